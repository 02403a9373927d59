"""Attention transfer, AT (Zagoruyko & Komodakis, ICLR 2017), CIRKD form, methods.md §5.6."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import (NORMALIZE_EPS, as_float32, check_mask, check_rank,
                                  check_same_spatial, frozen, masked_mean)

Array = jax.Array


def attention_map(feat: Array, mask: Array | None) -> Array:
    """``F.normalize(mean_c f², over positions)``: the spatial attention of one feature map.

    Args:
      feat: float32 (N, H, W, C).
      mask: optional bool (N, H, W); masked positions are 0 and leave the L2 norm.
    Returns:
      float32 (N, H, W).
    """
    energy = jnp.mean(jnp.square(feat), axis=-1)
    if mask is not None:
        energy = jnp.where(mask, energy, 0.0)
    norm = jnp.sqrt(jnp.sum(jnp.square(energy), axis=(1, 2), keepdims=True))
    return energy / jnp.maximum(norm, NORMALIZE_EPS)


def attention_transfer(student_feat: Array, teacher_feat: Array, *,
                       mask: Array | None = None) -> Array:
    """AT: ``mean_{n,p} (a(F^S)_{n,p} − a(F^T)_{n,p})²`` with ``a`` from :func:`attention_map`.

    Args:
      student_feat: (N, H, W, C_s).
      teacher_feat: (N, H, W, C_t); channel counts may differ.
      mask: optional bool (N, H, W).
    Returns:
      float32 scalar.
    """
    check_rank("student_feat", student_feat, 4, "N,H,W,C")
    check_rank("teacher_feat", teacher_feat, 4, "N,H,W,C")
    check_same_spatial("student_feat", student_feat, "teacher_feat", teacher_feat)
    check_mask(mask, student_feat)
    diff = attention_map(as_float32(student_feat), mask) - attention_map(frozen(teacher_feat), mask)
    return masked_mean(jnp.square(diff), mask)
