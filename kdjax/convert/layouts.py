"""Where each kdjax layer's tensors sit in the PyTorch state dicts kdjax imports.

Each ``*_layers`` function walks a kdjax module and yields ``(torch prefix, layer)`` for every
Conv2d and BatchNorm2d (and, in SegFormer, Linear and LayerNorm) in it: e.g.
``('pretrained.layer1.0.downsample.0', <Conv2d>)``. Key names are CIRKD's (cirkd-models.md §4) and
torchvision's; kdjax's attribute names mirror them, so most entries are a rename of ``conv``/``bn``
to the Sequential indices PyTorch uses.

CIRKD's SegFormer has no prefix: the encoder's ``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}`` and
the decoder's ``linear_c{i}.proj``, ``linear_fuse.{0,1}``, ``linear_pred`` sit at the root, as in
the ImageNet ``mit_b*.pth`` encoders (which add a classifier ``head.*``).
"""

from __future__ import annotations

from collections.abc import Iterator

from flax import nnx

from kdjax.models.heads import DeepLabV3Head, FCNHead, PSPHead
from kdjax.models.mobilenet import MobileNetV2
from kdjax.models.resnet import ResNet
from kdjax.models.segformer import MixTransformer, SegFormerHead
from kdjax.models.segmentor import Segmentor

Layers = Iterator[tuple[str, nnx.Module]]

# Index, inside an inverted residual's ``conv`` Sequential, of each stored layer (kdjax's
# ``block.layers``), keyed by the number of stored layers: 4 for expansion 1, 6 otherwise. CIRKD's
# Sequential is flat with the ReLU6s in it (§3.5); torchvision nests each conv+BN+ReLU6.
INVERTED_RESIDUAL_KEYS = {
    "cirkd": {4: ("0", "1", "3", "4"), 6: ("0", "1", "3", "4", "6", "7")},
    "torchvision": {4: ("0.0", "0.1", "1", "2"), 6: ("0.0", "0.1", "1.0", "1.1", "2", "3")},
}


def conv_bn_layers(prefix: str, block: nnx.Module, first: int = 0) -> Layers:
    """A ConvBNReLU stored as a PyTorch Sequential [conv, BN, ReLU] starting at index ``first``."""
    yield f"{prefix}.{first}", block.conv
    yield f"{prefix}.{first + 1}", block.bn


def resnet_layers(net: ResNet, prefix: str) -> Layers:
    """``conv1``/``bn1`` (and ``conv2``, ``bn2``, ``conv3``, ``bn3`` for CIRKD's deep stem), then
    ``layer{i}.{j}.conv*``/``bn*`` and ``downsample.{0,1}``."""
    for i in range(1, net.stem_depth + 1):
        yield f"{prefix}conv{i}", getattr(net, f"conv{i}")
        yield f"{prefix}bn{i}", getattr(net, f"bn{i}")
    for i, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), start=1):
        for j, block in enumerate(layer):
            for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
                if hasattr(block, name):
                    yield f"{prefix}layer{i}.{j}.{name}", getattr(block, name)
            if block.downsample_conv is not None:
                yield f"{prefix}layer{i}.{j}.downsample.0", block.downsample_conv
                yield f"{prefix}layer{i}.{j}.downsample.1", block.downsample_bn


def mobilenet_layers(net: MobileNetV2, prefix: str, layout: str) -> Layers:
    """``features.0.{0,1}`` (stem), then ``features.{i}.conv.{index}`` per ``INVERTED_RESIDUAL_KEYS``."""
    yield from conv_bn_layers(f"{prefix}features.0", net.features[0])
    for i in range(1, len(net.features)):
        block = net.features[i]
        keys = INVERTED_RESIDUAL_KEYS[layout][len(block.layers)]
        for key, layer in zip(keys, block.layers):
            yield f"{prefix}features.{i}.conv.{key}", layer


def deeplabv3_head_layers(head: DeepLabV3Head, prefix: str) -> Layers:
    """``aspp.b0.{0,1}``, ``aspp.b{1,2,3}.block.{0,1}``, ``aspp.b4.gap.{1,2}`` (0 is the pool),
    ``aspp.project.{0,1}``, ``block.{0,1}`` and the classifier ``block.4``."""
    aspp = head.aspp
    yield from conv_bn_layers(f"{prefix}aspp.b0", aspp.b0)
    for i, branch in enumerate((aspp.b1, aspp.b2, aspp.b3), start=1):
        yield from conv_bn_layers(f"{prefix}aspp.b{i}.block", branch)
    yield from conv_bn_layers(f"{prefix}aspp.b4.gap", aspp.b4, first=1)
    yield from conv_bn_layers(f"{prefix}aspp.project", aspp.project)
    yield from conv_bn_layers(f"{prefix}block", head.block)
    yield f"{prefix}block.4", head.classifier


def psp_head_layers(head: PSPHead, prefix: str) -> Layers:
    """``psp.conv{1..4}.{0,1}`` (bins 1, 2, 3, 6), ``block.{0,1}`` and ``classifier``."""
    for i, branch in enumerate((head.psp.conv1, head.psp.conv2, head.psp.conv3, head.psp.conv4),
                               start=1):
        yield from conv_bn_layers(f"{prefix}psp.conv{i}", branch)
    yield from conv_bn_layers(f"{prefix}block", head.block)
    yield f"{prefix}classifier", head.classifier


def fcn_head_layers(head: FCNHead, prefix: str) -> Layers:
    """``block.{0,1}`` and the classifier ``block.4``."""
    yield from conv_bn_layers(f"{prefix}block", head.block)
    yield f"{prefix}block.4", head.classifier


def mix_transformer_layers(net: MixTransformer, prefix: str = "") -> Layers:
    """``patch_embed{i}.{proj,norm}``; per block ``block{i}.{j}.norm1``, ``attn.{q,kv}``,
    ``attn.{sr,norm}`` (spatial reduction > 1 only), ``attn.proj``, ``norm2``, ``mlp.fc1``,
    ``mlp.dwconv.dwconv``, ``mlp.fc2``; and ``norm{i}``."""
    for i in range(1, 5):
        embed = getattr(net, f"patch_embed{i}")
        yield f"{prefix}patch_embed{i}.proj", embed.proj
        yield f"{prefix}patch_embed{i}.norm", embed.norm
    for i in range(1, 5):
        for j, block in enumerate(getattr(net, f"block{i}")):
            key = f"{prefix}block{i}.{j}"
            yield f"{key}.norm1", block.norm1
            yield f"{key}.attn.q", block.attn.q
            yield f"{key}.attn.kv", block.attn.kv
            if block.attn.sr is not None:
                yield f"{key}.attn.sr", block.attn.sr
                yield f"{key}.attn.norm", block.attn.norm
            yield f"{key}.attn.proj", block.attn.proj
            yield f"{key}.norm2", block.norm2
            yield f"{key}.mlp.fc1", block.mlp.fc1
            yield f"{key}.mlp.dwconv.dwconv", block.mlp.dwconv
            yield f"{key}.mlp.fc2", block.mlp.fc2
        yield f"{prefix}norm{i}", getattr(net, f"norm{i}")


def segformer_head_layers(head: SegFormerHead, prefix: str = "") -> Layers:
    """``linear_c{4,3,2,1}.proj``, ``linear_fuse.0`` (1×1 conv), ``linear_fuse.1`` (BN) and
    ``linear_pred``."""
    for i in (4, 3, 2, 1):
        yield f"{prefix}linear_c{i}.proj", getattr(head, f"linear_c{i}")
    yield f"{prefix}linear_fuse.0", head.linear_fuse.conv
    yield f"{prefix}linear_fuse.1", head.linear_fuse.bn
    yield f"{prefix}linear_pred", head.linear_pred


def backbone_layers(net: nnx.Module, layout: str, prefix: str = "") -> Layers:
    """A ResNet or MobileNetV2 backbone in ``layout`` 'cirkd' or 'torchvision' (the ResNet's own
    ``variant`` already fixes its stem), or a MiT encoder (one layout)."""
    if isinstance(net, ResNet):
        yield from resnet_layers(net, prefix)
    elif isinstance(net, MixTransformer):
        yield from mix_transformer_layers(net, prefix)
    else:
        yield from mobilenet_layers(net, prefix, layout)


def cirkd_segmentor_layers(model: Segmentor) -> Layers:
    """A CIRKD DeepLabV3 / PSPNet: ``pretrained.`` (ResNet) or ``pretrained.net.`` (MobileNetV2),
    ``head.`` and ``auxlayer.``; a CIRKD SegFormer: encoder and decoder keys without a prefix."""
    if isinstance(model.backbone, MixTransformer):
        yield from mix_transformer_layers(model.backbone)
        yield from segformer_head_layers(model.head)
        return
    prefix = "pretrained." if isinstance(model.backbone, ResNet) else "pretrained.net."
    yield from backbone_layers(model.backbone, "cirkd", prefix)
    if isinstance(model.head, DeepLabV3Head):
        yield from deeplabv3_head_layers(model.head, "head.")
    else:
        yield from psp_head_layers(model.head, "head.")
    if model.aux_head is not None:
        yield from fcn_head_layers(model.aux_head, "auxlayer.")
