"""Confusion matrix on device, int64 accumulation on the host, and the metrics derived from it.

The confusion matrix of one batch is computed inside ``jit`` as a product of two one-hot maps,
``onehot(label)ᵀ · onehot(prediction)`` summed over pixels, a matrix multiplication that XLA runs
well on every backend. With the batch sharded over a ``('data',)`` mesh (automatic or explicit
axis types) each device counts its own examples and one all-reduce adds the partial matrices, so
the result is the same as on one device.

Per-batch counts are int32, exact up to 2³¹ − 1 pixels per batch. Summed over a large eval set
they can pass that bound (Cityscapes val already has 10⁹ pixels), so batches are added on the host
in int64 (``ConfusionAccumulator``).

mIoU follows mmsegmentation: the mean over the classes whose union (ground truth ∪ prediction)
is not empty; a class absent from both is NaN and left out (``absent='nan'``). CIRKD's
``utils/score.py`` divides by ``eps + union`` and averages over all K classes, so an absent class
counts as IoU 0 and lowers the mean; ``absent='zero'`` reproduces that. The two agree whenever
every class occurs, as on the full validation sets of the benchmarks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ABSENT_RULES = ("nan", "zero")


def confusion_matrix(predictions: Array, labels: Array, *, num_classes: int,
                     ignore_label: int = 255, weights: Array | None = None) -> Array:
    """Counts of (ground truth, prediction) pairs over the valid pixels of a batch.

    A pixel counts when its label is in [0, K), differs from ``ignore_label`` and its example is
    marked real in ``weights``. Predictions must be in [0, K) (an argmax is); a prediction outside
    that range drops its pixel. Pure jnp: jit-able and correct with the batch axis sharded.

    Args:
      predictions: (N, H, W) integer class ids.
      labels: (N, H, W) integer ground-truth ids.
      num_classes: K.
      ignore_label: label value that is skipped.
      weights: optional bool (N,); False marks a filler example of a padded batch, which adds
        nothing.
    Returns:
      (K, K) int32, rows = ground truth, columns = prediction.
    """
    if jnp.ndim(labels) != 3 or jnp.shape(predictions) != jnp.shape(labels):
        raise ValueError(f"predictions and labels must both be (N, H, W); got "
                         f"{jnp.shape(predictions)} and {jnp.shape(labels)}.")
    if weights is not None and jnp.shape(weights) != jnp.shape(labels)[:1]:
        raise ValueError(f"weights must have shape ({jnp.shape(labels)[0]},); "
                         f"got {jnp.shape(weights)}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1; got {num_classes!r}.")
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    if weights is not None:
        valid = valid & jnp.asarray(weights, bool)[:, None, None]
    # one_hot of -1 is an all-zero row, so invalid pixels vanish from the product. int8 one-hots
    # with an int32 accumulator keep the count exact and the operands small.
    truth = jax.nn.one_hot(jnp.where(valid, labels, -1), num_classes, dtype=jnp.int8)
    predicted = jax.nn.one_hot(predictions, num_classes, dtype=jnp.int8)
    # Per-example matrices first, then a sum over the batch: the product never contracts the
    # (possibly sharded) batch axis, which explicit-sharding meshes would reject as ambiguous; the
    # sum becomes the all-reduce.
    per_example = jnp.einsum("nhwk,nhwj->nkj", truth, predicted, preferred_element_type=jnp.int32)
    return jnp.sum(per_example, axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentationMetrics:
    """Dataset-level metrics from an accumulated confusion matrix; every value a fraction in [0, 1].

    Attributes:
      miou: mean of ``per_class_iou`` over its non-NaN entries.
      per_class_iou: (K,) float64 IoU per class; NaN for a class absent from ground truth and
        prediction (0 under ``absent='zero'``).
      pixel_accuracy: correctly labelled pixels / labelled pixels.
      mean_class_accuracy: mean of TP / ground-truth pixels over the classes in the ground truth.
    """

    miou: float
    per_class_iou: np.ndarray
    pixel_accuracy: float
    mean_class_accuracy: float

    def to_dict(self, class_names: Sequence[str]) -> dict:
        """JSON-ready dict in percent (the unit papers report mIoU in); NaN becomes None (null)."""
        if len(class_names) != len(self.per_class_iou):
            raise ValueError(f"class_names has {len(class_names)} names for "
                             f"{len(self.per_class_iou)} classes.")
        return {
            "miou": to_percent(self.miou),
            "pixel_accuracy": to_percent(self.pixel_accuracy),
            "mean_class_accuracy": to_percent(self.mean_class_accuracy),
            "per_class_iou": {name: to_percent(iou)
                              for name, iou in zip(class_names, self.per_class_iou)},
        }


def to_percent(fraction: float) -> float | None:
    """100 · fraction as a Python float, or None for NaN (JSON has no NaN)."""
    return None if np.isnan(fraction) else 100.0 * float(fraction)


def segmentation_metrics(confusion: np.ndarray, *, absent: str = "nan") -> SegmentationMetrics:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy of a (K, K) confusion matrix.

    Args:
      confusion: (K, K) counts, rows = ground truth, columns = prediction (any integer dtype).
      absent: ``'nan'`` leaves classes with an empty union out of the mean (mmsegmentation);
        ``'zero'`` scores them 0 and averages over all K classes (CIRKD's ``utils/score.py``).
    """
    if absent not in ABSENT_RULES:
        raise ValueError(f"absent must be one of {ABSENT_RULES}; got {absent!r}.")
    confusion = np.asarray(confusion, np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (K, K) matrix; got shape {confusion.shape}.")
    total = confusion.sum()
    if total == 0:
        raise ValueError("confusion matrix is empty: the evaluation saw no labelled pixel. Check "
                         "that the split is not empty and that labels are not all ignore_label.")
    true_positive = np.diag(confusion)
    truth = confusion.sum(axis=1)
    union = truth + confusion.sum(axis=0) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        class_accuracy = np.where(truth > 0, true_positive / truth, np.nan)
    if absent == "zero":
        iou = np.nan_to_num(iou, nan=0.0)
    return SegmentationMetrics(
        miou=float(np.nanmean(iou)),
        per_class_iou=iou,
        pixel_accuracy=float(true_positive.sum() / total),
        mean_class_accuracy=float(np.nanmean(class_accuracy)),
    )


class ConfusionAccumulator:
    """Sums per-batch (K, K) device counts into a host int64 matrix, one batch behind.

    ``add`` keeps the newest batch's array pending and folds in the previous one, so fetching
    batch i to the host overlaps with the device computing batch i + 1 (JAX dispatches
    asynchronously). The per-batch arrays must be fully replicated, as a jitted
    ``confusion_matrix`` over a sharded batch returns them.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._total = np.zeros((num_classes, num_classes), np.int64)
        self._pending: Array | None = None

    def add(self, batch_confusion: Array) -> None:
        """Adds one batch's (K, K) counts."""
        if jnp.shape(batch_confusion) != self._total.shape:
            raise ValueError(f"batch_confusion must have shape {self._total.shape}; "
                             f"got {jnp.shape(batch_confusion)}.")
        self._fold_pending()
        self._pending = batch_confusion

    @property
    def confusion(self) -> np.ndarray:
        """(K, K) int64 counts of every batch added so far."""
        self._fold_pending()
        return self._total.copy()

    def metrics(self, *, absent: str = "nan") -> SegmentationMetrics:
        """``segmentation_metrics`` of the counts so far."""
        return segmentation_metrics(self.confusion, absent=absent)

    def _fold_pending(self) -> None:
        if self._pending is not None:
            self._total += np.asarray(jax.device_get(self._pending), np.int64)
            self._pending = None
