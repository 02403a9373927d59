"""Shared fixtures of the input-pipeline tests: tiny in-memory datasets and configs."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from kdjax.config.data_defaults import default_data_config
from kdjax.data.metadata import DatasetInfo
from kdjax.data.sources import EncodedExample, EncodedSource

# Colours of the RGB cube's corners, black excluded: no blend of some can equal another, so a pixel of
# exactly one of these colours can only come from pixels of that colour. Class k has colour CORNERS[k].
CORNERS = np.array([(r, g, b) for r in (0, 255) for g in (0, 255) for b in (0, 255)][1:], np.uint8)


def png(pixels: np.ndarray) -> bytes:
    """PNG bytes of uint8 (H, W, C) or (H, W) pixels."""
    pixels = np.asarray(pixels, np.uint8)
    return tf.io.encode_png(pixels if pixels.ndim == 3 else pixels[..., None]).numpy()


def tiny_info(num_classes: int = len(CORNERS), label_map: np.ndarray | None = None) -> DatasetInfo:
    return DatasetInfo(name="tiny", class_names=tuple(f"class{k}" for k in range(num_classes)),
                       palette=np.resize(CORNERS, (num_classes, 3)), label_map=label_map,
                       splits={"train": "train", "val": "val"})


def source_of(train: Sequence[tuple[str, np.ndarray | bytes, np.ndarray | bytes]] = (),
              val: Sequence[tuple[str, np.ndarray | bytes, np.ndarray | bytes]] = (),
              info: DatasetInfo | None = None) -> EncodedSource:
    """An in-memory source from (file name, image, label) triples; arrays are PNG-encoded, bytes kept."""

    def encode(item):
        return item if isinstance(item, bytes) else png(item)

    return EncodedSource(info or tiny_info(), {
        split: [EncodedExample(name, encode(image), encode(label)) for name, image, label in examples]
        for split, examples in (("train", train), ("val", val))})


def numbered_examples(count: int, height: int = 6, width: int = 8) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Constant images whose red channel is ``index + 1``, so an output pixel tells which example it is."""
    return [(f"ex{i:03d}.png", np.full((height, width, 3), (i + 1, 7, 7), np.uint8),
             np.zeros((height, width), np.uint8)) for i in range(count)]


def block_examples(count: int, height: int, width: int, block: int, seed: int = 0):
    """Random blocks of classes, each painted in its class's corner colour: the label is the image's
    colour, so it can be recomputed from the pixels after any resampling."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        classes = rng.integers(len(CORNERS), size=(-(-height // block), -(-width // block)))
        label = np.kron(classes, np.ones((block, block), np.int64))[:height, :width].astype(np.uint8)
        examples.append((f"blocks{i}.png", CORNERS[label], label))
    return examples


def plain_config(crop=(8, 8), **overrides):
    """Data config without randomness in scale or flip and without normalisation, for exact checks."""
    config = default_data_config()
    config.crop_size = crop
    config.scale_range = (1.0, 1.0)
    config.flip = False
    config.normalization = "none"
    config.num_parallel_calls = 2
    config.prefetch = 1
    config.update(overrides)
    return config


def example_numbers(images: np.ndarray) -> list[int]:
    """Which ``numbered_examples`` each image of a batch (B, h, w, 3) shows."""
    return [int(round(v)) - 1 for v in images[:, 0, 0, 0]]
