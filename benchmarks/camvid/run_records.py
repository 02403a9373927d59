"""The finished runs of a ``kdjax compare`` workdir, kept in the repository so that a comparison
of many hours survives its workdir and its machine: a clean checkout reports the finished runs
without training them and trains only the others.

    python benchmarks/camvid/run_records.py save WORKDIR [--records DIR]
    python benchmarks/camvid/run_records.py restore WORKDIR [--records DIR]
    python benchmarks/camvid/run_records.py progress [WORKDIR] [--records DIR] [--curves PNG]

A finished run is a folder of WORKDIR (at any depth) with ``result.json``. Its record is that
file, ``cost.json`` (the measured step cost a matched budget is computed from) and
``metrics.jsonl`` (the training log and the validation curve), at the same relative path under
DIR (default: ``benchmarks/camvid/records``), a few kilobytes per run. No weights are kept: the
students' models are not needed by the tables, and the teacher's are over the repository's
file-size limit.

``save`` copies the records of every finished run of WORKDIR into DIR, replacing older copies.
``restore`` copies into WORKDIR every record of a run not finished there, except the teacher's
when its model (``teacher/model``) is not in WORKDIR: every student loads that model, so
``kdjax compare`` trains the teacher again (the same recipe and seed) and reports the restored
students from their records. A teacher trained again on another CPU can differ from the recorded
one (other instruction sets sum in other orders); ``save`` then says so before replacing its
record, since the restored students were distilled from the recorded teacher. Unfinished runs
stay where they are: they resume from their checkpoints on the same machine, and from the start
elsewhere. ``progress`` prints the finished runs of WORKDIR (default: the records) as a Markdown
table, for a comparison that is still under way: each run's final mIoU, validation curve, spread
over its last fifth and step time, and each method's seed mean; with ``--curves`` it also draws
the validation curves of the runs directly under WORKDIR (the teacher and ``METHOD/seed_N``) as
``kdjax compare`` draws them at the end, so the plateaus can be seen before. kdjax names a run's
files (its model, the students' teacher) by absolute paths, which its recipe check compares:
restore into a checkout at the same place on every machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from kdjax.commands.compare import validation_curves
from kdjax.evaluation.curves import plot_curves
from kdjax.training.metrics_log import METRICS_FILE, read_records

RESULT = "result.json"
RECORD_FILES = (RESULT, "cost.json", METRICS_FILE)
TEACHER_RUN = Path("teacher")
TEACHER_MODEL = TEACHER_RUN / "model"
DEFAULT_RECORDS = Path(__file__).resolve().parent / "records"


def finished_runs(root: Path) -> list[Path]:
    """The folders under ``root`` that hold a finished run, relative to it, in path order."""
    return sorted(path.parent.relative_to(root) for path in root.rglob(RESULT))


def _copy_run(source: Path, target: Path, run: Path) -> None:
    (target / run).mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (source / run / name).is_file():
            shutil.copy2(source / run / name, target / run / name)


def _scores(result: Path) -> dict:
    """What a run's evaluation measured (its path to the model aside)."""
    row = json.loads(result.read_text())["row"]
    return {key: row[key] for key in ("miou", "per_class_iou")}


def save(workdir: Path, records: Path) -> list[Path]:
    """Copies the record of every finished run of ``workdir`` into ``records``."""
    runs = finished_runs(workdir)
    recorded = records / TEACHER_RUN / RESULT
    if TEACHER_RUN in runs and recorded.is_file():
        new, old = _scores(workdir / TEACHER_RUN / RESULT), _scores(recorded)
        if new != old:
            print(f"run_records: the teacher of {workdir} (mIoU {new['miou']:.4f}) is not the "
                  f"recorded one (mIoU {old['miou']:.4f}), which the recorded students were "
                  f"distilled from; its record is replaced. For one teacher throughout, train "
                  f"every student again (make camvid CAMVID_REUSE=0).", file=sys.stderr)
    for run in runs:
        _copy_run(workdir, records, run)
    return runs


def restore(workdir: Path, records: Path) -> list[Path]:
    """Copies into ``workdir`` the record of every run of ``records`` not finished there; the
    teacher's only with its model there (otherwise it is trained again)."""
    runs = [run for run in finished_runs(records) if not (workdir / run / RESULT).exists()]
    if TEACHER_RUN in runs and not (workdir / TEACHER_MODEL).is_dir():
        runs.remove(TEACHER_RUN)
        print(f"run_records: the teacher's weights are not in {workdir / TEACHER_MODEL}: "
              f"kdjax compare trains it again before the students that are not recorded")
    for run in runs:
        _copy_run(records, workdir, run)
    return runs


def progress(root: Path) -> str:
    """The finished runs under ``root`` (a workdir or the records) as a Markdown table: one row
    per run, then one per method with two or more seeds (the mean and the sample standard
    deviation of their final mIoU). The "last fifth" column is the spread of the validation mIoU
    over the last fifth of the run's steps, which says whether it ended on a plateau."""
    rows = ["| run | steps | mIoU | validation mIoU | last fifth | step (s) |",
            "|---|---:|---:|---|---|---:|"]
    by_method: dict[Path, list[float]] = {}
    for run in finished_runs(root):
        row = json.loads((root / run / RESULT).read_text())["row"]
        curve = [(entry["step"], entry["miou"]) for entry in read_records(root / run, "val")]
        tail = [miou for step, miou in curve if step >= 0.8 * curve[-1][0]]
        spread = f"{min(tail):.1f}–{max(tail):.1f}" if tail else ""
        step = f"{row['step_seconds']:.3f}" if row.get("step_seconds") else ""
        rows.append(f"| {run} | {row.get('steps', '')} | {row['miou']:.2f} | "
                    f"{', '.join(f'{miou:.1f}' for _, miou in curve)} | {spread} | {step} |")
        if run.name.startswith("seed_"):
            by_method.setdefault(run.parent, []).append(row["miou"])
    for method, mious in sorted(by_method.items()):
        if len(mious) > 1:
            rows.append(f"| {method}, {len(mious)} seeds | | {statistics.mean(mious):.2f} ± "
                        f"{statistics.stdev(mious):.2f} | | | |")
    return "\n".join(rows)


def progress_curves(root: Path, path: Path) -> Path:
    """Draws the validation curves of the finished runs directly under ``root`` to the PNG
    ``path`` (see :func:`kdjax.evaluation.curves.plot_curves`); a matched budget's runs, in a
    folder of their own, are drawn from that folder."""
    finished = finished_runs(root)
    runs = {(run.parent.name, int(run.name.removeprefix("seed_"))): root / run
            for run in finished if len(run.parts) == 2 and run.name.startswith("seed_")}
    return plot_curves(path, validation_curves(root, runs, TEACHER_RUN in finished))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("save", "restore", "progress"))
    parser.add_argument("workdir", type=Path, nargs="?")
    parser.add_argument("--records", type=Path, default=DEFAULT_RECORDS)
    parser.add_argument("--curves", type=Path, help="progress: also draw the curves to this PNG")
    args = parser.parse_args(argv)
    if args.action == "progress":
        print(progress(args.workdir or args.records))
        if args.curves:
            path = progress_curves(args.workdir or args.records, args.curves)
            print(f"run_records: curves in {path}")
        return 0
    if args.workdir is None:
        parser.error(f"{args.action} needs the workdir of a kdjax compare run")
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
