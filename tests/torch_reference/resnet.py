"""ResNet-18/50/101 in PyTorch: CIRKD's deep-stem "v1s" backbone and torchvision's ResNet.

Key names follow the originals (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` …,
torchvision's ``fc``). The two variants differ in the stem (cirkd-models.md §3.2: 3×3 convs 64-64-128;
torchvision: one 7×7 conv to 64) and in how the first block of a dilated layer dilates a BasicBlock.
"""

import torch
from torch import nn

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}

# (stride, dilation) of layer1..layer4; the stem and max-pool already divide by 4.
STAGE_GEOMETRY = {
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    32: ((1, 1), (2, 1), (2, 1), (2, 1)),
}

VARIANTS = ("cirkd", "torchvision")


def conv3x3(in_ch, out_ch, stride=1, dilation=1):
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs with their own dilations (the first carries the stride), plus the shortcut."""

    expansion = 1

    def __init__(self, inplanes, planes, stride, dilations, downsample):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilations[0])
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilations[1])
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    @property
    def closing_norm(self):
        """The BN whose output is added to the shortcut."""
        return self.bn2

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (stride and dilation here, "v1b"), 1×1 expand by 4, plus the shortcut."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, dilation, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    @property
    def closing_norm(self):
        """The BN whose output is added to the shortcut."""
        return self.bn3

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def block_dilations(kind, variant, first, dilation, previous_dilation):
    """Dilation argument of one block of a layer with ``dilation`` after a layer with ``previous_dilation``.

    The first block of a layer sits at the resolution change, so its entry conv keeps the previous
    layer's dilation (cirkd-models.md §3.2 table; torchvision's ``previous_dilation``). CIRKD's
    BasicBlock is the exception: its conv2 already uses the layer's dilation in the first block.
    """
    if not first:
        return (dilation, dilation) if kind == "basic" else dilation
    if kind == "bottleneck":
        return previous_dilation
    return (previous_dilation, dilation if variant == "cirkd" else previous_dilation)


class ResNet(nn.Module):
    """Dilated ResNet, NCHW in, ``forward_stages`` → (c1, c2, c3, c4) = layer1..layer4 outputs.

    variant 'cirkd': deep stem 3×3 s2 3→64, 3×3 64→64, 3×3 64→128 (each BN+ReLU), so R18's layer1.0
    has a 128→64 downsample; no classifier. variant 'torchvision': 7×7 s2 3→64 stem and, when
    ``num_classes`` is given, global average pooling and ``fc``. Both: 3×3 s2 p1 max-pool after the
    stem; ``output_stride`` 8 dilates layer3/layer4 by 2/4, 16 dilates layer4 by 2, 32 is undilated.
    """

    def __init__(self, depth, *, variant="cirkd", output_stride=8, num_classes=None):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if output_stride not in STAGE_GEOMETRY:
            raise ValueError(f"output_stride must be one of {sorted(STAGE_GEOMETRY)}, got {output_stride!r}")
        kind, counts = DEPTHS[depth]
        self.relu = nn.ReLU()
        if variant == "cirkd":
            self.conv1, self.bn1 = conv3x3(3, 64, 2), nn.BatchNorm2d(64)
            self.conv2, self.bn2 = conv3x3(64, 64), nn.BatchNorm2d(64)
            self.conv3, self.bn3 = conv3x3(64, 128), nn.BatchNorm2d(128)
            self.stem = ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))
            inplanes = 128
        else:
            self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
            self.stem = ((self.conv1, self.bn1),)
            inplanes = 64
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        previous_dilation = 1
        for index, (planes, count, (stride, dilation)) in enumerate(
                zip((64, 128, 256, 512), counts, STAGE_GEOMETRY[output_stride]), start=1):
            block = BasicBlock if kind == "basic" else Bottleneck
            blocks = []
            for i in range(count):
                out_ch = planes * block.expansion
                downsample = None
                if i == 0 and (stride != 1 or inplanes != out_ch):
                    downsample = nn.Sequential(nn.Conv2d(inplanes, out_ch, 1, stride, bias=False),
                                               nn.BatchNorm2d(out_ch))
                dilations = block_dilations(kind, variant, i == 0, dilation, previous_dilation)
                blocks.append(block(inplanes, planes, stride if i == 0 else 1, dilations, downsample))
                inplanes = out_ch
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            previous_dilation = dilation
        self.channels = tuple(c * (1 if kind == "basic" else 4) for c in (64, 128, 256, 512))
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.channels[-1], num_classes)
        else:
            self.fc = None

    def forward_stages(self, x):
        for conv, bn in self.stem:
            x = self.relu(bn(conv(x)))
        x = self.maxpool(x)
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        return tuple(stages)

    def forward(self, x):
        c4 = self.forward_stages(x)[-1]
        if self.fc is None:
            return c4
        return self.fc(torch.flatten(self.avgpool(c4), 1))
