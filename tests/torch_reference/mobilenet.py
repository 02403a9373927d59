"""MobileNetV2 in PyTorch with CIRKD's (flat) or torchvision's (nested) ``features`` key layout.

cirkd-models.md §3.5: stem 3×3 s2 conv to 32 + BN + ReLU6, then 17 inverted residuals; CIRKD drops the
final 1×1 conv to 1280 and dilates the network after construction. torchvision keeps that conv as
``features.18`` and adds ``classifier.1`` (a Linear after Dropout). The same dilation pass gives the
torchvision layout an output stride of 8 or 16, as kdjax's backbone has.
"""

import torch
from torch import nn

# (expansion t, channels c, repeats n, first stride s) of the inverted-residual stages.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
# features indices whose outputs are c1..c4: the last block at stride 4, 8 and the last two stages.
STAGE_TAPS = (3, 6, 13, 17)
# For each output stride, (first, last, dilate) feature ranges turned from strided into dilated.
DILATION_PLAN = {8: ((7, 13, 2), (14, 17, 4)), 16: ((14, 17, 2),), 32: ()}
LAYOUTS = ("cirkd", "torchvision")


def make_divisible(value, divisor=8):
    """Round a channel count to the nearest multiple of ``divisor``, never going 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn(in_ch, out_ch, kernel, stride=1, groups=1, relu6=True):
    modules = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
               nn.BatchNorm2d(out_ch)]
    return modules + [nn.ReLU6()] if relu6 else modules


class InvertedResidual(nn.Module):
    """[1×1 expand,] 3×3 depthwise, 1×1 linear projection; residual when stride 1 and in == out.

    ``nested`` groups each conv+BN+ReLU6 into its own Sequential (torchvision keys
    ``conv.0.0.weight``); otherwise the ``conv`` Sequential is flat (CIRKD keys ``conv.0.weight``).
    """

    def __init__(self, inp, oup, stride, expand_ratio, nested):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        units = [] if expand_ratio == 1 else [conv_bn(inp, hidden, 1)]
        units.append(conv_bn(hidden, hidden, 3, stride, groups=hidden))
        projection = conv_bn(hidden, oup, 1, relu6=False)
        if nested:
            modules = [nn.Sequential(*unit) for unit in units] + projection
        else:
            modules = [m for unit in units for m in unit] + projection
        self.conv = nn.Sequential(*modules)
        self.use_residual = stride == 1 and inp == oup

    @property
    def closing_norm(self):
        """The BN whose output is added to the input, or None without a residual connection."""
        return self.conv[-1] if self.use_residual else None

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


def remove_stride_and_dilate(module, dilate):
    """Dilate every 3×3 conv of ``module`` by ``dilate``; a strided one becomes stride 1, dilation dilate/2.

    Residual connections were fixed at construction, so they are unaffected (cirkd-models.md §3.5).
    """
    for conv in module.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        is_3x3 = conv.kernel_size == (3, 3)
        if conv.stride == (2, 2):
            conv.stride = (1, 1)
            if is_3x3:
                conv.dilation = conv.padding = (dilate // 2, dilate // 2)
        elif is_3x3:
            conv.dilation = conv.padding = (dilate, dilate)


class MobileNetV2(nn.Module):
    """MobileNetV2, NCHW in, ``forward_stages`` → (c1, c2, c3, c4) = outputs of features 3, 6, 13, 17.

    layout 'cirkd': features 0..17 only, width 1.0 (the only width CIRKD builds), ``forward`` returns
    c4 (320 channels). layout 'torchvision': also ``features.18`` (1×1 conv to 1280, BN, ReLU6) and
    ``classifier``; ``forward`` returns class logits. ``output_stride`` 8 or 16 dilates per
    cirkd-models.md §3.5 (16: only features 14..17, by 2); 32 keeps the ImageNet strides.
    """

    def __init__(self, *, layout="cirkd", width_mult=1.0, output_stride=8, num_classes=1000):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "cirkd" and width_mult != 1.0:
            raise ValueError(f"width_mult must be 1.0 for the cirkd layout, got {width_mult!r}")
        if output_stride not in DILATION_PLAN:
            raise ValueError(f"output_stride must be one of {sorted(DILATION_PLAN)}, got {output_stride!r}")
        nested = layout == "torchvision"
        in_ch = make_divisible(32 * width_mult)
        features = [nn.Sequential(*conv_bn(3, in_ch, 3, 2))]
        for t, c, n, s in SETTINGS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t, nested))
                in_ch = out_ch
        self.channels = tuple(features[i].conv[-1].num_features for i in STAGE_TAPS)
        if nested:
            last_ch = make_divisible(1280 * max(1.0, width_mult))
            features.append(nn.Sequential(*conv_bn(in_ch, last_ch, 1)))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_ch, num_classes)) if nested else None
        for first, last, dilate in DILATION_PLAN[output_stride]:
            for i in range(first, last + 1):
                remove_stride_and_dilate(self.features[i], dilate)

    def forward_stages(self, x):
        stages = []
        for i in range(STAGE_TAPS[-1] + 1):
            x = self.features[i](x)
            if i in STAGE_TAPS:
                stages.append(x)
        return tuple(stages)

    def forward(self, x):
        c4 = self.forward_stages(x)[-1]
        if self.classifier is None:
            return c4
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features[-1](c4), 1), 1)
        return self.classifier(pooled)
