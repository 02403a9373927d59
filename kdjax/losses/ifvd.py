"""IFVD: intra-class feature variation distillation (Wang et al., ECCV 2020), methods.md §5.3."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_labels, check_mask, check_rank, check_same_spatial, frozen,
                                  masked_mean, nearest_resize_labels, safe_sqrt, valid_label_mask)

Array = jax.Array

# nn.CosineSimilarity's eps, applied to each norm separately (torch 2.x semantics).
COSINE_EPS = 1e-8
# Added to the class pixel count in the prototype mean (as in the original code).
COUNT_EPS = 1e-6


def _check_labels(labels: Array, feat: Array, num_classes: int) -> None:
    check_labels(labels, feat, "student_feat")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")


def _cosine(x: Array, y: Array) -> Array:
    """``x·y / (max(||x||, 1e-8)·max(||y||, 1e-8))`` along the last axis: ``F.cosine_similarity``.

    The norm is ``safe_sqrt`` so that a zero feature (frequent after a ReLU) has a finite gradient;
    there the clamp is active and the result matches PyTorch, value and gradient.
    """
    norm_x = jnp.maximum(safe_sqrt(jnp.sum(jnp.square(x), axis=-1)), COSINE_EPS)
    norm_y = jnp.maximum(safe_sqrt(jnp.sum(jnp.square(y), axis=-1)), COSINE_EPS)
    return jnp.sum(x * y, axis=-1) / (norm_x * norm_y)


def prototype_similarity(feat: Array, labels: Array, member: Array, num_classes: int) -> Array:
    """Cosine similarity of every pixel's feature with its per-image class prototype.

    Args:
      feat: float32 (N, H, W, C).
      labels: int (N, H, W), already at the feature resolution.
      member: bool (N, H, W); True where the pixel belongs to its class prototype. Other pixels are
        compared with their own feature.
      num_classes: K.
    Returns:
      float32 (N, H, W).
    """
    index = jnp.where(member, labels, 0)
    onehot = ((index[..., None] == jnp.arange(num_classes)) & member[..., None]).astype(jnp.float32)
    # HIGHEST: a one-hot contraction must not drop to bf16 passes on accelerators.
    sums = jnp.einsum("nhwk,nhwc->nkc", onehot, feat, precision=jax.lax.Precision.HIGHEST)
    counts = jnp.sum(onehot, axis=(1, 2))
    prototypes = sums / (counts[..., None] + COUNT_EPS)
    centre = jax.vmap(lambda proto, idx: proto[idx])(prototypes, index)
    centre = jnp.where(member[..., None], centre, feat)
    return _cosine(feat, centre)


def ifvd(student_feat: Array, teacher_feat: Array, labels: Array, *, num_classes: int,
         ignore_label: int = 255, mask: Array | None = None) -> Array:
    """IFVD: match the cosine similarity of each pixel to its class prototype.

    ``ỹ = nearest_resize(labels, H, W)`` (PyTorch's floor rule);
    ``μ_{n,k} = Σ_{p: ỹ=k} f_{n,p} / (|{p: ỹ=k}| + 1e-6)`` per image;
    ``g_{n,p} = μ_{n,ỹ_{n,p}}`` for labels in [0, K) other than ``ignore_label``, else ``f_{n,p}``;
    ``s_{n,p} = cos(f_{n,p}, g_{n,p})`` for student and teacher separately;
    ``L = 1/(N·H·W) Σ_{n,p} (s^S − s^T)²`` (CIRKD ``losses/ifvd.py`` = official ``CriterionIFV``).
    Pixels without a class keep their own feature, so they add ≈0 but stay in the denominator.

    Args:
      student_feat: (N, H, W, C_s) student feature.
      teacher_feat: (N, H, W, C_t) teacher feature; C_t may differ from C_s.
      labels: int (N, H_l, W_l) ground truth at any resolution; nearest-resized to (H, W).
      num_classes: K, the number of classes.
      ignore_label: label value that never forms a prototype (255 as in the official code; CIRKD's
        −1 lies outside [0, K) and is excluded anyway).
      mask: optional bool (N, H, W) at the feature resolution. Masked pixels leave the prototypes
        and the mean (the denominator counts the valid pixels).
    Returns:
      float32 scalar.
    """
    check_rank("student_feat", student_feat, 4, "N,H,W,C")
    check_rank("teacher_feat", teacher_feat, 4, "N,H,W,C")
    check_same_spatial("student_feat", student_feat, "teacher_feat", teacher_feat)
    _check_labels(labels, student_feat, num_classes)
    check_mask(mask, student_feat)
    _, h, w, _ = student_feat.shape
    labels = nearest_resize_labels(jnp.asarray(labels), h, w)
    member = valid_label_mask(labels, num_classes, ignore_label)
    student = as_float32(student_feat)
    teacher = frozen(teacher_feat)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        member = member & mask
        # Zeroing (not multiplying) masked pixels keeps even a NaN there out of the prototypes and
        # the gradient.
        student = jnp.where(mask[..., None], student, 0.0)
        teacher = jnp.where(mask[..., None], teacher, 0.0)
    sim_s = prototype_similarity(student, labels, member, num_classes)
    sim_t = prototype_similarity(teacher, labels, member, num_classes)
    return masked_mean(jnp.square(sim_s - sim_t), mask)
