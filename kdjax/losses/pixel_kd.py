"""Pixel-wise KD (Hinton et al., 2015) on segmentation logits, methods.md §5.1."""

from __future__ import annotations

import jax

from kdjax.losses._common import (as_float32, check_choice, check_pair, check_positive, frozen,
                                  masked_mean, softmax_kl)

Array = jax.Array


def pixel_kl(student_logits: Array, teacher_logits: Array, temperature: float) -> Array:
    """Per-pixel KL(softmax(z^T/T) || softmax(z^S/T)) over classes, without the T² factor.

    Args:
      student_logits, teacher_logits: (N, H, W, K).
    Returns:
      float32 (N, H, W).
    """
    return softmax_kl(as_float32(student_logits), frozen(teacher_logits), axis=-1,
                      temperature=temperature)


def pixel_kd(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
             mask: Array | None = None, normalize: str = "pixel_mean") -> Array:
    """Pixel-wise KD: the KL divergence of class distributions at every pixel.

    ``'pixel_mean'`` (CIRKD ``losses/kd.py``, the default):
    ``T² · 1/(N·H·W) Σ_{n,h,w} KL(p^T || p^S)``.
    ``'element_mean'`` (TorchDistiller/IFVD ``CriterionKD``, ``nn.KLDivLoss()``):
    ``1/(N·H·W·K) Σ KL`` elements, without T².

    Args:
      student_logits: (N, H, W, K) student logits.
      teacher_logits: (N, H, W, K) teacher logits (no gradient flows into them).
      temperature: softmax temperature T.
      mask: optional bool (N, H, W); masked pixels leave the sum and the count.
      normalize: 'pixel_mean' or 'element_mean'.
    Returns:
      float32 scalar.
    """
    check_pair(student_logits, teacher_logits, mask)
    check_positive("temperature", temperature)
    check_choice("normalize", normalize, ("pixel_mean", "element_mean"))
    kl = pixel_kl(student_logits, teacher_logits, temperature)
    if normalize == "pixel_mean":
        return temperature**2 * masked_mean(kl, mask)
    return masked_mean(kl, mask, per_element=student_logits.shape[-1])
