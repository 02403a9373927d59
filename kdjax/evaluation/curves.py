"""Validation curves of a comparison: mIoU against the training step, one panel per method.

A comparison of ten methods drawn on one axes is a tangle of lines whose bands hide each other, so
each method gets a panel of its own, drawn over the student alone (its seed mean and band, grey)
and under the teacher's final mIoU (a dashed line). A first panel shows the teacher's own curve,
whose plateau every student is measured against, beside the student alone's. ``kdjax compare``
writes it as ``curves.png``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kdjax.evaluation.report import STUDENT_ALONE, TEACHER, save_png

Curve = Sequence[tuple[int, float]]

COLUMNS = 4
PANEL_SIZE = (3.2, 2.5)  # inches
REFERENCE = {TEACHER: "black", STUDENT_ALONE: "tab:gray"}
# tab10 without its grey, which is the student alone's.
PALETTE = tuple(colour for colour in matplotlib.colormaps["tab10"].colors
                if matplotlib.colors.to_hex(colour) != matplotlib.colors.to_hex("tab:gray"))


def mean_curve(seeds: Sequence[Curve]) -> tuple[list[int], np.ndarray]:
    """The steps every seed evaluated and the (seeds, steps) mIoU there.

    Under a matched budget a method's seeds train different numbers of steps, so their last
    evaluations, the reported results, fall on different steps; they are kept as one final point at
    the seeds' mean last step, so that the curve ends where the table does."""
    curves = [dict(curve) for curve in seeds]
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    values = [[curve[step] for step in steps] for curve in curves]
    lasts = [max(curve) for curve in curves]
    if len(set(lasts)) > 1:
        steps.append(round(sum(lasts) / len(lasts)))
        for row, curve, last in zip(values, curves, lasts):
            row.append(curve[last])
    return steps, np.array(values)


def _draw(axes, seeds: Sequence[Curve], colour, label: str, style: str = "-") -> None:
    """A method's seed mean, with a band from its lowest to its highest seed."""
    steps, values = mean_curve(seeds)
    axes.plot(steps, values.mean(axis=0), style, color=colour, marker=".", markersize=4,
              label=f"{label} ({len(seeds)})")
    if len(seeds) > 1:
        axes.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colour,
                          alpha=0.2, linewidth=0)


def plot_curves(path, curves: Mapping[str, Sequence[Curve]]) -> epath.Path:
    """Validation mIoU (%) against the training step, saved as a PNG; returns the path.

    Args:
      path: the PNG to write.
      curves: method → one curve per seed, each a sequence of (step, mIoU); ``TEACHER`` and
        ``STUDENT_ALONE`` are the references. Each line is the mean over the method's seeds at the
        steps every seed evaluated (and at their last evaluations: see :func:`mean_curve`), with a
        band from the lowest to the highest seed. Runs without an evaluation yet are left out.
    """
    curves = {method: [curve for curve in seeds if curve] for method, seeds in curves.items()}
    curves = {method: seeds for method, seeds in curves.items() if seeds}
    methods = [method for method in curves if method not in REFERENCE]
    references = [method for method in REFERENCE if method in curves]
    rows = math.ceil((1 + len(methods)) / COLUMNS)
    columns = min(COLUMNS, 1 + len(methods))
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    for axes in panels[1 + len(methods):]:
        axes.set_visible(False)

    first = panels[0]
    for method in references:
        _draw(first, curves[method], REFERENCE[method], method,
              "--" if method == TEACHER else "-")
    first.set_title(" and ".join(references) or "no references", fontsize=9)

    teacher_final = (np.mean([curve[-1][1] for curve in curves[TEACHER]])
                     if TEACHER in curves else None)
    for index, (axes, method) in enumerate(zip(panels[1:], methods)):
        if index:  # the students share their steps; the teacher's first panel has its own
            axes.sharex(panels[1])
        if STUDENT_ALONE in curves:
            _draw(axes, curves[STUDENT_ALONE], REFERENCE[STUDENT_ALONE], STUDENT_ALONE)
        if teacher_final is not None:
            axes.axhline(teacher_final, color=REFERENCE[TEACHER], linestyle="--", linewidth=1,
                         label=f"{TEACHER}, final")
        _draw(axes, curves[method], PALETTE[index % len(PALETTE)], method)
        axes.set_title(f"{method} ({len(curves[method])})", fontsize=9)
        if index == 0:  # the references are the same in every panel: named once
            axes.legend(fontsize=7, loc="lower right")

    for axes in panels[:1 + len(methods)]:
        axes.grid(alpha=0.3)
        axes.tick_params(labelsize=8)
        axes.set_xlabel("step", fontsize=8)
    for axes in panels[::columns]:
        axes.set_ylabel("validation mIoU (%)", fontsize=8)
    if references:
        first.legend(fontsize=7, loc="lower right")
    figure.suptitle("Validation mIoU: mean over seeds (in brackets), band from the lowest to the "
                    "highest seed", fontsize=10)
    figure.tight_layout()
    return save_png(figure, path)
