"""Relational (pairwise-affinity) distillation: PFS, SKD pair-wise and CIRKD mini-batch.

All three compare P×P affinity maps ``A = F̂ F̂ᵀ`` of per-pixel L2-normalised features, so student
and teacher may have different channel counts (only N, H, W must match):

- :func:`pixel_feature_similarity`, PFS (Shan, arXiv 1910.14226), methods.md §3 and §9.3;
- :func:`skd_pairwise`, SKD pair-wise (Liu et al., CVPR 2019), methods.md §5.2;
- :func:`cirkd_minibatch`, CIRKD mini-batch pixel-to-pixel (Yang et al., CVPR 2022), methods.md
  §5.4.

Memory (methods.md §9.1). ``block_size=None`` materialises the affinity maps: O(P²) memory, which is
~270 MB per map for a 64×128 feature. An int ``block_size`` scans over blocks of that many rows
of one image's (or one group's) maps, and each block turns its rows of the maps into its share of
the gradient before the next block starts, so no map outlives its block: peak memory
O(P·block_size) per block whatever the batch size, same value and gradient as the dense form.

PFS and SKD need no P×P map at all (``form='gram'``). With X (P×C) the normalised features of one
image, ``Σ_ij (A^S − A^T)²_ij = ‖X_SᵀX_S‖² − 2‖X_SᵀX_T‖² + ‖X_TᵀX_T‖²`` (Frobenius norms of C×C
Gram matrices; expand ``tr((A^S − A^T)²)`` and use ``tr(XYᵀYXᵀ) = ‖XᵀY‖²``). That costs
O(P·C²) time and O(C²) memory instead of O(P²·C) and O(P²), and is exact up to float32 rounding.
The three terms are of size P²·mean(A²) and cancel down to the loss, so its relative error grows as
the student's maps approach the teacher's: for ReLU features on a 64×64 map with a loss of 5e-4,
3e-6 against float64 (the pairs form: 7e-8), and the gradients of the two forms agreed to 4e-6.
``form='auto'`` takes whichever form needs fewer multiply-adds: the Gram form whenever
C_S² + C_S·C_T + C_T² ≤ P·(C_S + C_T), which holds for head features (C in the hundreds, P in the
thousands) and fails for SKD's 'half' pooling (P = 9 cells).

Masks (N, H, W bool). A masked pixel leaves every pair it belongs to. With pooling, the mask is
pooled too: a cell is valid if any of its pixels is, and pools over its valid pixels only (average
of the valid pixels, or their maximum); see :mod:`kdjax.losses.pooling`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_choice, check_group_size, check_mask,
                                  check_optional_positive_int, check_positive, check_rank,
                                  check_same_spatial, frozen, l2_normalize, softmax_kl)
from kdjax.losses._derivative_rules import gradient_from_forward
from kdjax.losses.pooling import pool_ceil

Array = jax.Array

# Affinities are the whole signal of these losses; keep the float32 matmuls exact on TPU, whose
# default float32 matmul precision rounds the operands to bfloat16.
_PRECISION = jax.lax.Precision.HIGHEST

# Official SKD (utils.py, ``L2``): f / (||f||₂ + 1e-8) with the norm detached.
DETACHED_NORM_EPS = 1e-8

# pair_term(A^S rows, A^T rows, column validity or None) -> one value per row and column image.
PairTerm = Callable[[Array, Array, Array | None], Array]


# --------------------------------------------------------------------------------------------------
# Argument checks.

def _check_features(student_feat: Array, teacher_feat: Array, mask: Array | None) -> None:
    check_rank("student_feat", student_feat, 4, "N,H,W,C")
    check_rank("teacher_feat", teacher_feat, 4, "N,H,W,C")
    check_same_spatial("student_feat", student_feat, "teacher_feat", teacher_feat)
    check_mask(mask, student_feat)


def _pool_window(pool: object, spatial: tuple[int, int], allow_half: bool) -> tuple[int, int]:
    """The (kh, kw) pooling window (= stride) that ``pool`` names for an H×W map."""
    if allow_half and isinstance(pool, str) and pool == "half":
        h, w = spatial
        if h < 2 or w < 2:
            raise ValueError(
                f"pool='half' needs H and W of at least 2 (kernel int(0.5·H) × int(0.5·W)), got "
                f"H×W = {h}×{w}.")
        return h // 2, w // 2
    if isinstance(pool, int) and not isinstance(pool, bool) and pool >= 1:
        return pool, pool
    if (isinstance(pool, tuple) and len(pool) == 2
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in pool)):
        return pool
    choices = "a positive int, a pair of positive ints" + (" or 'half'" if allow_half else "")
    raise ValueError(f"pool must be {choices}, got {pool!r}.")


# --------------------------------------------------------------------------------------------------
# Per-pixel normalisation.

def unit_pixels(x: Array) -> Array:
    """``F.normalize`` over the channels of (..., C): ``x / max(||x||₂, 1e-12)``.

    An all-zero vector (a masked pixel, an empty pooled cell, a pixel a ReLU switched off) stays 0
    with a zero gradient; plain ``l2_normalize`` would give it PyTorch's gradient of order 1/eps.
    """
    nonzero = jnp.sum(jnp.square(x), axis=-1, keepdims=True) > 0
    return jnp.where(nonzero, l2_normalize(jnp.where(nonzero, x, 1.0)), 0.0)


def unit_pixels_detached(x: Array) -> Array:
    """Official SKD normalisation ``x / (stop_gradient(||x||₂) + 1e-8)`` over the channels.

    The norm is a constant to the gradient, which then is ``g / (||x|| + 1e-8)``: it keeps the
    component along ``x`` that ``F.normalize``'s gradient projects out.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(jax.lax.stop_gradient(x)), axis=-1, keepdims=True))
    return x / (norm + DETACHED_NORM_EPS)


# --------------------------------------------------------------------------------------------------
# The shared engine: sums of per-row terms of affinity maps, dense or in blocks of rows.

def pairwise_row_sum(pair_term: PairTerm, student: Array, teacher: Array, valid: Array | None,
                     block_size: int | None, *, symmetric: bool = False) -> Array:
    """Σ of ``pair_term`` over every valid row of every within-group affinity map.

    For every group g, every image i and every image j of the group (i = j included), the affinity
    maps are ``A^S_{gij} = X^S_{gi} X^S_{gj}ᵀ`` and ``A^T_{gij}`` likewise (P×P, rows indexed by the
    pixels of image i, columns by those of image j). ``pair_term`` maps the rows of A^S and A^T (the
    column axis last) to one value per row; the result sums these values over the rows that are
    valid in image i and the images j that have at least one valid column.

    Differentiable in ``student`` only; the teacher is a constant (callers pass it frozen). Under
    differentiation each block of rows forms its gradient w.r.t. its A^S rows in the forward pass
    and turns it at once into the gradient w.r.t. X^S (rows and columns), so the backward pass only
    scales that (:func:`~kdjax.losses._derivative_rules.gradient_from_forward`): four matrix
    products per block, where a rematerialised autodiff needs six. A symmetric ``pair_term`` needs
    three (see ``symmetric``).

    Args:
      pair_term: ``(a_s, a_t, col_valid) -> terms``. ``a_s``, ``a_t``: (B, k, B, P) rows of one
        group's maps (image i, k rows of image i, image j, column); ``col_valid``: bool
        broadcastable to them, or None when every column is valid. Returns (B, k, B). It must not
        let invalid columns change the value (use ``where``, not multiplication).
      student: (G, B, P, C_s) per-pixel features, already normalised.
      teacher: (G, B, P, C_t) likewise.
      valid: bool (G, B, P) or None (every pixel valid). Invalid pixels must hold finite values.
      block_size: None for the dense form; an int k scans over blocks of k rows of one group, so
        that peak memory is O(B·P·k) instead of O(B²·P²), whatever the number of groups. P need
        not be a multiple of k: padded rows are masked.
      symmetric: whether the sum is symmetric in the pairs, i.e. its gradient w.r.t. the map is
        G with ``G_{gij}[r, q] = G_{gji}[q, r]`` (a term of the entries alone, such as a squared
        difference, with symmetric masks). The gradient w.r.t. X^S then is ``(G + Gᵀ)X^S = 2 G X^S``
        and the columns' share need not be formed: three products per block. A softmax over the
        columns is not symmetric.
    Returns:
      float32 scalar.
    """
    rule = gradient_from_forward(
        functools.partial(_row_sum_and_grad, pair_term, block_size, symmetric),
        value=functools.partial(_row_sum, pair_term, block_size))
    return rule(student, teacher, valid)


def _blocks(block_size: int | None, student: Array, teacher: Array,
            valid: Array | None) -> tuple[Array, Array, Array]:
    """One group's rows of X^S, X^T and their validity, (blocks, B, k, ...); padded rows are
    invalid."""
    b, p, _ = student.shape
    rows_valid = jnp.ones((b, p), bool) if valid is None else valid
    k = p if block_size is None else block_size
    blocks = -(-p // k)

    def split_rows(x: Array) -> Array:
        x = jnp.pad(x, [(0, 0), (0, blocks * k - p)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, blocks, k, *x.shape[2:]), 1, 0)

    return split_rows(student), split_rows(teacher), split_rows(rows_valid)


def _block_functions(pair_term: PairTerm, student: Array, teacher: Array, valid: Array | None):
    """For one group (``student`` (B, P, C_s), ``teacher`` (B, P, C_t), ``valid`` (B, P) or None):
    ``maps(rows_s, rows_t) -> (A^S, A^T)`` rows of one block, (B, k, B, P) each, and
    ``kept_sum(a_s, a_t, rows_valid) -> Σ`` of ``pair_term`` over the kept rows of the block."""
    if valid is None:
        col_valid = image_has_valid = None
    else:
        col_valid = valid[None, None, :, :]
        image_has_valid = jnp.any(valid, axis=-1)[None, None, :]

    # The columns channel-major, (C, B, P), formed once per group: a product with (B, P, C)
    # columns got a transposed copy of them in every block, where XLA's CPU backend left it.
    columns_s = jnp.einsum("jqc->cjq", student)
    columns_t = jnp.einsum("jqc->cjq", teacher)

    def maps(rows_s: Array, rows_t: Array) -> tuple[Array, Array]:
        return (jnp.einsum("ikc,cjq->ikjq", rows_s, columns_s, precision=_PRECISION),
                jnp.einsum("ikc,cjq->ikjq", rows_t, columns_t, precision=_PRECISION))

    def kept_sum(a_s: Array, a_t: Array, rows_valid: Array) -> Array:
        keep = rows_valid[..., None]
        if image_has_valid is not None:
            keep = keep & image_has_valid
        return jnp.sum(jnp.where(keep, pair_term(a_s, a_t, col_valid), 0.0))

    return maps, kept_sum


def _per_group(group_fn, student: Array, teacher: Array, valid: Array | None):
    """``group_fn(student_g, teacher_g, valid_g)`` for every group in turn, results stacked.

    The groups run one after another rather than batched, so that a block holds k rows of one
    group, (B, k, B, P) per map: its memory does not grow with the number of groups, and the
    smaller blocks are no slower (benchmarks/NOTES.md, 'One group per block').
    """
    _, stacked = jax.lax.scan(lambda _, group: (None, group_fn(*group)), None,
                              (student, teacher, valid))
    return stacked


def _row_sum(pair_term: PairTerm, block_size: int | None, student: Array, teacher: Array,
             valid: Array | None) -> Array:
    """:func:`pairwise_row_sum` (value only: no gradient is formed)."""

    def group_total(student_g, teacher_g, valid_g):
        maps, kept_sum = _block_functions(pair_term, student_g, teacher_g, valid_g)

        def body(total, block):
            rows_s, rows_t, rows_valid = block
            return total + kept_sum(*maps(rows_s, rows_t), rows_valid), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                                _blocks(block_size, student_g, teacher_g, valid_g))
        return total

    return jnp.sum(_per_group(group_total, student, teacher, valid))


def _row_sum_and_grad(pair_term: PairTerm, block_size: int | None, symmetric: bool,
                      student: Array, teacher: Array,
                      valid: Array | None) -> tuple[Array, tuple[Array, None, None]]:
    """:func:`pairwise_row_sum` and its gradient w.r.t. ``student`` (G, B, P, C_s), block by
    block; the teacher and the validity get none."""

    def group_total_and_grad(student_g, teacher_g, valid_g):
        maps, kept_sum = _block_functions(pair_term, student_g, teacher_g, valid_g)
        b, p, c = student_g.shape
        # A symmetric sum's columns' share equals its rows' share, and is not carried.
        columns_start = None if symmetric else jnp.zeros((c, b, p), jnp.float32)

        def body(carry, block):
            total, grad_columns = carry
            rows_s, rows_t, rows_valid = block
            a_s, a_t = maps(rows_s, rows_t)
            value, grad_a = jax.value_and_grad(kept_sum)(a_s, a_t, rows_valid)
            # A^S = X^S_rows · X^Sᵀ. The columns' share is formed transposed, (C, B, P): the
            # contraction then runs over the leading axes of the block's rows and of grad_a,
            # which the matrix product reads in place, where (B, P, C) would copy grad_a
            # transposed.
            grad_rows = jnp.einsum("ikjq,jqc->ikc", grad_a, student_g, precision=_PRECISION)
            if not symmetric:
                grad_columns += jnp.einsum("ikc,ikjq->cjq", rows_s, grad_a, precision=_PRECISION)
            return (total + value, grad_columns), grad_rows

        (total, grad_columns), grad_rows = jax.lax.scan(
            body, (jnp.zeros((), jnp.float32), columns_start),
            _blocks(block_size, student_g, teacher_g, valid_g))
        grad_rows = jnp.moveaxis(grad_rows, 0, 1).reshape(b, -1, c)[:, :p]
        if symmetric:
            return total, 2.0 * grad_rows
        return total, jnp.einsum("cjq->jqc", grad_columns) + grad_rows

    totals, grad_student = _per_group(group_total_and_grad, student, teacher, valid)
    return jnp.sum(totals), (grad_student, None, None)


def _squared_difference_rows(a_s: Array, a_t: Array, col_valid: Array | None) -> Array:
    """Σ_j (A^S_ij − A^T_ij)² over the valid columns j."""
    squared = jnp.square(a_s - a_t)
    if col_valid is not None:
        squared = jnp.where(col_valid, squared, 0.0)
    # Summed as a (rows, P) matrix: inside the block loop, XLA's CPU backend kept the unit axes of
    # a (B, k, B) result (B = 1 for PFS and SKD) in a reduction many times slower than this one.
    return jnp.sum(squared.reshape(-1, squared.shape[-1]), axis=-1).reshape(squared.shape[:-1])


def _kl_rows(tau: float) -> PairTerm:
    """Per row: KL(softmax(A^T_i/τ) ‖ softmax(A^S_i/τ)), softmax over the valid columns.

    By :func:`softmax_kl`, whose row maxima and sums are reductions apart from the affinity
    product: a log-softmax's maximum would be fused into the product on CPU, which then ran at
    about half the speed of the product alone.
    """

    def term(a_s: Array, a_t: Array, col_valid: Array | None) -> Array:
        return softmax_kl(a_s, a_t, axis=-1, valid=col_valid, temperature=tau)

    return term


def gram_squared_difference(student: Array, teacher: Array) -> Array:
    """Σ_n Σ_ij (A^S_nij − A^T_nij)² without forming A, from C×C Gram matrices.

    Args:
      student: (N, P, C_s) normalised features; rows of invalid pixels must be zero, so that they
        leave every pair.
      teacher: (N, P, C_t) likewise.
    Returns:
      float32 scalar, ``‖X_SᵀX_S‖² − 2‖X_SᵀX_T‖² + ‖X_TᵀX_T‖²`` summed over the images.
    """
    def squared_gram(a: Array, b: Array) -> Array:
        return jnp.sum(jnp.square(jnp.einsum("npc,npd->ncd", a, b, precision=_PRECISION)))

    return (squared_gram(student, student) + squared_gram(teacher, teacher)
            - 2.0 * squared_gram(student, teacher))


def _uses_gram(form: str, pixels: int, student_channels: int, teacher_channels: int) -> bool:
    """Whether ``form`` ('auto', 'gram' or 'pairs') runs the Gram form for these sizes."""
    if form != "auto":
        return form == "gram"
    gram_madds = pixels * (student_channels ** 2 + student_channels * teacher_channels
                           + teacher_channels ** 2)
    pairs_madds = pixels ** 2 * (student_channels + teacher_channels)
    return gram_madds <= pairs_madds


def _check_form(form: str, block_size: int | None) -> None:
    check_choice("form", form, ("auto", "gram", "pairs"))
    if form == "gram" and block_size is not None:
        raise ValueError(
            f"block_size={block_size} splits the P×P maps of form='pairs', which form='gram' never "
            "forms (its memory is O(C²) already); pass block_size=None, or form='pairs'.")


def _flatten(x: Array) -> Array:
    """(N, H, W, ...) -> (N, H·W, ...)."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _self_affinity_mse(student: Array, teacher: Array, valid: Array | None, form: str,
                       block_size: int | None) -> Array:
    """mean over n and valid pairs (i, j) of (A^S_nij − A^T_nij)² for normalised NHWC features.

    Invalid cells of ``student`` and ``teacher`` hold zero vectors (``pool_ceil`` zeroes them and
    the per-pixel normalisations keep zeros), which the Gram form relies on.
    """
    n, h, w, _ = student.shape
    flat_valid = None if valid is None else _flatten(valid)[:, None]
    if _uses_gram(form, h * w, student.shape[-1], teacher.shape[-1]):
        total = gram_squared_difference(_flatten(student), _flatten(teacher))
    else:
        total = pairwise_row_sum(_squared_difference_rows, _flatten(student)[:, None],
                                 _flatten(teacher)[:, None], flat_valid, block_size,
                                 symmetric=True)
    if valid is None:
        return total / (n * (h * w) ** 2)
    pixels = jnp.sum(flat_valid, axis=-1, dtype=jnp.float32)
    return total / jnp.maximum(jnp.sum(jnp.square(pixels)), 1.0)


# --------------------------------------------------------------------------------------------------
# Public losses.

def pixel_feature_similarity(student_feat: Array, teacher_feat: Array, *, pool: int = 1,
                             form: str = "auto", block_size: int | None = None,
                             mask: Array | None = None) -> Array:
    """PFS: mean squared difference of the pixel-wise cosine-similarity maps.

    ``f̂_{n,i} = F.normalize(f_{n,i})`` over the channels (eps 1e-12), ``A_n = F̂_n F̂_nᵀ`` (P×P)
    and ``L = 1/(N·P²) Σ_{n,i,j} (A^S_{n,i,j} − A^T_{n,i,j})²`` (methods.md §3, §9.3; a
    reconstruction, the paper's exact form is unpublished). Lies in [0, 4]. The average pool's
    divisor does not matter: normalisation cancels any per-cell scale.

    Args:
      student_feat: (N, H, W, C_s) student feature.
      teacher_feat: (N, H, W, C_t) teacher feature (no gradient flows into it); C_t may differ.
      pool: average-pool window (kernel = stride, ceil mode: a partial last window averages its
        in-bounds pixels) applied to both features before forming A; 1 = none. An int or (kh, kw).
      form: 'gram' (C×C Gram matrices, O(P·C²) time and O(C²) memory), 'pairs' (the P×P maps) or
        'auto' (whichever needs fewer multiply-adds); see the module docstring.
      block_size: for the pairs form, None for the dense maps or the number of rows of A per
        block.
      mask: optional bool (N, H, W). The mean runs over the pairs (i, j) whose pixels (pooled cells)
        are both valid; a pooled cell is valid if any of its pixels is and averages its valid
        pixels only.
    Returns:
      float32 scalar.
    """
    _check_features(student_feat, teacher_feat, mask)
    check_optional_positive_int("block_size", block_size)
    _check_form(form, block_size)
    window = _pool_window(pool, student_feat.shape[1:3], allow_half=False)
    student, valid = pool_ceil(as_float32(student_feat), window, kind="avg", mask=mask)
    teacher, _ = pool_ceil(frozen(teacher_feat), window, kind="avg", mask=mask)
    return _self_affinity_mse(unit_pixels(student), unit_pixels(teacher), valid, form, block_size)


def skd_pairwise(student_feat: Array, teacher_feat: Array, *, pool: int | str = 2,
                 norm: str = "normalize", form: str = "auto", block_size: int | None = None,
                 mask: Array | None = None) -> Array:
    """SKD pair-wise distillation: mean squared difference of pooled cosine-similarity maps.

    Both features are max-pooled (kernel = stride, ``ceil_mode=True``), normalised per pixel over
    the channels, and ``L = 1/(N·P'²) Σ_{n,i,j} (A^S_{n,i,j} − A^T_{n,i,j})²`` with
    ``A_n = F̂_n F̂_nᵀ`` over the P' pooled cells (methods.md §5.2).

    Defaults reproduce CIRKD ``losses/skd.py``: ``MaxPool2d(2, 2, ceil_mode=True)`` and
    ``F.normalize``. The official SKD code is ``pool='half', norm='detached'``.

    Args:
      student_feat: (N, H, W, C_s) student feature.
      teacher_feat: (N, H, W, C_t) teacher feature (no gradient flows into it); C_t may differ.
      pool: max-pool window: an int k (k×k, 1 = none), a pair (kh, kw), or 'half' for the official
        kernel (int(0.5·H), int(0.5·W)), which turns a 65×65 map into 3×3 cells.
      norm: 'normalize' (``F.normalize``, eps 1e-12) or 'detached' (official SKD:
        ``f / (stop_gradient(||f||₂) + 1e-8)``; nearly the same value, a different gradient).
      form: 'gram', 'pairs' or 'auto', as for :func:`pixel_feature_similarity`.
      block_size: for the pairs form, None for the dense maps or the number of rows of A per
        block.
      mask: optional bool (N, H, W). The mean runs over the pairs (i, j) of valid cells; a pooled
        cell is valid if any of its pixels is and takes the maximum over its valid pixels only.
    Returns:
      float32 scalar.
    """
    _check_features(student_feat, teacher_feat, mask)
    check_optional_positive_int("block_size", block_size)
    check_choice("norm", norm, ("normalize", "detached"))
    _check_form(form, block_size)
    window = _pool_window(pool, student_feat.shape[1:3], allow_half=True)
    student, valid = pool_ceil(as_float32(student_feat), window, kind="max", mask=mask)
    teacher, _ = pool_ceil(frozen(teacher_feat), window, kind="max", mask=mask)
    unit = unit_pixels if norm == "normalize" else unit_pixels_detached
    return _self_affinity_mse(unit(student), unit(teacher), valid, form, block_size)


def cirkd_minibatch(student_feat: Array, teacher_feat: Array, *, tau: float = 0.1,
                    group_size: int | None = 2, block_size: int | None = None,
                    mask: Array | None = None) -> Array:
    """CIRKD mini-batch pixel-to-pixel distillation across the images of a group.

    Images form consecutive groups of ``group_size``. For every ordered pair (i, j) of a group
    (i = j included), ``A_ij = F̂_i F̂_jᵀ`` (P×P, F.normalize over the channels, S and T separately)
    and ``ℓ_ij = 1/P Σ_rows KL(softmax(A^T_ij/τ) ‖ softmax(A^S_ij/τ))`` with the softmax over the
    column index; a group's loss is ``1/B² Σ_ij ℓ_ij`` and the result is the mean over groups
    (methods.md §5.4). CIRKD computes this per GPU on B = 2 images and DDP averages the GPUs'
    gradients, so ``group_size=2`` on one device reproduces an 8 GPU × 2 image run; ``None`` pairs
    all images of the batch, a different (stronger) loss.

    Args:
      student_feat: (N, H, W, C_s) student feature.
      teacher_feat: (N, H, W, C_t) teacher feature (no gradient flows into it); C_t may differ.
      tau: temperature τ of the row softmax.
      group_size: images per group, a divisor of N; None = the whole batch.
      block_size: None for the dense form, or the number of rows of A per block.
      mask: optional bool (N, H, W). Masked pixels leave the softmax (as columns) and the mean (as
        rows). The loss is the mean of the row KLs over every valid row of image i in every pair
        (i, j) whose image j has a valid pixel; without a mask this is the formula above.
    Returns:
      float32 scalar.
    """
    _check_features(student_feat, teacher_feat, mask)
    check_optional_positive_int("block_size", block_size)
    check_positive("tau", tau)
    n, h, w, _ = student_feat.shape
    b = check_group_size(group_size, n)
    groups, p = n // b, h * w
    student, valid = pool_ceil(as_float32(student_feat), (1, 1), kind="avg", mask=mask)
    teacher, _ = pool_ceil(frozen(teacher_feat), (1, 1), kind="avg", mask=mask)

    def grouped(x: Array) -> Array:
        return unit_pixels(x).reshape(groups, b, p, x.shape[-1])

    valid = None if valid is None else valid.reshape(groups, b, p)
    total = pairwise_row_sum(_kl_rows(tau), grouped(student), grouped(teacher), valid, block_size)
    if valid is None:
        return total / (n * b * p)
    pixels = jnp.sum(valid, axis=-1, dtype=jnp.float32)
    # Per group: every valid row of image i, paired with each image j that has a valid column.
    rows = jnp.sum(jnp.sum(pixels, axis=1) * jnp.sum(pixels > 0, axis=1, dtype=jnp.float32))
    return total / jnp.maximum(rows, 1.0)
