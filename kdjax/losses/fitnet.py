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


@jax.custom_vjp
def _mean_squared_difference(student: Array, teacher: Array, valid: Array | None) -> Array:
    """``Σ_valid (s − t)² / max(count_valid, 1)``, with the gradient ``2(s − t)/count`` at valid
    elements and 0 elsewhere (also where a masked element is NaN or infinite).

    Written out so that the gradient follows the value's sum
    (:func:`_mean_squared_difference_bwd`).

    Args:
      student, teacher: float32 (N, H, W, C).
      valid: bool (N, H, W, 1), or None for every element.
    Returns:
      float32 scalar.
    """
    return _mean_squared_difference_fwd(student, teacher, valid)[0]


def _mean_squared_difference_fwd(student, teacher, valid):
    difference = student - teacher
    if valid is None:
        count = float(difference.size)
    else:
        # where() rather than a product: a masked NaN or inf must leave the sum and the gradient.
        difference = jnp.where(valid, difference, 0.0)
        count = jnp.maximum(jnp.sum(valid, dtype=jnp.float32) * difference.shape[-1], 1.0)
    value = jnp.sum(difference * difference) / count
    return value, (difference, count, value)


def _mean_squared_difference_bwd(residuals, cotangent):
    difference, count, value = residuals
    # The value is a sum of squares, never below 0, so the added term is always 0. It makes the
    # gradient depend on the value: XLA then finishes the value's sum, which reads the stored
    # difference, before it forms the gradient, which can overwrite that buffer in place. Without
    # it, under the memory-saving scheduler of the `kdjax` command, XLA forms the gradient first
    # and keeps a second map of the feature's size (benchmarks/RESULTS.md, 'Closing the gap',
    # item 39).
    scale = 2.0 * cotangent / count + jnp.where(value < 0.0, value, 0.0)
    return scale * difference, None, None


_mean_squared_difference.defvjp(_mean_squared_difference_fwd, _mean_squared_difference_bwd)
