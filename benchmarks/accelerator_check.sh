#!/usr/bin/env bash
# benchmarks/accelerator_check.py on a GPU machine: its JSON and logs under $OUT (default
# /tmp/accelerator_check), its table on standard output, the whole run stopped after $LIMIT
# seconds (540) whatever happens; the JSON keeps every section finished by then.
#
#   [OUT=DIR] [WHEELS=DIR] [LIMIT=S] [PYTHON=python3] bash benchmarks/accelerator_check.sh [OPTIONS]
#
# WHEELS: a folder of wheels that the machine lacks (ml_collections for kdjax.config), installed
# first without an index or their dependencies into a temporary folder put on PYTHONPATH.
# OPTIONS go to the script (e.g. --budget 300, --tests tests/losses).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-${TMPDIR:-/tmp}/accelerator_check}"
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  site="$(mktemp -d)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout -k 10 "${LIMIT:-540}" "$PYTHON" benchmarks/accelerator_check.py \
  --json "$OUT/accelerator_check.json" "$@"
