"""kdjax.evaluation.curves: the validation curves of a comparison."""

import numpy as np
from PIL import Image

from kdjax.evaluation.curves import COLUMNS, PALETTE, PANEL_SIZE, mean_curve, plot_curves
from kdjax.evaluation.report import STUDENT_ALONE, TEACHER


def test_a_curve_is_the_seeds_mean_where_every_seed_evaluated():
    steps, values = mean_curve([[(100, 10.0), (200, 20.0), (300, 25.0)],
                                [(200, 30.0), (300, 35.0)]])
    assert steps == [200, 300]
    np.testing.assert_array_equal(values, [[20.0, 25.0], [30.0, 35.0]])


def test_seeds_that_end_on_different_steps_end_in_one_point():
    # Under a matched budget each seed trains the steps its measured time affords; their last
    # evaluations are the reported results, so the line ends there, at the mean last step.
    steps, values = mean_curve([[(250, 20.0), (500, 30.0), (610, 33.0)],
                                [(250, 22.0), (500, 31.0), (640, 36.0)],
                                [(250, 24.0), (500, 32.0), (600, 34.0)]])
    assert steps == [250, 500, 617]
    np.testing.assert_array_equal(values[:, -1], [33.0, 36.0, 34.0])


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _has_colour(pixels, colour):
    target = np.round(np.asarray(colour) * 255).astype(int)
    return bool((np.abs(pixels.astype(int) - target).sum(axis=-1) < 6).any())


def test_every_method_gets_a_panel_over_the_references(tmp_path):
    alone = [[(100, 10.0), (200, 20.0)], [(100, 12.0), (200, 22.0)]]
    methods = {f"method_{k}": [[(100, 11.0 + k), (200, 21.0 + k)]] for k in range(5)}
    path = plot_curves(tmp_path / "curves.png", {
        TEACHER: [[(100, 40.0), (200, 50.0), (400, 55.0)]], STUDENT_ALONE: alone, **methods,
        "not evaluated yet": [[]]})
    # 1 reference panel + 5 methods (the run without evaluations draws nothing) = 2 rows of 4.
    width, height = Image.open(path).size
    assert (width, height) == (100 * PANEL_SIZE[0] * COLUMNS, 100 * PANEL_SIZE[1] * 2)
    pixels = _pixels(path)
    for colour in PALETTE[:5]:  # each method in its own colour, none of them the student's grey
        assert _has_colour(pixels, colour)
    assert not _has_colour(pixels, PALETTE[5])


def test_without_methods_or_a_teacher_one_panel_remains(tmp_path):
    path = plot_curves(tmp_path / "curves.png", {STUDENT_ALONE: [[(100, 10.0), (200, 20.0)]]})
    assert Image.open(path).size == (100 * PANEL_SIZE[0], 100 * PANEL_SIZE[1])
