"""Segmentation heads: DeepLabV3 (ASPP), DeepLabV3+, PSPNet and the FCN auxiliary head.

The layouts are CIRKD's (cirkd-models.md §3.3-3.4); attribute names mirror its state-dict keys, so
the PyTorch importer maps them one to one. Every head is called on NHWC backbone features and
returns

    {'logits': (N, h, w, K), 'feature': (N, h, w, C)}

at the resolution of the feature it reads (nothing is upsampled inside a model, §3.1). ``feature``
is CIRKD's ``outputs[-1]``: the tensor the final 1×1 classifier reads, i.e. after the last 3×3 conv,
BN, ReLU and Dropout(0.1) (the dropout is the identity in eval mode). Each head names the backbone
taps it reads in its class attribute ``taps``, in call order. In train mode the dropout masks come
from the call's ``rngs`` (:func:`kdjax.models.layers.dropout`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models.layers import (Conv2d, ConvBNReLU, Dtype, adaptive_avg_pool, check_nhwc,
                                 dropout, resize_bilinear_align_corners)

Array = jax.Array

# ASPP dilation rates per output stride: CIRKD's (12, 24, 36) at OS8 (§3.3), halved at OS16 as in
# the DeepLabV3 paper (Chen et al. 2017, §3.3), so the receptive field in input pixels is the same.
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}

# PSPNet pyramid bins (Zhao et al. 2017, §3.3); CIRKD's branches conv1..conv4 take them in order.
PSP_BINS = (1, 2, 3, 6)


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """The three ASPP dilation rates for a backbone of the given output stride (8 or 16)."""
    if output_stride not in ASPP_RATES:
        raise ValueError(
            f"output_stride must be one of {sorted(ASPP_RATES)}, got {output_stride!r}.")
    return ASPP_RATES[output_stride]


class ImagePooling(ConvBNReLU):
    """ASPP image-level branch ``b4``: global average pool → 1×1 conv → BN → ReLU → back to h×w.

    (N, h, w, in) → (N, h, w, out). CIRKD upsamples the 1×1 map with align_corners=True bilinear
    interpolation, which for a single source pixel is exactly a broadcast.
    """

    def __init__(self, in_ch: int, out_ch: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        super().__init__(in_ch, out_ch, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, train: bool) -> Array:
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        out = super().__call__(pooled, train)
        return jnp.broadcast_to(out, (*x.shape[:3], out.shape[-1]))


class ASPP(nnx.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017, §3.3; CIRKD ``_ASPP``, cirkd-models §3.3).

    Five branches on the same input, concatenated in the order b0..b4: ``b0`` 1×1 conv, ``b1..b3``
    3×3 convs with dilation = padding = ``rates``, ``b4`` image pooling; each conv + BN + ReLU. Then
    ``project``: 1×1 conv 5C→C + BN + ReLU, and Dropout(0.5).

    (N, h, w, in_ch) → (N, h, w, width).
    """

    def __init__(self, in_ch: int, width: int, rates: Sequence[int], *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if len(rates) != 3:
            raise ValueError(f"rates must hold three dilation rates, got {tuple(rates)!r}.")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.b0 = ConvBNReLU(in_ch, width, 1, **kw)
        self.b1, self.b2, self.b3 = (
            ConvBNReLU(in_ch, width, 3, padding=rate, dilation=rate, **kw) for rate in rates)
        self.b4 = ImagePooling(in_ch, width, **kw)
        self.project = ConvBNReLU(5 * width, width, 1, **kw)
        self.dropout = nnx.Dropout(0.5)

    def __call__(self, x: Array, train: bool, *, rngs: nnx.Rngs | None = None) -> Array:
        branches = (self.b0, self.b1, self.b2, self.b3, self.b4)
        x = jnp.concatenate([branch(x, train) for branch in branches], axis=-1)
        return dropout(self.dropout, self.project(x, train), train, rngs)


class PyramidPooling(nnx.Module):
    """PSP pyramid pooling module (Zhao et al. 2017, §3.3; CIRKD ``_PyramidPooling``, §3.4).

    For each bin count b in (1, 2, 3, 6): PyTorch adaptive average pooling to b×b (overlapping bins
    when h or w is not a multiple of b), 1×1 conv in→in/4 + BN + ReLU (``conv1..conv4``), and
    align-corners bilinear upsampling back to h×w. The output is [x, bin1, bin2, bin3, bin6] along
    channels: (N, h, w, in_ch) → (N, h, w, 2·in_ch).
    """

    def __init__(self, in_ch: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1, self.conv2, self.conv3, self.conv4 = (
            ConvBNReLU(in_ch, in_ch // 4, 1, **kw) for _ in PSP_BINS)

    def __call__(self, x: Array, train: bool) -> Array:
        size = x.shape[1:3]
        branches = (self.conv1, self.conv2, self.conv3, self.conv4)
        pooled = [
            resize_bilinear_align_corners(conv(adaptive_avg_pool(x, bins), train), size)
            for bins, conv in zip(PSP_BINS, branches)]
        return jnp.concatenate([x, *pooled], axis=-1)


class ClassifierTail(nnx.Module):
    """The tail of every head: ``block`` (3×3 conv + BN + ReLU), Dropout(0.1), ``classifier``.

    The classifier is a 1×1 conv with bias, the only biased convs of the models (§3.6). Heads
    inherit it so that ``block`` and ``classifier`` sit directly on the head, as in CIRKD's state
    dicts.
    """

    def __init__(self, in_ch: int, width: int, num_classes: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.block = ConvBNReLU(in_ch, width, 3, padding=1, **kw)
        self.dropout = nnx.Dropout(0.1)
        self.classifier = Conv2d(width, num_classes, 1, use_bias=True, **kw)

    def classify(self, x: Array, train: bool, rngs: nnx.Rngs | None) -> dict[str, Array]:
        """(N, h, w, in_ch) → {'logits': (N, h, w, K), 'feature': (N, h, w, width)}."""
        feature = dropout(self.dropout, self.block(x, train), train, rngs)
        return {"logits": self.classifier(feature), "feature": feature}


class DeepLabV3Head(ClassifierTail):
    """DeepLabV3 head (Chen et al. 2017; CIRKD ``_DeepLabHead``, cirkd-models.md §3.3) on ``c4``.

    ASPP (``aspp``) with width C, then ``block`` 3×3 conv C→C + BN + ReLU + Dropout(0.1) and the
    1×1 ``classifier`` C→K. CIRKD's widths: 512 for ResNets (HEAD layout; the paper-era layout is
    128 for R18 and 256 for R50/R101), 128 for MobileNetV2. Train mode needs a batch of at least 2:
    the image-pooling branch's BN sees one value per image and channel (PyTorch refuses it too).

    Call: (N, h, w, in_ch) → {'logits': (N, h, w, K), 'feature': (N, h, w, width)}.
    """

    taps = ("c4",)

    def __init__(self, in_ch: int, num_classes: int, *, width: int,
                 rates: Sequence[int] = ASPP_RATES[8], dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.aspp = ASPP(in_ch, width, rates, **kw)
        super().__init__(width, width, num_classes, **kw)

    def __call__(self, x: Array, train: bool, *,
                 rngs: nnx.Rngs | None = None) -> dict[str, Array]:
        check_nhwc("x", x)
        return self.classify(self.aspp(x, train, rngs=rngs), train, rngs)


class DeepLabV3PlusHead(ClassifierTail):
    """DeepLabV3+ head (Chen et al. 2018, §3.1): ASPP on ``c4``, a decoder on the stride-4 ``c1``.

    ``aspp`` as in :class:`DeepLabV3Head`; ``low_level``: 1×1 conv c1→48 + BN + ReLU; the ASPP
    output is upsampled (bilinear, align corners) to the c1 size and concatenated before the
    low-level features; ``fuse``: 3×3 conv (width+48)→width + BN + ReLU; then ``block`` (a second
    3×3 conv + BN + ReLU), Dropout(0.1) and the ``classifier``.

    Call: ``head(c4, c1, train)`` with c4 (N, h, w, in_ch), c1 (N, H1, W1, low_level_ch) →
    {'logits': (N, H1, W1, K), 'feature': (N, H1, W1, width)}. Unlike the other heads the output is
    at the c1 resolution (output stride 4 for ResNets and MobileNetV2), not at c4's.
    """

    taps = ("c4", "c1")

    def __init__(self, in_ch: int, low_level_ch: int, num_classes: int, *, width: int,
                 rates: Sequence[int] = ASPP_RATES[8], low_level_width: int = 48,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.aspp = ASPP(in_ch, width, rates, **kw)
        self.low_level = ConvBNReLU(low_level_ch, low_level_width, 1, **kw)
        self.fuse = ConvBNReLU(width + low_level_width, width, 3, padding=1, **kw)
        super().__init__(width, width, num_classes, **kw)

    def __call__(self, x: Array, low_level: Array, train: bool, *,
                 rngs: nnx.Rngs | None = None) -> dict[str, Array]:
        check_nhwc("x", x)
        check_nhwc("low_level", low_level)
        context = resize_bilinear_align_corners(self.aspp(x, train, rngs=rngs),
                                                low_level.shape[1:3])
        fused = jnp.concatenate([context, self.low_level(low_level, train)], axis=-1)
        return self.classify(self.fuse(fused, train), train, rngs)


class PSPHead(ClassifierTail):
    """PSPNet head (Zhao et al. 2017; CIRKD ``_PSPHead``, cirkd-models.md §3.4) on ``c4``.

    Pyramid pooling (``psp``) in→2·in, then ``block`` 3×3 conv 2·in→width + BN + ReLU +
    Dropout(0.1) and the 1×1 ``classifier``. CIRKD's widths: 128 for R18 and MobileNetV2, 256 for
    R50/R101 (HEAD; 512 in the paper-era layout).

    Call: (N, h, w, in_ch) → {'logits': (N, h, w, K), 'feature': (N, h, w, width)}.
    """

    taps = ("c4",)

    def __init__(self, in_ch: int, num_classes: int, *, width: int, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.psp = PyramidPooling(in_ch, **kw)
        super().__init__(2 * in_ch, width, num_classes, **kw)

    def __call__(self, x: Array, train: bool, *,
                 rngs: nnx.Rngs | None = None) -> dict[str, Array]:
        check_nhwc("x", x)
        return self.classify(self.psp(x, train), train, rngs)


class FCNHead(ClassifierTail):
    """FCN auxiliary head (CIRKD ``_FCNHead``, cirkd-models.md §3.3) on ``c3``.

    ``block`` 3×3 conv in→in/4 + BN + ReLU + Dropout(0.1), then the 1×1 ``classifier`` →K. CIRKD
    trains with CE(logits) + 0.4·CE(aux logits).

    Call: (N, h, w, in_ch) → {'logits': (N, h, w, K), 'feature': (N, h, w, in_ch // 4)}.
    """

    taps = ("c3",)

    def __init__(self, in_ch: int, num_classes: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        super().__init__(in_ch, in_ch // 4, num_classes, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

    def __call__(self, x: Array, train: bool, *,
                 rngs: nnx.Rngs | None = None) -> dict[str, Array]:
        check_nhwc("x", x)
        return self.classify(x, train, rngs)
