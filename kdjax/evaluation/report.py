"""Result reporting: per-run rows, the comparison table (Markdown + JSON) and its bar plot (the
validation curves are ``kdjax.evaluation.curves``).

Units: mIoU and IoU are in percent everywhere in reports (results.json, results.md, plots), as
papers report them; ``SegmentationMetrics`` holds fractions and ``ResultRow.from_metrics``
converts. A class absent from both ground truth and prediction has IoU None (null in JSON).

Every row carries its eval mode (``EvalMode.describe()``) and checkpoint rule ('best' = the
checkpoint with the highest validation mIoU, 'last' = the final step), and the table states them
above the numbers. The rows named ``TEACHER`` and ``STUDENT_ALONE`` (the student trained without
distillation) come first, and Δ is measured against the student alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kdjax.evaluation.inference import EvalMode
from kdjax.evaluation.metrics import SegmentationMetrics, to_percent
from kdjax.io.paths import as_path

TEACHER = "teacher"
STUDENT_ALONE = "student alone"
CHECKPOINT_RULES = {"best": "highest validation mIoU", "last": "final step"}
DASH = "—"


@dataclasses.dataclass(frozen=True)
class ResultRow:
    """One evaluated model: a method and a seed.

    Attributes:
      method: e.g. ``'cwd'``, or ``TEACHER`` / ``STUDENT_ALONE``.
      seed: training seed.
      miou: mIoU in percent.
      per_class_iou: class name → IoU in percent, None for a class absent from the eval set.
      eval_mode: ``EvalMode.describe()`` of the evaluation, e.g. ``'whole, scale 1.0'``.
      checkpoint: ``'best'`` or ``'last'`` (see ``CHECKPOINT_RULES``).
      checkpoint_path: where the evaluated weights are, if anywhere.
      steps: the steps the run trained (None where unknown, e.g. a given teacher).
      step_seconds: the measured seconds of one train step, after compilation
        (:mod:`kdjax.training.budget`).
      step_flops: one train step's FLOPs (kdjax.ops.cost.traced_flops).
    """

    method: str
    seed: int
    miou: float
    per_class_iou: dict[str, float | None]
    eval_mode: str
    checkpoint: str
    checkpoint_path: str | None = None
    steps: int | None = None
    step_seconds: float | None = None
    step_flops: float | None = None

    def __post_init__(self):
        if self.checkpoint not in CHECKPOINT_RULES:
            raise ValueError(f"checkpoint must be one of {tuple(CHECKPOINT_RULES)}; "
                             f"got {self.checkpoint!r}.")
        # NumPy scalars (np.int64 seeds, np.float32 IoUs) are not JSON-serialisable.
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "miou", float(self.miou))
        for name, kind in (("steps", int), ("step_seconds", float), ("step_flops", float)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "per_class_iou", {
            name: None if iou is None else float(iou) for name, iou in self.per_class_iou.items()})

    @classmethod
    def from_metrics(cls, method: str, seed: int, metrics: SegmentationMetrics,
                     class_names: Sequence[str], *, eval_mode: EvalMode, checkpoint: str,
                     checkpoint_path: str | None = None) -> ResultRow:
        """The row of one evaluation; fractions become percent."""
        return cls(method=method, seed=int(seed), miou=to_percent(metrics.miou),
                   per_class_iou=metrics.to_dict(class_names)["per_class_iou"],
                   eval_mode=eval_mode.describe(), checkpoint=checkpoint,
                   checkpoint_path=None if checkpoint_path is None else str(checkpoint_path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _MethodSummary:
    """Mean over seeds of one method; std is the sample std (ddof=1), None for a single seed."""

    method: str
    seeds: int
    mean: float
    std: float | None
    per_class_mean: dict[str, float | None]
    steps: float | None = None           # mean over seeds of the steps trained
    step_seconds: float | None = None    # mean over seeds of one step's seconds
    seconds: float | None = None         # mean over seeds of steps × step seconds
    tflops: float | None = None          # mean over seeds of steps × step FLOPs, in 10¹²


def _mean_of(values: list[float | None]) -> float | None:
    """The mean, or None when any value is unknown."""
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def _summarise(method: str, rows: list[ResultRow], class_names: Sequence[str]) -> _MethodSummary:
    mious = np.array([row.miou for row in rows], np.float64)
    per_class = {}
    for name in class_names:
        values = [row.per_class_iou.get(name) for row in rows]
        present = [v for v in values if v is not None]
        per_class[name] = float(np.mean(present)) if present else None
    known = [r for r in rows if r.steps is not None]
    return _MethodSummary(
        method=method, seeds=len(rows), mean=float(mious.mean()),
        std=float(mious.std(ddof=1)) if len(rows) > 1 else None, per_class_mean=per_class,
        steps=_mean_of([r.steps for r in rows]),
        step_seconds=_mean_of([r.step_seconds for r in rows]),
        seconds=_mean_of([r.steps * r.step_seconds if r in known and r.step_seconds is not None
                          else None for r in rows]),
        tflops=_mean_of([r.steps * r.step_flops / 1e12 if r in known and r.step_flops is not None
                         else None for r in rows]))


def _group_by_method(rows: Sequence[ResultRow]) -> dict[str, list[ResultRow]]:
    """Rows per method: teacher, student alone, then the others in order of first appearance."""
    seen = set()
    groups: dict[str, list[ResultRow]] = {}
    for name in (TEACHER, STUDENT_ALONE):
        if any(row.method == name for row in rows):
            groups[name] = []
    for row in rows:
        if (row.method, row.seed) in seen:
            raise ValueError(f"method {row.method!r} has seed {row.seed} twice; each (method, "
                             "seed) pair must be evaluated once.")
        seen.add((row.method, row.seed))
        groups.setdefault(row.method, []).append(row)
    return groups


def _protocol_line(label: str, groups: dict[str, list[ResultRow]], field: str) -> str:
    """'Label: value.' when all rows agree, else each value with the methods that used it."""
    users: dict[str, list[str]] = {}
    for method, rows in groups.items():
        for value in dict.fromkeys(getattr(row, field) for row in rows):
            if field == "checkpoint":
                value = f"{value} ({CHECKPOINT_RULES[value]})"
            users.setdefault(value, []).append(method)
    if len(users) == 1:
        return f"{label}: {next(iter(users))}."
    return f"{label}: " + "; ".join(f"{value} for {', '.join(methods)}"
                                    for value, methods in users.items()) + "."


def _verdict(method: _MethodSummary, baseline: _MethodSummary) -> str:
    """'yes' / 'no' when the mean mIoU differs from the baseline's by more than twice the standard
    error of the difference (pooled variance over both methods' seeds, as a two-sample t-test
    assumes), 'unclear' otherwise; a dash when neither has two seeds to estimate the variance."""
    dof = method.seeds + baseline.seeds - 2
    if dof == 0:
        return DASH
    pooled = ((method.seeds - 1) * (method.std or 0.0) ** 2
              + (baseline.seeds - 1) * (baseline.std or 0.0) ** 2) / dof
    standard_error = np.sqrt(pooled * (1 / method.seeds + 1 / baseline.seeds))
    delta = method.mean - baseline.mean
    if delta > 2 * standard_error:
        return "yes"
    return "no" if delta < -2 * standard_error else "unclear"


def _fmt(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def _cost_cells(s: _MethodSummary) -> list[str]:
    """step time (ms) | steps | cost (s) | TFLOP of one method, means over its seeds."""
    def fmt(value, spec):
        return DASH if value is None else format(value, spec)
    return [fmt(None if s.step_seconds is None else 1e3 * s.step_seconds, ".1f"),
            fmt(s.steps, ".0f"), fmt(s.seconds, ".1f"), fmt(s.tflops, ".3g")]


COST_COLUMNS = "| step (ms) | steps | cost (s) | TFLOP |"


def _ranking(summaries: list[_MethodSummary], baseline: _MethodSummary | None,
             budget: str) -> list[str]:
    """The students ranked by mean mIoU under the matched budget."""
    students = sorted((s for s in summaries if s.method != TEACHER), key=lambda s: -s.mean)
    lines = ["", f"## Ranking under the matched budget ({budget})", "",
             "Every student, the student alone included, trained until the budget was spent; its "
             "schedule was stretched or shrunk to the steps it could afford. 'Better' as above.",
             "", "| rank | method | mIoU | Δ vs student alone | better " + COST_COLUMNS,
             "|---:|---|---:|---:|:---:|---:|---:|---:|---:|"]
    for rank, s in enumerate(students, 1):
        compared = baseline is not None and s.method != STUDENT_ALONE
        spread = "" if s.std is None else f" ± {s.std:.2f}"
        cells = [str(rank), s.method, f"{s.mean:.2f}{spread}",
                 f"{s.mean - baseline.mean:+.2f}" if compared else DASH,
                 _verdict(s, baseline) if compared else DASH, *_cost_cells(s)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def results_markdown(rows: Sequence[ResultRow], class_names: Sequence[str], *,
                     budget: str | None = None, matched: bool = False,
                     step_note: str | None = None) -> str:
    """The comparison table: method | seeds | mIoU mean ± std | Δ vs student alone | better than
    the student alone (see ``_verdict``) | step time | steps | cost | TFLOP | per-class IoU.

    Above it: the eval mode and checkpoint rule of the rows, the budget, and the meaning of the
    numbers. ``budget`` describes the budget (``Budget.describe()``); under a ``matched`` one a
    second table ranks the students by mIoU. ``step_note``: how the budget measured the step
    times, added to the explanation.
    """
    if not rows:
        raise ValueError("rows is empty: there is nothing to report.")
    groups = _group_by_method(rows)
    summaries = [_summarise(method, group, class_names) for method, group in groups.items()]
    baseline = next((s for s in summaries if s.method == STUDENT_ALONE), None)
    lines = [
        "# Results",
        "",
        _protocol_line("Evaluation", groups, "eval_mode"),
        _protocol_line("Checkpoint", groups, "checkpoint"),
        "",
        "mIoU and per-class IoU in %, mean over seeds; ± is the sample standard deviation over "
        "seeds (ddof = 1), absent for a single seed. Δ is the difference of mean mIoU to the "
        f"{STUDENT_ALONE!r} row (the student trained without distillation). 'Better' is 'yes' "
        "or 'no' when |Δ| exceeds twice its standard error (the seeds' variance pooled over "
        "the method and the student alone), else 'unclear'. Step time is one train step's, "
        "measured after compilation (the teacher's forward pass and every term included, the "
        "input pipeline not); cost is steps × step time, and TFLOP steps × the FLOPs of a "
        "step's matrix products and convolutions; all are means over seeds."
        + (f" {step_note}" if step_note else ""),
        "",
        "| method | seeds | mIoU | Δ vs student alone | better "
        + COST_COLUMNS + " " + " | ".join(class_names) + " |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|---:|" + "---:|" * len(class_names),
    ]
    if budget is not None:
        lines.insert(4, f"Budget: {budget}.")
    for s in summaries:
        compared = baseline is not None and s.method != STUDENT_ALONE
        delta = f"{s.mean - baseline.mean:+.2f}" if compared else DASH
        better = _verdict(s, baseline) if compared else DASH
        spread = "" if s.std is None else f" ± {s.std:.2f}"
        cells = [s.method, str(s.seeds), f"{s.mean:.2f}{spread}", delta, better,
                 *_cost_cells(s), *(_fmt(s.per_class_mean[name]) for name in class_names)]
        lines.append("| " + " | ".join(cells) + " |")
    if matched:
        lines += _ranking(summaries, baseline, budget or "matched")
    return "\n".join(lines) + "\n"


def save_png(figure: Figure, path) -> epath.Path:
    """Writes ``figure`` to ``path`` (a local or ``gs://`` path) as a PNG; returns the path."""
    path = as_path(path)
    with path.open("wb") as file:
        figure.savefig(file, format="png")
    return path


def plot_results(path, rows: Sequence[ResultRow]) -> epath.Path:
    """Bar plot of mean mIoU ± sample std per method (teacher as a dashed line, the student alone
    as a dotted line across the bars) saved as a PNG; returns the path."""
    groups = _group_by_method(rows)
    summaries = [_summarise(method, group, ()) for method, group in groups.items()]
    teacher = next((s for s in summaries if s.method == TEACHER), None)
    bars = [s for s in summaries if s.method != TEACHER]
    figure = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(bars)), 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    means = [s.mean for s in bars]
    errors = [s.std or 0.0 for s in bars]
    colours = ["tab:gray" if s.method == STUDENT_ALONE else "tab:blue" for s in bars]
    axes.bar(range(len(bars)), means, yerr=errors, capsize=4, color=colours)
    axes.set_xticks(range(len(bars)), [s.method for s in bars], rotation=30, ha="right")
    levels = [m - e for m, e in zip(means, errors)] + [m + e for m, e in zip(means, errors)]
    if teacher is not None:
        axes.axhline(teacher.mean, color="black", linestyle="--",
                     label=f"{TEACHER} {teacher.mean:.2f}")
        levels.append(teacher.mean)
    for s in bars:
        if s.method == STUDENT_ALONE:
            axes.axhline(s.mean, color="tab:gray", linestyle=":",
                         label=f"{STUDENT_ALONE} {s.mean:.2f}")
    # Zoom in on the range of the results: differences between methods are a few points.
    if levels:
        low, high = min(levels), max(levels)
        margin = max(1.0, 0.2 * (high - low))
        axes.set_ylim(max(0.0, low - margin), min(100.0, high + margin))
    axes.set_ylabel("mIoU (%)")
    axes.set_title(_protocol_line("Evaluation", groups, "eval_mode") + "\n"
                   + _protocol_line("Checkpoint", groups, "checkpoint"), fontsize=8)
    if teacher is not None or any(s.method == STUDENT_ALONE for s in bars):
        axes.legend(fontsize=8)
    figure.tight_layout()
    return save_png(figure, path)


def write_results(workdir, rows: Sequence[ResultRow],
                  class_names: Sequence[str], *, budget: str | None = None,
                  matched: bool = False, step_note: str | None = None) -> str:
    """Writes WORKDIR/results.json (the rows), results.md (the table) and results.png (the plot).

    Returns:
      The Markdown of results.md.
    """
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    markdown = results_markdown(rows, class_names, budget=budget, matched=matched,
                                step_note=step_note)
    (workdir / "results.json").write_text(
        json.dumps([row.to_dict() for row in rows], indent=2, allow_nan=False) + "\n")
    (workdir / "results.md").write_text(markdown)
    plot_results(workdir / "results.png", rows)
    return markdown


def load_results(path) -> list[ResultRow]:
    """The rows of a results.json (or of WORKDIR/results.json when given the directory)."""
    path = as_path(path)
    if path.is_dir():
        path = path / "results.json"
    return [ResultRow(**row) for row in json.loads(path.read_text())]


def metrics_table(values: Mapping[str, Any], *, eval_mode: EvalMode, checkpoint: str) -> str:
    """Markdown per-class IoU table of one evaluation, headed by its eval mode and checkpoint.

    ``values``: ``SegmentationMetrics.to_dict``'s record (percent): ``per_class_iou``, ``miou``,
    ``pixel_accuracy``, ``mean_class_accuracy``.
    """
    if checkpoint not in CHECKPOINT_RULES:
        raise ValueError(f"checkpoint must be one of {tuple(CHECKPOINT_RULES)}; "
                         f"got {checkpoint!r}.")
    lines = [f"Evaluation: {eval_mode.describe()}. "
             f"Checkpoint: {checkpoint} ({CHECKPOINT_RULES[checkpoint]}). Values in %.",
             "", "| class | IoU |", "|---|---:|"]
    lines += [f"| {name} | {_fmt(iou)} |" for name, iou in values["per_class_iou"].items()]
    lines += [f"| **mIoU** | {_fmt(values['miou'])} |",
              f"| pixel accuracy | {_fmt(values['pixel_accuracy'])} |",
              f"| mean class accuracy | {_fmt(values['mean_class_accuracy'])} |"]
    return "\n".join(lines) + "\n"
