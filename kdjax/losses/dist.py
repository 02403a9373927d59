"""DIST: distillation from a stronger teacher (Huang et al., NeurIPS 2022), methods.md §5.5."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_group_size, check_pair, check_positive, frozen,
                                  masked_mean, safe_sqrt, softmax_shifts)
from kdjax.ops.reductions import sums

Array = jax.Array

# DIST's own eps, added to the product of the two norms (not a clamp of each norm).
PEARSON_EPS = 1e-8


def _check_weight(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}.")


def pearson(a: Array, b: Array, axis: int, valid: Array | None = None) -> Array:
    """DIST's Pearson correlation ``⟨a−ā, b−b̄⟩ / (||a−ā||·||b−b̄|| + 1e-8)`` along ``axis``.

    The two means are one reduction and the three sums of products another
    (:func:`kdjax.ops.reductions.sums`).

    Args:
      a, b: float32 arrays of the same shape.
      axis: the axis the correlation runs over (it is reduced).
      valid: optional bool broadcastable to ``a``; invalid entries leave means and sums.
    """
    if valid is None:
        count = a.shape[axis]
    else:
        valid = jnp.broadcast_to(valid, a.shape)
        count = jnp.maximum(jnp.sum(valid, axis=axis, keepdims=True, dtype=jnp.float32), 1.0)
        a = jnp.where(valid, a, 0.0)
        b = jnp.where(valid, b, 0.0)
    total_a, total_b = sums(a, b, axis=axis)
    a = a - jax.lax.stop_gradient(jnp.expand_dims(total_a, axis) / count)
    b = b - jax.lax.stop_gradient(jnp.expand_dims(total_b, axis) / count)
    if valid is not None:
        a = jnp.where(valid, a, 0.0)
        b = jnp.where(valid, b, 0.0)
    return _centered_pearson(a, b, axis)


def _centered_pearson(a: Array, b: Array, axis: int) -> Array:
    """``r = P / (√A·√B + eps)`` of centred ``a``, ``b`` (``P = Σab``, ``A = Σa²``, ``B = Σb²``).

    Its gradient with respect to a centred slice sums to zero over the slice's valid entries, so
    it passes through the centring unchanged: :func:`pearson` stops the gradient at the means.
    ``safe_sqrt``: a constant slice (e.g. a uniform softmax) has a zero norm.
    """
    squares_a, squares_b, products = sums(a * a, b * b, a * b, axis=axis)
    return products / (safe_sqrt(squares_a) * safe_sqrt(squares_b) + PEARSON_EPS)


def dist(student_logits: Array, teacher_logits: Array, *, beta: float = 1.0, gamma: float = 1.0,
         tau: float = 1.0, group_size: int | None = None, mask: Array | None = None) -> Array:
    """DIST: inter-class and intra-class Pearson correlation of the softmax predictions.

    ``Y = softmax(z/τ)`` over the K classes at every pixel;
    ``inter = 1 − mean_{pixels} pearson(Y^S_p, Y^T_p)`` (across classes, per pixel);
    ``intra = 1 − mean_k pearson(Y^S_{:,k}, Y^T_{:,k})`` (across all pixels of a group, per class),
    averaged over groups of ``group_size`` consecutive images;
    ``L = τ² (β·inter + γ·intra)``. With τ = 1 this is the DIST segmentation code (``dist_kd.py``),
    whose per-GPU batch of 2 images is ``group_size=2``; the τ² factor is mmrazor ``DISTLoss``'s.
    ``L ∈ [0, 2τ²(β+γ)]``.

    Args:
      student_logits: (N, H, W, K) student logits.
      teacher_logits: (N, H, W, K) teacher logits (no gradient flows into them).
      beta: weight β of the inter-class term.
      gamma: weight γ of the intra-class term.
      tau: softmax temperature τ.
      group_size: images per intra-class group; must divide N. None uses the whole batch. The
        inter-class term does not depend on it.
      mask: optional bool (N, H, W). Masked pixels leave the inter-class mean and the intra-class
        means and sums; a group without valid pixels leaves the mean over groups.
    Returns:
      float32 scalar.
    """
    check_pair(student_logits, teacher_logits, mask)
    check_positive("tau", tau)
    _check_weight("beta", beta)
    _check_weight("gamma", gamma)
    n, h, w, k = student_logits.shape
    group = check_group_size(group_size, n)
    z_s = as_float32(student_logits) / tau
    z_t = frozen(teacher_logits) / tau
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        # Masked pixels become uniform distributions: nothing (not even a NaN) reaches the gradient.
        z_s = jnp.where(mask[..., None], z_s, 0.0)
        z_t = jnp.where(mask[..., None], z_t, 0.0)
    # Both softmaxes share the pass of their sums over the logits (kdjax.ops.reductions).
    e_s, e_t = (jnp.exp(z - m) for z, m in zip((z_s, z_t), softmax_shifts(z_s, z_t, axis=-1)))
    total_s, total_t = sums(e_s, e_t, axis=-1)
    y_s = e_s / total_s[..., None]
    y_t = e_t / total_t[..., None]

    # masked_mean of (1 − r) rather than 1 − mean(r): an all-masked batch must give 0, not 1.
    inter = masked_mean(1.0 - pearson(y_s, y_t, axis=-1), mask)

    groups = n // group
    # Each class's column laid out as a row (groups, K, pixels): the five sums of the correlation
    # then run along the last axis in two passes (kdjax.ops.reductions), and the transposing
    # copy fuses into the softmax that produces it (faster than reducing the pixel axis in place;
    # benchmarks/NOTES.md, 'Several sums in one reduction').
    cols_s = jnp.swapaxes(y_s.reshape(groups, group * h * w, k), 1, 2)
    cols_t = jnp.swapaxes(y_t.reshape(groups, group * h * w, k), 1, 2)
    if mask is None:
        intra = jnp.mean(1.0 - pearson(cols_s, cols_t, axis=-1))
    else:
        valid = mask.reshape(groups, 1, group * h * w)
        per_group = jnp.mean(1.0 - pearson(cols_s, cols_t, axis=-1, valid=valid), axis=-1)
        has_pixels = jnp.any(valid, axis=(1, 2))
        intra = (jnp.sum(jnp.where(has_pixels, per_group, 0.0))
                 / jnp.maximum(jnp.sum(has_pixels, dtype=jnp.float32), 1.0))
    return tau**2 * (beta * inter + gamma * intra)
