"""Dilated ResNet-18/50/101 backbones, CIRKD's ResNetV1b or torchvision's (cirkd-models.md §3.2).

Both variants put the stride of a Bottleneck on its 3×3 conv and use a plain strided 1×1 conv + BN
as the downsample shortcut. They differ in the stem and in how the first block of a dilated layer
dilates a BasicBlock:

- ``'cirkd'``: deep stem 3×3 s2 conv 3→64, 3×3 conv 64→64, 3×3 conv 64→128 (each + BN + ReLU), so
  layer1 receives 128 channels and ResNet-18's layer1.0 has a 128→64 downsample. In the first block
  of a dilated layer the strided 3×3 conv takes the previous layer's dilation and a BasicBlock's
  conv2 already takes the layer's dilation (layer3.0: 1 / 2, layer4.0: 2 / 4 at output stride 8).
- ``'torchvision'``: 7×7 s2 conv 3→64 + BN + ReLU. The first block of a dilated layer runs every 3×3
  conv at the previous layer's dilation (torchvision's ``previous_dilation``; for BasicBlocks, which
  torchvision cannot dilate, the same rule is applied to both convs).

Then a 3×3 s2 p1 max-pool (floor mode). Output stride 8: layer3/layer4 stride 1, dilation 2/4.
Output stride 16: layer3 stride 2, layer4 stride 1, dilation 2. Padding equals dilation in every
3×3 conv, so an H×W input gives c1 at ceil(H/4) and c2..c4 at ceil(H/8) (OS8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models.layers import (BatchNorm2d, Conv2d, Dtype, check_nhwc, max_pool_torch,
                                 residual_relu)

Array = jax.Array

VARIANTS = ("cirkd", "torchvision")
STAGE_WIDTHS = (64, 128, 256, 512)
# (stride, dilation) of layer1..layer4 for each supported output stride.
STAGE_STRIDES = {
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
}


class _ResidualBlock(nnx.Module):
    """Shared shortcut of the residual blocks: identity, or ``downsample_conv`` + ``downsample_bn``
    (PyTorch ``downsample.0`` / ``downsample.1``) when the stride or the width changes."""

    expansion: int = 1
    num_3x3: int = 1

    def _init_shortcut(self, in_ch: int, out_ch: int, stride: int, kw: dict) -> None:
        if stride != 1 or in_ch != out_ch:
            self.downsample_conv = Conv2d(in_ch, out_ch, 1, stride=stride, **kw)
            self.downsample_bn = BatchNorm2d(out_ch, **kw)
        else:
            self.downsample_conv = self.downsample_bn = None

    def _shortcut(self, x: Array, train: bool) -> Array:
        if self.downsample_conv is None:
            return x
        return self.downsample_bn(self.downsample_conv(x), train)


class BasicBlock(_ResidualBlock):
    """3×3 conv (stride) → BN → ReLU → 3×3 conv → BN, + shortcut, ReLU.

    (N, H, W, in_ch) -> (N, H/stride, W/stride, planes). ``dilations`` = (conv1, conv2) dilation.
    """

    expansion = 1
    num_3x3 = 2

    def __init__(self, in_ch: int, planes: int, *, stride: int, dilations: tuple[int, int],
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d1, d2 = dilations
        self.conv1 = Conv2d(in_ch, planes, 3, stride=stride, padding=d1, dilation=d1, **kw)
        self.bn1 = BatchNorm2d(planes, **kw)
        self.conv2 = Conv2d(planes, planes, 3, padding=d2, dilation=d2, **kw)
        self.bn2 = BatchNorm2d(planes, **kw)
        self._init_shortcut(in_ch, planes, stride, kw)

    def __call__(self, x: Array, train: bool) -> Array:
        y = jax.nn.relu(self.bn1(self.conv1(x), train))
        y = self.bn2(self.conv2(y), train)
        return residual_relu(y + self._shortcut(x, train))


class Bottleneck(_ResidualBlock):
    """1×1 conv → BN → ReLU → 3×3 conv (stride) → BN → ReLU → 1×1 conv → BN, + shortcut, ReLU.

    (N, H, W, in_ch) -> (N, H/stride, W/stride, 4·planes). ``dilations`` = (conv2 dilation,).
    """

    expansion = 4
    num_3x3 = 1

    def __init__(self, in_ch: int, planes: int, *, stride: int, dilations: tuple[int],
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        (d,) = dilations
        out_ch = planes * self.expansion
        self.conv1 = Conv2d(in_ch, planes, 1, **kw)
        self.bn1 = BatchNorm2d(planes, **kw)
        self.conv2 = Conv2d(planes, planes, 3, stride=stride, padding=d, dilation=d, **kw)
        self.bn2 = BatchNorm2d(planes, **kw)
        self.conv3 = Conv2d(planes, out_ch, 1, **kw)
        self.bn3 = BatchNorm2d(out_ch, **kw)
        self._init_shortcut(in_ch, out_ch, stride, kw)

    def __call__(self, x: Array, train: bool) -> Array:
        y = jax.nn.relu(self.bn1(self.conv1(x), train))
        y = jax.nn.relu(self.bn2(self.conv2(y), train))
        y = self.bn3(self.conv3(y), train)
        return residual_relu(y + self._shortcut(x, train))


DEPTHS: dict[int, tuple[type[_ResidualBlock], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def block_dilations(variant: str, num_3x3: int, dilation: int, previous_dilation: int,
                    first: bool) -> tuple[int, ...]:
    """Dilations of a block's 3×3 convs, in order, under ``variant``'s rule (§3.2 table).

    Later blocks use the layer's ``dilation`` throughout. A layer's first block runs at the previous
    layer's dilation, except CIRKD's BasicBlock conv2, which already uses ``dilation``.
    """
    if not first:
        return (dilation,) * num_3x3
    if variant == "cirkd" and num_3x3 == 2:
        return (previous_dilation, dilation)
    return (previous_dilation,) * num_3x3


class ResNet(nnx.Module):
    """Dilated ResNet backbone: (N, H, W, 3) -> ``{'c1'..'c4'}``, the layer1..layer4 outputs.

    At output stride 8, c1 is (N, ceil(H/4), ceil(W/4), C1) and c2..c4 are (N, ceil(H/8),
    ceil(W/8), Ci); at 16, c3 and c4 are at ceil(H/16). ``channels`` = (C1, C2, C3, C4):
    (64, 128, 256, 512) for depth 18, (256, 512, 1024, 2048) for 50 and 101, all scaled by
    ``width_multiplier`` (rounded, at least 8; 1.0 is the published network) for small
    experiments such as CPU-sized teachers and students.

    Attributes mirror the PyTorch state-dict names: ``conv1, bn1, conv2, bn2, conv3, bn3`` (cirkd
    stem) or ``conv1, bn1`` (torchvision stem), and ``layer1..layer4``, each an ``nnx.List`` of
    blocks.
    """

    def __init__(self, depth: int = 18, *, variant: str = "cirkd", output_stride: int = 8,
                 width_multiplier: float = 1.0, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if not width_multiplier > 0:
            raise ValueError(f"width_multiplier must be positive; got {width_multiplier!r}")
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}; got {depth!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
        if output_stride not in STAGE_STRIDES:
            raise ValueError(f"output_stride must be one of {sorted(STAGE_STRIDES)}; "
                             f"got {output_stride!r}")
        self.depth, self.variant, self.output_stride = depth, variant, output_stride
        self.width_multiplier = width_multiplier
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def scaled(width: int) -> int:
            return max(8, int(round(width * width_multiplier)))

        if variant == "cirkd":
            stem = ((3, scaled(64), 2), (scaled(64), scaled(64), 1), (scaled(64), scaled(128), 1))
            for i, (cin, cout, stride) in enumerate(stem, start=1):
                setattr(self, f"conv{i}", Conv2d(cin, cout, 3, stride=stride, padding=1, **kw))
                setattr(self, f"bn{i}", BatchNorm2d(cout, **kw))
        else:
            stem = ((3, scaled(64), 2),)
            self.conv1 = Conv2d(3, scaled(64), 7, stride=2, padding=3, **kw)
            self.bn1 = BatchNorm2d(scaled(64), **kw)
        self.stem_depth = len(stem)

        block, counts = DEPTHS[depth]
        in_ch, previous_dilation = stem[-1][1], 1
        widths = tuple(scaled(w) for w in STAGE_WIDTHS)
        for i, (planes, count, (stride, dilation)) in enumerate(
                zip(widths, counts, STAGE_STRIDES[output_stride]), start=1):
            blocks = []
            for j in range(count):
                dilations = block_dilations(variant, block.num_3x3, dilation, previous_dilation,
                                            first=j == 0)
                blocks.append(block(in_ch, planes, stride=stride if j == 0 else 1,
                                    dilations=dilations, **kw))
                in_ch = planes * block.expansion
            setattr(self, f"layer{i}", nnx.List(blocks))
            previous_dilation = dilation
        self.channels = tuple(w * block.expansion for w in widths)

    def __call__(self, x: Array, train: bool, *,
                 rngs: nnx.Rngs | None = None) -> dict[str, Array]:
        del rngs  # no dropout; accepted for the backbones' one call signature
        check_nhwc("x", x)
        for i in range(1, self.stem_depth + 1):
            x = jax.nn.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x), train))
        x = max_pool_torch(x, 3, 2, 1)
        features = {}
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            for block in layer:
                x = block(x, train)
            features[f"c{i}"] = x
        return features
