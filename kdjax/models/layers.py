"""Building blocks shared by every kdjax model, with PyTorch semantics, in NHWC.

CIRKD's networks (cirkd-models.md) are PyTorch modules; these layers reproduce the PyTorch behaviour
that their outputs depend on, so a converted checkpoint gives the same numbers:

- ``Conv2d``: symmetric integer padding, dilation and groups as ``torch.nn.Conv2d``; the kernel is
  stored HWIO, ``(kh, kw, in/groups, out)``, so a PyTorch OIHW weight maps by a transpose. It computes
  with :func:`kdjax.ops.convolution.conv2d`.
- ``BatchNorm2d``: eps 1e-5, running statistics updated with momentum 0.1 and the *unbiased* batch
  variance (as ``torch.nn.BatchNorm2d``); normalisation uses the biased batch variance.
- ``resize_bilinear_align_corners``: ``F.interpolate(mode='bilinear', align_corners=True)``, the
  resize CIRKD uses everywhere (cirkd-models.md §3.1).
- ``adaptive_avg_pool``: ``nn.AdaptiveAvgPool2d`` bins, edges ``floor(i·n/o)``..``ceil((i+1)·n/o)``,
  overlapping when ``n`` is not a multiple of ``o`` (§3.4).
- ``max_pool_torch``: ``nn.MaxPool2d`` with implicit −inf padding and optional ceil mode.

All tensors are (N, H, W, C).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.ops.batch_norm import batch_normalize
from kdjax.ops.convolution import conv2d
from kdjax.ops.kernels import resolve_kernels
from kdjax.ops.xla import BN_EPS

Array = jax.Array
Dtype = Any
IntPair = int | Sequence[int]

# PyTorch's BatchNorm2d momentum: the weight of the *new* statistic.
BN_MOMENTUM = 0.1

# He-normal on fan-out, the initialisation of torchvision's and CIRKD's ResNets and MobileNetV2.
default_kernel_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")

ACTIVATIONS: dict[str | None, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    None: lambda x: x,
}


def check_nhwc(name: str, x: Array) -> None:
    """Raises ValueError unless ``x`` is a rank-4 (N, H, W, C) array."""
    if jnp.ndim(x) != 4:
        raise ValueError(f"{name} must have rank 4 (N, H, W, C); got shape {jnp.shape(x)}")


def dropout(layer: nnx.Dropout | None, x: Array, train: bool, rngs: nnx.Rngs | None) -> Array:
    """``layer`` on ``x`` in train mode, its masks drawn from the 'dropout' stream of ``rngs``
    (else 'default'); the identity in eval mode, at rate 0 and for ``layer=None``. Any shape.

    Dropout keys are arguments of a call, not state of a model: a split model holds only its
    parameters and batch statistics, and a train step passes ``nnx.Rngs(dropout=key)``.
    """
    if layer is None or not train or layer.rate == 0.0:
        return x
    if rngs is None:
        raise ValueError("train=True applies dropout, whose masks need keys: pass "
                         "rngs=nnx.Rngs(dropout=key) to the call (train=False needs none).")
    return layer(x, deterministic=False, rngs=rngs)


def _pair(name: str, value: IntPair, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < minimum for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}; got {value!r}")
    return int(pair[0]), int(pair[1])


def check_activation(activation: str | None) -> None:
    """Raises ValueError unless ``activation`` names an entry of ``ACTIVATIONS``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(map(str, ACTIVATIONS))}; "
                         f"got {activation!r}")


@jax.custom_jvp
def residual_relu(x: Array) -> Array:
    """``max(x, 0)`` for the output of a residual block, with ``jax.nn.relu``'s value, NaN
    propagation and gradient (0 at 0), written as a select.

    XLA's CPU fusion copies an operation it counts as unary, such as ``maximum(x, 0)``, into every
    consumer. A block's output feeds the next block's convolution and its residual sum, so each
    block's fused sum recomputed every earlier block of its stage: in DeepLabV3-ResNet101's 23-block
    layer3, one fusion read 23 full-size tensors (``benchmarks/memory.py --train_step``). A select has two
    full-size operands, so the output is written once and read from memory.
    """
    return jnp.where(x < 0, jnp.zeros_like(x), x)


residual_relu.defjvps(lambda g, _, x: jnp.where(x > 0, g, jnp.zeros_like(g)))


class Conv2d(nnx.Module):
    """``torch.nn.Conv2d`` in NHWC: (N, H, W, in_ch) -> (N, H', W', out_ch).

    ``H' = floor((H + 2·padding − dilation·(kernel − 1) − 1) / stride) + 1``. Parameters:
    ``kernel`` (kh, kw, in_ch/groups, out_ch) and, with ``use_bias``, ``bias`` (out_ch,). Called as
    ``conv(x)``; computes in ``dtype``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: IntPair, *, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                 use_bias: bool = False, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32,
                 kernel_init: Callable[..., Array] = default_kernel_init, rngs: nnx.Rngs):
        if groups < 1 or in_ch % groups or out_ch % groups:
            raise ValueError(f"groups must divide in_ch={in_ch} and out_ch={out_ch}; got {groups}")
        self.in_ch, self.out_ch, self.groups = in_ch, out_ch, groups
        self.kernel_size = _pair("kernel", kernel, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)
        self.dtype = dtype
        self.kernels = resolve_kernels("auto")
        shape = (*self.kernel_size, in_ch // groups, out_ch)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_ch,), param_dtype)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        check_nhwc("x", x)
        if x.shape[-1] != self.in_ch:
            raise ValueError(f"x must have {self.in_ch} channels; got shape {x.shape}")
        y = conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), stride=self.stride,
                   padding=self.padding, dilation=self.dilation, groups=self.groups,
                   kernels=self.kernels)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class BatchNorm2d(nnx.Module):
    """``torch.nn.BatchNorm2d`` over the channel axis of (N, H, W, C); output has x's shape.

    Parameters ``scale``, ``bias`` (C,); batch statistics ``mean``, ``var`` (C,), PyTorch's
    ``running_mean`` and ``running_var``. ``bn(x, train=True)`` normalises with the statistics of
    this batch (biased variance, over N·H·W; under a global-view ``jit`` the batch is the global
    batch, i.e. synchronised BN) and moves the running statistics 10 % towards them, using the
    unbiased variance as PyTorch does. ``bn(x, train=False)`` normalises with the running statistics
    and changes nothing. Statistics are computed in at least float32; the output is in ``dtype``.

    The variables are those of ``nnx.BatchNorm`` (flax momentum 0.9 ⇔ PyTorch 0.1), but
    ``nnx.BatchNorm`` accumulates the biased variance, so imported running statistics would drift
    away from PyTorch's after further training; hence a module of its own.

    ``batch_groups = G > 1`` reproduces per-device (unsynchronised) BN under the global view:
    train mode splits the batch into G consecutive groups (one per device of a ``'data'`` mesh),
    normalises each with its own statistics, and moves the running statistics towards the mean
    of the groups' statistics.
    """

    def __init__(self, ch: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        del rngs  # deterministic initialisation; accepted for a uniform constructor signature
        self.ch = ch
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((ch,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((ch,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((ch,), param_dtype))
        self.var = nnx.BatchStat(jnp.ones((ch,), param_dtype))
        self.batch_groups = 1
        self.kernels = resolve_kernels("auto")

    def __call__(self, x: Array, train: bool) -> Array:
        check_nhwc("x", x)
        if x.shape[-1] != self.ch:
            raise ValueError(f"x must have {self.ch} channels; got shape {x.shape}")
        stat_dtype = jnp.promote_types(self.dtype, jnp.float32)
        groups = self.batch_groups if train else 1
        if x.shape[0] % groups:
            raise ValueError(f"a batch of {x.shape[0]} cannot be split into {groups} BN groups; "
                             f"make the batch size a multiple of the device count.")
        scale = self.scale[...].astype(stat_dtype)
        bias = self.bias[...].astype(stat_dtype)
        if train:
            count = x.shape[0] // groups * x.shape[1] * x.shape[2]
            if count < 2:
                raise ValueError(f"train-mode BatchNorm2d needs more than one value per channel; "
                                 f"got x of shape {x.shape} in {groups} group(s)")
            y, mean, var = batch_normalize(x, scale, bias, groups=groups, dtype=stat_dtype,
                                           kernels=self.kernels)
            unbiased = jax.lax.stop_gradient(jnp.mean(var, axis=0) * (count / (count - 1)))
            batch_mean = jax.lax.stop_gradient(jnp.mean(mean, axis=0))
            new_mean = (1 - BN_MOMENTUM) * self.mean[...] + BN_MOMENTUM * batch_mean
            new_var = (1 - BN_MOMENTUM) * self.var[...] + BN_MOMENTUM * unbiased
            # set_value, not ``[...] =``: nnx's indexed assignment reads ``.sharding`` of the
            # traced value, and the tracer's error message for it walks the whole trace so far,
            # which made tracing a deep network quadratic in its BatchNorm count.
            self.mean.set_value(new_mean.astype(self.mean.dtype))
            self.var.set_value(new_var.astype(self.var.dtype))
        else:
            mul = scale * jax.lax.rsqrt(self.var[...].astype(stat_dtype) + BN_EPS)
            y = (x.astype(stat_dtype) - self.mean[...].astype(stat_dtype)) * mul + bias
        return y.astype(self.dtype)


def set_kernels(module: nnx.Module, kernels: str) -> None:
    """Makes every ``Conv2d`` and ``BatchNorm2d`` of ``module`` compute with ``kernels``: 'xla',
    'cpu', 'gpu' or 'auto' (:func:`kdjax.ops.kernels.resolve_kernels`; the layers' default)."""
    resolved = resolve_kernels(kernels)
    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, (Conv2d, BatchNorm2d)):
            sub.kernels = resolved


def set_batch_norm_groups(module: nnx.Module, groups: int) -> None:
    """Per-device BN statistics: every BatchNorm2d of ``module`` normalises ``groups`` batch
    slices separately (see :class:`BatchNorm2d`)."""
    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, BatchNorm2d):
            sub.batch_groups = groups


class ConvBNReLU(nnx.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation: (N, H, W, in_ch) -> (N, H', W', out_ch).

    Children ``conv`` and ``bn`` (PyTorch ``Sequential`` indices 0 and 1); the activation ('relu',
    'relu6' or None) holds no state. Called as ``block(x, train)``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: IntPair, *, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                 activation: str | None = "relu", dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_activation(activation)
        self.activation = activation
        self.conv = Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm2d(out_ch, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, train: bool) -> Array:
        return ACTIVATIONS[self.activation](self.bn(self.conv(x), train))


def _align_corners_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows ``lo``, ``hi`` and weight of ``hi`` for each of the ``n_out`` output rows."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out) * scale
    lo = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _half_pixel_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The taps of PyTorch's align_corners=False: row ``i`` samples ``max((i + ½)·n_in/n_out − ½,
    0)``."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _lerp_axis(x: Array, axis: int, n_out: int, taps) -> Array:
    lo, hi, frac = taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w = jnp.asarray(frac.reshape(shape), x.dtype)
    x_lo = jnp.take(x, lo, axis=axis)
    return x_lo + (jnp.take(x, hi, axis=axis) - x_lo) * w


def _resize(x: Array, size: Sequence[int], taps) -> Array:
    """(N, H, W, C) → (N, h, w, C), separably along H then W with the given taps."""
    check_nhwc("x", x)
    h, w = _pair("size", size, 1)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point; got dtype {x.dtype}")
    if h != x.shape[1]:
        x = _lerp_axis(x, 1, h, taps)
    if w != x.shape[2]:
        x = _lerp_axis(x, 2, w, taps)
    return x


def resize_bilinear_align_corners(x: Array, size: Sequence[int]) -> Array:
    """Bilinear resize of (N, H, W, C) to (N, h, w, C) with ``align_corners=True``.

    Output row ``i`` samples input row ``i·(H−1)/(h−1)`` (row 0 when ``h == 1``), so the corner
    pixels of input and output coincide: PyTorch's ``F.interpolate(x, (h, w), mode='bilinear',
    align_corners=True)``, CIRKD's upsampling of logits, aux logits and ASPP image pooling
    (cirkd-models.md §3.1, §3.3). Keeps x's floating dtype.
    """
    return _resize(x, size, _align_corners_taps)


def resize_bilinear(x: Array, size: Sequence[int]) -> Array:
    """Bilinear resize of (N, H, W, C) to (N, h, w, C) with ``align_corners=False``.

    Output row ``i`` samples input row ``max((i + 0.5)·H/h − 0.5, 0)``: PyTorch's
    ``F.interpolate(x, (h, w), mode='bilinear', align_corners=False)`` (no antialiasing), the
    resize of the SegFormer decoder. Keeps x's floating dtype.
    """
    return _resize(x, size, _half_pixel_taps)


def _adaptive_bin_matrix(n: int, bins: int) -> np.ndarray:
    """(bins, n) averaging matrix with PyTorch's edges floor(i·n/o)..ceil((i+1)·n/o)."""
    m = np.zeros((bins, n), np.float32)
    for i in range(bins):
        start, end = (i * n) // bins, -((-(i + 1) * n) // bins)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: Array, bins: IntPair) -> Array:
    """``nn.AdaptiveAvgPool2d(bins)``: (N, H, W, C) -> (N, bh, bw, C), bins as PyTorch places them.

    Bin ``i`` of an axis of length ``n`` averages rows ``floor(i·n/o)`` to ``ceil((i+1)·n/o) − 1``;
    neighbouring bins overlap when ``n`` is not a multiple of ``o`` (PSP pyramid pooling,
    cirkd-models.md §3.4). Sums in float32; keeps x's dtype.
    """
    check_nhwc("x", x)
    bh, bw = _pair("bins", bins, 1)
    mh = jnp.asarray(_adaptive_bin_matrix(x.shape[1], bh))
    mw = jnp.asarray(_adaptive_bin_matrix(x.shape[2], bw))
    y = jnp.einsum("nhwc,ph,qw->npqc", x.astype(jnp.promote_types(x.dtype, jnp.float32)), mh, mw,
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def _pool_extent(n: int, k: int, s: int, p: int, ceil_mode: bool) -> tuple[int, int]:
    """Output length and right padding of PyTorch's pooling along one axis."""
    out = (n + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:  # the last window must start inside the input
        out -= 1
    return out, max(0, (out - 1) * s + k - n - p)


def max_pool_torch(x: Array, kernel: IntPair, stride: IntPair | None = None,
                   padding: IntPair = 0, ceil_mode: bool = False) -> Array:
    """``nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)`` on (N, H, W, C).

    Padding is −inf (it never wins the max); ``H' = floor((H + 2p − k) / s) + 1``, or with
    ``ceil_mode`` the ceiling, dropping a last window that would start in the right padding.
    ``stride`` defaults to ``kernel``. The ResNet stem uses k3 s2 p1: ``H' = ceil(H / 2)``.
    """
    check_nhwc("x", x)
    k = _pair("kernel", kernel, 1)
    s = _pair("stride", kernel if stride is None else stride, 1)
    p = _pair("padding", padding, 0)
    if any(pi > ki // 2 for pi, ki in zip(p, k)):
        raise ValueError(f"padding must be at most half the kernel {k}; got {padding!r}")
    extents = [_pool_extent(n, ki, si, pi, ceil_mode)
               for n, ki, si, pi in zip(x.shape[1:3], k, s, p)]
    if any(out < 1 for out, _ in extents):
        raise ValueError(f"x of shape {x.shape} is smaller than the pooling kernel {k}")
    # A concrete NumPy identity lets JAX recognise the max monoid, which has a gradient rule.
    neg_inf = np.array(-np.inf, x.dtype)
    pads = ((0, 0), *((pi, right) for pi, (_, right) in zip(p, extents)), (0, 0))
    return jax.lax.reduce_window(x, neg_inf, jax.lax.max, (1, *k, 1), (1, *s, 1), pads)
