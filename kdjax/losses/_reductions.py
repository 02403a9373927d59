"""Several sums or maxima along one axis, read in a single pass where that pays.

A softmax loss reduces a handful of element-wise expressions of the same logits along the same
axis: the maxima of student and teacher, the sums of their exponentials, the cross term of a KL. As
separate reductions, XLA's CPU backend hands each float32 sum to YNNPACK, which cannot take a fused
producer, so every sum's element-wise input is first written out in full and read back. One
reduction with several outputs stays in XLA's own loop emitter, which fuses the element-wise
producers into it and reads the logits once (on GPU and TPU it is one fused kernel as well).

That loop walks the reduced axis innermost, which is fast when the axis is the last (contiguous)
one, as the class axis of NHWC logits is. Along another axis it reads with a stride of the trailing
size, and YNNPACK's separate reductions are faster, so there the functions fall back to one
reduction per operand (benchmarks/RESULTS.md, 'Losses', 'Several sums in one reduction').
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array


def _one_pass(operands: tuple[Array, ...], init: float, combine, axis: int) -> tuple[Array, ...]:
    """One variadic ``lax.reduce`` of same-shape operands, each with its own accumulator."""
    inits = tuple(jnp.asarray(init, o.dtype) for o in operands)
    return tuple(jax.lax.reduce(
        operands, inits, lambda a, b: tuple(combine(x, y) for x, y in zip(a, b)), (axis,)))


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _sums_one_pass(axis: int, *operands: Array) -> tuple[Array, ...]:
    return _one_pass(operands, 0.0, jax.lax.add, axis)


@_sums_one_pass.defjvp
def _sums_one_pass_jvp(axis, primals, tangents):
    # A sum is linear: the tangent is the sum of the tangents. Plain sums transpose to broadcasts,
    # so the backward never sees the variadic reduction (which JAX cannot differentiate).
    return (_sums_one_pass(axis, *primals),
            tuple(jnp.sum(t, axis=axis) for t in tangents))


def _normalize_axis(operands: tuple[Array, ...], axis: int) -> tuple[int, bool]:
    """(axis in [0, ndim), whether it is the last axis); checks the operands agree in shape and dtype."""
    first = operands[0]
    for other in operands[1:]:
        if other.shape != first.shape or other.dtype != first.dtype:
            raise ValueError(
                "operands of one reduction must share shape and dtype, got "
                f"{[(o.shape, str(o.dtype)) for o in operands]}.")
    ndim = first.ndim
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for arrays of rank {ndim}.")
    axis %= ndim
    return axis, axis == ndim - 1


def sums(*operands: Array, axis: int) -> tuple[Array, ...]:
    """``tuple(jnp.sum(x, axis) for x in operands)``, one pass over all of them along the last axis.

    Args:
      operands: arrays of one shape and dtype (usually float32 element-wise expressions).
      axis: the axis to sum over (removed from the results).
    Returns:
      one array per operand, the operands' shape without ``axis``. Differentiable in every operand.
    """
    axis, last = _normalize_axis(operands, axis)
    if last and len(operands) > 1:
        return _sums_one_pass(axis, *operands)
    return tuple(jnp.sum(x, axis=axis) for x in operands)


def blocked_sums(*operands: Array, axis: int, block: int = 128) -> tuple[Array, ...]:
    """``tuple(jnp.sum(x, axis) for x in operands)`` in one pass along a non-last axis, in blocks.

    The axis is split into (axis/block, block), the block entries are summed in one reduction over
    all operands, then the (few) block sums. For wide trailing axes, such as the channels of
    (N, P, C) feature maps, this reads the operands once without writing their element-wise
    expressions out, and the two-level sum keeps each float32 accumulation short; it was 1.2× and
    1.4× faster than one long pass or separate sums for NFD's moments (benchmarks/RESULTS.md,
    'NFD from its moments'). An axis that ``block`` does not divide is summed in one long pass.

    Args:
      operands: arrays of one shape and dtype.
      axis: the axis to sum over (removed from the results); not the last one.
      block: the entries per block.
    Returns:
      one array per operand, the operands' shape without ``axis``. Differentiable in every operand.
    """
    axis, last = _normalize_axis(operands, axis)
    if last:
        raise ValueError("blocked_sums is for a non-last axis; use sums() along the last axis.")
    size = operands[0].shape[axis]
    if size % block:
        return _sums_one_pass(axis, *operands)
    split = operands[0].shape[:axis] + (size // block, block) + operands[0].shape[axis + 1:]
    partial = _sums_one_pass(axis + 1, *(x.reshape(split) for x in operands))
    return tuple(jnp.sum(x, axis=axis) for x in partial)


def maxes(*operands: Array, axis: int) -> tuple[Array, ...]:
    """``tuple(jnp.max(x, axis) for x in operands)`` without gradient, for the shifts of softmaxes.

    One pass over all operands along the last axis, as :func:`sums`.

    Args:
      operands: float arrays of one shape and dtype.
      axis: the axis to take the maximum over (removed from the results).
    Returns:
      one array per operand, the operands' shape without ``axis``; a gradient stops here.
    """
    axis, last = _normalize_axis(operands, axis)
    operands = tuple(jax.lax.stop_gradient(x) for x in operands)
    if last and len(operands) > 1:
        return _one_pass(operands, -jnp.inf, jax.lax.max, axis)
    return tuple(jnp.max(x, axis=axis) for x in operands)


def softmax_shifts(*operands: Array, axis: int) -> tuple[Array, ...]:
    """The shift of a stable softmax for each operand: its maximum along ``axis`` (kept, size 1),
    0 where that maximum is not finite (a slice of −inf, as :func:`jax.nn.logsumexp` does).

    Computed by :func:`maxes`, so one pass along the last axis and no gradient.

    Args:
      operands: float arrays of one shape and dtype (masked entries already −inf).
      axis: the softmax axis.
    Returns:
      one array per operand, the operands' shape with ``axis`` of size 1.
    """
    return tuple(jnp.expand_dims(jnp.where(jnp.isfinite(m), m, 0.0), axis)
                 for m in maxes(*operands, axis=axis))
