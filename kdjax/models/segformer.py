"""SegFormer (Xie et al. 2021): the Mix Transformer (MiT) encoder and the all-MLP decoder, NHWC.

The layout is CIRKD's ``models/segformer.py`` (the SegFormer B4 → B0 rows of its benchmark);
attribute names mirror its state-dict keys (``patch_embed1``, ``block1.0.attn.q``, ``norm1``,
``linear_c1``, ``linear_fuse``, ``linear_pred``), so :mod:`kdjax.convert` maps them one to one.

Encoder, per stage i = 1..4 (strides 4, 8, 16, 32):

- ``patch_embed{i}``: an overlapping patch embedding, a conv (7×7 stride 4 padding 3 for stage 1,
  3×3 stride 2 padding 1 after) with bias, then LayerNorm (eps 1e-5);
- ``block{i}``: ``depths[i]`` transformer blocks, ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``
  (LayerNorm eps 1e-6), each residual branch under stochastic depth (rates rising linearly from 0
  to ``drop_path_rate`` over all blocks, 0.1 in CIRKD; the identity in eval mode):
  - ``attn``: efficient self-attention. Queries from every position; keys and values from the map
    reduced by a ``sr × sr`` stride-``sr`` conv and a LayerNorm (eps 1e-5) when ``sr > 1``
    (sr = 8, 4, 2, 1); heads 1, 2, 5, 8; scale ``head_dim^-1/2``; then a linear projection.
  - ``mlp``: the Mix-FFN, linear C→4C, depthwise 3×3 conv with bias, exact GELU, linear 4C→C.
- ``norm{i}``: a final LayerNorm (eps 1e-6); its output is the tap ``c{i}``.

Decoder (:class:`SegFormerHead`): ``linear_c{i}`` projects each ``c{i}`` to the decoder width D,
c2..c4 are resized to the c1 size by bilinear interpolation with ``align_corners=False`` (unlike the
CNN heads), the four are concatenated in the order c4, c3, c2, c1, and ``linear_fuse`` (1×1 conv
4D→D with bias, BatchNorm, ReLU) fuses them into the ``feature`` (CIRKD's ``outputs[-1]``). The
1×1 ``linear_pred`` (with bias) gives the logits at stride 4. CIRKD's dropout before it has rate 0.

Mixed precision: matrix products run in ``dtype``; LayerNorm statistics and the attention softmax
are computed in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.models.layers import (BatchNorm2d, Conv2d, Dtype, check_nhwc, dropout,
                                 resize_bilinear)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MiTVariant:
    """One Mix Transformer size: channel widths and block counts per stage, and the decoder width
    CIRKD pairs with it."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    decoder_dim: int


# CIRKD's MiT_B0 .. MiT_B5 (the SegFormer paper's Table 6 encoders).
MIT_VARIANTS = {
    "mit_b0": MiTVariant((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "mit_b1": MiTVariant((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "mit_b2": MiTVariant((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "mit_b3": MiTVariant((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "mit_b4": MiTVariant((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "mit_b5": MiTVariant((64, 128, 320, 512), (3, 6, 40, 3), 768),
}
# Shared by every variant.
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
DROP_PATH_RATE = 0.1
# (kernel, stride, padding) of each stage's patch embedding.
PATCH_EMBEDS = ((7, 4, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1))
# LayerNorm eps: the blocks' and stages' norms (CIRKD's norm_layer) and the patch-embedding and
# spatial-reduction norms (PyTorch's default).
BLOCK_NORM_EPS = 1e-6
EMBED_NORM_EPS = 1e-5

# CIRKD's initialisation: truncated normal (std 0.02) for linear layers, N(0, 2 / fan_out) for
# convolutions with PyTorch's fan_out = kh·kw·out / groups.
linear_kernel_init = jax.nn.initializers.truncated_normal(0.02)


def conv_kernel_init(kernel: int, out_ch: int, groups: int = 1) -> Callable[..., Array]:
    return jax.nn.initializers.normal(math.sqrt(2.0 * groups / (kernel * kernel * out_ch)))


def drop_path_rates(depths: Sequence[int], drop_path_rate: float) -> list[float]:
    """Stochastic-depth rate of every block in order:
    ``linspace(0, drop_path_rate, sum(depths))``."""
    total = sum(depths)
    return [float(r) for r in np.linspace(0.0, drop_path_rate, total)] if total else []


class Linear(nnx.Module):
    """``torch.nn.Linear`` on the last axis: (..., in_features) → (..., out_features).

    Parameters ``kernel`` (in_features, out_features), PyTorch's ``weight`` transposed, and
    ``bias`` (out_features,). Computes in ``dtype``.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 kernel_init: Callable[..., Array] = linear_kernel_init, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features),
                                            param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features; got shape {x.shape}")
        y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm(dim, eps)`` over the last axis; output has x's shape, in ``dtype``.

    Parameters ``scale`` and ``bias`` (dim,), PyTorch's ``weight`` and ``bias``. Mean and (biased)
    variance are computed in at least float32.
    """

    def __init__(self, dim: int, *, eps: float, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic initialisation; accepted for a uniform constructor signature
        self.dim, self.eps, self.dtype = dim, eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have {self.dim} features; got shape {x.shape}")
        stat_dtype = jnp.promote_types(self.dtype, jnp.float32)
        x = x.astype(stat_dtype)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(stat_dtype) + self.bias[...].astype(stat_dtype)
        return y.astype(self.dtype)


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def stage_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """The (h, w) of c1..c4 for a height × width input: ceil(H/4), then halved, rounding up."""
    sizes = []
    for kernel, stride, padding in PATCH_EMBEDS:
        height, width = (_conv_out(n, kernel, stride, padding) for n in (height, width))
        sizes.append((height, width))
    return sizes


def min_input_size() -> int:
    """The smallest input side whose every stage map is at least its spatial-reduction ratio."""
    side = 1
    while any(min(hw) < sr for hw, sr in zip(stage_sizes(side, side), SR_RATIOS)):
        side += 1
    return side


class OverlapPatchEmbed(nnx.Module):
    """``proj`` (strided conv with bias) then ``norm`` (LayerNorm, eps 1e-5):
    (N, H, W, in_ch) → (N, H', W', dim)."""

    def __init__(self, in_ch: int, dim: int, kernel: int, stride: int, padding: int, *,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.proj = Conv2d(in_ch, dim, kernel, stride=stride, padding=padding, use_bias=True,
                           kernel_init=conv_kernel_init(kernel, dim), rngs=rngs, **kw)
        self.norm = LayerNorm(dim, eps=EMBED_NORM_EPS, **kw)

    def __call__(self, x: Array) -> Array:
        return self.norm(self.proj(x))


class EfficientSelfAttention(nnx.Module):
    """Multi-head attention whose keys and values come from a map reduced ``sr_ratio`` times per
    side (SegFormer §3.1): (N, H, W, dim) → (N, H, W, dim).

    ``q`` and ``kv`` (dim → 2·dim; keys first, then values, each split into heads in order) are
    linear layers with bias; ``sr`` (sr×sr conv, stride sr, with bias) and ``norm`` (LayerNorm,
    eps 1e-5) exist only when ``sr_ratio > 1``; ``proj`` is the output projection. The softmax is
    computed in float32.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be a multiple of num_heads {num_heads}")
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.dim, self.num_heads, self.sr_ratio, self.dtype = dim, num_heads, sr_ratio, dtype
        self.q = Linear(dim, dim, rngs=rngs, **kw)
        self.kv = Linear(dim, 2 * dim, rngs=rngs, **kw)
        self.proj = Linear(dim, dim, rngs=rngs, **kw)
        if sr_ratio > 1:
            self.sr = Conv2d(dim, dim, sr_ratio, stride=sr_ratio, use_bias=True,
                             kernel_init=conv_kernel_init(sr_ratio, dim), rngs=rngs, **kw)
            self.norm = LayerNorm(dim, eps=EMBED_NORM_EPS, **kw)
        else:
            self.sr = None
            self.norm = None

    def __call__(self, x: Array) -> Array:
        n, h, w, c = x.shape
        if min(h, w) < self.sr_ratio:
            raise ValueError(
                f"a {h}×{w} map is smaller than the attention's spatial-reduction ratio "
                f"{self.sr_ratio}; SegFormer inputs must be at least {min_input_size()} pixels "
                f"on each side.")
        heads, head_dim = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(n, h * w, heads, head_dim)
        context = x if self.sr is None else self.norm(self.sr(x))
        kv = self.kv(context).reshape(n, -1, 2, heads, head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * head_dim ** -0.5, axis=-1).astype(self.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v.astype(self.dtype))
        return self.proj(out.reshape(n, h, w, c))


class MixFFN(nnx.Module):
    """``fc1`` (dim → hidden), ``dwconv`` (depthwise 3×3, padding 1, with bias), exact GELU,
    ``fc2`` (hidden → dim): (N, H, W, dim) → (N, H, W, dim)."""

    def __init__(self, dim: int, hidden: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Linear(dim, hidden, rngs=rngs, **kw)
        self.dwconv = Conv2d(hidden, hidden, 3, padding=1, groups=hidden, use_bias=True,
                             kernel_init=conv_kernel_init(3, hidden, hidden), rngs=rngs, **kw)
        self.fc2 = Linear(hidden, dim, rngs=rngs, **kw)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.dwconv(self.fc1(x)), approximate=False))


class MiTBlock(nnx.Module):
    """A Mix Transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, each branch
    dropped per sample with probability ``drop_path`` in train mode (and scaled by
    1 / (1 − drop_path) when kept). (N, H, W, dim) → (N, H, W, dim)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, *, mlp_ratio: int = MLP_RATIO,
                 drop_path: float = 0.0, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1); got {drop_path!r}")
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(dim, eps=BLOCK_NORM_EPS, **kw)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, rngs=rngs, **kw)
        self.norm2 = LayerNorm(dim, eps=BLOCK_NORM_EPS, **kw)
        self.mlp = MixFFN(dim, dim * mlp_ratio, rngs=rngs, **kw)
        # One mask value per sample, shared by every position and channel.
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3)) if drop_path > 0 else None

    def __call__(self, x: Array, train: bool, *, rngs: nnx.Rngs | None = None) -> Array:
        x = x + dropout(self.drop_path, self.attn(self.norm1(x)), train, rngs)
        return x + dropout(self.drop_path, self.mlp(self.norm2(x)), train, rngs)


class MixTransformer(nnx.Module):
    """The MiT encoder: (N, H, W, 3) → {'c1': (N, ⌈H/4⌉, ⌈W/4⌉, d1), …, 'c4' at stride 32}.

    Args:
      embed_dims: the width of each stage (``MIT_VARIANTS``).
      depths: the blocks of each stage; ``num_heads``, ``sr_ratios`` and ``mlp_ratio`` default to
        the values every MiT shares.
      drop_path_rate: the last block's stochastic-depth rate (0.1 in CIRKD).

    Attributes ``patch_embed1..4``, ``block1..4`` (each an ``nnx.List`` of :class:`MiTBlock`),
    ``norm1..4`` and ``channels`` (the four widths). ``train=True`` applies stochastic depth, with
    masks from the call's ``rngs``; the encoder has no batch statistics.
    """

    def __init__(self, embed_dims: Sequence[int], depths: Sequence[int], *,
                 num_heads: Sequence[int] = NUM_HEADS, sr_ratios: Sequence[int] = SR_RATIOS,
                 mlp_ratio: int = MLP_RATIO, drop_path_rate: float = DROP_PATH_RATE,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        if not (len(embed_dims) == len(depths) == len(num_heads) == len(sr_ratios) == 4):
            raise ValueError("embed_dims, depths, num_heads and sr_ratios must have 4 entries each")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate!r}")
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.channels = tuple(int(d) for d in embed_dims)
        self.depths = tuple(int(d) for d in depths)
        self.sr_ratios = tuple(int(s) for s in sr_ratios)
        self.drop_path_rate = float(drop_path_rate)
        rates = iter(drop_path_rates(self.depths, drop_path_rate))
        in_ch = 3
        for i, (dim, depth, heads, sr, (kernel, stride, padding)) in enumerate(
                zip(self.channels, self.depths, num_heads, self.sr_ratios, PATCH_EMBEDS),
                start=1):
            setattr(self, f"patch_embed{i}",
                    OverlapPatchEmbed(in_ch, dim, kernel, stride, padding, rngs=rngs, **kw))
            setattr(self, f"block{i}", nnx.List([
                MiTBlock(dim, heads, sr, mlp_ratio=mlp_ratio, drop_path=next(rates), rngs=rngs,
                         **kw)
                for _ in range(depth)]))
            setattr(self, f"norm{i}", LayerNorm(dim, eps=BLOCK_NORM_EPS, **kw))
            in_ch = dim

    def __call__(self, x: Array, train: bool, *,
                 rngs: nnx.Rngs | None = None) -> dict[str, Array]:
        check_nhwc("x", x)
        sizes = stage_sizes(*x.shape[1:3])
        if any(min(hw) < sr for hw, sr in zip(sizes, self.sr_ratios)):
            raise ValueError(
                f"SegFormer inputs must be at least {min_input_size()} pixels on each side (the "
                f"stage maps may not be smaller than the attention's reduction ratios "
                f"{self.sr_ratios}); got images of shape {tuple(x.shape)}.")
        features = {}
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, train, rngs=rngs)
            x = getattr(self, f"norm{i}")(x)
            features[f"c{i}"] = x
        return features


class LinearFuse(nnx.Module):
    """CIRKD's ``linear_fuse`` Sequential: ``conv`` (1×1 with bias, index 0), ``bn`` (index 1),
    ReLU: (N, h, w, in_ch) → (N, h, w, out_ch)."""

    def __init__(self, in_ch: int, out_ch: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.conv = Conv2d(in_ch, out_ch, 1, use_bias=True, kernel_init=conv_kernel_init(1, out_ch),
                           rngs=rngs, **kw)
        self.bn = BatchNorm2d(out_ch, **kw)

    def __call__(self, x: Array, train: bool) -> Array:
        return jax.nn.relu(self.bn(self.conv(x), train))


class SegFormerHead(nnx.Module):
    """The all-MLP decoder (SegFormer §3.2) on c1..c4.

    ``linear_c{i}``: linear c_i → width; c2..c4 resized to the c1 size (bilinear,
    align_corners=False); concatenation [c4, c3, c2, c1]; ``linear_fuse`` (1×1 conv 4·width →
    width with bias, BN, ReLU) gives the ``feature``; dropout (rate ``dropout_rate``, 0 in CIRKD)
    and ``linear_pred`` (1×1 conv width → K, with bias) give the logits.

    Call: ``head(c1, c2, c3, c4, train)`` → {'logits': (N, h1, w1, K), 'feature': (N, h1, w1,
    width)} at the c1 resolution (stride 4).
    """

    taps = ("c1", "c2", "c3", "c4")

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, width: int,
                 dropout_rate: float = 0.0, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if len(in_channels) != 4:
            raise ValueError(f"in_channels must hold the widths of c1..c4; got {in_channels!r}")
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        for i, ch in enumerate(in_channels, start=1):
            setattr(self, f"linear_c{i}", Linear(ch, width, rngs=rngs, **kw))
        self.linear_fuse = LinearFuse(4 * width, width, rngs=rngs, **kw)
        self.dropout = (nnx.Dropout(dropout_rate, broadcast_dims=(1, 2)) if dropout_rate > 0
                        else None)
        self.linear_pred = Conv2d(width, num_classes, 1, use_bias=True,
                                  kernel_init=conv_kernel_init(1, num_classes), rngs=rngs, **kw)

    @property
    def classifier(self) -> Conv2d:
        """The final 1×1 classifier under the name every head gives it (FAKD reads its kernel)."""
        return self.linear_pred

    def __call__(self, c1: Array, c2: Array, c3: Array, c4: Array, train: bool, *,
                 rngs: nnx.Rngs | None = None) -> dict[str, Array]:
        for name, x in zip(self.taps, (c1, c2, c3, c4)):
            check_nhwc(name, x)
        size = c1.shape[1:3]
        embedded = [getattr(self, f"linear_c{i}")(x) for i, x in enumerate((c1, c2, c3, c4), 1)]
        resized = [embedded[0]] + [resize_bilinear(x, size) for x in embedded[1:]]
        feature = self.linear_fuse(jnp.concatenate(resized[::-1], axis=-1), train)
        return {"logits": self.linear_pred(dropout(self.dropout, feature, train, rngs)),
                "feature": feature}


def mit_widths(variant: str, width_multiplier: float = 1.0) -> tuple[int, ...]:
    """A variant's stage widths with every head's width scaled by ``width_multiplier`` (rounded,
    at least 1), so each width stays a multiple of its head count."""
    if variant not in MIT_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(MIT_VARIANTS)}; got {variant!r}")
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be positive; got {width_multiplier!r}")
    dims = MIT_VARIANTS[variant].embed_dims
    return tuple(heads * max(1, int(round(dim // heads * width_multiplier)))
                 for dim, heads in zip(dims, NUM_HEADS))


def build_mix_transformer(variant: str, *, width_multiplier: float = 1.0,
                          drop_path_rate: float = DROP_PATH_RATE, dtype: Dtype = jnp.float32,
                          param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> MixTransformer:
    """The MiT encoder of a variant ('mit_b0' … 'mit_b5'); ``width_multiplier`` scales the
    widths (1.0 is the published encoder)."""
    return MixTransformer(mit_widths(variant, width_multiplier), MIT_VARIANTS[variant].depths,
                          drop_path_rate=drop_path_rate, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
