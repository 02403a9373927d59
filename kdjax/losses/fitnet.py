"""FitNets hint loss (Romero et al., ICLR 2015), CIRKD form, methods.md §5.7."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_mask, check_rank, check_same_shape, frozen,
                                  masked_mean)

Array = jax.Array


def fitnet(adapted_student_feat: Array, teacher_feat: Array, *, mask: Array | None = None) -> Array:
    """``mean_{n,h,w,c} (Conv1x1(F^S) − F^T)²``: the student's adapted feature regresses the teacher's.

    Args:
      adapted_student_feat: (N, H, W, C_t), the student feature after its trainable 1×1 connector
        (a ``kdjax.models`` module beside the student).
      teacher_feat: (N, H, W, C_t).
      mask: optional bool (N, H, W); masked pixels leave the mean (over valid pixels × C).
    Returns:
      float32 scalar.
    """
    check_rank("adapted_student_feat", adapted_student_feat, 4, "N,H,W,C")
    check_same_shape("adapted_student_feat", adapted_student_feat, "teacher_feat", teacher_feat)
    check_mask(mask, adapted_student_feat)
    squared = jnp.sum(jnp.square(as_float32(adapted_student_feat) - frozen(teacher_feat)), axis=-1)
    return masked_mean(squared, mask, per_element=teacher_feat.shape[-1])
