"""SKD holistic (adversarial) distillation, hinge form of CIRKD ``losses/adv.py``, methods.md §5.2."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import as_float32

Array = jax.Array


def skd_adversarial_losses(d_student: Array, d_teacher: Array) -> tuple[Array, Array]:
    """Hinge GAN losses on discriminator scores of student and teacher logit maps.

    ``generator_loss = −mean D(z^S)`` (the student's term, weighted by λ_adv = 0.001 in CIRKD);
    ``discriminator_loss = mean ReLU(1 − D(z^T)) + mean ReLU(1 + D(z^S))`` (weighted by λ_d = 0.1).

    The discriminator (``kdjax.models``) must see gradients through ``d_teacher``, so neither score is
    stopped here. Call it twice per step: with ``D(student_logits)`` for the student update, and with
    ``D(stop_gradient(student_logits))`` and ``D(stop_gradient(teacher_logits))`` for the
    discriminator update; differentiate each loss only with respect to its own parameters.

    Args:
      d_student: discriminator scores of the student logits, any shape (e.g. (N, h, w, 1)).
      d_teacher: discriminator scores of the teacher logits, any shape.
    Returns:
      (generator_loss, discriminator_loss), float32 scalars.
    """
    d_student, d_teacher = as_float32(d_student), as_float32(d_teacher)
    if d_student.size == 0 or d_teacher.size == 0:
        raise ValueError(
            f"discriminator scores must be non-empty, got shapes {d_student.shape} and "
            f"{d_teacher.shape}.")
    generator_loss = -jnp.mean(d_student)
    discriminator_loss = (jnp.mean(jax.nn.relu(1.0 - d_teacher))
                          + jnp.mean(jax.nn.relu(1.0 + d_student)))
    return generator_loss, discriminator_loss
