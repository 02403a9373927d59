"""Several sums along one axis, read in a single pass where that pays, and the shifts of softmaxes.

A softmax loss sums a handful of element-wise expressions of the same logits along the same axis:
the exponentials of student and teacher, the cross term of a KL. As separate reductions, XLA's CPU
backend hands each float32 sum to YNNPACK, which cannot take a fused producer, so every sum's
element-wise input is first written out in full and read back. One reduction with several outputs
stays in XLA's own loop emitter, which fuses the element-wise producers into it and reads the
logits once (on GPU and TPU it is one fused kernel as well).

That loop walks the reduced axis innermost, which is fast when the axis is the last (contiguous)
one, as the class axis of NHWC logits is. Along another axis, such as the positions of (N, P, C)
maps, one long pass reads with a stride of the trailing size and was no faster than YNNPACK's
separate reductions (benchmarks/NOTES.md, 'Several sums in one reduction'). There
:func:`sums` splits the axis into blocks, sums the entries of every block in one pass and then
the few block sums: 1.2–1.3× faster than separate sums for CWD's logits and 1.4× for NFD's
features ('CWD and NFD in blocks of positions'). An axis the block does not divide falls back to
one reduction per operand.

The maxima that shift the softmaxes read the logits themselves, with no producer to fuse, and
YNNPACK takes them faster one by one than XLA's loop takes them together: 0.38 against 0.79 ms
for pixel KD's two maxima at the Cityscapes size (``benchmarks/losses.py``). So
:func:`softmax_shifts` takes one reduction per operand.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _sums_one_pass(axis: int, *operands: Array) -> tuple[Array, ...]:
    """One variadic ``lax.reduce`` of same-shape operands, each with its own accumulator."""
    zeros = tuple(jnp.zeros((), o.dtype) for o in operands)
    return tuple(jax.lax.reduce(
        operands, zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)), (axis,)))


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


# Entries per block of a sum along a non-last axis: short float32 accumulations, and block sums
# few enough to cost nothing (64 and 32 measured alike for CWD, 64 and 128 for NFD).
_BLOCK = 64


def sums(*operands: Array, axis: int) -> tuple[Array, ...]:
    """``tuple(jnp.sum(x, axis) for x in operands)``, reading the operands once where that pays.

    Along the last axis: one reduction over all operands. Along another axis of a size that
    ``_BLOCK`` divides (and exceeds): the axis split into (size/_BLOCK, _BLOCK), one reduction over
    the blocks' entries, then a sum of the block sums per operand. Otherwise one reduction per
    operand.

    Args:
      operands: arrays of one shape and dtype (usually float32 element-wise expressions).
      axis: the axis to sum over (removed from the results).
    Returns:
      one array per operand, the operands' shape without ``axis``. Differentiable in every operand.
    """
    axis, last = _normalize_axis(operands, axis)
    if last:
        if len(operands) > 1:
            return _sums_one_pass(axis, *operands)
        return (jnp.sum(operands[0], axis=axis),)
    shape = operands[0].shape
    if shape[axis] > _BLOCK and shape[axis] % _BLOCK == 0:
        split = shape[:axis] + (shape[axis] // _BLOCK, _BLOCK) + shape[axis + 1:]
        partial = _sums_one_pass(axis + 1, *(x.reshape(split) for x in operands))
        return tuple(jnp.sum(x, axis=axis) for x in partial)
    return tuple(jnp.sum(x, axis=axis) for x in operands)


def softmax_shifts(*operands: Array, axis: int) -> tuple[Array, ...]:
    """The shift of a stable softmax for each operand: its maximum along ``axis`` (kept, size 1),
    0 where that maximum is not finite (a slice of −inf, as :func:`jax.nn.logsumexp` does).

    One reduction per operand, and no gradient: a softmax does not depend on its shift.

    Args:
      operands: float arrays of one shape and dtype (masked entries already −inf).
      axis: the softmax axis.
    Returns:
      one array per operand, the operands' shape with ``axis`` of size 1.
    """
    axis, _ = _normalize_axis(operands, axis)
    maxima = (jnp.max(jax.lax.stop_gradient(x), axis=axis, keepdims=True) for x in operands)
    return tuple(jnp.where(jnp.isfinite(m), m, 0.0) for m in maxima)
