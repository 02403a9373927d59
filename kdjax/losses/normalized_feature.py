"""NFD: normalized feature distillation (Liu, Yang, Chen, arXiv 2207.05256), methods.md §2 and §9.2.

No official code exists; every choice of the reconstruction is an option (axes, ddof, whether the
student is normalised, the distance).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_choice, check_mask, check_positive, check_rank,
                                  check_same_shape, frozen, safe_sqrt)
from kdjax.losses._derivative_rules import backward_from_residuals
from kdjax.ops.reductions import sums

Array = jax.Array

AXES = {"spatial": (1, 2), "channel": (3,), "spatial_channel": (1, 2, 3)}
DISTANCES = ("mse", "fro_over_hw")


def _group_sums(reduce: tuple[int, ...], *operands: Array) -> tuple[Array, ...]:
    """Sums of (N, H, W, C) operands over the ``reduce`` axes, kept as size-1 axes, in one pass."""
    n, h, w, c = operands[0].shape
    if reduce == (1, 2):
        return tuple(x.reshape(n, 1, 1, c)
                     for x in sums(*(x.reshape(n, h * w, c) for x in operands), axis=1))
    if reduce == (3,):
        return tuple(x[..., None] for x in sums(*operands, axis=3))
    return tuple(x.reshape(n, 1, 1, 1) for x in sums(*(x.reshape(n, -1) for x in operands), axis=1))


class _Moments(NamedTuple):
    """Per-group statistics of teacher and student, each of the group shape ((N, 1, 1, C) for
    'spatial'). ``c`` are the centred values (the raw student without its normalisation) and
    ``δ = c_t − c_s`` their gap; all sums run over the valid entries."""

    count: Array
    mean_t: Array
    mean_s: Array
    squares_t: Array    # Σ c_t²
    squares_s: Array    # Σ c_s²
    cross: Array        # Σ c_t·c_s
    gap_squares: Array  # Σ δ²
    gap_teacher: Array  # Σ δ·c_t


def _gap(student: Array, teacher: Array, valid: Array, mean_t: Array, mean_s: Array) -> Array:
    """``δ = c_t − c_s``, formed as ``(t − s) − (μ_t − μ_s)``: maps that nearly agree keep their
    small difference, which ``c_t − c_s`` would round away."""
    return jnp.where(valid, (teacher - student) - (mean_t - mean_s), 0.0)


def _moments(student: Array, teacher: Array, valid: Array, reduce: tuple[int, ...],
             normalize_student: bool) -> _Moments:
    """The group statistics of :class:`_Moments`.

    Two passes, as a normalisation needs: the means first, then the five centred sums (in one
    reading of both maps, :func:`_group_sums`), so the variances carry no cancellation.

    Args:
      student, teacher: float32 (N, H, W, C), 0 at masked positions.
      valid: bool (N, H, W, 1).
      reduce: the axes of the groups (:data:`AXES`).
    """
    count = jnp.sum(jnp.broadcast_to(valid, teacher.shape), axis=reduce, keepdims=True,
                    dtype=jnp.float32)
    per_count = 1.0 / jnp.maximum(count, 1.0)
    mean_t = jnp.sum(teacher, axis=reduce, keepdims=True) * per_count
    centred_t = jnp.where(valid, teacher - mean_t, 0.0)
    if normalize_student:
        mean_s = jnp.sum(student, axis=reduce, keepdims=True) * per_count
        centred_s = jnp.where(valid, student - mean_s, 0.0)
    else:
        mean_s = jnp.zeros_like(mean_t)
        centred_s = student
    gap = _gap(student, teacher, valid, mean_t, mean_s)
    return _Moments(count, mean_t, mean_s, *_group_sums(
        reduce, centred_t * centred_t, centred_s * centred_s, centred_t * centred_s, gap * gap,
        gap * centred_t))


def _scales(m: _Moments, normalize_student: bool, eps: float,
            ddof: int) -> tuple[Array, Array, Array, Array]:
    """``a = 1/sqrt(σ² + eps)`` of the teacher's and the student's groups (1 without student
    normalisation), ``r − 1`` for ``r = a_t/a_s``, and the variance divisor ``count − ddof``.

    ``r − 1`` comes from ``σ_s² − σ_t² = (Σδ² − 2Σδ·c_t)/(count − ddof)``, sums of the gap itself,
    so groups that nearly agree get their small ``r − 1`` without cancellation."""
    divisor = jnp.maximum(m.count - ddof, 1.0)
    root_t = jnp.sqrt(m.squares_t / divisor + eps)
    if not normalize_student:
        return 1.0 / root_t, 1.0, 1.0 / root_t - 1.0, divisor
    root_s = jnp.sqrt(m.squares_s / divisor + eps)
    variance_gap = (m.gap_squares - 2.0 * m.gap_teacher) / divisor
    return 1.0 / root_t, 1.0 / root_s, variance_gap / ((root_s + root_t) * root_t), divisor


def _squared_distance(student: Array, teacher: Array, valid: Array, axes: str,
                      normalize_student: bool, eps: float, ddof: int) -> Array:
    """``Σ_valid (N(F^T) − N̂(F^S))²`` with N̂ the student's normalisation (or none).

    With ``c`` the centred values, ``a = 1/sqrt(σ² + eps)``, ``δ = c_t − c_s`` and ``r = a_t/a_s``
    per group, ``y_t − y_s = a_s·(δ + (r − 1)·c_t)``, so the sum is
    ``Σ_groups a_s²·(Σδ² + 2(r − 1)·Σδ·c_t + (r − 1)²·Σc_t²)``: group statistics only
    (:func:`_moments`), no normalised tensor stored, and no difference of large sums when the
    maps nearly agree (the form ``a_t²Σc_t² + a_s²Σc_s² − 2a_ta_sΣc_tc_s`` loses all accuracy
    there). The gradient w.r.t. the student, from ``g = −2(y_t − y_s)``, is the normalisation's
    backward ``a_s·(g − mean(g) − y_s·Σ(g·y_s)/(count − ddof))``, where ``mean(g) = 0`` (both
    normalised slices have zero mean) and ``Σ(y_t − y_s)·y_s = a_s²·(Σδ·c_s + (r − 1)·Σc_t·c_s)``
    with ``Σδ·c_s = Σδ·c_t − Σδ²``: one element-wise pass in the backward
    (:func:`~kdjax.losses._derivative_rules.backward_from_residuals`). The teacher gets no
    gradient.

    Args:
      student, teacher: float32 (N, H, W, C), 0 at masked positions.
      valid: bool (N, H, W, 1).
    Returns:
      float32 scalar.
    """
    rule = backward_from_residuals(
        functools.partial(_squared_distance_forward, axes, normalize_student, eps, ddof),
        functools.partial(_squared_distance_backward, normalize_student, eps, ddof))
    return rule(student, teacher, valid)


def _squared_distance_forward(axes: str, normalize_student: bool, eps: float, ddof: int,
                              student: Array, teacher: Array, valid: Array
                              ) -> tuple[Array, tuple[Array, Array, Array, _Moments]]:
    """:func:`_squared_distance` and its residuals: the inputs and the group moments."""
    m = _moments(student, teacher, valid, AXES[axes], normalize_student)
    _, scale_s, ratio_gap, _ = _scales(m, normalize_student, eps, ddof)
    value = jnp.sum(scale_s**2 * (m.gap_squares + 2.0 * ratio_gap * m.gap_teacher
                                  + ratio_gap**2 * m.squares_t))
    return value, (student, teacher, valid, m)


def _squared_distance_backward(normalize_student: bool, eps: float, ddof: int,
                               residuals: tuple[Array, Array, Array, _Moments],
                               cotangent: Array) -> tuple[Array, None, None]:
    """The cotangent of ``student`` (N, H, W, C) from the residuals; None for the teacher and the
    validity."""
    student, teacher, valid, m = residuals
    _, scale_s, ratio_gap, divisor = _scales(m, normalize_student, eps, ddof)
    gap = _gap(student, teacher, valid, m.mean_t, m.mean_s)
    grad = -2.0 * scale_s * (gap + ratio_gap * (teacher - m.mean_t))
    if normalize_student:
        # Σ g·y_s / (count − ddof), per group.
        projection = (-2.0 * scale_s**2 * ((m.gap_teacher - m.gap_squares) + ratio_gap * m.cross)
                      / divisor)
        grad = scale_s * (grad - scale_s * (student - m.mean_s) * projection)
    grad = jnp.where(valid, cotangent * grad, 0.0)
    return grad, None, None


def normalized_feature_distillation(student: Array, teacher: Array, *, axes: str = "spatial",
                                    normalize_student: bool = True, eps: float = 1e-5,
                                    ddof: int = 0, distance: str = "mse",
                                    mask: Array | None = None) -> Array:
    """NFD: distance between normalised teacher and (optionally normalised) student features.

    ``L = D(N(F^T), N(F̃^S))`` with ``N(F) = (F − μ) / sqrt(σ² + eps)`` (no affine parameters),
    the statistics over the ``axes`` of each group, and ``F̃^S`` the student feature after its 1×1
    connector. ``distance='mse'``: mean of the squared difference over all
    elements (methods.md §9.2, the default). ``distance='fro_over_hw'``: the unsquared Frobenius
    norm of the difference over the whole batch tensor divided by H·W (the third-party form of §2).
    The normalised tensors are never formed: the squared distance follows from each group's
    centred moments and those of the gap between the maps, and its gradient is one element-wise
    pass (``_squared_distance``).

    Args:
      student: (N, H, W, C) student feature, already through the connector.
      teacher: (N, H, W, C) teacher feature.
      axes: the groups of the statistics: 'spatial' (over H·W per image and channel,
        instance-norm style), 'channel' (over C per pixel) or 'spatial_channel' (over H·W·C per
        image, layer-norm style).
      normalize_student: normalise the student too (True) or compare it raw with N(F^T).
      eps: positive constant added to the variance.
      ddof: 0 for the biased variance, 1 for the unbiased one (``torch.std``). The divisor
        ``count − ddof`` is clamped to at least 1, so a single-element group has variance 0.
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
    n, h, w, c = student.shape
    s = as_float32(student)
    t = frozen(teacher)
    if mask is None:
        valid = jnp.ones((n, h, w, 1), bool)
        count = n * h * w * c
    else:
        valid = jnp.asarray(mask, bool)[..., None]
        count = jnp.sum(valid, dtype=jnp.float32) * c
        # Zero masked positions first: not even a NaN there may reach the value or the gradient.
        s = jnp.where(valid, s, 0.0)
        t = jnp.where(valid, t, 0.0)
    total = _squared_distance(s, t, valid, axes, normalize_student, float(eps), ddof)
    if distance == "mse":
        return total / jnp.maximum(count, 1.0)
    return safe_sqrt(total) / (h * w)
