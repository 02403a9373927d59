"""FAKD: feature-augmented distillation (Yuan et al., arXiv 2208.14143), methods.md §4 and §9.4.

The student's pre-classifier feature ``f`` of a pixel with class ``y`` is augmented along semantic
directions, ``f̃ = f + δ`` with ``δ ~ N(0, λ·diag(σ²_y))`` (ISDA). The classifier is a 1×1 conv,
``z = f·W + b`` with ``W`` of shape (A, K), so the augmented logits are ``z̃ = z + δ·W``. Instead
of sampling, the expected distillation loss over infinitely many augmentations is replaced by a
closed-form upper bound (Jensen's inequality and the Gaussian moment-generating function):

- :func:`fakd_kd` bounds ``E_δ[τ²·KL(q || softmax(z̃/τ))]`` (pixel KD, §5.1);
- :func:`fakd_cwd` bounds ``E_δ[CWD(z̃)]`` (channel-wise distillation, §1), with one independent
  δ per pixel.

Both equal their plain loss at λ = 0 and grow with λ. The per-class diagonal variance comes from
an online estimator (:class:`ClassCovariance`, ISDA's ``EstimatorCV``) whose state the training step
threads through explicitly, and the strength follows ISDA's linear ramp (:func:`fakd_strength`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.losses._common import (as_float32, check_labels, check_mask, check_optional_positive_int,
                                  check_pair, check_positive, check_rank, combine_masks, frozen,
                                  masked_mean, nearest_resize_labels, softmax_shifts,
                                  valid_label_mask)
from kdjax.losses._derivative_rules import gradient_from_forward
from kdjax.ops.reductions import sums
from kdjax.losses.channel_wise import channel_wise_divergence, spatial_log_softmax
from kdjax.losses.pixel_kd import pixel_kd

Array = jax.Array

# Sums over pixels and features must not drop to bf16 passes on accelerators.
_HIGHEST = jax.lax.Precision.HIGHEST


class ClassCovariance(NamedTuple):
    """Running per-class statistics of the student's pre-classifier feature (a pytree).

    Attributes:
      mean: float32 (K, A) running class means μ_k.
      var: float32 (K, A) running diagonal (biased) class variances σ²_k.
      count: float32 (K,) number of pixels seen per class n_k.
    """

    mean: Array
    var: Array
    count: Array


def init_class_covariance(num_classes: int, dim: int) -> ClassCovariance:
    """The empty estimator state: zero means, variances and counts for ``num_classes`` × ``dim``."""
    for name, value in (("num_classes", num_classes), ("dim", dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return ClassCovariance(mean=jnp.zeros((num_classes, dim), jnp.float32),
                           var=jnp.zeros((num_classes, dim), jnp.float32),
                           count=jnp.zeros((num_classes,), jnp.float32))


def _pixel_classes(labels: Array, spatial_of: Array, num_classes: int,
                   ignore_label: int) -> tuple[Array, Array]:
    """Labels nearest-resized to the (H, W) of ``spatial_of``: (safe class index, has-class mask).

    Returns:
      int (N, H, W) class indices (0 where the pixel has no class) and bool (N, H, W), True where
      the resized label is a class in [0, num_classes) other than ``ignore_label``.
    """
    h, w = jnp.shape(spatial_of)[1:3]
    resized = nearest_resize_labels(jnp.asarray(labels), h, w)
    has_class = valid_label_mask(resized, num_classes, ignore_label)
    return jnp.where(has_class, resized, 0), has_class


def update_class_covariance(state: ClassCovariance, features: Array, labels: Array, *,
                            ignore_label: int = 255, mask: Array | None = None) -> ClassCovariance:
    """One step of ISDA's online class-conditional diagonal covariance estimator (methods.md §4).

    With this batch's per-class mean ``m_k``, biased variance ``v_k`` and pixel count ``b_k``, and
    ``w = b_k / (b_k + n_k)``::

        σ²_k ← (1 − w)·σ²_k + w·v_k + w(1 − w)·(μ_k − m_k)²
        μ_k  ← (1 − w)·μ_k + w·m_k
        n_k  ← n_k + b_k

    which keeps μ_k and σ²_k equal to the mean and biased variance of every feature of class k
    seen so far. Classes absent from the batch keep their state unchanged.

    Args:
      state: the current :class:`ClassCovariance` (K, A).
      features: (N, H, W, A) the student's pre-classifier feature; used under ``stop_gradient``.
      labels: int (N, H_l, W_l) ground truth, nearest-resized to (H, W) with PyTorch's floor rule.
      ignore_label: label value excluded from the statistics (as are labels outside [0, K)).
      mask: optional bool (N, H, W); masked pixels are excluded.
    Returns:
      the updated :class:`ClassCovariance`.
    """
    check_rank("features", features, 4, "N,H,W,A")
    shapes = tuple(tuple(jnp.shape(x)) for x in state)
    mean_shape = shapes[0]
    if len(mean_shape) != 2 or shapes[1] != mean_shape or shapes[2] != mean_shape[:1]:
        raise ValueError(
            "state must hold mean (K, A), var (K, A) and count (K,), got shapes "
            f"{shapes[0]}, {shapes[1]} and {shapes[2]}.")
    if features.shape[-1] != mean_shape[1]:
        raise ValueError(f"features must have A = {mean_shape[1]} channels like the state mean "
                         f"{mean_shape}, got shape {tuple(features.shape)}.")
    check_mask(mask, features)
    check_labels(labels, features, "features")
    return _update_class_covariance(ClassCovariance(*state), features, labels, mask,
                                    ignore_label=ignore_label)


@functools.partial(jax.jit, static_argnames=("ignore_label",))
def _update_class_covariance(state, features, labels, mask, *, ignore_label):
    mean, var, count = (as_float32(x) for x in state)
    num_classes = mean.shape[0]
    classes, has_class = _pixel_classes(labels, features, num_classes, ignore_label)
    valid = combine_masks(has_class, None if mask is None else jnp.asarray(mask, bool))
    # where() rather than one-hot weighting alone: 0 · NaN in an excluded pixel would still be NaN.
    feats = jnp.where(valid[..., None], jax.lax.stop_gradient(as_float32(features)), 0.0)
    onehot = jnp.where(valid[..., None],
                       jax.nn.one_hot(classes, num_classes, dtype=jnp.float32), 0.0)

    batch_count = jnp.sum(onehot, axis=(0, 1, 2))
    present = batch_count > 0
    per_class = jnp.maximum(batch_count, 1.0)[:, None]
    batch_mean = jnp.einsum("nhwk,nhwa->ka", onehot, feats, precision=_HIGHEST) / per_class
    # Two passes (deviations from the batch mean) rather than E[f²] − m², which cancels badly.
    deviation = jnp.where(valid[..., None], feats - batch_mean[classes], 0.0)
    batch_var = jnp.einsum("nhwk,nhwa->ka", onehot, jnp.square(deviation),
                           precision=_HIGHEST) / per_class

    # b_k ≥ 1 wherever the class is present, so the denominator is never 0 there.
    weight = jnp.where(present, batch_count / jnp.maximum(batch_count + count, 1.0), 0.0)[:, None]
    new_var = (1.0 - weight) * var + weight * batch_var + weight * (1.0 - weight) * jnp.square(
        mean - batch_mean)
    new_mean = (1.0 - weight) * mean + weight * batch_mean
    keep = present[:, None]
    return ClassCovariance(mean=jnp.where(keep, new_mean, mean), var=jnp.where(keep, new_var, var),
                           count=count + batch_count)


def fakd_strength(step, total_steps, lam0: float = 7.5) -> Array:
    """ISDA's linear ramp of the augmentation strength, ``λ(t) = λ₀ · t / T``.

    Args:
      step: current step t (int or traced int).
      total_steps: total number of steps T.
      lam0: final strength λ₀ (ISDA default 7.5; choices there {1, 2.5, 5, 7.5, 10}).
    Returns:
      float32 scalar λ(t).
    """
    if isinstance(total_steps, (int, float)):
        check_positive("total_steps", total_steps)
    ratio = jnp.asarray(step, jnp.float32) / jnp.asarray(total_steps, jnp.float32)
    return jnp.float32(lam0) * ratio


def _classifier_matrix(classifier_kernel: Array, num_classes: int) -> Array:
    """The 1×1 classifier weight as (A, K); accepts (A, K) and an NNX conv kernel (1, 1, A, K)."""
    kernel = jnp.asarray(classifier_kernel)
    shape = tuple(kernel.shape)
    if kernel.ndim == 4 and shape[:2] == (1, 1):
        kernel = kernel.reshape(shape[2:])
    if kernel.ndim != 2 or kernel.shape[1] != num_classes:
        raise ValueError(
            f"classifier_kernel must have shape (A, K) or (1, 1, A, K) with K = {num_classes} "
            f"classes (the logits' last axis), got {shape}.")
    return kernel


def _check_variance(variance: Array, kernel: Array) -> None:
    """Raises ValueError unless the diagonal class variance is (K, A) for the (A, K) kernel."""
    dim, num_classes = kernel.shape
    if tuple(jnp.shape(variance)) != (num_classes, dim):
        raise ValueError(
            f"variance must have shape (K, A) = {(num_classes, dim)} to match classifier_kernel "
            f"(A, K) = {(dim, num_classes)}, got {tuple(jnp.shape(variance))}.")


def _check_strength(strength) -> None:
    """Raises ValueError for a negative concrete strength (traced values are not checked)."""
    if isinstance(strength, (int, float)) and not strength >= 0:
        raise ValueError(f"strength must be non-negative, got {strength!r}.")


def _kd_excess(log_p: Array, q: Array, kernel: Array, variance: Array, classes: Array,
               has_class: Array, beta: Array) -> Array:
    """Per-pixel excess of the FAKD-KD bound over the plain cross-entropy.

    ``Σ_k q_k [LSE_j(log p_j + β·M_y[j,k]) − LSE_j(log p_j)]`` with
    ``M_y[j,k] = Σ_a (W[a,j] − W[a,k])² σ²_{y,a}``; it is ≥ 0, and 0 at β = 0 or for pixels
    without a class (M = 0).

    Runs over the target class k with ``lax.map``, two targets per step, and rematerialises each
    step in the backward pass, so memory stays O(N·H·W·K) instead of O(N·H·W·K²); the batch axis
    is never looped over, so a batch-sharded input stays sharded.

    Args:
      log_p: float32 (N, H, W, K) student log-probabilities at temperature τ.
      q: float32 (N, H, W, K) teacher probabilities.
      kernel: float32 (A, K). variance: float32 (K, A).
      classes, has_class: (N, H, W) pixel class and whether it has one.
      beta: float32 scalar λ/(2τ²).
    Returns:
      float32 (N, H, W).
    """
    base = jax.nn.logsumexp(log_p, axis=-1)
    num_classes = log_p.shape[-1]

    def augmented(k):
        column = jax.lax.dynamic_slice_in_dim(kernel, k, 1, axis=1)
        # (K_y, K_j): M_y[j, k] for this k, from squared differences so it is never negative.
        quad = jnp.matmul(variance, jnp.square(kernel - column), precision=_HIGHEST)
        return log_p + jnp.where(has_class[..., None], beta * quad[classes], 0.0)

    @jax.checkpoint
    def for_two_targets(i):
        # Two target classes per step share one pass over log_p for their sums
        # (kdjax.ops.reductions; benchmarks/NOTES.md item 51).
        # An odd K repeats the last target; its copy is dropped below.
        logits = augmented(2 * i), augmented(jnp.minimum(2 * i + 1, num_classes - 1))
        shifts = softmax_shifts(*logits, axis=-1)
        totals = sums(*(jnp.exp(a - m) for a, m in zip(logits, shifts)), axis=-1)
        return jnp.stack([m[..., 0] + jnp.log(t) - base for m, t in zip(shifts, totals)])

    steps = (num_classes + 1) // 2
    per_target = jax.lax.map(for_two_targets, jnp.arange(steps))      # (steps, 2, N, H, W)
    per_target = per_target.reshape((2 * steps,) + base.shape)[:num_classes]
    return jnp.sum(jnp.moveaxis(per_target, 0, -1) * q, axis=-1)


def fakd_kd(student_logits: Array, teacher_logits: Array, classifier_kernel: Array,
            variance: Array, labels: Array, *, strength, temperature: float = 1.0,
            ignore_label: int = 255, mask: Array | None = None) -> Array:
    """FAKD-KD: the closed-form upper bound of pixel KD under infinite feature augmentation (§9.4).

    With ``q = softmax(z^T/τ)``, the student logits ``z``, the pixel's class ``y`` and
    ``M_y[j,k] = Σ_a (W[a,j] − W[a,k])² σ²_{y,a}``::

        L = mean_pixels τ² · [Σ_k q_k · logsumexp_j((z_j − z_k)/τ + λ/(2τ²)·M_y[j,k]) − H(q)]
          ≥ mean_pixels E_δ[τ² · KL(q || softmax((z + δ·W)/τ))],   δ ~ N(0, λ·diag(σ²_y)).

    It is computed as pixel KD plus the (non-negative) augmentation excess, so at λ = 0 it is
    ``pixel_kd(student_logits, teacher_logits, temperature=τ, mask=mask)``. Pixels without a class
    (``ignore_label`` or outside [0, K)) get no augmentation (M = 0) but stay in the mean unless
    masked. The gradient flows into the student logits and into the classifier kernel (through M,
    as in ISDA); the teacher and the variance are constants.

    Args:
      student_logits: (N, H, W, K) student logits.
      teacher_logits: (N, H, W, K) teacher logits.
      classifier_kernel: (A, K) student 1×1 classifier weight (z = f·W + b), or the (1, 1, A, K)
        kernel of an NNX ``Conv``.
      variance: (K, A) per-class diagonal feature variance, :attr:`ClassCovariance.var`.
      labels: int (N, H_l, W_l) ground truth; nearest-resized to (H, W).
      strength: λ ≥ 0 (float or traced scalar, e.g. :func:`fakd_strength`).
      temperature: τ.
      ignore_label: label value without a class (255 VOC/Cityscapes, −1 CIRKD).
      mask: optional bool (N, H, W); masked pixels leave the sum and the count.
    Returns:
      float32 scalar.
    """
    check_pair(student_logits, teacher_logits, mask)
    check_positive("temperature", temperature)
    kernel = _classifier_matrix(classifier_kernel, student_logits.shape[-1])
    _check_variance(variance, kernel)
    check_labels(labels, student_logits, "student_logits")
    _check_strength(strength)
    plain = pixel_kd(student_logits, teacher_logits, temperature=temperature, mask=mask)
    return plain + _kd_augmentation(student_logits, teacher_logits, kernel, variance, labels,
                                    strength, temperature, mask, ignore_label=ignore_label)


# The augmentation parts are compiled as one program each, with the temperature as an argument:
# eager calls then neither retrace the lax.map body nor recompile for every temperature or strength.
@functools.partial(jax.jit, static_argnames=("ignore_label",))
def _kd_augmentation(student_logits, teacher_logits, kernel, variance, labels, strength,
                     temperature, mask, *, ignore_label):
    """τ² · mean over the (unmasked) pixels of the FAKD-KD excess (see :func:`_kd_excess`)."""
    num_classes = student_logits.shape[-1]
    classes, has_class = _pixel_classes(labels, student_logits, num_classes, ignore_label)
    beta = as_float32(strength) / (2.0 * temperature**2)
    log_p = jax.nn.log_softmax(as_float32(student_logits) / temperature, axis=-1)
    q = jax.nn.softmax(frozen(teacher_logits) / temperature, axis=-1)
    excess = _kd_excess(log_p, q, as_float32(kernel), frozen(variance), classes, has_class, beta)
    return temperature**2 * masked_mean(excess, mask)


def _chunk_of_images(images_per_chunk: int | None, batch: int, bytes_per_image: int,
                     scratch_bytes: int | None) -> int:
    """The number of images FAKD-CWD processes at once (at most ``batch``).

    Args:
      images_per_chunk: the user's choice, a positive integer, or None: as many images as keep
        ``bytes_per_image`` each within ``scratch_bytes`` (at least one), or the whole batch
        when that is None too.
      batch: the batch size N.
      bytes_per_image: the scratch one image needs.
      scratch_bytes: the scratch budget, or None.
    """
    check_optional_positive_int("images_per_chunk", images_per_chunk)
    check_optional_positive_int("scratch_bytes", scratch_bytes)
    if images_per_chunk is None:
        if scratch_bytes is None:
            return batch
        images_per_chunk = max(1, scratch_bytes // bytes_per_image)
    return min(images_per_chunk, batch)


# Full-size float32 arrays the leave-one-out step holds at once, for the chunk estimate.
_LEAVE_ONE_OUT_ARRAYS = 12


def _leave_one_out_parts(z: Array, u: Array, q: Array, valid: Array) -> tuple[Array, Array, Array]:
    """``Σ_{n,c,i} q_i · log(1 + Σ_{j≠i, valid} exp(z_j − z_i + u_j + u_i))`` and its gradients.

    With ``a = z + u``, ``M`` the valid maximum of a channel and ``e_j = exp(a_j − M)``, the term is
    ``softplus(v_i)``, ``v_i = 2u_i − (a_i − M) + log O_i`` with ``O_i = Σ_{j≠i} e_j``. Away from the
    maximum, ``O_i`` is the full sum minus one term that is at most the maximum's ``e = 1``: no
    cancellation. At a maximum it is the sum of the terms below the maximum, kept apart as ``R``
    (plus the other maxima, if tied), which may be far below 1 (the leave-one-out sum a plain
    ``sum − own term`` would cancel to 0).

    The gradients follow from ``∂v_i/∂a_j = e_j/O_i`` (j ≠ i): with ``g_i = q_i·sigmoid(v_i)``,
    ``∂/∂z_j = X_j − g_j`` and ``∂/∂u_j = X_j + g_j``, where ``X_j = e_j Σ_{i≠j} g_i/O_i``. The
    maxima's share ``Σ_top g/O_top`` may be huge where R is tiny, so it enters as
    ``G_top·(e_j/O_top)``, with ``e_j ≤ R ≤ O_top``. They are formed here, where their ingredients
    already are, rather than by differentiating these steps.

    Args:
      z, u: float32 (N, P, C); sums run over the position axis 1.
      q: float32 (N, P, C) weights, 0 at invalid positions.
      valid: bool (N, P, 1); invalid positions take no part.
    Returns:
      float32 scalar value, and float32 (N, P, C) gradients with respect to z and u.
    """
    valid = jnp.broadcast_to(valid, z.shape)
    # One stored copy of a for the maximum and the comparisons with it: a recomputed inside each
    # fusion might round differently, and then no entry would equal the maximum.
    a = jax.lax.optimization_barrier(jnp.where(valid, z + u, -jnp.inf))
    (shift,) = softmax_shifts(a, axis=1)
    top = valid & (a == shift)
    d = jnp.where(valid, a - shift, 0.0)
    below = jnp.where(valid & ~top, jnp.exp(d), 0.0)
    # Every maximum's e is exactly 1; ties at the maximum are counted, not guessed.
    tops, rest = (x[:, None] for x in sums(top.astype(jnp.float32), below, axis=1))
    top_others = rest + (tops - 1.0)
    others = jnp.where(top, top_others, (rest + tops) - below)
    live = valid & (others > 0)
    safe_others = jnp.where(live, others, 1.0)
    v = 2.0 * u - d + jnp.log(safe_others)
    tail = jnp.exp(-jnp.abs(v))
    value = jnp.sum(jnp.where(live, q * (jnp.maximum(v, 0.0) + jnp.log1p(tail)), 0.0))

    g = jnp.where(live, q * jnp.where(v >= 0, 1.0, tail) / (1.0 + tail), 0.0)
    g_over = g / safe_others
    rest_share, g_top = (x[:, None] for x in sums(jnp.where(top, 0.0, g_over),
                                                    jnp.where(top, g, 0.0), axis=1))
    safe_top_others = jnp.where(top_others > 0, top_others, 1.0)
    x = jnp.where(top, rest_share + (g_top - g) / safe_top_others,
                  below * (rest_share - g_over) + g_top * (below / safe_top_others))
    return value, x - g, x + g


def _image_bound_parts(student: Array, u: Array, teacher: Array, valid: Array,
                       tau: float) -> tuple[Array, Array, Array]:
    """One image's ``Σ_{c,i} q_i (term_i + log q_i)`` and its gradients w.r.t. student and u.

    Args:
      student, teacher: float32 (H, W, K) logits.
      u: float32 (H·W, K), β·s of each position.
      valid: bool (H, W).
    Returns:
      float32 scalar, float32 (H, W, K) and float32 (H·W, K).
    """
    h, w, num_classes = student.shape
    z = student.reshape(1, h * w, num_classes) / tau
    positions = valid.reshape(1, h * w, 1)
    log_q = spatial_log_softmax(teacher[None], tau, valid[None])  # 0 at invalid positions
    q = jnp.where(positions, jnp.exp(log_q), 0.0)
    value, grad_z, grad_u = _leave_one_out_parts(z, u[None], q, positions)
    return value + jnp.sum(q * log_q), (grad_z / tau).reshape(h, w, num_classes), grad_u[0]


def _chunked_bound(student: Array, u: Array, teacher: Array, valid: Array, tau: float,
                   images_per_chunk: int) -> Array:
    """The sum over images of :func:`_image_bound_parts`, for (N, ...) stacks of its arguments,
    over chunks of ``images_per_chunk`` images (``lax.map``, each chunk vmapped). The gradients
    come from the same pass, so the backward only scales them
    (:func:`~kdjax.losses._derivative_rules.gradient_from_forward`); the teacher and τ get none."""
    rule = gradient_from_forward(functools.partial(_chunked_bound_parts, images_per_chunk))
    return rule(student, u, teacher, valid, tau)


def _chunked_bound_parts(images_per_chunk: int, student: Array, u: Array, teacher: Array,
                         valid: Array, tau: float
                         ) -> tuple[Array, tuple[Array, Array, None, None, None]]:
    """:func:`_chunked_bound` and its gradients w.r.t. ``student`` (N, H, W, K) and ``u``
    (N, H·W, K); None for the teacher, the validity and τ."""
    values, grad_student, grad_u = jax.lax.map(
        lambda args: _image_bound_parts(*args, tau), (student, u, teacher, valid),
        batch_size=images_per_chunk)
    return jnp.sum(values), (grad_student, grad_u, None, None, None)


def fakd_cwd(student_logits: Array, teacher_logits: Array, classifier_kernel: Array,
             variance: Array, labels: Array, *, strength, tau: float = 4.0,
             c_norm: int | None = None, ignore_label: int = 255,
             mask: Array | None = None, images_per_chunk: int | None = None,
             scratch_bytes: int | None = None) -> Array:
    """FAKD-CWD: the closed-form upper bound of CWD under infinite feature augmentation (§9.4).

    Per image and channel c over the positions i, with ``q = softmax_i(z^T_{c,i}/τ)``,
    ``s_{c,y} = w_cᵀ Σ_y w_c = Σ_a W[a,c]² σ²_{y,a}`` (0 for positions without a class) and
    ``β = λ/(2τ²)``, the cross-entropy part ``−log softmax_i(z_c/τ)`` of CWD becomes::

        term_i = log(1 + Σ_{j≠i} exp((z_{c,j} − z_{c,i})/τ + β·(s_{c,y_j} + s_{c,y_i})))

    and ``L = τ²/(N·C_norm) Σ_{n,c} Σ_i q_i (term_i + log q_i)``. With one independent
    δ_i ~ N(0, λ·diag(σ²_{y_i})) per pixel, ``L ≥ E_δ[CWD(z + δ·W)]``. At λ = 0, ``term_i`` is
    ``−log softmax_i(z_c/τ)`` and L is CWD; there the function returns
    ``channel_wise_divergence(student_logits, teacher_logits, tau=τ, c_norm=c_norm, mask=mask)``
    itself (a ``lax.cond`` on λ > 0 when λ is traced), the plain loss rather than a bound that
    meets it. For λ > 0 the bound is computed directly: one leave-one-out pass over the student
    and the teacher's spatial log-softmax, with its gradient formed in the same pass. Cost is
    O(N·P·K); the scratch memory is O(P·K) per chunk of images.

    Args:
      student_logits: (N, H, W, K) student logits.
      teacher_logits: (N, H, W, K) teacher logits.
      classifier_kernel: (A, K) student 1×1 classifier weight, or an NNX conv kernel (1, 1, A, K).
      variance: (K, A) per-class diagonal feature variance, :attr:`ClassCovariance.var`.
      labels: int (N, H_l, W_l) ground truth; nearest-resized to (H, W).
      strength: λ ≥ 0 (float or traced scalar).
      tau: temperature τ.
      c_norm: channel count of the denominator (None: K), as in :func:`channel_wise_divergence`.
      ignore_label: label value without a class.
      mask: optional bool (N, H, W); masked positions leave both spatial distributions, and images
        without a valid position leave the mean.
      images_per_chunk: the bound runs over chunks of this many images (``lax.map``), which bounds
        its scratch memory. None: as many as ``scratch_bytes`` allows.
      scratch_bytes: without ``images_per_chunk``, chunks of as many images as keep the scratch
        within this many bytes; None: the whole batch in one step. The trainer passes its
        platform's budget (``distill.loss_scratch_mb``, :mod:`kdjax.ops.kernels`).
    Returns:
      float32 scalar.
    """
    check_pair(student_logits, teacher_logits, mask)
    check_positive("tau", tau)
    if c_norm is None:
        c_norm = student_logits.shape[-1]
    check_positive("c_norm", c_norm)
    kernel = _classifier_matrix(classifier_kernel, student_logits.shape[-1])
    _check_variance(variance, kernel)
    check_labels(labels, student_logits, "student_logits")
    _check_strength(strength)
    n, h, w, num_classes = student_logits.shape
    images_per_chunk = _chunk_of_images(images_per_chunk, n,
                                        h * w * num_classes * 4 * _LEAVE_ONE_OUT_ARRAYS,
                                        scratch_bytes)

    def plain():
        return channel_wise_divergence(student_logits, teacher_logits, tau=tau, c_norm=c_norm,
                                       mask=mask)

    def bound():
        return _cwd_bound(student_logits, teacher_logits, kernel, variance, labels, strength, tau,
                          c_norm, mask, ignore_label=ignore_label,
                          images_per_chunk=images_per_chunk)

    if isinstance(strength, (int, float)):
        return bound() if strength > 0 else plain()
    return jax.lax.cond(as_float32(strength) > 0, bound, plain)


@functools.partial(jax.jit, static_argnames=("ignore_label", "images_per_chunk"))
def _cwd_bound(student_logits, teacher_logits, kernel, variance, labels, strength, tau, c_norm,
               mask, *, ignore_label, images_per_chunk):
    """``τ²/(N·C_norm) Σ_{n,c} Σ_i q_i (term_i(β) + log q_i)``, the FAKD-CWD bound for β > 0."""
    n, h, w, num_classes = student_logits.shape
    kernel, var = as_float32(kernel), frozen(variance)
    classes, has_class = _pixel_classes(labels, student_logits, num_classes, ignore_label)
    beta = as_float32(strength) / (2.0 * tau**2)
    # (K_y, K_c): s[y, c] = w_cᵀ Σ_y w_c.
    spread = jnp.matmul(var, jnp.square(kernel), precision=_HIGHEST)
    valid = (jnp.ones((n, h, w), bool) if mask is None else jnp.asarray(mask, bool))
    u = beta * jnp.where(has_class[..., None], spread[classes], 0.0).reshape(n, h * w, num_classes)
    total = _chunked_bound(as_float32(student_logits), u, frozen(teacher_logits), valid, tau,
                           images_per_chunk)
    images = n if mask is None else jnp.sum(jnp.any(valid, axis=(1, 2)), dtype=jnp.float32)
    return tau**2 * total / (jnp.maximum(images, 1.0) * c_norm)
