"""Colour-coded label maps and one-row PNG overlays: image | ground truth | predictions."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from kdjax.io.paths import as_path

# Layout of an overlay row, in pixels: a title strip above the panels and a white gap between them.
TITLE_HEIGHT = 16
PANEL_GAP = 4


def colorize(label: np.ndarray, palette: np.ndarray, ignore_label: int = 255) -> np.ndarray:
    """Colours a class map with the dataset palette.

    Args:
      label: (H, W) integer class ids.
      palette: (K, 3) uint8 RGB, one colour per class.
      ignore_label: shown black, like any value outside [0, K).
    Returns:
      (H, W, 3) uint8 RGB.
    """
    label = np.asarray(label)
    palette = np.asarray(palette, np.uint8)
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W); got shape {label.shape}.")
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must be (K, 3) RGB; got shape {palette.shape}.")
    known = (label >= 0) & (label < len(palette)) & (label != ignore_label)
    colours = palette[np.where(known, label, 0)]
    colours[~known] = 0
    return colours


def overlay_row(image: np.ndarray, label: np.ndarray, predictions: Mapping[str, np.ndarray],
                palette: np.ndarray, ignore_label: int = 255, *,
                show_inputs: bool = True) -> np.ndarray:
    """Panels image | label | each prediction in order, side by side, each titled.

    Args:
      image: (H, W, 3) uint8 RGB (de-normalised, unpadded).
      label: (H, W) ground-truth class ids.
      predictions: name → (H, W) predicted class ids, e.g. ``{'teacher': t, 'student': s}``.
      palette: (K, 3) uint8 RGB.
      ignore_label: drawn black.
      show_inputs: draw the image and label panels; False keeps only the predictions, a row that
        holds none of the dataset's pixels (for publishing results on licensed data).
    Returns:
      (TITLE_HEIGHT + H, P·W + (P − 1)·PANEL_GAP, 3) uint8 with P = len(predictions), plus 2
      with ``show_inputs``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8; got shape {image.shape}, "
                         f"dtype {image.dtype}.")
    height, width = image.shape[:2]
    panels = {"image": image, "label": colorize(label, palette, ignore_label)} if show_inputs else {}
    for name, prediction in predictions.items():
        panels[name] = colorize(prediction, palette, ignore_label)
    for name, panel in panels.items():
        if panel.shape[:2] != (height, width):
            raise ValueError(f"{name} must be {height}x{width} like the image; got shape "
                             f"{panel.shape[:2]}. Crop padded predictions to the image first.")
    row = np.full((TITLE_HEIGHT + height, len(panels) * (width + PANEL_GAP) - PANEL_GAP, 3), 255,
                  np.uint8)
    canvas = Image.fromarray(row)
    draw = ImageDraw.Draw(canvas)
    for i, (name, panel) in enumerate(panels.items()):
        left = i * (width + PANEL_GAP)
        canvas.paste(Image.fromarray(panel), (left, TITLE_HEIGHT))
        draw.text((left + 2, 2), name, fill=(0, 0, 0))
    return np.asarray(canvas)


def write_overlays(path, image_uint8: np.ndarray, label: np.ndarray,
                   predictions: Mapping[str, np.ndarray], palette: np.ndarray,
                   ignore_label: int = 255, *, show_inputs: bool = True) -> epath.Path:
    """Writes ``overlay_row(...)`` as a PNG (creating parent directories); returns the path."""
    path = as_path(path)
    row = overlay_row(image_uint8, label, predictions, palette, ignore_label,
                      show_inputs=show_inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        Image.fromarray(row).save(file, format="PNG")
    return path
