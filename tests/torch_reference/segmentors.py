"""CIRKD's DeepLabV3 / PSPNet segmentors and the torchvision ImageNet backbones, by name.

CIRKD key prefixes (cirkd-models.md §4): ``pretrained.`` (ResNet) or ``pretrained.net.`` (MobileNetV2)
for the backbone, ``head.`` and ``auxlayer.``. Head widths depend on the code revision (§3.3-3.4), so
they are a constructor argument, defaulting from ``layout`` = 'head' (dab64dbb) or 'paper' (05a2753).
"""

from torch import nn

from tests.torch_reference.heads import AsppHead, FcnHead, PspHead
from tests.torch_reference.mobilenet import MobileNetV2
from tests.torch_reference.resnet import ResNet

BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenetv2")
HEADS = ("deeplabv3", "pspnet")
# (head, layout) → backbone → width of the head's last 3×3 conv (and of the ASPP).
HEAD_CHANNELS = {
    ("deeplabv3", "head"): {"resnet18": 512, "resnet50": 512, "resnet101": 512, "mobilenetv2": 128},
    ("deeplabv3", "paper"): {"resnet18": 128, "resnet50": 256, "resnet101": 256, "mobilenetv2": 128},
    ("pspnet", "head"): {"resnet18": 128, "resnet50": 256, "resnet101": 256, "mobilenetv2": 128},
    ("pspnet", "paper"): {"resnet18": 128, "resnet50": 512, "resnet101": 512, "mobilenetv2": 128},
}
LAYOUTS = ("head", "paper")


def cirkd_head_channels(head, backbone, layout="head"):
    """CIRKD's head width for a model, e.g. ('deeplabv3', 'resnet18', 'paper') → 128."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return HEAD_CHANNELS[head, layout][backbone]


def parse_name(name):
    head, _, backbone = name.partition("_")
    if head not in HEADS or backbone not in BACKBONES:
        raise ValueError(f"name must be '<{'|'.join(HEADS)}>_<{'|'.join(BACKBONES)}>', got {name!r}")
    return head, backbone


class MobileNetV2Dilated(nn.Module):
    """Holder that puts CIRKD's MobileNetV2 under the attribute ``net`` (keys ``pretrained.net.…``)."""

    def __init__(self, output_stride):
        super().__init__()
        self.net = MobileNetV2(layout="cirkd", output_stride=output_stride)
        self.channels = self.net.channels

    def forward_stages(self, x):
        return self.net.forward_stages(x)


class CirkdSegmentor(nn.Module):
    """Backbone ``pretrained``, ``head`` and optional ``auxlayer`` (FCN head on c3).

    ``forward`` returns CIRKD's list: [logits, aux_logits, feature] with an aux head, else
    [logits, feature]; all at the backbone's output stride, nothing upsampled (§3.1).
    ``forward_all`` returns those tensors and the backbone stages c1..c4 in a dict.
    """

    def __init__(self, pretrained, head, auxlayer=None):
        super().__init__()
        self.pretrained = pretrained
        self.head = head
        if auxlayer is not None:
            self.auxlayer = auxlayer
        self.has_aux = auxlayer is not None

    def forward_all(self, x):
        c1, c2, c3, c4 = self.pretrained.forward_stages(x)
        logits, feature = self.head(c4)
        aux_logits = self.auxlayer(c3) if self.has_aux else None
        return {"c1": c1, "c2": c2, "c3": c3, "c4": c4, "logits": logits, "aux_logits": aux_logits,
                "feature": feature}

    def forward(self, x):
        out = self.forward_all(x)
        if self.has_aux:
            return [out["logits"], out["aux_logits"], out["feature"]]
        return [out["logits"], out["feature"]]


def build_cirkd(name, num_classes=19, *, layout="head", head_channels=None, aux=None, output_stride=8,
                rates=(12, 24, 36)):
    """A CIRKD segmentor such as 'deeplabv3_resnet101' or 'pspnet_mobilenetv2'.

    ``aux`` defaults to CIRKD's choice (an FCN aux head on ResNets, none on MobileNetV2, whose CIRKD
    model exposes only c4); ``head_channels`` overrides the ``layout`` table. ``output_stride`` 16 and
    other ``rates`` go beyond CIRKD (always 8 and 12/24/36) to mirror kdjax's options.
    """
    head_kind, backbone = parse_name(name)
    if aux is None:
        aux = backbone != "mobilenetv2"
    if aux and backbone == "mobilenetv2":
        raise ValueError(f"aux must be False for {name!r}: CIRKD's MobileNetV2 models have no aux head")
    if head_channels is None:
        head_channels = cirkd_head_channels(head_kind, backbone, layout)
    if backbone == "mobilenetv2":
        pretrained = MobileNetV2Dilated(output_stride)
    else:
        pretrained = ResNet(int(backbone.removeprefix("resnet")), variant="cirkd", output_stride=output_stride)
    c3, c4 = pretrained.channels[2:]
    if head_kind == "deeplabv3":
        head = AsppHead(c4, num_classes, head_channels, rates)
    else:
        head = PspHead(c4, num_classes, head_channels)
    return CirkdSegmentor(pretrained, head, FcnHead(c3, num_classes) if aux else None)


def torchvision_resnet(depth, replace_stride_with_dilation=(False, False, False), num_classes=1000):
    """torchvision's ``resnet{depth}`` (keys ``conv1.weight`` … ``fc.bias``); dilation as torchvision's
    argument: (False, True, True) is output stride 8, (False, False, True) is 16."""
    strides = {(False, False, False): 32, (False, False, True): 16, (False, True, True): 8}
    key = tuple(bool(v) for v in replace_stride_with_dilation)
    if key not in strides:
        raise ValueError(f"replace_stride_with_dilation must be one of {sorted(strides)}, got "
                         f"{replace_stride_with_dilation!r}")
    return ResNet(depth, variant="torchvision", output_stride=strides[key], num_classes=num_classes)


def torchvision_mobilenet_v2(width_mult=1.0, output_stride=32, num_classes=1000):
    """torchvision's ``mobilenet_v2`` (keys ``features.0.0.weight`` … ``features.18.*``, ``classifier.1.*``)."""
    return MobileNetV2(layout="torchvision", width_mult=width_mult, output_stride=output_stride,
                       num_classes=num_classes)
