"""BPKD: boundary-privileged KD (Liu et al., WACV 2024, arXiv 2306.08075), methods.md §12.

The paper distils the teacher's logits separately on two regions drawn from the ground truth: an
edge region along the class boundaries, where a pixel-level KL divergence teaches the student to
separate the ambiguous classes, and the body region (every other labelled pixel), where a
channel-wise spatial distribution (CWD, methods.md §1) teaches the shape of each class map. Its
training code was never released, so the form below is a reconstruction and every choice that
the paper's text leaves open is an option (methods.md §12 lists each one with its default):

- the regions: :func:`boundary_regions`, at the logits' resolution, with the band ``width``, the
  treatment of ignored pixels (``ignore_borders``) and the map they come from (``edge_source``);
- the edge part: τ_e²·KL per pixel, averaged over edge pixels (``edge_reduction``);
- the body part: CWD over the body positions, which either leave the spatial softmax or stay in
  it with zero logits (``body_masking``);
- ``L = edge_weight · L_edge + body_weight · L_body``: :func:`bpkd`, with both parts from
  :func:`bpkd_parts`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_choice, check_labels, check_pair,
                                  check_positive, check_rank, frozen, masked_mean,
                                  nearest_resize_labels, valid_label_mask)
from kdjax.losses.channel_wise import channel_wise_divergence
from kdjax.losses.pixel_kd import pixel_kl

Array = jax.Array

EDGE_SOURCES = ("labels", "teacher")
EDGE_REDUCTIONS = ("pixel_mean", "class_mean")
BODY_MASKINGS = ("exclude", "zero")

_LOWEST = int(jnp.iinfo(jnp.int32).min)
_HIGHEST = int(jnp.iinfo(jnp.int32).max)


class BpkdParts(NamedTuple):
    """The two unweighted parts of BPKD, float32 scalars."""

    edge: Array
    body: Array


# --------------------------------------------------------------------------------------------------
# Argument checks.

def _check_int(name: str, value: object, minimum: int, advice: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}. {advice}")


def _check_width(width: object) -> None:
    _check_int("width", width, 0,
               "It is the half-size of the square window, in pixels at the logits' resolution: "
               "1 marks every pixel with another class in its 3x3 neighbourhood.")


def _check_size(size: object) -> tuple[int, int]:
    if (not isinstance(size, tuple | list) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)):
        raise ValueError(f"size must be a pair of positive ints (height, width) of the logits, got "
                         f"{size!r}.")
    return int(size[0]), int(size[1])


def _check_weight(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}; use 0 to leave "
                         "that part out.")


# --------------------------------------------------------------------------------------------------
# Regions.

def _window_reduce(x: Array, init: int, op, width: int) -> Array:
    """``op`` over the (2·width+1)² window around every pixel of an int32 (N, H, W) map; the
    window is cut at the image border (padding takes ``init``, which ``op`` ignores)."""
    side = 2 * width + 1
    return jax.lax.reduce_window(x, jnp.int32(init), op, (1, side, side), (1, 1, 1),
                                 ((0, 0), (width, width), (width, width)))


def class_regions(classes: Array, valid: Array, *, width: int,
                  ignore_borders: bool = False) -> tuple[Array, Array]:
    """Edge and body regions of a class map whose validity is given (methods.md §12).

    A valid pixel is an edge pixel when its (2·width+1)² window (cut at the image border) holds a
    valid pixel of another class, or, with ``ignore_borders``, any invalid pixel. The body is
    every other valid pixel. Invalid pixels belong to neither region. Computed with a windowed
    maximum and minimum (``lax.reduce_window``): the largest or the smallest valid class in the
    window differs from the pixel's own class exactly when another valid class is in it.

    Args:
      classes: int (N, H, W) class indices (any value where ``valid`` is False).
      valid: bool (N, H, W).
      width: int >= 0; 0 gives no edge at all.
      ignore_borders: whether an invalid pixel in the window makes an edge.
    Returns:
      (edge, body): bool (N, H, W) each, disjoint, their union ``valid``.
    """
    check_rank("classes", classes, 3, "N,H,W")
    if jnp.shape(valid) != jnp.shape(classes):
        raise ValueError(f"valid must have the shape of classes {tuple(jnp.shape(classes))}, got "
                         f"{tuple(jnp.shape(valid))}.")
    _check_width(width)
    check_choice("ignore_borders", ignore_borders, (False, True))
    valid = jnp.asarray(valid, bool)
    if width == 0:
        return jnp.zeros_like(valid), valid
    classes = jnp.asarray(classes).astype(jnp.int32)
    top = _window_reduce(jnp.where(valid, classes, _LOWEST), _LOWEST, jax.lax.max, width)
    bottom = _window_reduce(jnp.where(valid, classes, _HIGHEST), _HIGHEST, jax.lax.min, width)
    boundary = (top > classes) | (bottom < classes)
    if ignore_borders:
        invalid = jnp.where(valid, 0, 1).astype(jnp.int32)
        boundary = boundary | (_window_reduce(invalid, 0, jax.lax.max, width) > 0)
    edge = valid & boundary
    return edge, valid & ~edge


def _valid_labels(labels: Array, num_classes: int | None, ignore_label: int) -> Array:
    if num_classes is None:
        labels = jnp.asarray(labels)
        return (labels >= 0) & (labels != ignore_label)
    return valid_label_mask(labels, num_classes, ignore_label)


def boundary_regions(labels: Array, size: tuple[int, int], *, width: int = 1,
                     ignore_label: int = 255, num_classes: int | None = None,
                     ignore_borders: bool = False) -> tuple[Array, Array]:
    """BPKD's edge and body regions of ground-truth labels at the logits' size (methods.md §12).

    The labels are nearest-resized to ``size`` (:func:`kdjax.losses.nearest_resize_labels`, the
    PyTorch rule), then split by :func:`class_regions`: a labelled pixel is an edge pixel when a
    pixel of another class lies within ``width`` pixels of it in the max-norm (in its
    (2·width+1)² window). That is a band about 2·width pixels wide along every boundary between
    two classes, the paper's edge region between adjacent categories (arXiv 2306.08075); the body
    is the rest of the labelled pixels.

    Ignored pixels (``ignore_label``, negative labels and, when ``num_classes`` is given, labels
    outside [0, num_classes)) belong to neither region. By default they are unknown rather than a
    class (``ignore_borders=False``): a pixel whose window holds only its own class and ignored
    pixels is body, so void areas and unlabelled strips draw no edges. With ``ignore_borders=True``
    they count as another class; the edge region then equals the union over the classes of the
    dilation minus the erosion of each class's one-hot mask by the (2·width+1)² square, restricted
    to labelled pixels. The image border never makes an edge.

    Args:
      labels: int (N, H_l, W_l) ground truth at any resolution.
      size: (h, w), the logits' spatial size.
      width: int >= 0, in pixels at the logits' resolution (at output stride s it spans about
        s·width input pixels); 0 gives no edge.
      ignore_label: the label of unlabelled pixels.
      num_classes: K, or None to accept every label >= 0 other than ``ignore_label`` as a class.
      ignore_borders: whether ignored pixels draw edges around them.
    Returns:
      (edge, body): bool (N, h, w) each, disjoint.
    """
    check_rank("labels", labels, 3, "N,H,W")
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise ValueError(f"labels must be an integer array (class indices as integers), got dtype "
                         f"{jnp.asarray(labels).dtype}.")
    h, w = _check_size(size)
    if num_classes is not None:
        _check_int("num_classes", num_classes, 1, "It is the number of classes K.")
    labels = nearest_resize_labels(jnp.asarray(labels), h, w)
    return class_regions(labels, _valid_labels(labels, num_classes, ignore_label), width=width,
                         ignore_borders=ignore_borders)


# --------------------------------------------------------------------------------------------------
# The two parts.

def _class_mean(values: Array, classes: Array, region: Array, num_classes: int) -> Array:
    """Mean over the classes present in ``region`` of each class's mean of ``values`` there."""
    member = (classes[..., None] == jnp.arange(num_classes)) & region[..., None]
    totals = jnp.sum(jnp.where(member, values[..., None], 0.0), axis=(0, 1, 2))
    counts = jnp.sum(member, axis=(0, 1, 2), dtype=jnp.float32)
    present = counts > 0
    per_class = jnp.where(present, totals / jnp.maximum(counts, 1.0), 0.0)
    return jnp.sum(per_class) / jnp.maximum(jnp.sum(present, dtype=jnp.float32), 1.0)


def bpkd_parts(student_logits: Array, teacher_logits: Array, labels: Array, *, num_classes: int,
               ignore_label: int = 255, edge_tau: float = 1.0, body_tau: float = 4.0,
               width: int = 1, ignore_borders: bool = False, edge_source: str = "labels",
               edge_reduction: str = "pixel_mean", body_masking: str = "exclude",
               mask: Array | None = None) -> BpkdParts:
    """The edge and body parts of BPKD, unweighted (methods.md §12; arXiv 2306.08075).

    Regions (:func:`boundary_regions`, at the logits' size h×w): E (edge) and B (body), both
    restricted to ``mask``. With ``p = softmax(z/τ)`` over the K classes of a pixel and
    ``q_{n,k} = softmax over the positions i ∈ B_n of z_{n,i,k}/τ_b``:

    ``L_edge = τ_e²/|E| · Σ_{(n,i)∈E} KL(p^T_{n,i} || p^S_{n,i})`` ('pixel_mean'), or the
    mean over the classes present in E of that mean over each class's edge pixels
    ('class_mean');

    ``L_body = τ_b²/(N_B·K) Σ_{n,k} KL(q^T_{n,k} || q^S_{n,k})``, CWD over the body positions
    (N_B: images with a body pixel). With ``body_masking='zero'`` the non-body positions stay in
    the spatial softmax with logits 0 for both networks (the product ``z ⊙ 1_B``) and N_B = N.

    Each part is 0, with a zero gradient, when its region is empty. A part reads only the logits
    of its own region: the edge part does not change with the logits at body pixels, nor the body
    part with those at edge pixels.

    Args:
      student_logits: (N, h, w, K) student logits.
      teacher_logits: (N, h, w, K) teacher logits (no gradient flows into them).
      labels: int (N, H_l, W_l) ground truth at any resolution, nearest-resized to h×w.
      num_classes: K; must equal the logits' last axis. Labels outside [0, K) are ignored.
      ignore_label: the label of unlabelled pixels; they belong to neither region.
      edge_tau: τ_e, the temperature of the edge KL (> 0).
      body_tau: τ_b, the temperature of the body CWD (> 0).
      width: the edge band's half-width in logit pixels (int >= 0; 0: no edge, plain CWD on B).
      ignore_borders: whether ignored pixels draw edges (see :func:`boundary_regions`).
      edge_source: 'labels' (the ground truth) or 'teacher' (the teacher's arg-max classes at the
        labelled pixels) as the class map the edges are drawn from.
      edge_reduction: 'pixel_mean' or 'class_mean', over the whole batch; 'class_mean' groups
        edge pixels by their class in the map of ``edge_source``.
      body_masking: 'exclude' (non-body positions leave the spatial softmax) or 'zero'.
      mask: optional bool (N, h, w); masked pixels leave both regions. They still shape the
        boundaries, which come from the class map alone.
    Returns:
      BpkdParts(edge, body): float32 scalars.
    """
    check_pair(student_logits, teacher_logits, mask)
    check_labels(labels, student_logits, "student_logits")
    _check_int("num_classes", num_classes, 1, "It is the number of classes K.")
    classes_axis = student_logits.shape[-1]
    if num_classes != classes_axis:
        raise ValueError(
            f"num_classes ({num_classes}) must equal the logits' class axis, got logits of shape "
            f"{tuple(student_logits.shape)}. BPKD distils logits: pass the (N,H,W,K) logits of "
            "both networks and the dataset's class count.")
    check_positive("edge_tau", edge_tau)
    check_positive("body_tau", body_tau)
    _check_width(width)
    check_choice("ignore_borders", ignore_borders, (False, True))
    check_choice("edge_source", edge_source, EDGE_SOURCES)
    check_choice("edge_reduction", edge_reduction, EDGE_REDUCTIONS)
    check_choice("body_masking", body_masking, BODY_MASKINGS)

    _, h, w, _ = student_logits.shape
    labels = nearest_resize_labels(jnp.asarray(labels), h, w)
    valid = _valid_labels(labels, num_classes, ignore_label)
    if edge_source == "labels":
        classes = labels
    else:
        classes = jnp.argmax(frozen(teacher_logits), axis=-1)
    edge, body = class_regions(classes, valid, width=width, ignore_borders=ignore_borders)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        edge, body = edge & mask, body & mask

    kl = pixel_kl(student_logits, teacher_logits, edge_tau)
    if edge_reduction == "pixel_mean":
        edge_loss = masked_mean(kl, edge)
    else:
        edge_loss = _class_mean(kl, jnp.asarray(classes).astype(jnp.int32), edge, num_classes)
    edge_loss = edge_tau**2 * edge_loss

    if body_masking == "exclude":
        body_loss = channel_wise_divergence(student_logits, teacher_logits, tau=body_tau,
                                            mask=body)
    else:
        inside = body[..., None]
        body_loss = channel_wise_divergence(jnp.where(inside, as_float32(student_logits), 0.0),
                                            jnp.where(inside, frozen(teacher_logits), 0.0),
                                            tau=body_tau)
    return BpkdParts(edge_loss, body_loss)


def bpkd(student_logits: Array, teacher_logits: Array, labels: Array, *, num_classes: int,
         ignore_label: int = 255, edge_weight: float = 1.0, body_weight: float = 3.0,
         edge_tau: float = 1.0, body_tau: float = 4.0, width: int = 1,
         ignore_borders: bool = False, edge_source: str = "labels",
         edge_reduction: str = "pixel_mean", body_masking: str = "exclude",
         mask: Array | None = None) -> Array:
    """BPKD: ``edge_weight · L_edge + body_weight · L_body`` (methods.md §12; arXiv 2306.08075).

    The parts and every other argument are those of :func:`bpkd_parts`. The defaults give each
    part the setting of the established loss it restricts to its region: pixel KD as in the CIRKD
    benchmark (τ = 1, weight 1) on the edges, and the official CWD logit recipe (τ = 4, weight 3)
    on the body, so that ``width=0`` is exactly CWD on the labelled pixels.

    Args:
      edge_weight: λ_edge >= 0.
      body_weight: λ_body >= 0.
    Returns:
      float32 scalar.
    """
    _check_weight("edge_weight", edge_weight)
    _check_weight("body_weight", body_weight)
    edge, body = bpkd_parts(student_logits, teacher_logits, labels, num_classes=num_classes,
                            ignore_label=ignore_label, edge_tau=edge_tau, body_tau=body_tau,
                            width=width, ignore_borders=ignore_borders, edge_source=edge_source,
                            edge_reduction=edge_reduction, body_masking=body_masking, mask=mask)
    return edge_weight * edge + body_weight * body
