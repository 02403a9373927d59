"""The finished runs of a ``kdjax compare`` workdir, kept beside it in the checkout so that a
comparison of many hours survives its workdir and its tables can be reported again without
training. The default folder is ignored by git (``runs/`` in .gitignore): the teacher's weights
are over the repository's file-size limit, so the records travel to another machine by copying
the folder, not by a commit.

    python benchmarks/camvid/run_records.py save WORKDIR [--records DIR]
    python benchmarks/camvid/run_records.py restore WORKDIR [--records DIR]

A finished run is a folder of WORKDIR (at any depth) with ``result.json``. Its record is that
file, ``cost.json`` (the measured step cost a matched budget is computed from) and
``metrics.jsonl`` (the training log and the validation curve), at the same relative path under
DIR (default: ``benchmarks/camvid/runs``). The teacher's exported model (``teacher/model``) is
kept too, since every student run and every later table loads it; the students' checkpoints and
models are not (each is a few megabytes and nothing downstream of the tables needs them).

``save`` copies the records of every finished run of WORKDIR into DIR, replacing older copies.
``restore`` copies every record of DIR into WORKDIR where that run is not finished there, so
``kdjax compare`` (``make camvid``) reports those runs from their records and trains only the
others. Unfinished runs stay where they are: they resume from their checkpoints on the same
machine, and from the start elsewhere. kdjax names a run's files (its model, the students'
teacher) by absolute paths, which its recipe check compares: restore into a checkout at the same
place, e.g. /work/kdjax on every machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

RESULT = "result.json"
RECORD_FILES = (RESULT, "cost.json", "metrics.jsonl")
KEPT_MODELS = ("teacher/model",)
DEFAULT_RECORDS = Path(__file__).resolve().parent / "runs"


def finished_runs(root: Path) -> list[Path]:
    """The folders under ``root`` that hold a finished run, relative to it, in path order."""
    return sorted(path.parent.relative_to(root) for path in root.rglob(RESULT))


def _copy_run(source: Path, target: Path, run: Path) -> None:
    (target / run).mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (source / run / name).is_file():
            shutil.copy2(source / run / name, target / run / name)
    for model in KEPT_MODELS:
        model = Path(model)
        if model.parent == run and (source / model).is_dir():
            shutil.rmtree(target / model, ignore_errors=True)
            shutil.copytree(source / model, target / model)


def save(workdir: Path, records: Path) -> list[Path]:
    """Copies the record of every finished run of ``workdir`` into ``records``."""
    runs = finished_runs(workdir)
    for run in runs:
        _copy_run(workdir, records, run)
    return runs


def restore(workdir: Path, records: Path) -> list[Path]:
    """Copies into ``workdir`` the record of every run of ``records`` not finished there."""
    runs = [run for run in finished_runs(records) if not (workdir / run / RESULT).exists()]
    for run in runs:
        _copy_run(records, workdir, run)
    return runs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--records", type=Path, default=DEFAULT_RECORDS)
    args = parser.parse_args(argv)
    if args.action == "save":
        runs = save(args.workdir, args.records)
        print(f"run_records: {len(runs)} finished run(s) of {args.workdir} kept in {args.records}")
    else:
        runs = restore(args.workdir, args.records)
        print(f"run_records: {len(runs)} finished run(s) restored from {args.records} into "
              f"{args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
