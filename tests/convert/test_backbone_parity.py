"""Converted ImageNet backbones (torchvision and CIRKD's deep-stem ResNets, MobileNetV2) reproduce
the PyTorch stages c1..c4 at output stride 8 and 16, with the ImageNet-only keys ignored."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kdjax.convert import from_torch  # noqa: E402
from kdjax.models.mobilenet import MobileNetV2  # noqa: E402
from kdjax.models.resnet import ResNet  # noqa: E402
from tests.convert.parity import (  # noqa: E402
    assert_outputs_match,
    kdjax_backbone_outputs,
    random_images,
    torch_backbone_outputs,
)
from tests.torch_reference import (  # noqa: E402
    MobileNetV2 as TorchMobileNetV2,
    ResNet as TorchResNet,
    randomize,
    torchvision_mobilenet_v2,
    torchvision_resnet,
)

pytestmark = pytest.mark.torch

DILATIONS = {8: (False, True, True), 16: (False, False, True)}


def check_backbone_parity(name, reference, height=97, width=105, **options):
    randomize(reference, seed=11)
    images = random_images(height, width)
    model = from_torch(name, reference.state_dict(), **options)
    errors = assert_outputs_match(kdjax_backbone_outputs(model, images),
                                  torch_backbone_outputs(reference, images))
    return model, errors


@pytest.mark.parametrize("output_stride", [8, 16])
def test_torchvision_resnet18(output_stride):
    reference = torchvision_resnet(18, DILATIONS[output_stride])
    model, _ = check_backbone_parity("torchvision_resnet18", reference, output_stride=output_stride)
    assert isinstance(model, ResNet) and model.variant == "torchvision"


def test_torchvision_mobilenet_v2_drops_the_final_conv_and_classifier():
    reference = torchvision_mobilenet_v2(output_stride=8)
    keys = reference.state_dict()
    assert any(k.startswith("features.18.") for k in keys) and "classifier.1.weight" in keys
    model, _ = check_backbone_parity("torchvision_mobilenetv2", reference, output_stride=8)
    assert isinstance(model, MobileNetV2) and len(model.features) == 18


def test_torchvision_mobilenet_v2_width_multiplier():
    reference = torchvision_mobilenet_v2(width_mult=0.5, output_stride=16)
    check_backbone_parity("torchvision_mobilenetv2", reference, 65, 81, output_stride=16,
                          width_multiplier=0.5)


def test_cirkd_imagenet_resnet18_ignores_fc():
    # CIRKD's resnet18-imagenet.pth: the deep-stem network with an ImageNet classifier.
    reference = TorchResNet(18, variant="cirkd", num_classes=1000)
    model, _ = check_backbone_parity("cirkd_resnet18", reference)
    assert model.variant == "cirkd" and model.stem_depth == 3


def test_cirkd_imagenet_mobilenet_v2_ignores_the_imagenet_tail():
    reference = TorchMobileNetV2(layout="cirkd")
    extra = {"features.18.0.weight": torch.zeros(1280, 320, 1, 1),
             "classifier.1.weight": torch.zeros(1000, 1280), "classifier.1.bias": torch.zeros(1000)}
    randomize(reference, seed=11)
    images = random_images(33, 41)
    model = from_torch("cirkd_mobilenetv2", {**reference.state_dict(), **extra})
    assert_outputs_match(kdjax_backbone_outputs(model, images), torch_backbone_outputs(reference, images))


@pytest.mark.slow
@pytest.mark.parametrize("depth, output_stride", [(50, 8), (101, 8), (101, 16)])
def test_torchvision_bottleneck_resnets(depth, output_stride):
    reference = torchvision_resnet(depth, DILATIONS[output_stride])
    check_backbone_parity(f"torchvision_resnet{depth}", reference, output_stride=output_stride)


def test_stage_shapes_at_odd_sizes():
    reference = torchvision_resnet(18, DILATIONS[8])
    model = from_torch("torchvision_resnet18", randomize(reference, seed=0).state_dict())
    stages = kdjax_backbone_outputs(model, np.zeros((1, 297, 329, 3), np.float32))
    assert {k: v.shape for k, v in stages.items()} == {
        "c1": (1, 75, 83, 64), "c2": (1, 38, 42, 128), "c3": (1, 38, 42, 256), "c4": (1, 38, 42, 512)}
