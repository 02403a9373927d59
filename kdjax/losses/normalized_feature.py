"""NFD: normalized feature distillation (Liu, Yang, Chen, arXiv 2207.05256), methods.md §2 and §9.2.

No official code exists; every choice of the reconstruction is an option (axes, ddof, whether the
student is normalised, the distance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_choice, check_mask, check_positive, check_rank,
                                  check_same_shape, frozen, masked_mean, safe_norm)

Array = jax.Array

AXES = {"spatial": (1, 2), "channel": (3,), "spatial_channel": (1, 2, 3)}
DISTANCES = ("mse", "fro_over_hw")


def normalize_features(x: Array, *, axes: str = "spatial", eps: float = 1e-5, ddof: int = 0,
                       mask: Array | None = None) -> Array:
    """``N(F) = (F − μ) / sqrt(σ² + eps)`` with statistics over ``axes`` (no affine parameters).

    Args:
      x: float32 (N, H, W, C).
      axes: 'spatial' (over H·W per image and channel, instance-norm style), 'channel' (over C per
        pixel) or 'spatial_channel' (over H·W·C per image, layer-norm style).
      eps: added to the variance.
      ddof: 0 for the biased variance, 1 for the unbiased one (``torch.std``). The divisor
        ``count − ddof`` is clamped to at least 1, so a single-element slice has variance 0.
      mask: optional bool (N, H, W); statistics use the valid positions only and masked positions
        of the result are 0.
    Returns:
      float32 (N, H, W, C).
    """
    reduce = AXES[axes]
    if mask is None:
        count = 1
        for axis in reduce:
            count *= x.shape[axis]
        centred = x - jnp.mean(x, axis=reduce, keepdims=True)
    else:
        valid = jnp.broadcast_to(jnp.asarray(mask, bool)[..., None], x.shape)
        count = jnp.sum(valid, axis=reduce, keepdims=True, dtype=jnp.float32)
        total = jnp.sum(jnp.where(valid, x, 0.0), axis=reduce, keepdims=True)
        mean = total / jnp.maximum(count, 1.0)
        centred = jnp.where(valid, x - mean, 0.0)
    squares = jnp.sum(jnp.square(centred), axis=reduce, keepdims=True)
    variance = squares / jnp.maximum(count - ddof, 1)
    return centred / jnp.sqrt(variance + eps)


def normalized_feature_distillation(student: Array, teacher: Array, *, axes: str = "spatial",
                                    normalize_student: bool = True, eps: float = 1e-5,
                                    ddof: int = 0, distance: str = "mse",
                                    mask: Array | None = None) -> Array:
    """NFD: distance between normalised teacher and (optionally normalised) student features.

    ``L = D(N(F^T), N(F̃^S))`` with ``N`` from :func:`normalize_features` and ``F̃^S`` the student
    feature after its 1×1 connector. ``distance='mse'``: mean of the squared difference over all
    elements (methods.md §9.2, the default). ``distance='fro_over_hw'``: the unsquared Frobenius
    norm of the difference over the whole batch tensor divided by H·W (the third-party form of §2).

    Args:
      student: (N, H, W, C) student feature, already through the connector.
      teacher: (N, H, W, C) teacher feature.
      axes: 'spatial', 'channel' or 'spatial_channel' (see :func:`normalize_features`).
      normalize_student: normalise the student too (True) or compare it raw with N(F^T).
      eps: positive constant added to the variance.
      ddof: 0 (biased variance) or 1 (unbiased).
      distance: 'mse' or 'fro_over_hw'.
      mask: optional bool (N, H, W). Masked positions leave the statistics and the distance:
        'mse' divides by the number of valid elements; 'fro_over_hw' takes the norm over the valid
        elements and still divides by the full H·W.
    Returns:
      float32 scalar.
    """
    check_rank("student", student, 4, "N,H,W,C")
    check_same_shape("student", student, "teacher", teacher)
    check_mask(mask, student)
    check_choice("axes", axes, tuple(AXES))
    check_choice("distance", distance, DISTANCES)
    check_choice("ddof", ddof, (0, 1))
    check_choice("normalize_student", normalize_student, (True, False))
    # eps > 0 keeps sqrt(σ² + eps) away from 0 for constant or fully masked slices.
    check_positive("eps", eps)
    _, h, w, _ = student.shape
    s = as_float32(student)
    t = frozen(teacher)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        # Zero masked positions first: not even a NaN there may reach the value or the gradient.
        s = jnp.where(mask[..., None], s, 0.0)
        t = jnp.where(mask[..., None], t, 0.0)
    t = normalize_features(t, axes=axes, eps=eps, ddof=ddof, mask=mask)
    if normalize_student:
        s = normalize_features(s, axes=axes, eps=eps, ddof=ddof, mask=mask)
    diff = t - s
    if distance == "mse":
        return masked_mean(jnp.square(diff), mask)
    if mask is not None:
        diff = jnp.where(mask[..., None], diff, 0.0)
    return safe_norm(diff) / (h * w)
