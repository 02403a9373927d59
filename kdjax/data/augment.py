"""Training augmentation (random scale, crop with padding, flip, photometric distortion) and normalisation.

All randomness is stateless: each example gets a key derived from (seed, epoch, example index), so an
example's augmentation does not depend on which process reads it, on the order of reading, or on
where a run was resumed.

Scale, crop, padding and flip are one resampling. The crop window is placed in the virtually scaled
image and sampled straight from the original with ``tf.image.crop_and_resize`` (bilinear for the image,
nearest for the label, on the same grid), so only crop-sized tensors are ever computed. Sample points
outside the image take the fill value: 0 for the image (before normalisation, as CIRKD pads) and the
ignore label for the label, which pads on the bottom and right. Flipping reverses the window's x
extent, so the padding moves with the content, exactly as pad → crop → flip would place it.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import tensorflow as tf

from kdjax.data import errors

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 scale
IMAGENET_STD = (58.395, 57.12, 57.375)
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)  # CIRKD's Cityscapes/CamVid loaders
NORMALIZATIONS = ("imagenet", "cirkd_bgr", "none")

# Shrinks the sampling grid by a relative 1e-5 so that float rounding never pushes the last real row or
# column just past the image edge, where it would be read as padding; far too small to move a sample.
_GRID_SHRINK = 1.0 - 1e-5


@dataclasses.dataclass(frozen=True)
class TrainAugmentation:
    """Settings of the training augmentation (see ``default_data_config`` for their meaning)."""

    crop_size: tuple[int, int]
    scale_range: tuple[float, float]
    scale_step: float | None
    base_size: int | None
    flip: bool
    photometric: bool
    ignore_label: int

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict, ignore_label: int) -> TrainAugmentation:
        crop = tuple(int(s) for s in data_config.crop_size)
        low, high = (float(s) for s in data_config.scale_range)
        if len(crop) != 2 or min(crop) < 1:
            raise errors.DataError(f"data.crop_size must be (height, width) > 0, got {data_config.crop_size}")
        if not 0 < low <= high:
            raise errors.DataError(f"data.scale_range must be (low, high) with 0 < low <= high, got "
                                   f"{data_config.scale_range}")
        return cls(crop, (low, high), data_config.scale_step, data_config.base_size, bool(data_config.flip),
                   bool(data_config.photometric), ignore_label)


def scale_crop_flip(image: tf.Tensor, label: tf.Tensor, key: tf.Tensor,
                    settings: TrainAugmentation) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Random scale, crop (padding where the scaled image is smaller than the crop) and flip.

    Args:
      image: uint8 (H, W, 3), H and W at least 2.
      label: int32 (H, W) train ids.
      key: int64 (2,) stateless random key of this example.
      settings: crop size, scale range and flip.

    Returns:
      image: float32 (h, w, 3) in 0..255, zero where padded; (h, w) = ``settings.crop_size``.
      label: int32 (h, w), ``settings.ignore_label`` where padded.
      valid: bool (h, w), False where padded.
    """
    crop_h, crop_w = settings.crop_size
    scale_key, y_key, x_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 4))
    height, width = tf.shape(image)[0], tf.shape(image)[1]

    low, high = settings.scale_range
    if settings.scale_step:
        steps = int(round((high - low) / settings.scale_step))
        factor = low + settings.scale_step * tf.cast(
            tf.random.stateless_uniform([], scale_key, 0, steps + 1, tf.int32), tf.float32)
    else:
        factor = tf.random.stateless_uniform([], scale_key, low, high)
    if settings.base_size:
        # CIRKD's base-size rule: the short side becomes base_size × factor.
        factor *= settings.base_size / tf.cast(tf.minimum(height, width), tf.float32)
    scaled_h = tf.maximum(tf.cast(tf.round(tf.cast(height, tf.float32) * factor), tf.int32), 2)
    scaled_w = tf.maximum(tf.cast(tf.round(tf.cast(width, tf.float32) * factor), tf.int32), 2)

    top = tf.random.stateless_uniform([], y_key, 0, tf.maximum(scaled_h - crop_h, 0) + 1, tf.int32)
    left = tf.random.stateless_uniform([], x_key, 0, tf.maximum(scaled_w - crop_w, 0) + 1, tf.int32)
    flip = settings.flip & (tf.random.stateless_uniform([], flip_key) < 0.5)

    # Window in crop_and_resize's coordinates (0..1 spans the original's first to last pixel centre).
    # Scaled pixel i sits at original position i·(H−1)/(h−1), the align-corners grid, which keeps every
    # real sample inside the original so that only padding is ever extrapolated.
    def extent(offset, size, scaled):
        step = _GRID_SHRINK / tf.cast(scaled - 1, tf.float32)
        return tf.cast(offset, tf.float32) * step, tf.cast(offset + size - 1, tf.float32) * step

    y0, y1 = extent(top, crop_h, scaled_h)
    x0, x1 = extent(left, crop_w, scaled_w)
    x0, x1 = tf.where(flip, x1, x0), tf.where(flip, x0, x1)
    box = tf.stack([y0, x0, y1, x1])[None]

    def resample(pixels, method, fill):
        return tf.image.crop_and_resize(pixels[None], box, [0], [crop_h, crop_w], method=method,
                                        extrapolation_value=fill)[0]

    image = resample(image, "bilinear", 0.0)
    label = tf.cast(resample(label[..., None], "nearest", float(settings.ignore_label))[..., 0], tf.int32)
    valid_rows = tf.range(crop_h) < scaled_h - top
    valid_cols = tf.range(crop_w) < scaled_w - left
    valid_cols = tf.where(flip, tf.reverse(valid_cols, [0]), valid_cols)
    return image, label, valid_rows[:, None] & valid_cols[None, :]


def photometric_distortion(image: tf.Tensor, valid: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """Random brightness (±32), contrast (×0.5–1.5), saturation (×0.5–1.5) and hue (±36°), each with
    probability 1/2, in the manner of mmseg's PhotoMetricDistortion.

    Args:
      image: float32 (h, w, 3) RGB in 0..255.
      valid: bool (h, w); padded pixels stay 0.
      key: int64 (2,) stateless random key.
    """
    keys = tf.random.experimental.stateless_split(key, 5)
    apply = tf.random.stateless_uniform([4], keys[0]) < 0.5
    brightness = tf.where(apply[0], tf.random.stateless_uniform([], keys[1], -32.0, 32.0), 0.0)
    contrast = tf.where(apply[1], tf.random.stateless_uniform([], keys[2], 0.5, 1.5), 1.0)
    saturation = tf.where(apply[2], tf.random.stateless_uniform([], keys[3], 0.5, 1.5), 1.0)
    hue = tf.where(apply[3], tf.random.stateless_uniform([], keys[4], -0.1, 0.1), 0.0)
    image = tf.clip_by_value((image + brightness) * contrast, 0.0, 255.0) / 255.0
    image = tf.image.adjust_hue(tf.image.adjust_saturation(image, saturation), hue)
    return tf.clip_by_value(image * 255.0, 0.0, 255.0) * tf.cast(valid[..., None], tf.float32)


def check_normalization(mode: str) -> None:
    if mode not in NORMALIZATIONS:
        raise errors.DataError(f"data.normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def normalize(image: tf.Tensor, mode: str) -> tf.Tensor:
    """float32 (..., 3) RGB in 0..255 → the model's input: ImageNet mean/std, CIRKD's BGR minus the
    Caffe mean (no std), or unchanged ('none')."""
    check_normalization(mode)
    if mode == "imagenet":
        return (image - IMAGENET_MEAN) / IMAGENET_STD
    if mode == "cirkd_bgr":
        return image[..., ::-1] - CAFFE_BGR_MEAN
    return image


def denormalize(image: np.ndarray, mode: str) -> np.ndarray:
    """Inverse of ``normalize`` for display: float32 (..., 3) → uint8 RGB."""
    check_normalization(mode)
    if mode == "imagenet":
        image = image * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    elif mode == "cirkd_bgr":
        image = (image + np.asarray(CAFFE_BGR_MEAN))[..., ::-1]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
