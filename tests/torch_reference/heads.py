"""CIRKD's segmentation heads in PyTorch (cirkd-models.md §3.3-3.4), NCHW, original key names.

Every head returns ``(logits, feature)`` where ``feature`` is the tensor the final 1×1 classifier
reads (CIRKD's ``outputs[-1]``); dropout is the identity in eval mode, which is what the parity tests run.
"""

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn_relu(in_ch, out_ch, kernel, dilation=1):
    """[conv (no bias, 'same' padding for odd kernels), BN, ReLU] as a list to splice into a Sequential."""
    padding = dilation * (kernel // 2)
    return [nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU()]


def upsample_to(x, size):
    return F.interpolate(x, size, mode="bilinear", align_corners=True)


class AsppConv(nn.Module):
    """A dilated 3×3 ASPP branch; keys ``block.{0,1}``."""

    def __init__(self, in_ch, out_ch, rate):
        super().__init__()
        self.block = nn.Sequential(*conv_bn_relu(in_ch, out_ch, 3, rate))

    def forward(self, x):
        return self.block(x)


class AsppPooling(nn.Module):
    """Image pooling branch: global mean, 1×1 conv, BN, ReLU, broadcast back; keys ``gap.{1,2}``."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_ch, out_ch, 1))

    def forward(self, x):
        return upsample_to(self.gap(x), x.shape[2:])


class Aspp(nn.Module):
    """Five branches (1×1, three dilated 3×3, image pooling) concatenated, then ``project`` 5C → C."""

    def __init__(self, in_ch, channels, rates):
        super().__init__()
        self.b0 = nn.Sequential(*conv_bn_relu(in_ch, channels, 1))
        self.b1, self.b2, self.b3 = (AsppConv(in_ch, channels, rate) for rate in rates)
        self.b4 = AsppPooling(in_ch, channels)
        self.project = nn.Sequential(*conv_bn_relu(5 * channels, channels, 1), nn.Dropout(0.5))

    def forward(self, x):
        branches = (self.b0, self.b1, self.b2, self.b3, self.b4)
        return self.project(torch.cat([branch(x) for branch in branches], dim=1))


class AsppHead(nn.Module):
    """DeepLabV3 head ``_DeepLabHead``: ASPP of width ``channels``, ``block`` = 3×3 conv, BN, ReLU,
    Dropout(0.1) and the biased 1×1 classifier ``block.4``. (N, in_ch, h, w) → (N, K, h, w), (N, C, h, w)."""

    def __init__(self, in_ch, num_classes, channels, rates=(12, 24, 36)):
        super().__init__()
        self.aspp = Aspp(in_ch, channels, rates)
        self.block = nn.Sequential(*conv_bn_relu(channels, channels, 3), nn.Dropout(0.1),
                                   nn.Conv2d(channels, num_classes, 1))

    def forward(self, x):
        feature = self.block[:4](self.aspp(x))
        return self.block[4](feature), feature


class PyramidPooling(nn.Module):
    """Bins 1, 2, 3, 6 (``conv1``..``conv4``), each 1×1 conv in → in/4 + BN + ReLU, upsampled back;
    output [x, bin1, bin2, bin3, bin6] concatenated: 2·in channels."""

    bins = (1, 2, 3, 6)

    def __init__(self, in_ch):
        super().__init__()
        for index, _ in enumerate(self.bins, start=1):
            setattr(self, f"conv{index}", nn.Sequential(*conv_bn_relu(in_ch, in_ch // 4, 1)))

    def forward(self, x):
        pooled = [upsample_to(getattr(self, f"conv{index}")(F.adaptive_avg_pool2d(x, bins)), x.shape[2:])
                  for index, bins in enumerate(self.bins, start=1)]
        return torch.cat([x, *pooled], dim=1)


class PspHead(nn.Module):
    """PSPNet head ``_PSPHead``: pyramid pooling, ``block`` = 3×3 conv 2·in → C, BN, ReLU, Dropout(0.1),
    then the biased 1×1 ``classifier``. (N, in_ch, h, w) → (N, K, h, w), (N, C, h, w)."""

    def __init__(self, in_ch, num_classes, channels):
        super().__init__()
        self.psp = PyramidPooling(in_ch)
        self.block = nn.Sequential(*conv_bn_relu(2 * in_ch, channels, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        feature = self.block(self.psp(x))
        return self.classifier(feature), feature


class FcnHead(nn.Module):
    """Auxiliary ``_FCNHead`` on c3: 3×3 conv in → in/4, BN, ReLU, Dropout(0.1), biased 1×1 → K (``block.4``)."""

    def __init__(self, in_ch, num_classes):
        super().__init__()
        self.block = nn.Sequential(*conv_bn_relu(in_ch, in_ch // 4, 3), nn.Dropout(0.1),
                                   nn.Conv2d(in_ch // 4, num_classes, 1))

    def forward(self, x):
        return self.block(x)
