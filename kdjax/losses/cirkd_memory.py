"""CIRKD memory-based pixel-to-pixel and pixel-to-region distillation (Yang et al., CVPR 2022).

methods.md §5.4. Per class, a pixel queue and a region queue hold L2-normalised teacher embeddings
of past batches. Every step samples one contrast set from each queue; each anchor pixel turns into a
similarity distribution over that set, once with the teacher's embedding and once with the
student's, and the student matches the teacher's distribution by KL divergence.

The queues are explicit state (:class:`CirkdMemory`): :func:`init_cirkd_memory` creates them,
:func:`update_cirkd_memory` enqueues a batch and returns the new state, and :func:`cirkd_memory`
computes the two losses from a given state. A training step calls :func:`update_cirkd_memory` first
and passes the *updated* memory to :func:`cirkd_memory`, as the original enqueues before it samples.
All three are pure, jit-able (static shapes only) and deterministic given their PRNG key.

Details pinned down from the original code (``losses/cirkd_memory.py`` and ``train_cirkd.py``):

- Queues start as standard normal samples L2-normalised over C; pointers start at 0.
- Enqueue visits the images in batch order, and in each image every present class. The region queue
  receives ``normalize(mean of the class's normalised teacher embeddings)`` at the class's pointer,
  which then advances by one, modulo the region queue size. The pixel queue receives
  ``k = min(n_c, 16)`` normalised embeddings (``n_c`` = the class's pixel count in the image): if
  ``ptr + k >= size`` they fill the *last* k slots and the pointer resets to 0; otherwise they fill
  ``[ptr, ptr + k)`` and the pointer advances by k.
- Which pixels: the original draws ``perm = randperm(n_c)`` and reads ``feat[:, perm[:k]]`` from the
  whole image's flattened features, i.e. k distinct random positions among the first ``n_c`` raster
  positions of the image, whatever their label (ignore pixels included). It is not what the paper or
  methods.md describe ("k random pixels of that class"); kdjax reproduces the code by default
  (``pixel_pool='first_n'``) and offers the described behaviour as ``pixel_pool='class'``.
- Contrast sets: one random permutation of the queue slots per queue and step, its first
  ``n = pixel_contrast // K + 1`` (resp. ``region_contrast // K + 1``) entries, the same slots for
  every class (216 and 54 for K = 19). When n exceeds the queue size the original's ``perm[:n]``
  keeps all slots; so does kdjax.
- Anchors are all pixels whose nearest-resized label is not ignored; the KL uses ``F.kl_div(...,
  reduction='batchmean')``, i.e. a sum over the contrast set and a mean over anchors, times
  ``kd_tau²``. With no anchor the original returns ``0 · mean(s²)``; kdjax returns exactly 0 with a
  zero gradient.
- Multi-GPU: the original enqueues the all-gathered batch (= the global batch in order), but each
  GPU averages over its own anchors with its own contrast set and DDP averages the GPUs' gradients.
  kdjax averages over all anchors of the batch with one contrast set, which matches the original
  exactly on a single device and differs only in the per-device weighting otherwise.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_choice, check_labels, check_mask, check_positive, check_rank,
                                  check_same_shape, combine_masks, frozen, l2_normalize,
                                  nearest_resize_labels, softmax_kl, valid_label_mask)
from kdjax.losses._derivative_rules import gradient_from_forward

Array = jax.Array

PIXEL_POOLS = ("first_n", "class")


class CirkdMemory(NamedTuple):
    """The per-class teacher embedding queues of CIRKD (a pytree; K classes, C channels).

    Attributes:
      pixel_queue: float32 (K, S_pix, C), unit-norm rows: single teacher pixel embeddings.
      pixel_ptr: int32 (K,): next write position of each class's pixel queue.
      region_queue: float32 (K, S_reg, C), unit-norm rows: normalised class-mean embeddings.
      region_ptr: int32 (K,): next write position of each class's region queue.
    """

    pixel_queue: Array
    pixel_ptr: Array
    region_queue: Array
    region_ptr: Array


def _check_count(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_memory(memory: CirkdMemory, dim: int | None = None) -> None:
    """Raises ValueError unless the queues and pointers have consistent (K, S, C) / (K,) shapes."""
    if not isinstance(memory, CirkdMemory):
        raise ValueError(f"memory must be a CirkdMemory, got {type(memory).__name__}.")
    check_rank("memory.pixel_queue", memory.pixel_queue, 3, "K,S_pix,C")
    check_rank("memory.region_queue", memory.region_queue, 3, "K,S_reg,C")
    k, _, c = memory.pixel_queue.shape
    k_r, _, c_r = memory.region_queue.shape
    if (k_r, c_r) != (k, c):
        raise ValueError(
            "memory.pixel_queue and memory.region_queue must agree in classes and channels (K, C), "
            f"got {tuple(memory.pixel_queue.shape)} and {tuple(memory.region_queue.shape)}.")
    for name, ptr in (("memory.pixel_ptr", memory.pixel_ptr),
                      ("memory.region_ptr", memory.region_ptr)):
        if tuple(jnp.shape(ptr)) != (k,):
            raise ValueError(f"{name} must have shape (K,) = ({k},), got {tuple(jnp.shape(ptr))}.")
    if dim is not None and dim != c:
        raise ValueError(
            f"the embeddings have {dim} channels but the memory queues hold {c} "
            f"(memory.pixel_queue shape {tuple(memory.pixel_queue.shape)}).")


def init_cirkd_memory(key: Array, num_classes: int, dim: int, *, pixel_size: int = 20000,
                      region_size: int = 2000) -> CirkdMemory:
    """Fresh queues: standard normal rows L2-normalised over C, all pointers at 0 (as the original).

    Args:
      key: PRNG key.
      num_classes: K.
      dim: C, the teacher embedding channels.
      pixel_size: S_pix, slots per class in the pixel queue (20000 in CIRKD).
      region_size: S_reg, slots per class in the region queue (2000 in CIRKD).
    Returns:
      CirkdMemory with float32 (K, S_pix, C) / (K, S_reg, C) queues and int32 (K,) zero pointers.
    """
    for name, value in (("num_classes", num_classes), ("dim", dim), ("pixel_size", pixel_size),
                        ("region_size", region_size)):
        _check_count(name, value, 1)
    return _init(key, num_classes, dim, pixel_size, region_size)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init(key: Array, num_classes: int, dim: int, pixel_size: int, region_size: int) -> CirkdMemory:
    key_pixel, key_region = jax.random.split(key)
    pixel = jax.random.normal(key_pixel, (num_classes, pixel_size, dim), jnp.float32)
    region = jax.random.normal(key_region, (num_classes, region_size, dim), jnp.float32)
    zeros = jnp.zeros((num_classes,), jnp.int32)
    return CirkdMemory(l2_normalize(pixel), zeros, l2_normalize(region), zeros)


def _select_pixels(key: Array, labels: Array, num_classes: int, count: int,
                   pixel_pool: str) -> tuple[Array, Array]:
    """Random pixel positions to enqueue for every class of one image.

    Args:
      key: PRNG key of this image.
      labels: int (P,) flattened resized labels; invalid (ignored) entries are any value outside
        [0, num_classes).
      count: pixels per class (the original's ``pixel_update_freq``), at most P.
      pixel_pool: 'first_n' (the original: distinct positions among the first n_c raster positions)
        or 'class' (distinct positions among the class's own pixels).
    Returns:
      positions: int32 (K, count), the selected raster positions of each class; only the first
        ``taken[c]`` entries of row c are meaningful (in random order, as ``randperm(n_c)[:k]``).
      taken: int32 (K,), ``min(n_c, count)``.
    """
    classes = jnp.arange(num_classes, dtype=labels.dtype)
    members = labels[None, :] == classes[:, None]                              # (K, P)
    n_c = jnp.sum(members, axis=1, dtype=jnp.int32)
    if pixel_pool == "first_n":
        candidates = jnp.arange(labels.shape[0], dtype=jnp.int32)[None, :] < n_c[:, None]
    else:
        candidates = members
    return _random_subset(key, candidates, count), jnp.minimum(n_c, count)


def _random_subset(key: Array, candidates: Array, count: int) -> Array:
    """Per row, ``count`` distinct random indices of True entries, in random order: a sample
    without replacement (the original's ``randperm(n)[:k]`` over the candidates).

    Args:
      key: PRNG key.
      candidates: bool (R, P).
      count: static number of indices per row, at most P.
    Returns:
      int32 (R, count); a row with n < count candidates has them in its first n entries (the
      rest are other indices).
    """
    # Independent uniform scores; candidates score in [0, 1), the rest -1, so top_k returns a
    # uniformly random ordered subset of the candidates first.
    scores = jax.random.uniform(key, candidates.shape, jnp.float32)
    scores = jnp.where(candidates, scores, -1.0)
    _, positions = jax.lax.top_k(scores, count)
    return positions.astype(jnp.int32)


def _ring_enqueue(queue: Array, ptr: Array, rows: Array, taken: Array) -> tuple[Array, Array]:
    """Writes ``taken[k]`` new rows into each of K ring-buffer queues, CIRKD's rule.

    With ``k = taken[q]`` for queue q: if ``ptr + k >= size`` the rows fill the *last* k slots
    and the pointer resets to 0; otherwise they fill ``[ptr, ptr + k)`` and the pointer advances
    by k. ``k = 0`` leaves a queue and its pointer untouched.

    Args:
      queue: float32 (K, S, C).
      ptr: int32 (K,) write positions.
      rows: float32 (K, count, C); only the first ``taken[q]`` rows of queue q are written.
      taken: int (K,), each in [0, min(count, S)].
    Returns:
      (queue, ptr), the updated float32 (K, S, C) queues and int32 (K,) pointers.
    """
    size = queue.shape[1]
    wraps = ptr + taken >= size
    start = jnp.where(wraps, size - taken, ptr)
    new_ptr = jnp.where(wraps, 0, ptr + taken).astype(jnp.int32)
    offsets = jnp.arange(rows.shape[1], dtype=jnp.int32)
    slots = start[:, None] + offsets[None, :]
    # Unused rows point past the queue and are dropped by the scatter.
    slots = jnp.where(offsets[None, :] < taken[:, None], slots, size)
    index = jnp.arange(queue.shape[0])[:, None]
    return queue.at[index, slots].set(rows, mode="drop"), new_ptr


def _enqueue_image(memory: CirkdMemory, feat: Array, labels: Array, positions: Array,
                   taken: Array) -> CirkdMemory:
    """Enqueues one image's classes into every class queue at once (each class owns its queue).

    Args:
      memory: the current state.
      feat: float32 (P, C) L2-normalised teacher embeddings of the image.
      labels: int (P,) resized labels (values outside [0, K) are ignored).
      positions, taken: from :func:`_select_pixels`.
    """
    num_classes = memory.pixel_queue.shape[0]
    region_size = memory.region_queue.shape[1]
    classes = jnp.arange(num_classes)
    members = (labels[None, :] == classes[:, None].astype(labels.dtype)).astype(jnp.float32)
    n_c = jnp.sum(members, axis=1)
    present = n_c > 0

    # Region queue: the normalised class mean at the class's pointer, pointer + 1 (mod size).
    class_sum = jnp.matmul(members, feat, precision=jax.lax.Precision.HIGHEST)
    region_rows = l2_normalize(class_sum / jnp.maximum(n_c, 1.0)[:, None])
    region_ptr = memory.region_ptr
    old_rows = memory.region_queue[classes, region_ptr]
    region_queue = memory.region_queue.at[classes, region_ptr].set(
        jnp.where(present[:, None], region_rows, old_rows))
    region_ptr = jnp.where(present, (region_ptr + 1) % region_size, region_ptr)

    # Pixel queue: k rows at ptr, or the last k slots (pointer reset) once they reach the end.
    rows = l2_normalize(feat[positions])                                      # (K, count, C)
    pixel_queue, pixel_ptr = _ring_enqueue(memory.pixel_queue, memory.pixel_ptr, rows, taken)
    return CirkdMemory(pixel_queue, pixel_ptr, region_queue, region_ptr.astype(jnp.int32))


def _check_update(memory: CirkdMemory, teacher_feat: Array, labels: Array, pixels_per_class: int,
                  pixel_pool: str) -> int:
    """Validates the update arguments; returns the static number of pixels drawn per class."""
    check_rank("teacher_feat", teacher_feat, 4, "N,H,W,C")
    check_labels(labels, teacher_feat, "teacher_feat")
    _check_memory(memory, teacher_feat.shape[-1])
    check_choice("pixel_pool", pixel_pool, PIXEL_POOLS)
    _check_count("pixels_per_class", pixels_per_class, 1)
    _, h, w, _ = teacher_feat.shape
    # A tiny feature map may hold fewer pixels than pixels_per_class; then all of them can go.
    count = min(pixels_per_class, h * w)
    if count > memory.pixel_queue.shape[1]:
        # The original fails here too: k rows cannot fit into a queue of fewer slots.
        raise ValueError(
            f"pixels_per_class ({pixels_per_class}) must not exceed the pixel queue size "
            f"(memory.pixel_queue shape {tuple(memory.pixel_queue.shape)}) unless the feature map "
            f"{tuple(teacher_feat.shape)} has fewer pixels.")
    return count


def _flat_labels(labels: Array, height: int, width: int, num_classes: int,
                 ignore_label: int) -> Array:
    """int32 (N, H·W) labels resized to the feature size, with -1 wherever they are ignored."""
    resized = nearest_resize_labels(jnp.asarray(labels), height, width)
    valid = valid_label_mask(resized, num_classes, ignore_label)
    return jnp.where(valid, resized, -1).reshape(labels.shape[0], height * width).astype(jnp.int32)


def _select_batch(key: Array, flat_labels: Array, num_classes: int, count: int,
                  pixel_pool: str) -> tuple[Array, Array]:
    """Per-image selections for a batch: positions (N, K, count), taken (N, K)."""
    keys = jax.random.split(key, flat_labels.shape[0])
    return jax.vmap(lambda k, lab: _select_pixels(k, lab, num_classes, count, pixel_pool))(
        keys, flat_labels)


def _enqueue_batch(memory: CirkdMemory, feat: Array, flat_labels: Array, positions: Array,
                   taken: Array) -> CirkdMemory:
    """Scans :func:`_enqueue_image` over the images in batch order (the order matters per class)."""
    memory = CirkdMemory(as_float32(memory.pixel_queue), jnp.asarray(memory.pixel_ptr, jnp.int32),
                         as_float32(memory.region_queue), jnp.asarray(memory.region_ptr, jnp.int32))
    memory = jax.tree.map(jax.lax.stop_gradient, memory)

    def step(state, image):
        return _enqueue_image(state, *image), None

    memory, _ = jax.lax.scan(step, memory, (feat, flat_labels, positions, taken))
    return memory


# Compiled once per shape and option set, also when called eagerly; inlined under an outer jit.
@functools.partial(jax.jit, static_argnames=("count", "pixel_pool"))
def _update(memory: CirkdMemory, teacher_feat: Array, flat_labels: Array, key: Array, *, count: int,
            pixel_pool: str) -> tuple[CirkdMemory, Array]:
    """The new memory and the (N, K, count) pixel positions drawn for it."""
    n, h, w, c = teacher_feat.shape
    feat = l2_normalize(frozen(teacher_feat)).reshape(n, h * w, c)
    num_classes = memory.pixel_queue.shape[0]
    positions, taken = _select_batch(key, flat_labels, num_classes, count, pixel_pool)
    return _enqueue_batch(memory, feat, flat_labels, positions, taken), positions


def update_cirkd_memory(memory: CirkdMemory, teacher_feat: Array, labels: Array, key: Array, *,
                        ignore_label: int = 255, pixels_per_class: int = 16,
                        pixel_pool: str = "first_n") -> CirkdMemory:
    """Enqueues a batch of teacher embeddings into the CIRKD queues (the original's rules).

    Call it once per step *before* :func:`cirkd_memory`, and pass the returned memory to it: the
    original enqueues the current batch before it samples the contrast sets.

    For every image in batch order and every class present in its resized labels, the normalised
    class mean goes into the class's region queue and ``min(n_c, pixels_per_class)`` randomly chosen
    embeddings into its pixel queue, with the pointer and wrap-around rules of the module docstring.
    Classes absent from an image leave their queues and pointers untouched. The teacher embeddings
    are L2-normalised over C here (and each enqueued row once more, as in the original).

    Args:
      memory: the current state (K classes, C channels).
      teacher_feat: (N, H, W, C) teacher embeddings (treated as constants).
      labels: int (N, H_l, W_l) ground truth, nearest-resized to (H, W) with PyTorch's floor rule.
        Labels equal to ``ignore_label`` or outside [0, K) are ignored.
      key: PRNG key; the result is a deterministic function of it.
      ignore_label: ignored label value (CIRKD's datasets use -1, kdjax's 255).
      pixels_per_class: most pixel embeddings one class of one image enqueues (16 in CIRKD); at most
        the pixel queue size (unless the feature map has fewer pixels).
      pixel_pool: 'first_n' (default, the original code: random positions among the first n_c
        raster positions of the image, whatever their label) or 'class' (random pixels of the class
        itself, as the paper and methods.md describe).
    Returns:
      The updated CirkdMemory (float32 queues, int32 pointers).
    """
    count = _check_update(memory, teacher_feat, labels, pixels_per_class, pixel_pool)
    _, h, w, _ = teacher_feat.shape
    flat_labels = _flat_labels(labels, h, w, memory.pixel_queue.shape[0], ignore_label)
    return _update(memory, teacher_feat, flat_labels, key, count=count, pixel_pool=pixel_pool)[0]


def _contrast_sizes(memory: CirkdMemory, pixel_contrast: int,
                    region_contrast: int) -> tuple[int, int]:
    """Slots per class drawn from each queue: ``min(contrast // K + 1, queue size)``."""
    num_classes, pixel_size, _ = memory.pixel_queue.shape
    region_size = memory.region_queue.shape[1]
    return (min(pixel_contrast // num_classes + 1, pixel_size),
            min(region_contrast // num_classes + 1, region_size))


def _contrast_indices(key: Array, memory: CirkdMemory, pixel_contrast: int,
                      region_contrast: int) -> tuple[Array, Array]:
    """The queue slots of this step: the first n of a random permutation, shared by all classes.

    Returns:
      int32 (n_pix,) pixel-queue slots and int32 (n_reg,) region-queue slots.
    """
    n_pix, n_reg = _contrast_sizes(memory, pixel_contrast, region_contrast)
    key_pixel, key_region = jax.random.split(key)
    pixel_index = jax.random.permutation(key_pixel, memory.pixel_queue.shape[1])[:n_pix]
    region_index = jax.random.permutation(key_region, memory.region_queue.shape[1])[:n_reg]
    return pixel_index.astype(jnp.int32), region_index.astype(jnp.int32)


def _gather_contrast(queue: Array, index: Array) -> Array:
    """(K·n, C) contrast set: class 0's n slots, then class 1's, ... (the original's order)."""
    rows = frozen(queue)[:, index]
    return rows.reshape(-1, rows.shape[-1])


def _rows_kl_sum(z_s: Array, z_t: Array, valid: Array, temperature: Array) -> Array:
    """``Σ_{valid a} KL(softmax(z_t,a/T) ‖ softmax(z_s,a/T))`` over (R, M) similarity rows.

    :func:`softmax_kl` takes the row maxima and sums in reductions apart from the similarity
    product; a plain log-softmax's maximum would be fused into the product, which then ran at
    about half the speed of the product alone on CPU.
    """
    kl = softmax_kl(z_s, z_t, axis=-1, temperature=temperature)
    return jnp.sum(jnp.where(valid, kl, 0.0))


def _similarities(x: Array, contrast: Array) -> Array:
    """(R, M) cosine similarities ``x·Qᵀ`` of unit rows."""
    # HIGHEST: the similarities must be float32-accurate even where matmuls default to bf16.
    return jnp.matmul(x, contrast.T, precision=jax.lax.Precision.HIGHEST)


def _rows_kl_sums(student: Array, teacher: Array, valid: Array, contrasts: tuple[Array, ...],
                  temperature: Array) -> Array:
    """(X,) KL sums of R anchor rows, one per contrast set.

    Args:
      student, teacher: float32 (R, C) L2-normalised embeddings.
      valid: bool (R,) anchors.
      contrasts: X float32 (M_x, C) contrast sets Q.
      temperature: float32 scalar ``τ·kd_tau``.
    """
    return jnp.stack([
        _rows_kl_sum(_similarities(student, q), _similarities(teacher, q), valid, temperature)
        for q in contrasts])


def _rows_kl_parts(student: Array, teacher: Array, valid: Array, contrasts: tuple[Array, ...],
                   temperature: Array) -> tuple[Array, Array]:
    """:func:`_rows_kl_sums` and its gradient w.r.t. the student, (X,) and (X, R, C): the
    gradient w.r.t. the similarities, ``(p_s − p_t)/T`` on the valid rows, times Q."""
    sums, grads = [], []
    for q in contrasts:
        value, grad_z = jax.value_and_grad(_rows_kl_sum)(
            _similarities(student, q), _similarities(teacher, q), valid, temperature)
        sums.append(value)
        grads.append(jnp.matmul(grad_z, q, precision=jax.lax.Precision.HIGHEST))
    return jnp.stack(sums), jnp.stack(grads)


# Anchor rows per step of the loop over the similarity maps: each step holds a few (R, M) maps per
# contrast set (M = 4,104 pixel slots for K = 19: 4.2 MB each at R = 256), however many pixels the
# batch has. Maps that stay in the cache make the step faster than larger blocks, and smaller
# blocks were slower again (benchmarks/NOTES.md item 51).
_ROWS_PER_STEP = 256


def _row_blocks(x: Array, rows: int) -> Array:
    """(N, P, ...) -> (blocks, rows, ...), the N·P rows in order, zero-padded at the end."""
    flat = x.reshape(-1, *x.shape[2:])
    blocks = -(-flat.shape[0] // rows)
    flat = jnp.pad(flat, [(0, blocks * rows - flat.shape[0])] + [(0, 0)] * (flat.ndim - 1))
    return flat.reshape(blocks, rows, *flat.shape[1:])


def _blocks_of(student: Array, teacher: Array, anchors: Array) -> tuple[Array, Array, Array]:
    """The anchor rows of the batch in blocks; padded rows are no anchors."""
    rows = min(_ROWS_PER_STEP, anchors.size)
    return _row_blocks(student, rows), _row_blocks(teacher, rows), _row_blocks(anchors, rows)


def _contrast_kl_sums(student: Array, teacher: Array, anchors: Array, contrasts: tuple[Array, ...],
                      temperature: Array) -> Array:
    """(X,) sums over all anchors of the row KLs, one per contrast set; differentiable in the
    student only (the teacher, the contrast sets and the temperatures are constants here).

    Every anchor's KL is a function of its own row, so the rows of the whole batch run in blocks
    of ``_ROWS_PER_STEP`` (``lax.map``): only a few (R, M) similarity maps are alive at any
    moment, whatever the batch. Under differentiation the forward pass also forms the gradient,
    an (R, C) product per block and set, and the backward pass only scales it
    (:func:`~kdjax.losses._derivative_rules.gradient_from_forward`): three matrix products per
    set instead of the five of a rematerialised autodiff. The value alone forms no gradient.

    Args:
      student, teacher: float32 (N, P, C) L2-normalised embeddings.
      anchors: bool (N, P).
      contrasts: X float32 (M_x, C) contrast sets.
      temperature: float32 scalar ``τ·kd_tau``.
    """
    rule = gradient_from_forward(_contrast_kl_parts, value=_contrast_kl_values)
    return rule(student, teacher, anchors, contrasts, temperature)


def _contrast_kl_values(student: Array, teacher: Array, anchors: Array,
                        contrasts: tuple[Array, ...], temperature: Array) -> Array:
    """:func:`_contrast_kl_sums`, the value alone: (X,)."""
    sums = jax.lax.map(lambda block: _rows_kl_sums(*block, contrasts, temperature),
                       _blocks_of(student, teacher, anchors))
    return jnp.sum(sums, axis=0)


def _contrast_kl_parts(student: Array, teacher: Array, anchors: Array,
                       contrasts: tuple[Array, ...], temperature: Array
                       ) -> tuple[Array, tuple[Array, None, None, None, None]]:
    """:func:`_contrast_kl_sums`, (X,), and its gradient w.r.t. the student, (X, N, P, C); None
    for the other arguments."""
    sums, grads = jax.lax.map(lambda block: _rows_kl_parts(*block, contrasts, temperature),
                              _blocks_of(student, teacher, anchors))
    n, p, c = student.shape
    # (blocks, X, R, C) -> (X, N, P, C), without the padded rows.
    grads = jnp.moveaxis(grads, 1, 0).reshape(len(contrasts), -1, c)[:, :n * p]
    return jnp.sum(sums, axis=0), (grads.reshape(len(contrasts), n, p, c), None, None, None, None)


def _contrast_kd(student: Array, teacher: Array, anchors: Array, contrasts: tuple[Array, ...],
                 tau: Array | float, kd_tau: Array | float) -> tuple[Array, ...]:
    """``kd_tau² · mean over anchors of KL(softmax(t·Qᵀ/τ/kd_tau) || softmax(s·Qᵀ/τ/kd_tau))``.

    The loss core, given the contrast sets explicitly (one loss per set).

    Args:
      student, teacher: float32 (N, P, C) L2-normalised embeddings (teacher already frozen).
      anchors: bool (N, P).
      contrasts: float32 (M_x, C) frozen contrast sets.
    Returns:
      float32 scalars, one per contrast set; exactly 0 (zero gradient) without anchors.
    """
    sums = _contrast_kl_sums(student, teacher, anchors, contrasts, frozen(tau * kd_tau))
    count = jnp.sum(anchors, dtype=jnp.float32)
    losses = kd_tau**2 * sums / jnp.maximum(count, 1.0)
    return tuple(losses[i] for i in range(len(contrasts)))


def cirkd_memory(student_embed: Array, teacher_embed: Array, labels: Array, memory: CirkdMemory,
                 key: Array, *, tau: float = 0.1, kd_tau: float = 1.0, pixel_contrast: int = 4096,
                 region_contrast: int = 1024, ignore_label: int = 255,
                 mask: Array | None = None) -> tuple[Array, Array]:
    """CIRKD memory-based pixel-to-pixel and pixel-to-region losses (methods.md §5.4).

    ``L_x = kd_tau² · 1/|A| Σ_{a∈A} KL(softmax(t_a·Q_xᵀ/τ/kd_tau) || softmax(s_a·Q_xᵀ/τ/kd_tau))``
    for x ∈ {pixel, region}, with s, t the L2-normalised student and teacher embeddings, A the
    anchor pixels and Q_x (K·n_x, C) the contrast set sampled from queue x: the slots
    ``permutation(S_x)[:n_x]`` of every class, ``n_x = min(x_contrast // K + 1, S_x)``.

    Call :func:`update_cirkd_memory` with this step's teacher embeddings first and pass its result
    here, as the original enqueues before it samples. The CIRKD weights are 0.1 for both losses
    (0.01 for VOC).

    Args:
      student_embed: (N, H, W, C) student embedding *after* the CIRKD projection head (which maps
        the student channels to the teacher's C; it lives beside the student, not here).
      teacher_embed: (N, H, W, C) teacher embedding (no gradient flows into it).
      labels: int (N, H_l, W_l) ground truth, nearest-resized to (H, W) with PyTorch's floor rule.
      memory: the queues (no gradient flows into them).
      key: PRNG key for the contrast sets; the result is a deterministic function of it.
      tau: similarity temperature τ (``--contrast-temperature``, 0.1).
      kd_tau: KD temperature (``--contrast-kd-temperature``, 1.0).
      pixel_contrast, region_contrast: total contrast sizes before the per-class split (4096, 1024).
      ignore_label: ignored label value; labels outside [0, K) are ignored as well.
      mask: optional bool (N, H, W); False pixels are no anchors either.
    Returns:
      (pixel_loss, region_loss), float32 scalars; both exactly 0 with a zero gradient when no pixel
      is an anchor.
    """
    check_rank("student_embed", student_embed, 4, "N,H,W,C")
    check_same_shape("student_embed", student_embed, "teacher_embed", teacher_embed)
    check_labels(labels, student_embed, "student_embed")
    _check_memory(memory, student_embed.shape[-1])
    check_mask(mask, student_embed)
    check_positive("tau", tau)
    check_positive("kd_tau", kd_tau)
    _check_count("pixel_contrast", pixel_contrast, 0)
    _check_count("region_contrast", region_contrast, 0)

    n, h, w, _ = student_embed.shape
    resized = nearest_resize_labels(jnp.asarray(labels), h, w)
    anchors = valid_label_mask(resized, memory.pixel_queue.shape[0], ignore_label)
    anchors = combine_masks(anchors, mask).reshape(n, h * w)
    return _losses(student_embed, teacher_embed, anchors, memory, key, jnp.float32(tau),
                   jnp.float32(kd_tau), pixel_contrast=pixel_contrast,
                   region_contrast=region_contrast)


# Compiled once per shape and contrast size, also when called eagerly (the temperatures are traced,
# the labels already reduced to anchors); inlined under an outer jit.
@functools.partial(jax.jit, static_argnames=("pixel_contrast", "region_contrast"))
def _losses(student_embed: Array, teacher_embed: Array, anchors: Array, memory: CirkdMemory,
            key: Array, tau: Array, kd_tau: Array, *, pixel_contrast: int,
            region_contrast: int) -> tuple[Array, Array]:
    n, h, w, c = student_embed.shape
    student = l2_normalize(as_float32(student_embed)).reshape(n, h * w, c)
    teacher = l2_normalize(frozen(teacher_embed)).reshape(n, h * w, c)
    pixel_index, region_index = _contrast_indices(key, memory, pixel_contrast, region_contrast)
    contrasts = (_gather_contrast(memory.pixel_queue, pixel_index),
                 _gather_contrast(memory.region_queue, region_index))
    return _contrast_kd(student, teacher, anchors, contrasts, tau, kd_tau)
