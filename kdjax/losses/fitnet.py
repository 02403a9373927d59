"""FitNets hint loss (Romero et al., ICLR 2015), CIRKD form, methods.md §5.7."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import as_float32, check_mask, check_rank, check_same_shape, frozen
from kdjax.ops.reductions import mean_squared_difference

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
    return mean_squared_difference(as_float32(adapted_student_feat), frozen(teacher_feat), valid)
