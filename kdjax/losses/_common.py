"""Shared conventions of the loss library (methods.md §9.1).

Every loss takes NHWC arrays, casts them to float32 before any softmax, normalisation or reduction, and
puts the teacher side under ``stop_gradient``. Argument checks run on static shapes only, so they cost
nothing under ``jax.jit`` and fail before any compilation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp

from kdjax.ops.reductions import normalize_axis, sums

Array = jax.Array

# F.normalize's default eps: x / max(||x||, 1e-12).
NORMALIZE_EPS = 1e-12


def as_float32(x: Array) -> Array:
    """Casts to float32 (the precision of every loss computation)."""
    return jnp.asarray(x).astype(jnp.float32)


def frozen(teacher: Array) -> Array:
    """The teacher tensor as float32 constant: no gradient can reach the teacher through a loss."""
    return jax.lax.stop_gradient(as_float32(teacher))


def check_rank(name: str, x: Array, rank: int, layout: str) -> None:
    """Raises ValueError unless ``x`` has ``rank`` dimensions (``layout`` names them, e.g. 'N,H,W,C')."""
    if jnp.ndim(x) != rank:
        raise ValueError(
            f"{name} must have rank {rank} ({layout}), got shape {tuple(jnp.shape(x))}.")


def check_same_shape(name_a: str, a: Array, name_b: str, b: Array) -> None:
    """Raises ValueError unless ``a`` and ``b`` have the same shape."""
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(jnp.shape(a))} and "
            f"{tuple(jnp.shape(b))}. Adapt the student's channels with a connector and resize "
            "before calling the loss.")


def check_same_spatial(name_a: str, a: Array, name_b: str, b: Array) -> None:
    """Raises ValueError unless the (N, H, W) dimensions of two NHWC tensors agree."""
    if jnp.shape(a)[:3] != jnp.shape(b)[:3]:
        raise ValueError(
            f"{name_a} and {name_b} must share batch and spatial size (N,H,W), got "
            f"{tuple(jnp.shape(a))} and {tuple(jnp.shape(b))}. Distil tensors of the same output "
            "stride, or resize one of them before calling the loss.")


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def check_positive(name: str, value: float) -> None:
    """Raises ValueError unless ``value`` is a positive number."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")


def check_optional_positive_int(name: str, value: object) -> None:
    """Raises ValueError unless ``value`` is None or a positive int (a bool is not accepted)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be None or a positive int, got {value!r}.")


def check_mask(mask: Array | None, spatial_of: Array, name: str = "mask") -> None:
    """Raises ValueError unless ``mask`` is None or has the (N, H, W) shape of the NHWC ``spatial_of``."""
    if mask is None:
        return
    expected = tuple(jnp.shape(spatial_of)[:3])
    if tuple(jnp.shape(mask)) != expected:
        raise ValueError(f"{name} must have shape (N,H,W) = {expected}, got {tuple(jnp.shape(mask))}.")


def check_group_size(group_size: int | None, batch: int) -> int:
    """Returns the group size to use (the whole batch for None); raises unless it divides ``batch``."""
    if group_size is None:
        return batch
    if not isinstance(group_size, int) or group_size < 1 or batch % group_size:
        raise ValueError(
            f"group_size must be a positive divisor of the batch size {batch}, got {group_size!r}.")
    return group_size


def valid_weights(mask: Array | None, shape: Sequence[int]) -> Array:
    """The mask as float32 weights of ``shape`` (all ones for None)."""
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    return jnp.broadcast_to(jnp.asarray(mask, jnp.float32), shape)


def masked_mean(values: Array, mask: Array | None, per_element: int = 1) -> Array:
    """Mean of ``values`` over the valid entries; 0 (with a zero gradient) when nothing is valid.

    Args:
      values: float array (N, H, W) or (N, H, W, ...) of per-pixel terms.
      mask: optional bool (N, H, W); broadcast over trailing axes of ``values``.
      per_element: how many elements each valid pixel stands for in the denominator (e.g. C for an
        element mean over channels when ``values`` were already summed over C).
    Returns:
      float32 scalar: sum(valid values) / (count(valid) * per_element).
    """
    values = as_float32(values)
    if mask is None:
        return jnp.mean(values) / per_element
    mask = jnp.asarray(mask, bool).reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    mask = jnp.broadcast_to(mask, values.shape)
    # where() rather than multiplication: a masked NaN/inf must not poison the sum or its gradient.
    total = jnp.sum(jnp.where(mask, values, 0.0))
    count = jnp.sum(mask, dtype=jnp.float32) * per_element
    return total / jnp.maximum(count, 1.0)


def l2_normalize(x: Array, axis: int = -1, eps: float = NORMALIZE_EPS) -> Array:
    """``x / max(||x||_2, eps)`` along ``axis``: PyTorch's ``F.normalize``.

    The clamp sits inside the square root, so an all-zero vector gets a finite gradient (as in
    PyTorch) instead of the NaN of ``sqrt`` at 0.
    """
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps * eps))


def check_pair(student: Array, teacher: Array, mask: Array | None, *,
               names: tuple[str, str] = ("student_logits", "teacher_logits"),
               axes: str = "N,H,W,K") -> None:
    """Raises ValueError unless ``student`` and ``teacher`` are two rank-4 arrays of one shape and
    ``mask`` is None or a bool (N, H, W); the message uses ``names`` and ``axes``."""
    check_rank(names[0], student, 4, axes)
    check_same_shape(names[0], student, names[1], teacher)
    check_mask(mask, student)


def check_labels(labels: Array, other: Array, other_name: str) -> None:
    """Raises ValueError unless ``labels`` is an integer (N, H, W) map with ``other``'s batch N."""
    check_rank("labels", labels, 3, "N,H,W")
    batch = jnp.shape(other)[0]
    if jnp.shape(labels)[0] != batch:
        raise ValueError(
            f"labels and {other_name} must have the same batch size {batch}, got "
            f"{tuple(jnp.shape(labels))} and {tuple(jnp.shape(other))}.")
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise ValueError(f"labels must be an integer array (class indices as integers), got dtype "
                         f"{jnp.asarray(labels).dtype} and shape {tuple(jnp.shape(labels))}.")


def nearest_resize_labels(labels: Array, height: int, width: int) -> Array:
    """Nearest-neighbour label resize with PyTorch's legacy rule ``src = floor(dst * in / out)``.

    Args:
      labels: int (N, H_in, W_in).
    Returns:
      int (N, height, width).
    """
    check_rank("labels", labels, 3, "N,H,W")
    _, h_in, w_in = labels.shape
    if (h_in, w_in) == (height, width):
        return labels
    # PyTorch computes the scale in float32 as in/out and floors dst*scale; replicate the float32 maths.
    rows = jnp.floor(jnp.arange(height, dtype=jnp.float32) * jnp.float32(h_in / height))
    cols = jnp.floor(jnp.arange(width, dtype=jnp.float32) * jnp.float32(w_in / width))
    rows = jnp.minimum(rows.astype(jnp.int32), h_in - 1)
    cols = jnp.minimum(cols.astype(jnp.int32), w_in - 1)
    return labels[:, rows][:, :, cols]


def valid_label_mask(labels: Array, num_classes: int, ignore_label: int) -> Array:
    """bool (N, H, W): True where the label is a class in [0, num_classes) and not ``ignore_label``."""
    labels = jnp.asarray(labels)
    return (labels >= 0) & (labels < num_classes) & (labels != ignore_label)


def combine_masks(a: Array | None, b: Array | None) -> Array | None:
    """Logical AND of two optional masks."""
    if a is None:
        return b
    if b is None:
        return a
    return jnp.logical_and(a, b)


def _masked_shift_and_log_total(z: Array, valid: Array, axis: int) -> tuple[Array, Array]:
    """(shift, log Σ_valid exp(z − shift)) along ``axis`` (kept, size 1), with the shift the valid
    maximum (0 for a slice without a valid entry, whose log-total is 0)."""
    valid = jnp.broadcast_to(valid, z.shape)
    z = jnp.where(valid, z, 0.0)
    (shift,) = softmax_shifts(jnp.where(valid, z, -jnp.inf), axis=axis)
    total = jnp.sum(jnp.where(valid, jnp.exp(z - shift), 0.0), axis=axis, keepdims=True)
    return shift, jnp.log(jnp.where(total > 0, total, 1.0))


def _where_valid(x: Array, valid: Array | None, fill: float) -> Array:
    return x if valid is None else jnp.where(valid, x, fill)


def softmax_kl(student: Array, teacher: Array, axis: int, valid: Array | None = None,
               temperature: float = 1.0) -> Array:
    """``KL(softmax(teacher/T) || softmax(student/T))`` along ``axis``, over the ``valid`` entries.

    Computed as ``Σ e^T (x^T − x^S) / (T Σ e^T) + log Σ e^S − log Σ e^T + (m^S − m^T)/T`` with
    ``e = exp((x − m)/T)`` and ``m`` the (valid) maximum of the raw ``x``. The log-probabilities are
    never formed, nor are the scaled logits ``x/T``: the maxima read the inputs themselves and the
    three sums are one reduction along the class axis (:func:`kdjax.ops.reductions.sums`), so
    the inputs are read about once forward and once backward (the gradient is ``(p^S − p^T)/T``). A
    slice without a valid entry gives 0.

    Args:
      student, teacher: float32 logits of one shape (the teacher already frozen).
      axis: the axis of the distributions.
      valid: bool array broadcastable to them, or None.
      temperature: the softmax temperature T (> 0).
    Returns:
      float32, the inputs' shape without ``axis``.
    """
    if valid is not None:
        valid = jnp.broadcast_to(valid, student.shape)
        # Masked entries to 0 first: a masked NaN/inf would otherwise reach the gradients through
        # exp (0 · inf) even though the forward selects it away.
        student = jnp.where(valid, student, 0.0)
        teacher = jnp.where(valid, teacher, 0.0)
    shift_s, shift_t = softmax_shifts(_where_valid(student, valid, -jnp.inf),
                                      _where_valid(teacher, valid, -jnp.inf), axis=axis)
    e_s = _where_valid(jnp.exp((student - shift_s) / temperature), valid, 0.0)
    e_t = _where_valid(jnp.exp((teacher - shift_t) / temperature), valid, 0.0)
    total_s, total_t, cross = sums(e_s, e_t, e_t * (teacher - student), axis=axis)
    total_s, total_t = (jnp.where(t > 0, t, 1.0) for t in (total_s, total_t))
    return (cross / (temperature * total_t) + jnp.log(total_s) - jnp.log(total_t)
            + jnp.squeeze(shift_s - shift_t, axis) / temperature)


def masked_log_softmax(z: Array, valid: Array | None, axis: int) -> Array:
    """log softmax of ``z`` along ``axis`` over the ``valid`` entries only; 0 at invalid entries.

    Stays finite everywhere (also when a whole slice is invalid), so neither the value nor the
    gradient can turn NaN through the masked entries.

    Args:
      z: float32 array.
      valid: bool array broadcastable to ``z``, or None for the plain log softmax.
    """
    if valid is None:
        return jax.nn.log_softmax(z, axis=axis)
    shift, log_total = _masked_shift_and_log_total(z, valid, axis)
    # (z − shift) first: exact 0 at the maximum, so a dominant entry keeps its small log-probability.
    return jnp.where(valid, (z - shift) - log_total, 0.0)


def safe_sqrt(x: Array) -> Array:
    """Element-wise ``sqrt`` of a non-negative array whose gradient at 0 is 0 instead of inf/NaN."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def softmax_shifts(*operands: Array, axis: int) -> tuple[Array, ...]:
    """The shift of a stable softmax for each operand: its maximum along ``axis`` (kept, size 1),
    0 where that maximum is not finite (a slice of −inf, as :func:`jax.nn.logsumexp` does).

    One reduction per operand, and no gradient: a softmax does not depend on its shift. (The
    maxima read the logits themselves, with no producer to fuse, so several in one pass gain
    nothing, on the CPU either.)

    Args:
      operands: float arrays of one shape and dtype (masked entries already −inf).
      axis: the softmax axis.
    Returns:
      one array per operand, the operands' shape with ``axis`` of size 1.
    """
    axis = normalize_axis(operands, axis)
    maxima = (jnp.max(jax.lax.stop_gradient(x), axis=axis, keepdims=True) for x in operands)
    return tuple(jnp.where(jnp.isfinite(m), m, 0.0) for m in maxima)
