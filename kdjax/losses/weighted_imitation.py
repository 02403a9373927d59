"""Weighted pixel-level soft-prediction imitation, WPI (Shan, arXiv 1910.14226), methods.md §9.3."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kdjax.losses._common import check_pair, check_positive, masked_mean, valid_weights
from kdjax.losses.pixel_kd import pixel_kl

Array = jax.Array
GapWeight = Callable[[Array, Array], Array]


def relative_gap_weight(gap: Array, valid: Array) -> Array:
    """The default knowledge-gap weighting: ``w = P·g / Σ_i g`` over each image's valid pixels.

    The weights average 1 over an image's valid pixels and grow where the student is further from the
    teacher. An image whose gap is 0 everywhere gets weight 0 (it contributes nothing either way).

    Args:
      gap: float32 (N, H, W) per-pixel gap g (τ²-scaled KL).
      valid: float32 (N, H, W) 1 for valid pixels, 0 for masked ones.
    Returns:
      float32 (N, H, W) weights.
    """
    axes = (1, 2)
    total = jnp.sum(gap * valid, axis=axes, keepdims=True)
    count = jnp.sum(valid, axis=axes, keepdims=True)
    return jnp.where(total > 0, count * gap / jnp.where(total > 0, total, 1.0), 0.0)


def weighted_pixel_imitation(student_logits: Array, teacher_logits: Array, *,
                             temperature: float = 1.0, gap_weight: GapWeight | None = None,
                             mask: Array | None = None) -> Array:
    """WPI: pixel KD weighted by each pixel's teacher-student knowledge gap.

    ``g_{n,i} = τ² · KL(softmax(z^T_{n,i}/τ) || softmax(z^S_{n,i}/τ))``,
    ``w = stop_gradient(gap_weight(g, valid))`` (default :func:`relative_gap_weight`), and
    ``L = mean_{n,i} w_{n,i} · g_{n,i}`` over valid pixels.

    Args:
      student_logits: (N, H, W, K).
      teacher_logits: (N, H, W, K).
      temperature: τ.
      gap_weight: callable ``(gap (N,H,W), valid (N,H,W) float) -> weights (N,H,W)``; its output is
        treated as a constant. Slot in another published weighting rule here.
      mask: optional bool (N, H, W).
    Returns:
      float32 scalar.
    """
    check_pair(student_logits, teacher_logits, mask)
    check_positive("temperature", temperature)
    weight_fn = relative_gap_weight if gap_weight is None else gap_weight
    gap = temperature**2 * pixel_kl(student_logits, teacher_logits, temperature)
    valid = valid_weights(mask, gap.shape)
    weights = jax.lax.stop_gradient(jnp.asarray(weight_fn(jax.lax.stop_gradient(gap), valid),
                                                jnp.float32))
    if weights.shape != gap.shape:
        raise ValueError(f"gap_weight must return weights of shape {gap.shape}, got {weights.shape}.")
    return masked_mean(weights * gap, mask)
