#!/usr/bin/env bash
# Sets up every worker of a Cloud TPU VM slice (the repository and a .venv with JAX's TPU build), or
# runs one kdjax command on all of them, through `gcloud compute tpus tpu-vm`.
set -euo pipefail

usage() {
  cat >&2 <<'TEXT'
usage: launch/tpu_pod.sh setup [OPTIONS] [--repo-url=URL [--ref=REF]] [--python=PYTHON]
       launch/tpu_pod.sh [run] [OPTIONS] COMMAND --config=FILE --workdir=DIR [--config.KEY=VALUE ...]

setup puts the repository at DIR on every worker of the TPU VM slice NAME and runs
`make install ACCEL=tpu` there, which makes DIR/.venv with JAX's TPU build. The workers need make,
Python >= 3.11 with venv and, for --repo-url, git. Running it again updates the workers.

run (the default) runs `cd DIR && .venv/bin/python -m kdjax COMMAND ...` on all workers; everything
from COMMAND on is passed unchanged. JAX finds the other workers by itself.

OPTIONS:
  --tpu=NAME         the TPU VM (default: $TPU_NAME)
  --zone=ZONE        its zone (default: $TPU_ZONE)
  --project=PROJECT  its Cloud project (default: $TPU_PROJECT, else gcloud's configured project)
  --repo-dir=DIR     the repository on the workers (default: this repository's path, relative to
                     the home directory when it lies inside it)
  --dry-run          print the commands, one per line, instead of running them
setup only:
  --repo-url=URL     have every worker fetch the repository from URL (default: copy this
                     repository's last commit, git archive HEAD; uncommitted changes stay here)
  --ref=REF          the branch, tag or commit to fetch from URL (default: its default branch)
  --python=PYTHON    the interpreter `make install` makes .venv with (default: python3)

Use a workdir on a file system every worker mounts (NFS, or a bucket through gcsfuse).
TEXT
  exit 2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=common.sh
source "$repo/launch/common.sh"

action=run
dry_run=false
tpu="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
# ssh starts in the home directory, so a path inside it is given relative to it.
repo_dir="${repo#"$HOME"/}"
repo_url=""
ref=""
python=""
while (($#)); do
  case "$1" in
    setup | run) action="$1" ;;
    --dry-run) dry_run=true ;;
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo-dir=*) repo_dir="${1#*=}" ;;
    --repo-url=*) repo_url="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    -h | --help) usage ;;
    -*)
      echo "tpu_pod.sh: unknown option $1 (kdjax's own options go after COMMAND)" >&2
      usage
      ;;
    *) break ;;
  esac
  shift
done
# setup takes no command, run needs one and none of setup's options; --ref goes with --repo-url.
if [[ "$action" == setup ]]; then
  (($# == 0)) && [[ -z "$ref" || -n "$repo_url" ]] || usage
else
  (($#)) && [[ -z "$repo_url$ref$python" ]] || usage
fi
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "tpu_pod.sh: name the TPU VM and its zone with --tpu=NAME --zone=ZONE (or TPU_NAME, TPU_ZONE)" >&2
  exit 2
fi

flags=("--zone=$zone")
if [[ -n "$project" ]]; then flags+=("--project=$project"); fi
flags+=(--worker=all)
dir="$(quote "$repo_dir")"

# on_workers RUN SHELL_COMMAND: runs (or prints) SHELL_COMMAND on every worker, RUN being
# run_or_print or exec_or_print.
on_workers() {
  "$1" "$dry_run" gcloud compute tpus tpu-vm ssh "$tpu" "${flags[@]}" "--command=$2"
}

# copy_repository: puts the repository at DIR on every worker.
copy_repository() {
  if [[ -n "$repo_url" ]]; then
    # REF fetched into an initialised directory, so that a second setup updates it in place.
    local fetch
    fetch="git fetch -q --depth=1 $(quote_words "$repo_url" "${ref:-HEAD}")"
    on_workers run_or_print \
      "git init -q $dir && cd $dir && $fetch && git checkout -q --force FETCH_HEAD"
    return
  fi
  if [[ -n "$(git -C "$repo" status --porcelain)" ]]; then
    echo "tpu_pod.sh: copying HEAD; the uncommitted changes here are not copied" >&2
  fi
  archive_dir="$(mktemp -d)"
  trap 'rm -rf "$archive_dir"' EXIT
  local archive="$archive_dir/kdjax.tar.gz"
  run_or_print "$dry_run" git -C "$repo" archive --format=tar.gz "--output=$archive" HEAD
  run_or_print "$dry_run" gcloud compute tpus tpu-vm scp "$archive" "$tpu:kdjax.tar.gz" "${flags[@]}"
  on_workers run_or_print "mkdir -p $dir && tar -xzf kdjax.tar.gz -C $dir && rm kdjax.tar.gz"
}

if [[ "$action" == setup ]]; then
  copy_repository
  # The TPU build: a plain `make install` would give the workers JAX's CPU build.
  on_workers run_or_print "cd $dir && make install ACCEL=tpu${python:+ PYTHON=$(quote "$python")}"
else
  on_workers exec_or_print "cd $dir && .venv/bin/python -m kdjax $(quote_words "$@")"
fi
