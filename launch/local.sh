#!/usr/bin/env bash
# Runs one kdjax command on this machine with the repository's virtualenv (`make install` makes it).
set -euo pipefail

usage() {
  cat >&2 <<'TEXT'
usage: launch/local.sh [--dry-run] COMMAND --config=FILE --workdir=DIR [--config.KEY=VALUE ...]

Runs `python -m kdjax COMMAND ...` with the repository's .venv; everything from COMMAND on is
passed unchanged. --dry-run prints the command instead. KDJAX_PYTHON overrides the interpreter.
TEXT
  exit 2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=common.sh
source "$repo/launch/common.sh"

dry_run=false
while (($#)); do
  case "$1" in
    --dry-run) dry_run=true ;;
    -h | --help) usage ;;
    -*)
      echo "local.sh: unknown option $1 (kdjax's own options go after COMMAND)" >&2
      usage
      ;;
    *) break ;;
  esac
  shift
done
(($#)) || usage

# No cd: relative paths in the arguments stay relative to where the script was called from.
exec_or_print "$dry_run" "${KDJAX_PYTHON:-$repo/.venv/bin/python}" -m kdjax "$@"
