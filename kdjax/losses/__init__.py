"""Pure distillation losses for semantic segmentation (methods.md §9.1 conventions).

Every function takes NHWC arrays, treats the teacher side as a constant, computes in float32 and
returns float32 scalars. None of them holds parameters or state: trainable pieces live in
``kdjax.models`` and stateful methods pass their state in and out explicitly.
"""

from kdjax.losses.pixel_kd import pixel_kd

__all__ = ["pixel_kd"]
