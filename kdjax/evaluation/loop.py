"""The evaluation loop: confusion-matrix mIoU of a model over an eval set, in whole / slide /
multi-scale + flip mode, accumulated on the host in int64.

Example, with a model split as ``graphdef, state = nnx.split(model)``::

    def logits_fn(state, images):          # define once: it keys the compilation cache
        return nnx.merge(graphdef, state)(images, train=False).logits

    metrics, confusion = evaluate(logits_fn, val_batches, state=state, num_classes=19,
                                  eval_mode=EvalMode('whole'))
    print(f"mIoU {100 * metrics.miou:.2f} ({EvalMode('whole').describe()})")
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from kdjax.evaluation.inference import EvalMode, predict_classes
from kdjax.evaluation.metrics import (ConfusionAccumulator, SegmentationMetrics, confusion_matrix,
                                      segmentation_metrics)

Array = jax.Array


def batch_confusion(state: Any, images: Array, labels: Array, valid: Array | None, *,
                    logits_fn: Callable[..., Array], num_classes: int, ignore_label: int,
                    eval_mode: EvalMode) -> Array:
    """Inference, arg-max and confusion matrix of one eval batch; (K, K) int32.

    Args:
      state: a pytree passed to ``logits_fn(state, images)``, or None to call
        ``logits_fn(images)``. Passing model variables here, rather than closing over them, keeps
        them jit arguments instead of constants baked into the compiled program.
      images: (B, H, W, C) float32, zero-padded after normalisation.
      labels: (B, H, W) int, padded with ``ignore_label``.
      valid: bool (B,), False for filler examples; or None when all are real.
      logits_fn, num_classes, ignore_label, eval_mode: as in :func:`evaluate`.
    """
    fn = logits_fn if state is None else functools.partial(logits_fn, state)
    predictions = predict_classes(fn, images, eval_mode=eval_mode, num_classes=num_classes)
    return confusion_matrix(predictions, labels, num_classes=num_classes,
                            ignore_label=ignore_label, weights=valid)


# One compiled program per (logits_fn, K, ignore label, mode, input shapes and shardings); reusing
# the same logits_fn object across evaluations reuses the compilation.
_jitted_batch_confusion = jax.jit(
    batch_confusion, static_argnames=("logits_fn", "num_classes", "ignore_label", "eval_mode"))


def evaluate(logits_fn: Callable[..., Array], batches: Iterable[Mapping[str, Any]], *,
             num_classes: int, ignore_label: int = 255, eval_mode: EvalMode = EvalMode(),
             state: Any = None, jit: bool = True) -> tuple[SegmentationMetrics, np.ndarray]:
    """mIoU and friends of a model over an eval set.

    Per batch, ``batch_confusion`` (inference + arg-max + confusion, one jitted call when ``jit``)
    counts the valid pixels; the counts are summed on the host in int64. Padding pixels carry
    ``ignore_label`` and filler examples ``valid = False``, so neither counts. Batches may be
    global arrays sharded over a ``('data',)`` mesh; the confusion matrix comes back replicated.

    Args:
      logits_fn: ``logits_fn(images)``, or ``logits_fn(state, images)`` when ``state`` is given:
        (n, h, w, C) float32 → (n, h', w', K) logits at any resolution. Must be traceable. It
        is a static jit argument: define it once, a new function object per call recompiles.
      batches: dicts with ``'image'`` (B, H, W, C) float32, ``'label'`` (B, H, W) int and
        ``'valid'`` bool (B,) (optional; absent = all real). Other keys (e.g. ``'height'``,
        ``'width'``) are ignored.
      num_classes: K.
      ignore_label: label value excluded from the metrics.
      eval_mode: whole / slide, scales, flip.
      state: optional pytree (e.g. the model's NNX state) passed as ``logits_fn``'s first argument.
      jit: compile the per-batch computation; False runs it op by op (for debugging).
    Returns:
      (metrics, confusion): ``SegmentationMetrics`` (NaN-rule mIoU) and the (K, K) int64 confusion
      matrix, rows = ground truth, columns = prediction.
    """
    step = _jitted_batch_confusion if jit else batch_confusion
    accumulator = ConfusionAccumulator(num_classes)
    for batch in batches:
        accumulator.add(step(state, batch["image"], batch["label"], batch.get("valid"),
                             logits_fn=logits_fn, num_classes=num_classes,
                             ignore_label=ignore_label, eval_mode=eval_mode))
    confusion = accumulator.confusion
    return segmentation_metrics(confusion), confusion
