"""Converted CIRKD segmentors reproduce the PyTorch models' eval outputs (float32, odd input sizes).

Each test randomizes every weight and BN statistic of a PyTorch reference (tests/torch_reference),
converts its state dict and compares logits, aux logits, the head feature and c1..c4 at
max|Δ| / max|torch| < 1e-4. 97×105 gives a 13×14 map at output stride 8, so the PSP bins of 2, 3
and 6 overlap unevenly and the ASPP rates 12/24/36 exceed the map.
"""

import pytest

torch = pytest.importorskip("torch")

from kdjax.convert import from_torch  # noqa: E402
from tests.convert.parity import (  # noqa: E402
    assert_outputs_match,
    kdjax_segmentor_outputs,
    random_images,
    torch_segmentor_outputs,
)
from tests.torch_reference import build_cirkd, randomize  # noqa: E402

pytestmark = pytest.mark.torch


def check_parity(name, height, width, layout="head", num_classes=19, **options):
    reference = randomize(build_cirkd(name, num_classes, layout=layout, **options), seed=7)
    images = random_images(height, width)
    expected = torch_segmentor_outputs(reference, images)
    build_options = {"output_stride": options["output_stride"]} if "output_stride" in options else {}
    model = from_torch(name, reference.state_dict(), num_classes=num_classes, **build_options)
    return assert_outputs_match(kdjax_segmentor_outputs(model, images), expected)


@pytest.mark.parametrize("name, layout", [
    ("deeplabv3_resnet18", "head"),
    ("deeplabv3_resnet18", "paper"),
    ("pspnet_resnet18", "head"),
    ("deeplabv3_mobilenetv2", "head"),
    ("pspnet_mobilenetv2", "head"),
])
def test_small_models_match_torch(name, layout):
    check_parity(name, 97, 105, layout)


@pytest.mark.slow
@pytest.mark.parametrize("name, layout", [
    ("deeplabv3_resnet18", "head"),
    ("pspnet_resnet18", "head"),
    ("deeplabv3_mobilenetv2", "head"),
])
def test_small_models_match_torch_at_297x329(name, layout):
    check_parity(name, 297, 329, layout)


@pytest.mark.slow
@pytest.mark.parametrize("name, layout", [
    ("deeplabv3_resnet50", "head"),
    ("deeplabv3_resnet101", "head"),
    ("deeplabv3_resnet101", "paper"),
    ("pspnet_resnet101", "head"),
    ("pspnet_resnet101", "paper"),
])
def test_large_models_match_torch(name, layout):
    check_parity(name, 97, 105, layout)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "pspnet_resnet50", "deeplabv3_mobilenetv2"])
def test_output_stride_16_matches_torch(name):
    check_parity(name, 97, 105, output_stride=16, rates=(6, 12, 18))
