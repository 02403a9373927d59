"""CIRKDv2 channel-to-channel distillation, mini-batch and memory-based (docs/methods.md §11).

Source: winycg/CIRKD ``losses/cirkd_channel.py`` (``StudentSegChannelContrast``) and
``train_cirkdv2.py``, read at 351400e8 (HEAD dab64dbb).

Channel embeddings. The original average-pools both head features 4×4 (stride 4, ``ceil_mode``:
:func:`cirkd_channel_pool`), projects the pooled student feature to the teacher's C channels
(Conv1x1 → BN → ReLU → Conv1x1, the CIRKD projection head, which lives beside the student as for
CIRKD v1) and L2-normalises every channel's map over its P' = H'·W' positions. Channel c of image n
thus becomes one unit vector ``e_{n,c} ∈ R^{P'}`` (positions in raster order); ``E_n`` is the
(C, P') matrix of these rows. The functions here take the pooled tensors, the student's already
projected, and form the embeddings themselves: s from the student, t from the teacher.

Three losses of one forward of the original, the first two contrastive:

- :func:`cirkd_channel_minibatch`: for every ordered pair (i, j) of images in a group (i = j
  included), the channel similarity maps ``M_ij = E_i E_jᵀ`` (C×C), and
  ``ℓ_ij = 1/C Σ_rows KL(softmax(M^T_ij/τ) ‖ softmax(M^S_ij/τ))``; the loss is ``1/B² Σ_ij ℓ_ij``
  per group of B images, averaged over the groups. The engine is CIRKD v1's mini-batch one
  (:func:`kdjax.losses.relational.pairwise_row_sum`) with the roles of channels and positions
  swapped.
- :func:`cirkd_channel_memory`: every channel row of the batch is an anchor and contrasts with a
  random set Q of teacher channel embeddings from a queue of past batches:
  ``kd_tau² · mean_{n,c} KL(softmax(t_{n,c}·Qᵀ/τ/kd_tau) ‖ softmax(s_{n,c}·Qᵀ/τ/kd_tau))``, the core
  of CIRKD v1's memory loss (:mod:`kdjax.losses.cirkd_memory`) with one queue instead of one per
  class.
- :func:`cirkd_channel_mse`: ``mean_{n,c,p} (s_{n,c,p} − t_{n,c,p})²`` (the original's
  ``channel_mse_loss``, weighted by ``--lambda-channel-kd``).

The queue is explicit state (:class:`CirkdChannelMemory`): :func:`init_cirkd_channel_memory`
creates it, :func:`update_cirkd_channel_memory` enqueues a batch and returns the new state, and
:func:`cirkd_channel_memory` reads a given state. A training step calls the update first and passes
the *updated* memory to the loss, as the original enqueues before it samples. All are pure,
jit-able and deterministic given their PRNG key.

Details pinned down from the original code:

- The queue has ``--channel-memory-size`` (10000) rows of dimension ``int(H·W/16)`` of the teacher
  feature at the training crop (512 for 64×128), standard normal samples L2-normalised; the pointer
  starts at 0. Here the dimension is the pooled P' = ceil(H/4)·ceil(W/4), the same number whenever 4
  divides H and W (otherwise the original fails on the first step).
- Enqueue: the teacher's (N·C, P') channel embeddings, all-gathered across GPUs (the global batch,
  image-major), then ``k = min(N·C, 256)`` distinct random rows in random order
  (``randperm(N·C)[:k]``), L2-normalised once more. If ``ptr + k >= size`` they fill the *last* k
  slots and the pointer resets to 0; otherwise ``[ptr, ptr + k)`` and the pointer advances by k:
  CIRKD v1's pixel-queue rule, shared through :mod:`kdjax.losses.cirkd_memory`.
- Contrast set: the first ``min(--channel-contrast-size, size)`` (2048) slots of one random
  permutation of the queue per step. τ = ``--contrast-temperature`` (0.1), kd_tau =
  ``--contrast-kd-temperature`` (1.0); ``F.kl_div(..., 'batchmean')`` averages over the N·C rows.
- The mini-batch loss has no kd_tau and no τ² factor; its ``batchmean`` divides by the C rows.
- Multi-GPU: the mini-batch pairs exist only inside each GPU's batch (``group_size``, the per-GPU
  batch: 1 for the Cityscapes v2 scripts, 8 images on 8 GPUs), and DDP averages the GPUs'
  gradients. The memory loss averages over each GPU's own rows with its own contrast set; kdjax
  averages over all rows of the batch with one contrast set, the same on one device and, as every
  GPU holds as many rows, different across devices only in the contrast sets drawn. The enqueue
  takes the whole (global) batch, as the original's all-gather does.

Masks (N, H', W' bool, at the pooled size) are a kdjax option; ``None`` reproduces the original.
Masked positions leave every channel embedding (they are zeroed before the normalisation over the
positions), and an image without a valid position leaves the losses and the enqueue altogether.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_group_size, check_mask,
                                  check_optional_positive_int, check_positive, check_rank,
                                  check_same_shape, frozen, l2_normalize, masked_mean)
from kdjax.losses.cirkd_memory import (_check_count, _contrast_kd, _random_subset,
                                       _ring_enqueue)
from kdjax.losses.pooling import pool_ceil
from kdjax.losses.relational import _kl_rows, _pool_window, pairwise_row_sum, unit_pixels

Array = jax.Array


class CirkdChannelMemory(NamedTuple):
    """The CIRKDv2 queue of teacher channel embeddings (a pytree; S slots of P' positions).

    Attributes:
      queue: float32 (S, P'), unit-norm rows: teacher channel embeddings of past batches.
      ptr: int32 scalar: the next write position.
    """

    queue: Array
    ptr: Array


# --------------------------------------------------------------------------------------------------
# Pooling and embeddings.

def cirkd_channel_pool(feat: Array, *, pool: int | tuple[int, int] = 4) -> Array:
    """The original's ``AvgPool2d(4, 4, ceil_mode=True)`` of a head feature (docs/methods.md §11).

    Applied to both features before anything else; the student's pooled feature then goes through
    the projection head. A partial last window averages its in-bounds pixels.

    Args:
      feat: (N, H, W, C).
      pool: window (= stride), an int or (kh, kw); 4 in CIRKDv2.
    Returns:
      (N, ceil(H/kh), ceil(W/kw), C) in the dtype of ``feat``.
    """
    check_rank("feat", feat, 4, "N,H,W,C")
    window = _pool_window(pool, jnp.shape(feat)[1:3], allow_half=False)
    return pool_ceil(jnp.asarray(feat), window, kind="avg")[0]


def _embeddings(x: Array, mask: Array | None) -> Array:
    """(N, C, H·W) channel embeddings of float32 (N, H, W, C): each channel's map over the
    positions in raster order, L2-normalised over them (``F.normalize``; an all-zero map stays 0
    with a zero gradient). Masked positions are zeroed first."""
    n, h, w, c = x.shape
    if mask is not None:
        x = jnp.where(jnp.asarray(mask, bool)[..., None], x, 0.0)
    return unit_pixels(jnp.swapaxes(x.reshape(n, h * w, c), 1, 2))


def _valid_images(mask: Array | None) -> Array | None:
    """bool (N,): the images with at least one valid position; None without a mask."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    return jnp.any(mask.reshape(mask.shape[0], -1), axis=1)


def _check_pair(student_embed: Array, teacher_embed: Array, mask: Array | None) -> None:
    check_rank("student_embed", student_embed, 4, "N,H,W,C")
    check_same_shape("student_embed", student_embed, "teacher_embed", teacher_embed)
    check_mask(mask, student_embed)


# --------------------------------------------------------------------------------------------------
# Mini-batch channel contrast and the channel MSE.

def cirkd_channel_minibatch(student_embed: Array, teacher_embed: Array, *, tau: float = 0.1,
                            group_size: int | None = 2, block_size: int | None = None,
                            mask: Array | None = None) -> Array:
    """CIRKDv2 mini-batch channel-to-channel distillation (docs/methods.md §11).

    Images form consecutive groups of ``group_size``. For every ordered pair (i, j) of a group
    (i = j included), ``M_ij = E_i E_jᵀ`` (C×C, channel embeddings normalised over the positions,
    S and T separately) and ``ℓ_ij = 1/C Σ_rows KL(softmax(M^T_ij/τ) ‖ softmax(M^S_ij/τ))`` with the
    softmax over the column index (the channels of image j); a group's loss is ``1/B² Σ_ij ℓ_ij``
    and the result is the mean over groups. The original computes this per GPU on its own images
    and DDP averages the GPUs' gradients: ``group_size`` is the per-GPU batch.

    Args:
      student_embed: (N, H', W', C) pooled and projected student feature.
      teacher_embed: (N, H', W', C) pooled teacher feature (no gradient flows into it).
      tau: temperature τ of the row softmax (``--contrast-temperature``, 0.1).
      group_size: images per group, a divisor of N; None = the whole batch.
      block_size: None for the dense C×C maps, or the number of rows of M per block (peak memory
        O(B·C·block_size) per block, same value and gradient).
      mask: optional bool (N, H', W'). Masked positions leave the embeddings; an image without a
        valid position leaves the pairs, as rows and as columns. The loss then is the mean of the
        row KLs over every row of every pair of valid images (the formula above without a mask).
    Returns:
      float32 scalar; 0 with a zero gradient when every position is masked.
    """
    _check_pair(student_embed, teacher_embed, mask)
    check_optional_positive_int("block_size", block_size)
    check_positive("tau", tau)
    n, h, w, c = student_embed.shape
    b = check_group_size(group_size, n)
    groups = n // b

    def grouped(x: Array) -> Array:
        return _embeddings(x, mask).reshape(groups, b, c, h * w)

    images = _valid_images(mask)
    valid = None
    if images is not None:
        valid = jnp.broadcast_to(images[:, None], (n, c)).reshape(groups, b, c)
    total = pairwise_row_sum(_kl_rows(tau), grouped(as_float32(student_embed)),
                             grouped(frozen(teacher_embed)), valid, block_size)
    if images is None:
        return total / (n * b * c)
    per_group = jnp.sum(images.reshape(groups, b), axis=1, dtype=jnp.float32)
    # Every row of a valid image i, paired with every valid image j of its group.
    return total / jnp.maximum(c * jnp.sum(jnp.square(per_group)), 1.0)


def cirkd_channel_mse(student_embed: Array, teacher_embed: Array, *,
                      mask: Array | None = None) -> Array:
    """Mean squared difference of the channel embeddings (docs/methods.md §11).

    ``mean_{n,c,p} (s_{n,c,p} − t_{n,c,p})²`` over all N·C·P' elements, s and t the channel
    embeddings (each channel's map L2-normalised over the P' positions): the original's
    ``channel_mse_loss``, weighted by ``--lambda-channel-kd`` (100 in every CIRKDv2 script). Each
    channel contributes ``(2 − 2 cos(s, t))/P'``, so the loss lies in [0, 4/P'].

    Args:
      student_embed: (N, H', W', C) pooled and projected student feature.
      teacher_embed: (N, H', W', C) pooled teacher feature (no gradient flows into it).
      mask: optional bool (N, H', W'); masked positions leave the embeddings and the mean, which
        runs over the valid positions × C.
    Returns:
      float32 scalar; 0 with a zero gradient when every position is masked.
    """
    _check_pair(student_embed, teacher_embed, mask)
    n, h, w, _ = student_embed.shape
    s = _embeddings(as_float32(student_embed), mask)
    t = _embeddings(frozen(teacher_embed), mask)
    valid = None if mask is None else jnp.asarray(mask, bool).reshape(n, 1, h * w)
    return masked_mean(jnp.square(s - t), valid)


# --------------------------------------------------------------------------------------------------
# The memory: initialisation and update.

def _check_memory(memory: CirkdChannelMemory, positions: int | None = None) -> None:
    """Raises ValueError unless the queue is (S, P') and the pointer a scalar."""
    if not isinstance(memory, CirkdChannelMemory):
        raise ValueError(f"memory must be a CirkdChannelMemory, got {type(memory).__name__}.")
    check_rank("memory.queue", memory.queue, 2, "S,P")
    if tuple(jnp.shape(memory.ptr)) != ():
        raise ValueError(f"memory.ptr must be a scalar, got shape {tuple(jnp.shape(memory.ptr))}.")
    dim = memory.queue.shape[1]
    if positions is not None and positions != dim:
        raise ValueError(
            f"the channel embeddings have H·W = {positions} positions but the memory queue rows "
            f"have {dim} (memory.queue shape {tuple(memory.queue.shape)}). Initialise the memory "
            "with dim = H·W of the pooled tensors passed here (the crop's feature size pooled "
            "4×4), and pass tensors of that size.")


def init_cirkd_channel_memory(key: Array, dim: int, *, size: int = 10000) -> CirkdChannelMemory:
    """A fresh queue: standard normal rows L2-normalised, pointer 0 (as the original).

    Args:
      key: PRNG key.
      dim: P' = H'·W', the positions of the pooled tensors (512 for a 64×128 feature pooled 4×4).
      size: S, the queue's slots (``--channel-memory-size``, 10000).
    Returns:
      CirkdChannelMemory with a float32 (S, P') queue and an int32 scalar pointer.
    """
    _check_count("dim", dim, 1)
    _check_count("size", size, 1)
    return _init(key, dim, size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init(key: Array, dim: int, size: int) -> CirkdChannelMemory:
    queue = jax.random.normal(key, (size, dim), jnp.float32)
    return CirkdChannelMemory(l2_normalize(queue), jnp.zeros((), jnp.int32))


def _check_update(memory: CirkdChannelMemory, teacher_embed: Array, channels_per_step: int,
                  mask: Array | None) -> int:
    """Validates the update arguments; returns the static number of rows drawn per step."""
    check_rank("teacher_embed", teacher_embed, 4, "N,H,W,C")
    check_mask(mask, teacher_embed)
    n, h, w, c = teacher_embed.shape
    _check_memory(memory, h * w)
    _check_count("channels_per_step", channels_per_step, 1)
    count = min(channels_per_step, n * c)
    if count > memory.queue.shape[0]:
        # The original fails here too: k rows cannot fit into a queue of fewer slots.
        raise ValueError(
            f"channels_per_step ({channels_per_step}) must not exceed the queue size "
            f"(memory.queue shape {tuple(memory.queue.shape)}) unless the batch "
            f"{tuple(teacher_embed.shape)} has fewer channel rows (N·C = {n * c}).")
    return count


# Compiled once per shape and count, also when called eagerly; inlined under an outer jit.
@functools.partial(jax.jit, static_argnames=("count",))
def _update(memory: CirkdChannelMemory, teacher_embed: Array, key: Array, mask: Array | None, *,
            count: int) -> tuple[CirkdChannelMemory, Array]:
    """The new memory and the (count,) rows of the (N·C, P') batch drawn for it (image-major)."""
    n, h, w, c = teacher_embed.shape
    rows = _embeddings(frozen(teacher_embed), mask).reshape(n * c, h * w)
    images = _valid_images(mask)
    if images is None:
        candidates = jnp.ones((1, n * c), bool)
    else:
        candidates = jnp.repeat(images, c)[None, :]
    order = _random_subset(key, candidates, count)                               # (1, count)
    taken = jnp.minimum(jnp.sum(candidates, dtype=jnp.int32), count)[None]
    queue = jax.lax.stop_gradient(as_float32(memory.queue))
    ptr = jnp.asarray(memory.ptr, jnp.int32)
    queue, ptr = _ring_enqueue(queue[None], ptr[None], l2_normalize(rows[order]), taken)
    return CirkdChannelMemory(queue[0], ptr[0]), order[0]


def update_cirkd_channel_memory(memory: CirkdChannelMemory, teacher_embed: Array, key: Array, *,
                                channels_per_step: int = 256,
                                mask: Array | None = None) -> CirkdChannelMemory:
    """Enqueues random teacher channel embeddings of a batch (the original's rule).

    Call it once per step *before* :func:`cirkd_channel_memory` and pass the returned memory to
    it: the original enqueues the current batch before it samples the contrast set.

    ``k = min(N·C, channels_per_step)`` distinct rows of the batch's (N·C, P') teacher channel
    embeddings, drawn uniformly in random order, go into the queue at the pointer, or into its last
    k slots with the pointer reset to 0 once ``ptr + k`` reaches the size (module docstring).

    Args:
      memory: the current state; its rows have P' = H'·W' entries.
      teacher_embed: (N, H', W', C) pooled teacher feature (treated as a constant); the whole
        batch, as the original all-gathers it before enqueueing.
      key: PRNG key; the result is a deterministic function of it.
      channels_per_step: most rows enqueued per step (256, hard-coded in the original); at most the
        queue size unless N·C is smaller.
      mask: optional bool (N, H', W'): masked positions leave the embeddings, and the rows of
        images without a valid position are never enqueued (k then counts the valid rows).
    Returns:
      The updated CirkdChannelMemory (float32 queue, int32 scalar pointer).
    """
    count = _check_update(memory, teacher_embed, channels_per_step, mask)
    return _update(memory, teacher_embed, key, mask, count=count)[0]


# --------------------------------------------------------------------------------------------------
# The memory-based loss.

def _contrast_slots(key: Array, size: int, contrast: int) -> Array:
    """int32 (min(contrast, size),): the first slots of a random permutation of the queue."""
    return jax.random.permutation(key, size)[:min(contrast, size)].astype(jnp.int32)


def cirkd_channel_memory(student_embed: Array, teacher_embed: Array, memory: CirkdChannelMemory,
                         key: Array, *, tau: float = 0.1, kd_tau: float = 1.0,
                         channel_contrast: int = 2048, mask: Array | None = None) -> Array:
    """CIRKDv2 memory-based channel-to-channel distillation (docs/methods.md §11).

    ``L = kd_tau² · 1/(N·C) Σ_{n,c} KL(softmax(t_nc·Qᵀ/τ/kd_tau) ‖ softmax(s_nc·Qᵀ/τ/kd_tau))``
    with s, t the student and teacher channel embeddings (each channel's map L2-normalised over the
    P' positions) and Q (M, P') the queue rows ``permutation(S)[:M]``,
    ``M = min(channel_contrast, S)``.

    Call :func:`update_cirkd_channel_memory` with this step's teacher tensor first and pass its
    result here, as the original enqueues before it samples. The CIRKDv2 weight is 0.1.

    Args:
      student_embed: (N, H', W', C) pooled and projected student feature (the projection head maps
        the pooled student to the teacher's C channels; it lives beside the student, not here).
      teacher_embed: (N, H', W', C) pooled teacher feature (no gradient flows into it).
      memory: the queue, rows of H'·W' entries (no gradient flows into it).
      key: PRNG key for the contrast set; the result is a deterministic function of it.
      tau: similarity temperature τ (``--contrast-temperature``, 0.1).
      kd_tau: KD temperature (``--contrast-kd-temperature``, 1.0).
      channel_contrast: queue rows per contrast set (``--channel-contrast-size``, 2048); a larger
        value than the queue size takes every row.
      mask: optional bool (N, H', W'): masked positions leave the embeddings, and the channels of
        an image without a valid position are no anchors.
    Returns:
      float32 scalar; 0 with a zero gradient when every position is masked.
    """
    _check_pair(student_embed, teacher_embed, mask)
    _, h, w, _ = student_embed.shape
    _check_memory(memory, h * w)
    check_positive("tau", tau)
    check_positive("kd_tau", kd_tau)
    _check_count("channel_contrast", channel_contrast, 1)
    return _memory_loss(student_embed, teacher_embed, memory, key, mask, jnp.float32(tau),
                        jnp.float32(kd_tau), channel_contrast=channel_contrast)


# Compiled once per shape and contrast size, also when called eagerly (the temperatures are
# traced); inlined under an outer jit.
@functools.partial(jax.jit, static_argnames=("channel_contrast",))
def _memory_loss(student_embed: Array, teacher_embed: Array, memory: CirkdChannelMemory,
                 key: Array, mask: Array | None, tau: Array, kd_tau: Array, *,
                 channel_contrast: int) -> Array:
    n, _, _, c = student_embed.shape
    student = _embeddings(as_float32(student_embed), mask)                      # (N, C, P')
    teacher = _embeddings(frozen(teacher_embed), mask)
    images = _valid_images(mask)
    anchors = jnp.ones((n, c), bool) if images is None else jnp.broadcast_to(images[:, None],
                                                                             (n, c))
    contrast = frozen(memory.queue)[_contrast_slots(key, memory.queue.shape[0], channel_contrast)]
    (loss,) = _contrast_kd(student, teacher, anchors, (contrast,), tau, kd_tau)
    return loss
