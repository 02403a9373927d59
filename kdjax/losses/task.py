"""The segmentation task loss: pixel cross-entropy with an ignore label."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_mask, check_rank, combine_masks, masked_mean,
                                  softmax_shifts, valid_label_mask)
from kdjax.ops.reductions import sums

Array = jax.Array


def cross_entropy(logits: Array, labels: Array, *, ignore_label: int = 255,
                  class_weights: Array | None = None, mask: Array | None = None) -> Array:
    """Softmax cross-entropy averaged over the valid pixels (PyTorch ``CrossEntropyLoss`` semantics).

    A pixel is valid when its label is a class in [0, K), differs from ``ignore_label`` and (if given)
    ``mask`` is True. Labels outside [0, K) are treated as ignored here; the data pipeline rejects
    out-of-range labels before they reach a loss. With ``class_weights`` the mean is weighted:
    ``Σ w_y · nll / Σ w_y`` over valid pixels, as in PyTorch.

    Args:
      logits: (N, H, W, K) logits at the label resolution (upsample before calling).
      labels: (N, H, W) integer class indices.
      ignore_label: label value that contributes nothing (255 in VOC/Cityscapes, -1 in CIRKD).
      class_weights: optional (K,) per-class weights.
      mask: optional bool (N, H, W) of pixels to use.
    Returns:
      float32 scalar; 0 when no pixel is valid.
    """
    check_rank("logits", logits, 4, "N,H,W,K")
    check_rank("labels", labels, 3, "N,H,W")
    if tuple(labels.shape) != tuple(logits.shape[:3]):
        raise ValueError(
            f"labels must have the (N,H,W) shape of logits {tuple(logits.shape[:3])}, got "
            f"{tuple(labels.shape)}. Upsample the logits to the label size first.")
    check_mask(mask, logits)
    num_classes = logits.shape[-1]
    if class_weights is not None and jnp.shape(class_weights) != (num_classes,):
        raise ValueError(
            f"class_weights must have shape ({num_classes},), got {tuple(jnp.shape(class_weights))}.")
    valid = combine_masks(valid_label_mask(labels, num_classes, ignore_label), mask)
    safe_labels = jnp.where(valid, labels, 0)
    z = as_float32(logits)
    # The label's logit by comparison with a class iota rather than a gather, summed in the same
    # pass as the exponentials (kdjax.ops.reductions): the logits are read once for the shift
    # and once for both sums.
    (shift,) = softmax_shifts(z, axis=-1)
    total, label_logit = sums(
        jnp.exp(z - shift),
        jnp.where(jnp.arange(num_classes) == safe_labels[..., None], z, 0.0), axis=-1)
    nll = shift[..., 0] + jnp.log(total) - label_logit
    if class_weights is None:
        return masked_mean(nll, valid)
    weights = jnp.where(valid, as_float32(class_weights)[safe_labels], 0.0)
    return jnp.sum(jnp.where(valid, weights * nll, 0.0)) / jnp.maximum(jnp.sum(weights), 1e-12)
