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

    Its derivative is written out so that the gradient follows the value's sum
    (:func:`_mean_squared_difference_jvp`); forward and reverse mode both apply.

    Args:
      student, teacher: float32 (N, H, W, C).
      valid: bool (N, H, W, 1), or None for every element.
    Returns:
      float32 scalar.
    """
    return _difference_and_value(student, teacher, valid)[1]


def _difference_and_value(student, teacher, valid):
    """The difference (0 at masked elements), the mean of its squares, and their count."""
    difference = student - teacher
    if valid is None:
        count = float(difference.size)
    else:
        # where() rather than a product: a masked NaN or inf must leave the sum and the gradient.
        difference = jnp.where(valid, difference, 0.0)
        count = jnp.maximum(jnp.sum(valid, dtype=jnp.float32) * difference.shape[-1], 1.0)
    return difference, jnp.sum(difference * difference) / count, count


@_mean_squared_difference.defjvp
def _mean_squared_difference_jvp(primals, tangents):
    student, teacher, valid = primals
    student_tangent, teacher_tangent, _ = tangents
    difference, value, count = _difference_and_value(student, teacher, valid)
    # The value is a sum of squares, never below 0, so the added term is always 0. It makes the
    # derivative, and so the gradient, depend on the value: XLA then finishes the value's sum,
    # which reads the stored difference, before it forms the gradient, which can overwrite that
    # buffer in place. Without it, under the memory-saving scheduler of the `kdjax` command, XLA
    # forms the gradient first and keeps a second map of the feature's size
    # (benchmarks/RESULTS.md, 'Closing the gap', item 39).
    derivative = (2.0 / count + jnp.where(value < 0.0, value, 0.0)) * difference
    return value, jnp.sum(derivative * (student_tangent - teacher_tangent))
