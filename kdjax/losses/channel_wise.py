"""Channel-wise distillation, CWD (Shu et al., ICCV 2021, arXiv 2011.13256), methods.md §1."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_pair, check_positive, frozen,
                                  masked_log_softmax, softmax_kl)

Array = jax.Array


def spatial_log_softmax(x: Array, tau: float, mask: Array | None = None) -> Array:
    """log softmax over the H·W positions of each (image, channel), at temperature ``tau``.

    Args:
      x: (N, H, W, C).
      mask: optional bool (N, H, W); masked positions leave the softmax (their entries are 0).
    Returns:
      float32 (N, H·W, C).
    """
    n, h, w, c = x.shape
    z = as_float32(x).reshape(n, h * w, c) / tau
    valid = None if mask is None else jnp.asarray(mask, bool).reshape(n, h * w, 1)
    return masked_log_softmax(z, valid, axis=1)


def channel_wise_divergence(student: Array, teacher: Array, *, tau: float = 4.0,
                            c_norm: int | None = None, mask: Array | None = None) -> Array:
    """CWD: KL between the spatial softmax distributions of every channel.

    ``τ²/(N·C_norm) Σ_{n,c} Σ_i p^T_{n,c,i} (log p^T_{n,c,i} − log p^S_{n,c,i})`` with
    ``p_{n,c,:} = softmax(y_{n,:,:,c} / τ)`` over the H·W positions (paper Eq. for φ; all four code
    versions in methods.md §1.2 agree), computed by :func:`softmax_kl`, equal to the original
    ``softmax().log()`` form wherever that is finite.

    Args:
      student: (N, H, W, C) student map, already adapted to the teacher's C channels.
      teacher: (N, H, W, C) teacher map.
      tau: temperature τ.
      c_norm: channel count of the denominator. None uses C (TorchDistiller, mmrazor); CIRKD divides
        by the student's channel count before its adapter, so pass that to reproduce CIRKD features.
      mask: optional bool (N, H, W). Masked positions leave both distributions; images with no valid
        position leave the mean (the denominator counts N_valid·C_norm).
    Returns:
      float32 scalar.
    """
    check_pair(student, teacher, mask, names=("student", "teacher"), axes="N,H,W,C")
    check_positive("tau", tau)
    n, h, w, c = student.shape
    if c_norm is None:
        c_norm = c
    check_positive("c_norm", c_norm)
    valid = None if mask is None else jnp.asarray(mask, bool).reshape(n, h * w, 1)
    kl = softmax_kl(as_float32(student).reshape(n, h * w, c), frozen(teacher).reshape(n, h * w, c),
                    axis=1, valid=valid, temperature=tau)
    if mask is None:
        images = n
    else:
        images = jnp.sum(jnp.any(valid[..., 0], axis=1), dtype=jnp.float32)
    return tau**2 * jnp.sum(kl) / (jnp.maximum(images, 1.0) * c_norm)
