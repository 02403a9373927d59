"""Colour-coded label maps and the PNG overlay row, decoded back and checked panel by panel."""

import numpy as np
import pytest
from PIL import Image

from kdjax.evaluation import colorize, write_overlays
from kdjax.evaluation.overlays import PANEL_GAP, TITLE_HEIGHT

PALETTE = np.array([[128, 64, 128], [220, 20, 60], [0, 0, 142]], np.uint8)


def test_colorize_maps_classes_and_blackens_ignore_and_unknown():
    label = np.array([[0, 1, 2], [255, -1, 3]])
    got = colorize(label, PALETTE, ignore_label=255)
    assert got.dtype == np.uint8 and got.shape == (2, 3, 3)
    np.testing.assert_array_equal(got[0], PALETTE)
    np.testing.assert_array_equal(got[1], np.zeros((3, 3), np.uint8))


def test_overlay_png_has_one_titled_panel_per_map(tmp_path):
    h, w = 9, 11
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 3, (h, w))
    label[0] = 255
    teacher = rng.integers(0, 3, (h, w))
    student = rng.integers(0, 3, (h, w))
    path = write_overlays(tmp_path / "overlays" / "0001.png", image, label,
                          {"teacher": teacher, "student": student}, PALETTE)
    decoded = np.asarray(Image.open(path))
    assert decoded.shape == (TITLE_HEIGHT + h, 4 * w + 3 * PANEL_GAP, 3)

    def panel(i):
        left = i * (w + PANEL_GAP)
        return decoded[TITLE_HEIGHT:, left:left + w]

    np.testing.assert_array_equal(panel(0), image)
    np.testing.assert_array_equal(panel(1)[1:], PALETTE[label[1:]])
    np.testing.assert_array_equal(panel(1)[0], 0)  # the ignore row is black
    np.testing.assert_array_equal(panel(2), PALETTE[teacher])
    np.testing.assert_array_equal(panel(3), PALETTE[student])
    # Titles are drawn: the strip above the panels is not blank.
    assert (decoded[:TITLE_HEIGHT] < 255).any()


def test_prediction_only_overlay_holds_no_input_pixels(tmp_path):
    h, w = 6, 7
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    teacher, student = rng.integers(0, 3, (2, h, w))
    path = write_overlays(tmp_path / "p.png", image, rng.integers(0, 3, (h, w)),
                          {"teacher": teacher, "student": student}, PALETTE, show_inputs=False)
    decoded = np.asarray(Image.open(path))
    assert decoded.shape == (TITLE_HEIGHT + h, 2 * w + PANEL_GAP, 3)
    np.testing.assert_array_equal(decoded[TITLE_HEIGHT:, :w], PALETTE[teacher])
    np.testing.assert_array_equal(decoded[TITLE_HEIGHT:, w + PANEL_GAP:], PALETTE[student])


def test_overlay_rejects_a_prediction_of_another_size(tmp_path):
    image = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="student must be 4x5"):
        write_overlays(tmp_path / "x.png", image, np.zeros((4, 5), int),
                       {"student": np.zeros((6, 5), int)}, PALETTE)
