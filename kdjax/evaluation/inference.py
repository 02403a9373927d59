"""Class probabilities at input resolution: whole-image, sliding-window, multi-scale and flip.

The protocol follows CIRKD's evaluation (cirkd-models.md §3.1): the model's low-resolution logits
are resized to the size of the image they came from, bilinearly with ``align_corners=True``, and
turned into probabilities with a softmax. Sliding windows follow mmsegmentation's placement (the
last window is pushed back to end at the image border); overlapping windows, scales and flips are
averaged as probabilities.

Everything here is traced with static shapes: window offsets and scaled sizes are Python ints
computed from the input shape, so ``infer_probabilities`` is jit-able for a fixed input shape. The
windows run in a ``lax.scan``, so the model is traced and compiled once however many windows there
are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models.layers import check_nhwc, resize_bilinear_align_corners

Array = jax.Array
LogitsFn = Callable[[Array], Array]

EVAL_MODES = ("whole", "slide")


def _int_pair(name: str, value: Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ValueError(f"{name} must be a pair of positive ints (height, width); got {value!r}.")
    return int(pair[0]), int(pair[1])


@dataclasses.dataclass(frozen=True)
class EvalMode:
    """How predictions are made; hashable, so it can be a static argument of ``jax.jit``.

    Attributes:
      mode: ``'whole'`` (one forward pass over the full, batch-padded image) or ``'slide'``
        (windows of ``crop_size`` every ``stride`` pixels).
      crop_size: (height, width) of a window; required for ``'slide'``, None for ``'whole'``.
      stride: (height, width) step between windows, at most ``crop_size`` so that windows cover
        every pixel; required for ``'slide'``, None for ``'whole'``.
      scales: image scale factors; the probabilities of all scales are averaged.
      flip: also predict on the horizontally flipped image and average.
    """

    mode: str = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self):
        if self.mode not in EVAL_MODES:
            raise ValueError(f"mode must be one of {EVAL_MODES}; got {self.mode!r}.")
        crop_size = _int_pair("crop_size", self.crop_size)
        stride = _int_pair("stride", self.stride)
        if self.mode == "slide":
            if crop_size is None or stride is None:
                raise ValueError("mode 'slide' needs crop_size and stride, e.g. crop_size=(512, "
                                 "1024), stride=(341, 682).")
            if stride[0] > crop_size[0] or stride[1] > crop_size[1]:
                raise ValueError(f"stride {stride} must not exceed crop_size {crop_size}: larger "
                                 "steps would leave pixels that no window covers.")
        elif crop_size is not None or stride is not None:
            raise ValueError("mode 'whole' takes no crop_size or stride; use mode='slide' for "
                             "sliding windows.")
        scales = tuple(float(s) for s in self.scales)
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"scales must be a non-empty sequence of positive numbers; "
                             f"got {self.scales!r}.")
        # Lists from a config become tuples so that the mode stays hashable.
        object.__setattr__(self, "crop_size", crop_size)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "flip", bool(self.flip))

    def describe(self) -> str:
        """One line for logs and tables, e.g. ``'slide 512x1024 stride 341x682, scales
        0.5/0.75/1.0, flip'`` or ``'whole, scale 1.0'``."""
        parts = ["whole" if self.mode == "whole" else
                 f"slide {self.crop_size[0]}x{self.crop_size[1]} "
                 f"stride {self.stride[0]}x{self.stride[1]}"]
        if len(self.scales) == 1:
            parts.append(f"scale {self.scales[0]}")
        else:
            parts.append("scales " + "/".join(str(s) for s in self.scales))
        if self.flip:
            parts.append("flip")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {"mode": self.mode,
                "crop_size": None if self.crop_size is None else list(self.crop_size),
                "stride": None if self.stride is None else list(self.stride),
                "scales": list(self.scales), "flip": self.flip}


def window_starts(size: int, crop: int, stride: int) -> tuple[int, ...]:
    """Start offsets of the sliding windows along one axis of length ``size`` ≥ ``crop``.

    Windows start every ``stride`` pixels; the last one is moved back to end exactly at ``size``
    (mmsegmentation's placement), so with ``stride ≤ crop`` every pixel is covered.
    """
    if size < crop:
        raise ValueError(f"size {size} must be at least crop {crop}; pad the image first.")
    count = (size - crop + stride - 1) // stride + 1
    return tuple(min(i * stride, size - crop) for i in range(count))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(height, width) · scale rounded half up, at least 1 pixel."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _probabilities(logits_fn: LogitsFn, images: Array, num_classes: int) -> Array:
    """softmax(resize(logits_fn(images))): (n, h, w, C) → (n, h, w, K) float32."""
    logits = logits_fn(images)
    expected = (images.shape[0], num_classes)
    if jnp.ndim(logits) != 4 or (logits.shape[0], logits.shape[-1]) != expected:
        raise ValueError(f"logits_fn must return (n, h', w', {num_classes}) logits for images of "
                         f"shape {images.shape}; got shape {jnp.shape(logits)}.")
    logits = resize_bilinear_align_corners(logits.astype(jnp.float32), images.shape[1:3])
    return jax.nn.softmax(logits, axis=-1)


def _slide_probabilities(logits_fn: LogitsFn, images: Array, crop_size: tuple[int, int],
                         stride: tuple[int, int], num_classes: int) -> Array:
    """Window-averaged probabilities: (n, H, W, C) → (n, H, W, K) float32.

    An image smaller than the crop is zero-padded at the bottom/right up to it (the pad value of
    normalised images in the eval batches) and the padding is cut off the result.
    """
    n, height, width, channels = images.shape
    crop_h, crop_w = crop_size
    canvas_h, canvas_w = max(height, crop_h), max(width, crop_w)
    canvas = jnp.pad(images, ((0, 0), (0, canvas_h - height), (0, canvas_w - width), (0, 0)))
    offsets = np.array([(y, x) for y in window_starts(canvas_h, crop_h, stride[0])
                        for x in window_starts(canvas_w, crop_w, stride[1])], np.int32)
    coverage = np.zeros((canvas_h, canvas_w), np.float32)
    for y, x in offsets:
        coverage[y:y + crop_h, x:x + crop_w] += 1

    def add_window(total, offset):
        start = (0, offset[0], offset[1], 0)
        window = jax.lax.dynamic_slice(canvas, start, (n, crop_h, crop_w, channels))
        summed = jax.lax.dynamic_slice(total, start, (n, crop_h, crop_w, num_classes))
        probs = _probabilities(logits_fn, window, num_classes)
        return jax.lax.dynamic_update_slice(total, summed + probs, start), None

    # Zeros derived from the canvas inherit its batch sharding; under an explicit-sharding mesh a
    # replicated carry could not take the sharded window updates.
    total = jnp.zeros_like(canvas[..., :1], jnp.float32) + jnp.zeros((num_classes,), jnp.float32)
    total, _ = jax.lax.scan(add_window, total, jnp.asarray(offsets))
    return (total / coverage[None, :, :, None])[:, :height, :width]


def infer_probabilities(logits_fn: LogitsFn, images: Array, *, eval_mode: EvalMode,
                        num_classes: int) -> Array:
    """Class probabilities of every pixel, averaged over the scales and flips of ``eval_mode``.

    For each scale the image is resized bilinearly (``align_corners=True``) to ``scaled_size``;
    resizing the normalised image equals normalising the resized one, since bilinear weights sum
    to 1. With ``flip`` the image is also mirrored left–right and its probabilities mirrored back.
    Each view is predicted whole or by sliding windows, its probabilities resized back to the input
    size, and all views averaged. In a padded eval batch this all runs on the padded canvas (CIRKD
    evaluates each unpadded image alone), so zero padding can influence the pixels next to it.

    Args:
      logits_fn: images (n, h, w, C) float32 → logits (n, h', w', K) at any resolution, e.g. the
        model's 1/8 output; must be traceable (it runs inside ``lax.scan`` for 'slide').
      images: (N, H, W, C) normalised images.
      eval_mode: whole / slide, scales and flip.
      num_classes: K.
    Returns:
      (N, H, W, K) float32 probabilities.
    """
    check_nhwc("images", images)
    height, width = images.shape[1:3]
    flips = (False, True) if eval_mode.flip else (False,)
    views = []
    for scale in eval_mode.scales:
        scaled = resize_bilinear_align_corners(images, scaled_size(height, width, scale))
        for flip in flips:
            view = scaled[:, :, ::-1] if flip else scaled
            if eval_mode.mode == "slide":
                probs = _slide_probabilities(logits_fn, view, eval_mode.crop_size,
                                             eval_mode.stride, num_classes)
            else:
                probs = _probabilities(logits_fn, view, num_classes)
            if flip:
                probs = probs[:, :, ::-1]
            views.append(resize_bilinear_align_corners(probs, (height, width)))
    return sum(views) / len(views)


def predict_classes(logits_fn: LogitsFn, images: Array, *, eval_mode: EvalMode,
                    num_classes: int) -> Array:
    """Arg-max class of ``infer_probabilities``: (N, H, W, C) → (N, H, W) int32."""
    probs = infer_probabilities(logits_fn, images, eval_mode=eval_mode, num_classes=num_classes)
    return jnp.argmax(probs, axis=-1).astype(jnp.int32)
