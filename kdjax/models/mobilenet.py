"""Dilated MobileNetV2 backbone, CIRKD's ``MobileNetV2Dilated`` (cirkd-models.md §3.5).

The standard MobileNetV2 (Sandler et al., CVPR 2018): a 3×3 s2 stem and 17 inverted residual
blocks with ReLU6, without the final 1×1 conv to 1280 channels. Output stride 8 removes the strides
of features 7 and 14 and dilates what follows, as CIRKD does after construction: a block whose
stride is removed runs its depthwise conv at half the stage dilation, every later block at the full
one (padding = dilation):

| features | OS8 stride / dilation | OS16 stride / dilation |
| -- | -- | -- |
| 0–6 | unchanged | unchanged |
| 7 | 1 / 1 | 2 / 1 |
| 8–13 | 1 / 2 | 1 / 1 |
| 14 | 1 / 2 | 1 / 1 |
| 15–17 | 1 / 4 | 1 / 2 |

Feature taps: c1 = features 3 (24 ch, stride 4), c2 = features 6 (32 ch, stride 8), c3 = features 13
(96 ch, stride 8 at OS8, 16 at OS16), c4 = features 17 (320 ch, the output). Each is the last block
at its resolution or width before the next strided (or, once dilated, widened) stage, so c1 serves
as DeepLabV3+'s low-level feature and c3 as the stage-3 input of an auxiliary head, like ResNet's
layer1 and layer3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models.layers import BatchNorm2d, Conv2d, ConvBNReLU, Dtype, check_nhwc

Array = jax.Array

STEM_WIDTH = 32
# (expansion t, width c, blocks n, stride s) of the seven stages, features 1..17.
INVERTED_RESIDUAL_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Dilation of each stage for each supported output stride.
STAGE_DILATIONS = {8: (1, 1, 1, 2, 2, 4, 4), 16: (1, 1, 1, 1, 1, 2, 2)}
FEATURE_TAPS = {"c1": 3, "c2": 6, "c3": 13, "c4": 17}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a scaled width to the nearest multiple of ``divisor``, never more than 10 % below
    ``value`` (torchvision's ``_make_divisible``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nnx.Module):
    """[1×1 expand → BN → ReLU6 →] 3×3 depthwise (stride, dilation) → BN → ReLU6 → 1×1 linear → BN.

    (N, H, W, in_ch) -> (N, H/stride, W/stride, out_ch), plus the input when ``residual``.
    ``layers`` is an ``nnx.List`` of the Conv2d/BatchNorm2d modules in PyTorch order (PyTorch
    ``conv`` indices 0, 1, 3, 4[, 6, 7]; the ReLU6 entries hold no state and are not stored).
    ``residual`` is fixed when the undilated network is built: stride 1 and ``in_ch == out_ch``.
    """

    def __init__(self, in_ch: int, out_ch: int, *, expand_ratio: int, stride: int,
                 dilation: int, residual: bool, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = int(round(in_ch * expand_ratio))
        layers = []
        if expand_ratio != 1:
            layers += [Conv2d(in_ch, hidden, 1, **kw), BatchNorm2d(hidden, **kw)]
        layers += [Conv2d(hidden, hidden, 3, stride=stride, padding=dilation, dilation=dilation,
                          groups=hidden, **kw),
                   BatchNorm2d(hidden, **kw),
                   Conv2d(hidden, out_ch, 1, **kw),
                   BatchNorm2d(out_ch, **kw)]
        self.layers = nnx.List(layers)
        self.residual = residual

    def __call__(self, x: Array, train: bool) -> Array:
        y = x
        last = len(self.layers) - 2
        for i in range(0, len(self.layers), 2):
            y = self.layers[i + 1](self.layers[i](y), train)
            if i < last:
                y = jax.nn.relu6(y)
        return x + y if self.residual else y


class MobileNetV2(nnx.Module):
    """Dilated MobileNetV2: (N, H, W, 3) -> ``{'c1'..'c4'}`` (taps in the module docstring).

    At width 1.0 and output stride 8: c1 (N, ceil(H/4), ceil(W/4), 24), c2 (…/8, 32), c3 (…/8, 96),
    c4 (…/8, 320); ``channels`` = (24, 32, 96, 320), scaled by ``width_multiplier`` and rounded to
    multiples of 8. ``features`` is an ``nnx.List``: entry 0 the ConvBNReLU stem, 1..17 the
    InvertedResidual blocks (PyTorch ``features.0`` .. ``features.17``).
    """

    def __init__(self, *, width_multiplier: float = 1.0, output_stride: int = 8,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if not width_multiplier > 0:
            raise ValueError(f"width_multiplier must be positive; got {width_multiplier!r}")
        if output_stride not in STAGE_DILATIONS:
            raise ValueError(f"output_stride must be one of {sorted(STAGE_DILATIONS)}; "
                             f"got {output_stride!r}")
        self.width_multiplier, self.output_stride = width_multiplier, output_stride
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_ch = make_divisible(STEM_WIDTH * width_multiplier)
        features = [ConvBNReLU(3, in_ch, 3, stride=2, padding=1, activation="relu6", **kw)]
        widths = [in_ch]
        for (t, c, n, s), dilation in zip(INVERTED_RESIDUAL_SETTINGS,
                                          STAGE_DILATIONS[output_stride]):
            out_ch = make_divisible(c * width_multiplier)
            for j in range(n):
                stride = s if j == 0 else 1
                # A dilated stage drops its stride; that block keeps half the stage dilation.
                block_stride, block_dilation = ((1, max(1, dilation // 2))
                                                if stride == 2 and dilation > 1
                                                else (stride, dilation))
                features.append(InvertedResidual(
                    in_ch, out_ch, expand_ratio=t, stride=block_stride, dilation=block_dilation,
                    residual=stride == 1 and in_ch == out_ch, **kw))
                in_ch = out_ch
                widths.append(out_ch)
        self.features = nnx.List(features)
        self.channels = tuple(widths[i] for i in FEATURE_TAPS.values())

    def __call__(self, x: Array, train: bool, *,
                 rngs: nnx.Rngs | None = None) -> dict[str, Array]:
        del rngs  # no dropout; accepted for the backbones' one call signature
        check_nhwc("x", x)
        taps = {index: name for name, index in FEATURE_TAPS.items()}
        features = {}
        for i, layer in enumerate(self.features):
            x = layer(x, train)
            if i in taps:
                features[taps[i]] = x
        return features
