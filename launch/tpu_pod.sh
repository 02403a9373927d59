#!/usr/bin/env bash
# Runs one kdjax command on every worker of a Cloud TPU VM slice, through `gcloud ... ssh --worker=all`.
set -euo pipefail

usage() {
  cat >&2 <<'TEXT'
usage: launch/tpu_pod.sh [--dry-run] [--tpu=NAME] [--zone=ZONE] [--project=PROJECT]
                         [--repo-dir=DIR] COMMAND --config=FILE --workdir=DIR [--config.KEY=VALUE ...]

Runs `cd DIR && .venv/bin/python -m kdjax COMMAND ...` on all workers of the TPU VM slice NAME;
everything from COMMAND on is passed unchanged. Each worker needs the repository at DIR with its
.venv installed (`make install`); JAX finds the other workers by itself.

  --tpu=NAME         the TPU VM (default: $TPU_NAME)
  --zone=ZONE        its zone (default: $TPU_ZONE)
  --project=PROJECT  its Cloud project (default: $TPU_PROJECT, else gcloud's configured project)
  --repo-dir=DIR     the repository on the workers (default: this repository's path, relative to
                     the home directory when it lies inside it)
  --dry-run          print the gcloud command instead of running it

Use a workdir on a file system every worker mounts (NFS, or a bucket through gcsfuse).
TEXT
  exit 2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=common.sh
source "$repo/launch/common.sh"

dry_run=false
tpu="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
# ssh starts in the home directory, so a path inside it is given relative to it.
repo_dir="${repo#"$HOME"/}"
while (($#)); do
  case "$1" in
    --dry-run) dry_run=true ;;
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo-dir=*) repo_dir="${1#*=}" ;;
    -h | --help) usage ;;
    -*)
      echo "tpu_pod.sh: unknown option $1 (kdjax's own options go after COMMAND)" >&2
      usage
      ;;
    *) break ;;
  esac
  shift
done
(($#)) || usage
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "tpu_pod.sh: name the TPU VM and its zone with --tpu=NAME --zone=ZONE (or TPU_NAME, TPU_ZONE)" >&2
  exit 2
fi

remote="cd $(quote_words "$repo_dir") && .venv/bin/python -m kdjax $(quote_words "$@")"
command=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
if [[ -n "$project" ]]; then command+=("--project=$project"); fi
command+=(--worker=all "--command=$remote")
run_or_print "$dry_run" "${command[@]}"
