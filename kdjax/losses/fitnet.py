"""FitNets hint loss (Romero et al., ICLR 2015), CIRKD form, methods.md §5.7."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import as_float32, check_mask, check_rank, check_same_shape, frozen

Array = jax.Array


def fitnet(adapted_student_feat: Array, teacher_feat: Array, *, mask: Array | None = None) -> Array:
    """``mean_{n,h,w,c} (Conv1x1(F^S) − F^T)²``: the student's adapted feature regresses the teacher's.

    Args:
      adapted_student_feat: (N, H, W, C_t), the student feature after its trainable 1×1 connector
        (a ``kdjax.models`` module beside the student).
      teacher_feat: (N, H, W, C_t).
      mask: optional bool (N, H, W); masked pixels leave the mean (over valid pixels × C).
    Returns:
      float32 scalar; 0 with a zero gradient when every pixel is masked.
    """
    check_rank("adapted_student_feat", adapted_student_feat, 4, "N,H,W,C")
    check_same_shape("adapted_student_feat", adapted_student_feat, "teacher_feat", teacher_feat)
    check_mask(mask, adapted_student_feat)
    valid = None if mask is None else jnp.asarray(mask, bool)[..., None]
    return _mean_squared_difference(as_float32(adapted_student_feat), frozen(teacher_feat), valid)


@jax.custom_jvp
def _mean_squared_difference(student: Array, teacher: Array, valid: Array | None) -> Array:
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
    anyway (``benchmarks/losses.py``).

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


@_mean_squared_difference.defjvp
def _mean_squared_difference_jvp(primals, tangents):
    student, teacher, valid = primals
    student_tangent, teacher_tangent, _ = tangents
    gradient, value = _gradient_and_value(student, teacher, valid)
    return value, jnp.sum(gradient * (student_tangent - teacher_tangent))
