"""The CPU forms of the losses' reductions (:mod:`kdjax.ops.reductions` chooses them on the CPU):
several sums along one axis read in a single pass, and a masked mean squared difference summed
from its own gradient.

A softmax loss sums a handful of element-wise expressions of the same logits along the same axis:
the exponentials of student and teacher, the cross term of a KL. As separate reductions, XLA's CPU
backend hands each float32 sum to YNNPACK, which cannot take a fused producer, so every sum's
element-wise input is first written out in full and read back. One reduction with several outputs
stays in XLA's own loop emitter, which fuses the element-wise producers into it and reads the
logits once.

That loop walks the reduced axis innermost, which is fast when the axis is the last (contiguous)
one, as the class axis of NHWC logits is. Along another axis, such as the positions of (N, P, C)
maps, one long pass reads with a stride of the trailing size and was no faster than YNNPACK's
separate reductions. There :func:`sums` splits the axis into blocks, sums the entries of every
block in one pass and then the few block sums. An axis the block does not divide falls back to
one reduction per operand. The measurements: benchmarks/NOTES.md, 'Several sums in one
reduction', 'CWD and NFD in blocks of positions' and item 52.
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
      operands: arrays of one shape and dtype (checked by :func:`kdjax.ops.reductions.sums`).
      axis: the axis to sum over (removed from the results).
    Returns:
      one array per operand, the operands' shape without ``axis``. Differentiable in every operand.
    """
    axis %= operands[0].ndim
    if axis == operands[0].ndim - 1:
        if len(operands) > 1:
            return _sums_one_pass(axis, *operands)
        return (jnp.sum(operands[0], axis=axis),)
    shape = operands[0].shape
    if shape[axis] > _BLOCK and shape[axis] % _BLOCK == 0:
        split = shape[:axis] + (shape[axis] // _BLOCK, _BLOCK) + shape[axis + 1:]
        partial = _sums_one_pass(axis + 1, *(x.reshape(split) for x in operands))
        return tuple(jnp.sum(x, axis=axis) for x in partial)
    return tuple(jnp.sum(x, axis=axis) for x in operands)


@jax.custom_jvp
def mean_squared_difference(student: Array, teacher: Array, valid: Array | None) -> Array:
    """``Σ_valid (s − t)² / max(count_valid, 1)``, with the derivative ``2(s − t)/count`` at valid
    elements and 0 elsewhere (also where a masked element is NaN or infinite).

    The value is computed from the gradient: :func:`_gradient_and_value`. Its derivative is
    written out so that reverse mode returns that same map; forward mode applies too.

    Args:
      student, teacher: float32 (N, H, W, C).
      valid: bool (N, H, W, 1), or None for every element.
    Returns:
      float32 scalar.
    """
    return _gradient_and_value(student, teacher, valid)[1]


def _gradient_and_value(student: Array, teacher: Array, valid: Array | None) -> tuple[Array, Array]:
    """The gradient ``g = 2(s − t)/count`` (0 at masked elements) and the value ``Σ g² · count/4``.

    Two passes, where the value's own sum of ``(s − t)²`` made three: the sum runs in YNNPACK,
    which cannot take a fused producer, so the difference was written out, summed, and read
    again for the gradient. The sum of ``g²`` reads the gradient itself, which is an output
    anyway.

    ``g²`` is smaller than ``(s − t)²`` by ``count²/4``, so squares of tiny differences can fall
    below float32's normal range and be flushed to 0. Each such square loses less than 2⁻¹²⁶,
    the value at most ``count² · 2⁻¹²⁸``; below ``count² · 2⁻¹⁰⁴`` that could exceed float32's
    rounding, and the value is summed again from ``g · count/2 = s − t``. That branch runs only
    then (a ``lax.cond``), and reads the gradient again.
    """
    difference = student - teacher
    if valid is None:
        count = float(difference.size)
    else:
        # where() rather than a product: a masked NaN or inf must leave the sum and the gradient.
        difference = jnp.where(valid, difference, 0.0)
        count = jnp.maximum(jnp.sum(valid, dtype=jnp.float32) * difference.shape[-1], 1.0)
    gradient = difference * (2.0 / count)
    value = jnp.sum(gradient * gradient) * (count / 4.0)

    def from_differences(gradient: Array) -> Array:
        return jnp.sum(jnp.square(gradient * (count / 2.0))) / count

    value = jax.lax.cond(value < count * count * 2.0 ** -104, from_differences,
                         lambda _: value, gradient)
    return gradient, value


@mean_squared_difference.defjvp
def _mean_squared_difference_jvp(primals, tangents):
    student, teacher, valid = primals
    student_tangent, teacher_tangent, _ = tangents
    gradient, value = _gradient_and_value(student, teacher, valid)
    return value, jnp.sum(gradient * (student_tangent - teacher_tangent))
