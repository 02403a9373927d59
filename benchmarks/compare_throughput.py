"""Training throughput of every run of a ``kdjax compare`` workdir, from its ``metrics.jsonl``.

    python benchmarks/compare_throughput.py runs/camvid

Prints a Markdown table: per method, the median over its seeds of each run's median training
images/s (the first logged window, which includes compilation, left out), its min–max over seeds,
and the cost relative to the student alone (student-alone images/s / method images/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

STUDENT_ALONE = "student_alone"


def run_rates(metrics_file: Path) -> list[float]:
    """images/s of each logged training window after the first."""
    rates = [record["images_per_second"] for record in map(json.loads, metrics_file.open())
             if record.get("split") == "train" and "images_per_second" in record]
    return rates[1:]


def method_rates(workdir: Path) -> dict[str, list[float]]:
    """method (or 'teacher') → per-seed median images/s."""
    rates: dict[str, list[float]] = {}
    for metrics_file in sorted(workdir.glob("*/seed_*/metrics.jsonl")) + sorted(
            workdir.glob("teacher/metrics.jsonl")):
        per_window = run_rates(metrics_file)
        if per_window:
            method = metrics_file.parts[-3] if metrics_file.parent.name.startswith("seed_") else \
                metrics_file.parent.name
            rates.setdefault(method, []).append(statistics.median(per_window))
    return rates


def table(rates: dict[str, list[float]]) -> str:
    baseline = statistics.median(rates[STUDENT_ALONE]) if STUDENT_ALONE in rates else None
    lines = ["| run | seeds | images/s (median over seeds) | min–max | step time vs student alone |",
             "|---|---:|---:|---:|---:|"]
    order = sorted(rates, key=lambda m: (m != "teacher", m != STUDENT_ALONE, m))
    for method in order:
        values = rates[method]
        median = statistics.median(values)
        relative = "—" if baseline is None or method == "teacher" else f"{baseline / median:.2f}×"
        lines.append(f"| {method} | {len(values)} | {median:.2f} | {min(values):.2f}–"
                     f"{max(values):.2f} | {relative} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="a kdjax compare workdir")
    args = parser.parse_args(argv)
    rates = method_rates(args.workdir)
    if not rates:
        raise SystemExit(f"{args.workdir} holds no metrics.jsonl with training throughput.")
    print(table(rates))


if __name__ == "__main__":
    main()
