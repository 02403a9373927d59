"""Af-DCD, augmentation-free dense contrastive distillation (Fan et al., NeurIPS 2023, arXiv
2312.04168), docs/methods.md §10.

Af-DCD trains a generator beside the student (:class:`kdjax.models.MaskedGenerator`): the student's
feature, mapped to the teacher's channels by a 1×1 conv, loses a random 75 % of its positions
(set to 0), and a small projector of 3×3 convs regenerates the teacher's feature from the rest.
Two losses compare the generated map ``G`` with the teacher's map ``T``, both (N, H, W, C):

- :func:`feature_reconstruction`, the masked-generation (MGD) term ``Σ (G − T)² / N``;
- :func:`omni_contrast`, the omni-contrast term. The maps are max-pooled (or cropped), cut into
  patches of 4×4 positions, and the C channels into M groups of C/M. Within a patch, every
  (position, group) of ``G`` is a vector whose positive is the teacher's vector at the same position
  and group, and whose negatives are the teacher's vectors of every *other* group at any position of
  the patch; similarity is the negative L1 distance, and the term is the cross-entropy of the
  positive among them at temperature τ.

The keep-masks of the generator come from :func:`random_keep_mask` (the method's default) or
:func:`centre_third_keep_mask` (the official code's deterministic alternative).

Memory. The official code forms, for each patch, the K×K matrix of L1 distances between its
K = 16·M generated and teacher vectors (``torch.cdist``). :func:`omni_contrast` forms those
distances and, in the same pass, their gradient ``Σ_j w_ij sign(g_ic − t_jc)``, so the backward
pass only scales a stored gradient of the input's size and nothing of size K×K outlives the pass.
Both are sums over the (K, K, C/M) element-wise differences (:mod:`kdjax.ops.distances`). Their
plain forms leave it to the backend to compute those inside the sums or to write them out; the
CPU forms never form them, and write out only a patch's K×K maps. The patches go through in
chunks (``patches_per_chunk``), so that a chunk's differences would stay within a fixed budget
(16 MB on CPU, 256 MB elsewhere) even where they are written out. On the CPU, at 8 images,
K = 256 and C/M = 16, that is one patch at a time, whose K×K maps take about 4 MB: the term's
scratch on the pooled 16×32 maps is 14 MB (46 MB with the differences written out), and larger
chunks only ran slower (benchmarks/NOTES.md, item 53).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses._common import (as_float32, check_optional_positive_int, check_pair,
                                  check_positive, frozen)
from kdjax.losses._derivative_rules import gradient_from_forward
from kdjax.ops import distances

Array = jax.Array

# --------------------------------------------------------------------------------------------------
# Keep-masks of the generator.

def _check_shape_nhw(shape_nhw: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(shape_nhw)
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                              for d in shape):
        raise ValueError(f"shape_nhw must be three positive ints (N, H, W), got {shape_nhw!r}.")
    return tuple(int(d) for d in shape)


def random_keep_mask(key: Array, shape_nhw: Sequence[int], ratio: float = 0.75) -> Array:
    """The random keep-mask of Af-DCD and MGD: each position dropped with probability ``ratio``.

    Every image gets its own draw and every position is independent; the channels of a position
    share it (the mask multiplies all of them). The official code keeps a position where a uniform
    draw ``u`` has ``u ≤ 1 − ratio``; this draws the same distribution.

    Args:
      key: a JAX PRNG key (one per step: the mask must change from step to step).
      shape_nhw: (N, H, W) of the feature map the mask applies to.
      ratio: the probability of dropping a position, in [0, 1]; 0.75 in Af-DCD and MGD.
    Returns:
      bool (N, H, W), True where the position is kept.
    """
    shape = _check_shape_nhw(shape_nhw)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio (the probability of dropping a position) must be a number in "
                         f"[0, 1], got {ratio!r}.")
    return jax.random.bernoulli(key, 1.0 - float(ratio), shape)


def centre_third_keep_mask(shape_nhw: Sequence[int]) -> Array:
    """The deterministic keep-mask of the official code (``rand_mask=False``): the central third.

    Rows ``⌊H/3⌋ .. ⌊2H/3⌋ − 1`` and columns ``⌊W/3⌋ .. ⌊2W/3⌋ − 1`` are dropped in every image;
    everything else is kept. (For H = 2 that drops row 0; for H = 1 nothing.)

    Args:
      shape_nhw: (N, H, W) of the feature map the mask applies to.
    Returns:
      bool (N, H, W), True where the position is kept.
    """
    n, h, w = _check_shape_nhw(shape_nhw)
    keep = np.ones((h, w), bool)
    keep[h // 3:(2 * h) // 3, w // 3:(2 * w) // 3] = False
    return jnp.broadcast_to(jnp.asarray(keep), (n, h, w))


# --------------------------------------------------------------------------------------------------
# The reconstruction term.

def feature_reconstruction(generated: Array, teacher: Array, *, mask: Array | None = None) -> Array:
    """The masked-generation (MGD) term of Af-DCD: ``Σ_{n,h,w,c} (G − T)² / N``.

    The sum runs over every position, the dropped ones included (the generator must fill them in),
    and is divided by the number of images only: the official ``MSELoss(reduction='sum') / BS``
    (docs/methods.md §10; Af-DCD, arXiv 2312.04168; MGD, Yang et al., ECCV 2022, arXiv
    2205.01529). Its scale grows with H·W·C, which the small published weights (2e-6 on
    Cityscapes) compensate.

    Args:
      generated: (N, H, W, C), the generator's output (:class:`kdjax.models.MaskedGenerator`).
      teacher: (N, H, W, C), the teacher's feature (a constant: it receives no gradient).
      mask: optional bool (N, H, W) of the positions that count (e.g. not ignore-labelled); they
        are not the generator's keep-mask. N then counts the images with at least one valid
        position, as in CWD; an all-masked batch gives 0 with a zero gradient, and a NaN or infinity
        at a masked position reaches neither the value nor the gradient.
    Returns:
      float32 scalar.
    """
    check_pair(generated, teacher, mask, names=("generated", "teacher"), axes="N,H,W,C")
    diff = as_float32(generated) - frozen(teacher)
    if mask is None:
        return jnp.sum(jnp.square(diff)) / diff.shape[0]
    valid = jnp.asarray(mask, bool)
    diff = jnp.where(valid[..., None], diff, 0.0)
    images = jnp.sum(jnp.any(valid, axis=(1, 2)), dtype=jnp.float32)
    return jnp.sum(jnp.square(diff)) / jnp.maximum(images, 1.0)


# --------------------------------------------------------------------------------------------------
# The omni-contrast term.

def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def _positive_pair(name: str, value: object) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                   for v in pair)):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (H, W), got "
                         f"{value!r}.")
    return int(pair[0]), int(pair[1])


def _max_pool_floor(x: Array, window: int) -> Array:
    """``F.max_pool2d(x, window)`` in NHWC: stride = window, no padding, the rows and columns past
    the last whole window dropped. Exactly tied maxima share the gradient (PyTorch gives it all to
    one of them). In the generator's output, ties arise where every input within reach was dropped;
    those positions are then one and the same function of the generator's parameters (and of no
    student feature), so the sharing leaves the gradients unchanged."""
    n, h, w, c = x.shape
    ho, wo = h // window, w // window
    x = x[:, :ho * window, :wo * window].reshape(n, ho, window, wo, window, c)
    return jnp.max(x, axis=(2, 4))


def _patch_vectors(x: Array, patch: tuple[int, int], groups: int) -> Array:
    """(N, H, W, C) → (P, N, K, C/M): per patch (P = H/ph · W/pw, row-major), the K = ph·pw·M
    vectors of C/M channels, vector ``k = (r·pw + q)·M + m`` for position (r, q) of the patch and
    channel group m (channels ``m·C/M .. (m+1)·C/M − 1``), the official ordering."""
    n, h, w, c = x.shape
    ph, pw = patch
    x = x.reshape(n, h // ph, ph, w // pw, pw, groups, c // groups)
    x = x.transpose(1, 3, 0, 2, 4, 5, 6)
    return x.reshape((h // ph) * (w // pw), n, ph * pw * groups, c // groups)


def _patch_parts(generated: Array, teacher: Array, groups: int, tau: float) -> tuple[Array, Array]:
    """One patch of every image: the sum of its rows' cross-entropies and its gradient.

    With ``d_ij = Σ_c |g_ic − t_cj|``, logits ``−d_ij/τ`` over the allowed columns (j = i and
    every j of another group) and ``p_i`` their softmax, row i adds
    ``ℓ_i = d_ii/τ + log Σ_j e^{−d_ij/τ}``, and
    ``∂ℓ/∂g_ic = Σ_j (δ_ij − p_ij)/τ · sign(g_ic − t_cj)`` (sign 0 at 0, as PyTorch's cdist).
    The distances and the gradient come from :mod:`kdjax.ops.distances`, whose plain forms reduce
    the (N, K, K, D) differences and whose CPU forms never form them.

    Args:
      generated: float32 (N, K, D), the patch's vectors in :func:`_patch_vectors` order.
      teacher: float32 (N, D, K), the teacher's, as columns (as :mod:`kdjax.ops.distances`
        takes them).
    Returns:
      float32 scalar and float32 (N, K, D).
    """
    k = generated.shape[-2]
    group = np.arange(k) % groups
    own = np.eye(k, dtype=bool)
    allowed = own | (group[:, None] != group[None, :])
    dist = distances.l1_distances(generated, teacher)
    logits = jnp.where(allowed, dist * (-1.0 / tau), -jnp.inf)
    # The diagonal is always allowed, so the shift is finite and the total at least 1. The positive
    # is read from the same logits, so that shift − positive is exactly 0 where it is the maximum.
    shift = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - shift)
    total = jnp.sum(e, axis=-1, keepdims=True)
    positive = jnp.diagonal(logits, axis1=-2, axis2=-1)
    value = jnp.sum((shift[..., 0] - positive) + jnp.log(total[..., 0]))
    weight = (own - e / total) / tau
    return value, distances.l1_distance_gradient(weight, generated, teacher)


def _contrast_sum(generated: Array, teacher: Array, groups: int, tau: float,
                  patches_per_chunk: int) -> Array:
    """Σ over patches of :func:`_patch_parts` for the (P, N, K, D) generated and (P, N, D, K)
    teacher stacks, ``patches_per_chunk`` patches at a time (``lax.map``; each chunk vmapped). The
    gradient comes from the same pass, so the backward pass only scales it
    (:func:`~kdjax.losses._derivative_rules.gradient_from_forward`); the teacher gets none."""
    rule = gradient_from_forward(
        functools.partial(_contrast_sum_parts, groups, tau, patches_per_chunk))
    return rule(generated, teacher)


def _contrast_sum_parts(groups: int, tau: float, patches_per_chunk: int, generated: Array,
                        teacher: Array) -> tuple[Array, tuple[Array, None]]:
    """:func:`_contrast_sum` and its gradient w.r.t. ``generated`` (P, N, K, D); None for the
    teacher."""
    def parts(args):
        return _patch_parts(*args, groups, tau)

    if patches_per_chunk >= generated.shape[0]:
        values, grad = jax.vmap(parts)((generated, teacher))
    else:
        values, grad = jax.lax.map(parts, (generated, teacher), batch_size=patches_per_chunk)
    return jnp.sum(values), (grad, None)


def _patches_within(scratch_bytes: int, batch: int, vectors: int, dim: int) -> int:
    """Patches per chunk whose (batch, K, K, D) float32 differences fit ``scratch_bytes``."""
    return max(1, scratch_bytes // (4 * batch * vectors * vectors * dim))


def omni_contrast(generated: Array, teacher: Array, *, groups: int = 16,
                  patch: int | tuple[int, int] = (4, 4), pool: int = 4,
                  crop: tuple[int, int] | None = None, tau: float = 0.07,
                  patches_per_chunk: int | None = None,
                  scratch_bytes: int | None = None) -> Array:
    """The omni-contrast term of Af-DCD (docs/methods.md §10; arXiv 2312.04168).

    1. ``crop=(h, w)`` keeps the top-left h×w positions of both maps (the official CamVid path,
       ``crop=(44, 44)``, which trims the 45×45 map of a 360×360 crop), then ``pool > 0``
       max-pools both with a ``pool``×``pool`` window and stride (``F.max_pool2d``: rows and
       columns past the last whole window are dropped). The official Cityscapes, ADE20K, VOC and
       COCO-Stuff path is ``pool=4`` without crop; CamVid's is ``crop=(44, 44), pool=0``.
    2. The resulting H'×W' maps are cut into patches of ``patch`` = (ph, pw) positions and the C
       channels into M = ``groups`` groups of D = C/M consecutive channels. In a patch the vector
       ``v_{p,m}`` is position p's group m (K = ph·pw·M vectors).
    3. With ``d(a, b) = ‖a − b‖₁`` and every generated vector ``g_{p,m}`` as a row, the logits are
       ``−d(g_{p,m}, t_{p,m})/τ`` (the positive) and ``−d(g_{p,m}, t_{q,m'})/τ`` for every
       position q of the patch and every group m' ≠ m (ph·pw·(M − 1) negatives); same-group
       vectors of other positions take no part. The row's loss is the cross-entropy of the
       positive::

           L = 1/(N·H'·W') · Σ_{n, patch, p, m} −log( e^{−d_pos/τ} / (e^{−d_pos/τ}
                                                                    + Σ_neg e^{−d_neg/τ}) )

    That is the official sum of ``CrossEntropyLoss(reduction='sum')`` divided by H'·W' and by the
    batch size. The loss is positive, and not zero at ``generated == teacher``: the positive then
    has distance 0, but the negatives keep a share of every softmax.

    Args:
      generated: (N, H, W, C), the generator's output: the student side, which gets the gradient.
      teacher: (N, H, W, C), the teacher's feature (a constant).
      groups: M, the number of channel groups; must divide C. 16 in Af-DCD.
      patch: (ph, pw) positions per patch, or an int for a square patch; must tile H'×W'.
      pool: max-pool window and stride; 0 for none. 4 in Af-DCD (but CamVid, see above).
      crop: (h, w) top-left positions kept before pooling, or None; must fit in H×W.
      tau: the temperature τ > 0; 0.07 in Af-DCD.
      patches_per_chunk: the patches processed at once (``lax.map`` over the patches of every
        image; the batch axis stays whole, so a batch sharded across devices stays sharded), which
        bounds the scratch memory. None: as many as ``scratch_bytes`` allows.
      scratch_bytes: without ``patches_per_chunk``, as many patches at once as keep the
        (N, K, K, D) float32 differences of a chunk within this many bytes; None: every patch in
        one step. The trainer passes its platform's budget (``distill.loss_scratch_mb``,
        :mod:`kdjax.ops.kernels`).
    Returns:
      float32 scalar. Reverse-mode differentiable only (the gradient is written out).
    Raises:
      ValueError: shapes that differ, C not divisible by ``groups``, a map smaller than the crop
        or the pooling window, or a (pooled, cropped) map that the patch does not tile.
    """
    check_pair(generated, teacher, None, names=("generated", "teacher"), axes="N,H,W,C")
    check_positive("tau", tau)
    groups = _positive_int("groups", groups)
    ph, pw = _positive_pair("patch", patch)
    if isinstance(pool, bool) or not isinstance(pool, (int, np.integer)) or pool < 0:
        raise ValueError(f"pool must be a non-negative int (the max-pool window; 0 for none), got "
                         f"{pool!r}.")
    check_optional_positive_int("patches_per_chunk", patches_per_chunk)
    check_optional_positive_int("scratch_bytes", scratch_bytes)
    n, h, w, c = generated.shape
    if c % groups:
        raise ValueError(
            f"the channel count C={c} must be divisible by groups={groups} (each group holds "
            f"C/groups consecutive channels); choose groups among the divisors of {c}.")
    stages = []
    if crop is not None:
        crop = _positive_pair("crop", crop)
        if crop[0] > h or crop[1] > w:
            raise ValueError(f"crop={crop!r} does not fit in the {h}×{w} map; crop to at most "
                             f"{h}×{w}, or pass crop=None.")
        h, w = crop
        stages.append(f"cropping to {h}×{w}")
    if pool:
        if pool > h or pool > w:
            raise ValueError(f"pool={pool} is larger than the {h}×{w} map; use a smaller window, "
                             f"or pool=0 for none.")
        h, w = h // pool, w // pool
        stages.append(f"max-pooling by {pool}")
    if h % ph or w % pw:
        after = f" after {' and '.join(stages)}" if stages else ""
        raise ValueError(
            f"the patch {ph}×{pw} does not tile the {h}×{w} map{after}; choose a patch that "
            f"divides it, or a crop/pool that makes the map a multiple of the patch (the official "
            f"CamVid path is crop=(44, 44), pool=0).")

    g = as_float32(generated)
    t = frozen(teacher)
    if crop is not None:
        g, t = g[:, :crop[0], :crop[1]], t[:, :crop[0], :crop[1]]
    if pool:
        g, t = _max_pool_floor(g, pool), _max_pool_floor(t, pool)
    g_vectors = _patch_vectors(g, (ph, pw), groups)
    # The teacher's vectors as columns, (P, N, D, K): the layout kdjax.ops.distances takes.
    t_vectors = jnp.swapaxes(_patch_vectors(t, (ph, pw), groups), -1, -2)
    k, dim = g_vectors.shape[-2:]
    if patches_per_chunk is None:
        patches_per_chunk = (_patches_within(scratch_bytes, n, k, dim) if scratch_bytes
                             else g_vectors.shape[0])
    total = _contrast_sum(g_vectors, t_vectors, groups, float(tau), patches_per_chunk)
    return total / (n * h * w)
