"""results.json / results.md / results.png and the per-class table, with hand-computed numbers."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from kdjax.evaluation import EvalMode, segmentation_metrics
from kdjax.evaluation.report import (STUDENT_ALONE, TEACHER, ResultRow, load_results,
                                     metrics_table, results_markdown, write_results)

CLASSES = ["road", "car"]
WHOLE = "whole, scale 1.0"


def _row(method, seed, miou, road, car=None, eval_mode=WHOLE, checkpoint="best"):
    return ResultRow(method=method, seed=seed, miou=miou, per_class_iou={"road": road, "car": car},
                     eval_mode=eval_mode, checkpoint=checkpoint,
                     checkpoint_path=f"/runs/{method}/{seed}")


def _rows():
    # Listed out of order: the table must still start with teacher, then student alone.
    return [
        _row("cwd", 0, 73.0, 80.0), _row("cwd", 1, 74.0, 82.0), _row("cwd", 2, 74.5, None),
        _row(STUDENT_ALONE, 0, 70.0, 79.0, 10.0), _row(STUDENT_ALONE, 1, 71.0, 79.5, 11.0),
        _row(STUDENT_ALONE, 2, 72.5, 80.0, 12.0),
        _row(TEACHER, 0, 78.0, 90.0, 50.0),
    ]


def test_results_files(tmp_path):
    markdown = write_results(tmp_path, _rows(), CLASSES)
    assert (tmp_path / "results.md").read_text() == markdown

    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 7
    assert set(rows[0]) == {"method", "seed", "miou", "per_class_iou", "eval_mode", "checkpoint",
                            "checkpoint_path", "steps", "step_seconds", "step_flops"}
    assert rows[2]["per_class_iou"] == {"road": None, "car": None}
    assert load_results(tmp_path) == _rows()

    # student alone: mean 71.1667, sample std 1.2583; cwd: mean 73.8333, std 0.7638;
    # Δ = 78 − 71.1667 = +6.83 and 73.8333 − 71.1667 = +2.67; per-class means skip missing values.
    # 'better': pooled variance (2·1.5833 + 2·0.5833)/4 = 1.0833, SE = √(1.0833·2/3) = 0.850, and
    # 2.67 > 2·0.850; the single-seed teacher: (0 + 2·1.5833)/2, SE = √(1.5833·4/3) = 1.453.
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0] == ("| method | seeds | mIoU | Δ vs student alone | better | step (ms) | steps "
                        "| cost (s) | TFLOP | road | car |")
    assert table[1:] == [
        "| teacher | 1 | 78.00 | +6.83 | yes | — | — | — | — | 90.00 | 50.00 |",
        "| student alone | 3 | 71.17 ± 1.26 | — | — | — | — | — | — | 79.50 | 11.00 |",
        "| cwd | 3 | 73.83 ± 0.76 | +2.67 | yes | — | — | — | — | 81.00 | — |",
    ]
    assert np.isclose(np.std([70.0, 71.0, 72.5], ddof=1), 1.2583, atol=1e-4)
    assert "Evaluation: whole, scale 1.0." in markdown
    assert "Checkpoint: best (highest validation mIoU)." in markdown

    with Image.open(tmp_path / "results.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 100


def test_mixed_protocols_are_spelled_out_per_method(tmp_path):
    rows = [_row(TEACHER, 0, 78.0, 90.0, checkpoint="last"),
            _row(STUDENT_ALONE, 0, 70.0, 80.0, eval_mode="whole, scales 0.5/1.0, flip"),
            _row("dist", 0, 72.0, 81.0)]
    markdown = write_results(tmp_path, rows, CLASSES)
    assert ("Evaluation: whole, scale 1.0 for teacher, dist; "
            "whole, scales 0.5/1.0, flip for student alone.") in markdown
    assert ("Checkpoint: last (final step) for teacher; "
            "best (highest validation mIoU) for student alone, dist.") in markdown


def test_without_a_student_alone_row_delta_is_a_dash(tmp_path):
    markdown = write_results(tmp_path, [_row("cwd", 0, 73.0, 80.0)], CLASSES)
    assert "| cwd | 1 | 73.00 | — | — | — | — | — | — | 80.00 | — |" in markdown


def test_better_says_no_or_unclear_within_twice_the_standard_error(tmp_path):
    # Student alone 70, 71, 72 (std 1): SE of a 3-seed difference with pooled std s is s·√(2/3).
    alone = [_row(STUDENT_ALONE, k, 70.0 + k, 80.0) for k in range(3)]
    slightly = [_row("kd", k, 70.5 + k, 80.0) for k in range(3)]     # Δ +0.5, SE 0.816
    worse = [_row("at", k, 66.0 + k, 80.0) for k in range(3)]        # Δ −4, SE 0.816
    single = [_row("dist", 0, 71.5, 80.0), _row("nfd", 0, 74.0, 80.0)]  # SE √(1·4/3) = 1.155
    markdown = write_results(tmp_path, alone + slightly + worse + single, CLASSES)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[4]
            for line in markdown.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows == {"method": "better", "student alone": "—", "kd": "unclear", "at": "no",
                    "dist": "unclear", "nfd": "yes"}


def test_bad_rows_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="seed 1 twice"):
        write_results(tmp_path, [_row("cwd", 1, 73.0, 80.0), _row("cwd", 1, 74.0, 80.0)],
                      CLASSES)
    with pytest.raises(ValueError, match="checkpoint"):
        _row("cwd", 0, 73.0, 80.0, checkpoint="final")
    with pytest.raises(ValueError, match="empty"):
        write_results(tmp_path, [], CLASSES)


def test_row_and_table_from_metrics():
    # road: TP 3, union 4 → 75 %; car: TP 1, union 2 → 50 %; pixel accuracy 4/5.
    metrics = segmentation_metrics(np.array([[3, 1], [0, 1]]))
    mode = EvalMode("slide", crop_size=(4, 4), stride=(2, 2), flip=True)
    row = ResultRow.from_metrics("cwd", 3, metrics, CLASSES, eval_mode=mode, checkpoint="last")
    assert row == ResultRow(method="cwd", seed=3, miou=62.5,
                            per_class_iou={"road": 75.0, "car": 50.0},
                            eval_mode="slide 4x4 stride 2x2, scale 1.0, flip", checkpoint="last")
    table = metrics_table(metrics.to_dict(CLASSES), eval_mode=mode, checkpoint="last")
    assert table.splitlines()[0] == ("Evaluation: slide 4x4 stride 2x2, scale 1.0, flip. "
                                     "Checkpoint: last (final step). Values in %.")
    assert "| road | 75.00 |" in table and "| **mIoU** | 62.50 |" in table
    assert "| pixel accuracy | 80.00 |" in table


def test_costs_are_means_over_seeds_and_a_matched_budget_ranks_the_students(tmp_path):
    def costed(method, seed, miou, steps, seconds):
        return dataclasses.replace(_row(method, seed, miou, 80.0), steps=steps,
                                   step_seconds=seconds, step_flops=2e9)
    rows = [costed(STUDENT_ALONE, 0, 70.0, 100, 0.5), costed(STUDENT_ALONE, 1, 72.0, 100, 0.7),
            costed("cwd", 0, 71.0, 50, 1.2), costed("cwd", 1, 71.5, 48, 1.25)]
    markdown = results_markdown(rows, CLASSES, budget="seconds budget: 60s per run",
                                matched=True)
    lines = markdown.splitlines()
    assert "| student alone | 2 | 71.00 ± 1.41 | — | — | 600.0 | 100 | 60.0 | 0.2 |" in markdown
    assert "| cwd | 2 | 71.25 ± 0.35 | +0.25 | unclear | 1225.0 | 49 | 60.0 | 0.098 |" in markdown
    assert "Budget: seconds budget: 60s per run." in lines
    ranking = lines[lines.index("## Ranking under the matched budget (seconds budget: 60s per run)"):]
    ranked = [line.split(" | ")[1] for line in ranking if line.startswith("| 1 ") or
              line.startswith("| 2 ")]
    assert ranked == ["cwd", STUDENT_ALONE]
    assert "## Ranking" not in results_markdown(rows, CLASSES, budget="equal steps")
