"""``kdjax data show``: a picture of what the model sees, augmented training crops over their labels."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.patches
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from kdjax.data import augment, pipeline, sources
from kdjax.io.paths import as_path


def colour_labels(label: np.ndarray, palette: np.ndarray, ignore_label: int) -> np.ndarray:
    """int (..., H, W) train ids → uint8 (..., H, W, 3) palette colours; ignore (and anything else) black."""
    table = np.zeros((256, 3), np.uint8)
    table[:len(palette)] = palette
    table[ignore_label] = 0
    return table[np.clip(label, 0, 255)]


def write_sample_grid(data_config: ml_collections.ConfigDict, out_path: str | os.PathLike, *, num: int = 8,
                      seed: int = 0) -> None:
    """Writes a PNG of the first ``num`` augmented training examples of ``seed``: each image (normalisation
    undone) above its label in the dataset's palette, ignore in black, with a legend of the classes shown."""
    source = sources.open_source(data_config)
    batch = next(pipeline.make_train_iterator(data_config, global_batch_size=num, seed=seed, process_index=0,
                                              process_count=1, source=source))
    info = source.info
    images = augment.denormalize(batch["image"], data_config.normalization)
    labels = colour_labels(batch["label"], info.palette, info.ignore_label)

    columns = min(num, 4)
    rows = -(-num // columns)
    crop_h, crop_w = images.shape[1:3]
    panel = 3.0
    figure, axes = plt.subplots(2 * rows, columns, squeeze=False,
                                figsize=(panel * columns, panel * 2 * rows * crop_h / crop_w + 1.0))
    for axis in axes.flat:
        axis.axis("off")
    for i in range(num):
        row, column = divmod(i, columns)
        axes[2 * row, column].imshow(images[i])
        axes[2 * row + 1, column].imshow(labels[i], interpolation="nearest")
    # Only the classes on show, so that datasets with 150 classes still get a readable legend.
    shown = set(np.unique(batch["label"]).tolist())
    legend = [matplotlib.patches.Patch(color=np.asarray(info.palette[k]) / 255, label=info.class_names[k])
              for k in range(info.num_classes) if k in shown]
    legend.append(matplotlib.patches.Patch(color="black", label=f"ignore ({info.ignore_label})"))
    figure.legend(handles=legend, loc="lower center", ncol=min(len(legend), 6), fontsize="small", frameon=False)
    figure.suptitle(f"{info.name}: {num} training crops, seed {seed}")
    figure.tight_layout(rect=(0, 0.06, 1, 0.97))
    with as_path(out_path).open("wb") as file:
        figure.savefig(file, dpi=100, format="png")
    plt.close(figure)


def show_command(config: ml_collections.ConfigDict, out_path: str | os.PathLike) -> None:
    """``kdjax data show``: the sample grid of an experiment config (its ``data`` section and ``seed``)."""
    write_sample_grid(config.data, out_path, seed=config.get("seed", 0))
