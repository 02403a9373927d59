"""Converted CIRKD SegFormers reproduce the PyTorch model's eval outputs (float32, odd input sizes),
and SegFormer state dicts that do not fit fail with a CheckpointMismatchError.

The reference (tests/torch_reference/segformer.py) has every Conv, Linear, LayerNorm and BN tensor
drawn at random; logits, the fused decoder feature and c1..c4 must agree at max|Δ| / max|torch| <
1e-4. 67×93 gives stage maps 17×24, 9×12, 5×6 and 3×3: uneven reductions in every attention and
non-integer decoder upsampling factors.
"""

import argparse

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from kdjax.commands.convert import add_convert_parser, run_convert  # noqa: E402
from kdjax.convert import CheckpointMismatchError, TorchCheckpointError, from_torch  # noqa: E402
from kdjax.io.model_dir import load_model, read_spec  # noqa: E402
from kdjax.models.segformer import MixTransformer, resize_bilinear  # noqa: E402
from tests.convert.parity import (  # noqa: E402
    assert_outputs_match,
    kdjax_backbone_outputs,
    kdjax_segmentor_outputs,
    random_images,
    torch_backbone_outputs,
    torch_segmentor_outputs,
)
from tests.torch_reference import build_cirkd, randomize  # noqa: E402
from tests.torch_reference.segformer import Segformer, VARIANTS, build_segformer  # noqa: E402

pytestmark = pytest.mark.torch
DECODER_KEYS = ("linear_c", "linear_fuse.", "linear_pred.")


@torch.no_grad()
def random_reference(variant="mit_b0", num_classes=19, seed=7, **options):
    """The reference with random weights: LayerNorm scales and biases first (``randomize`` leaves
    them at 1 and 0, which would hide a mis-mapped norm), then ``randomize``."""
    if options:
        embed_dims, depths, _ = VARIANTS[variant]
        model = Segformer(num_classes, embed_dims, depths, **options)
    else:
        model = build_segformer(variant, num_classes)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return randomize(model, seed=seed)


def zeros_state_dict(variant="mit_b0", num_classes=19, decoder_dim=None):
    """A CIRKD SegFormer state dict with the right keys and shapes and cheap (zero) values."""
    embed_dims, depths, default_dim = VARIANTS[variant]
    with torch.device("meta"):
        model = Segformer(num_classes, embed_dims, depths, decoder_dim or default_dim)
    return {key: np.zeros(value.shape, np.float32) for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def b0_reference():
    return random_reference("mit_b0")


def check_parity(reference, name, height, width, num_classes=19):
    images = random_images(height, width)
    expected = torch_segmentor_outputs(reference, images)
    model = from_torch(name, reference.state_dict(), num_classes=num_classes)
    return assert_outputs_match(kdjax_segmentor_outputs(model, images), expected)


@pytest.mark.parametrize("height, width", [(67, 93), (33, 45)])
def test_b0_matches_torch(b0_reference, height, width):
    check_parity(b0_reference, "segformer_mit_b0", height, width)


@pytest.mark.slow
def test_b4_matches_torch():
    check_parity(random_reference("mit_b4"), "segformer_mit_b4", 67, 93)


def test_decoder_resize_is_torchs_align_corners_false():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    for size in ((17, 24), (3, 4), (5, 7)):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size, mode="bilinear",
            align_corners=False).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), size), expected, atol=1e-5)


def test_tensors_map_to_their_kdjax_layouts(b0_reference):
    state = b0_reference.state_dict()
    model = from_torch("segformer_mit_b0", state)
    attn = model.backbone.block2[1].attn
    np.testing.assert_array_equal(attn.kv.kernel[...], state["block2.1.attn.kv.weight"].numpy().T)
    np.testing.assert_array_equal(attn.sr.kernel[...],
                                  state["block2.1.attn.sr.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(attn.norm.scale[...], state["block2.1.attn.norm.weight"].numpy())
    dwconv = model.backbone.block1[0].mlp.dwconv.kernel[...]
    assert dwconv.shape == (3, 3, 1, 128)
    np.testing.assert_array_equal(
        dwconv, state["block1.0.mlp.dwconv.dwconv.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.backbone.norm4.bias[...], state["norm4.bias"].numpy())
    np.testing.assert_array_equal(model.head.linear_fuse.bn.var[...],
                                  state["linear_fuse.1.running_var"].numpy())
    np.testing.assert_array_equal(model.head.linear_pred.bias[...],
                                  state["linear_pred.bias"].numpy())


def test_class_count_and_decoder_width_are_read_from_the_shapes():
    model = from_torch("segformer_mit_b0", zeros_state_dict(num_classes=7, decoder_dim=64))
    assert model.head.linear_pred.out_ch == 7
    assert model.spec["head_width"] == 64 and model.spec["num_classes"] == 7
    assert model.spec["aux"] is False and model.aux_head is None
    # The bare encoder keys of an ImageNet MiT carry no class count.
    encoder_only = {k: v for k, v in zeros_state_dict().items() if not k.startswith(DECODER_KEYS)}
    with pytest.raises(TorchCheckpointError, match="linear_pred.weight"):
        from_torch("segformer_mit_b0", encoder_only)


def test_missing_unexpected_and_misshaped_keys_are_all_listed():
    state = zeros_state_dict()
    del state["block1.0.attn.kv.weight"]
    state["block1.2.norm1.weight"] = np.zeros(32, np.float32)
    state["linear_c1.proj.weight"] = np.zeros((256, 33), np.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        from_torch("segformer_mit_b0", state, num_classes=19)
    assert error.value.missing == {"block1.0.attn.kv.weight": (64, 32)}     # PyTorch's (out, in)
    assert error.value.unexpected == {"block1.2.norm1.weight": (32,)}
    assert error.value.mismatched == {"linear_c1.proj.weight": ((256, 33), (256, 32))}
    message = str(error.value)
    assert "nothing was loaded" in message and "block1.0.attn.kv.weight" in message


@pytest.mark.parametrize("variant", ["mit_b1", "mit_b4"])
def test_another_variant_is_named_in_the_error(variant):
    with pytest.raises(CheckpointMismatchError, match=f"it is segformer_{variant}, not "
                                                      "segformer_mit_b0"):
        from_torch("segformer_mit_b0", zeros_state_dict(variant))


def test_a_cnn_state_dict_is_refused():
    with torch.device("meta"):
        cnn = build_cirkd("deeplabv3_resnet18", 19).state_dict()
    state = {key: np.zeros(value.shape, np.float32) for key, value in cnn.items()}
    with pytest.raises(CheckpointMismatchError, match="Is segformer_mit_b0 the checkpoint's "
                                                      "architecture"):
        from_torch("segformer_mit_b0", state, num_classes=19)


def test_imagenet_encoder_loads_as_a_backbone(b0_reference):
    """CIRKD's students start from the ImageNet ``mit_b0.pth``: the encoder keys plus a 1000-class
    ``head`` (ignored), loaded as the trainer loads a backbone checkpoint."""
    encoder = {k: v for k, v in b0_reference.state_dict().items()
               if not k.startswith(DECODER_KEYS)}
    encoder.update({"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})
    model = from_torch("cirkd_mit_b0", encoder, output_stride=8, width_multiplier=1.0)
    assert isinstance(model, MixTransformer)
    images = random_images(67, 93)
    assert_outputs_match(kdjax_backbone_outputs(model, images),
                         torch_backbone_outputs(b0_reference, images))
    with pytest.raises(CheckpointMismatchError, match="linear_pred.weight"):
        from_torch("cirkd_mit_b0", b0_reference.state_dict())       # a whole SegFormer
    with pytest.raises(ValueError, match="output_stride does not apply"):
        from_torch("cirkd_mit_b0", encoder, output_stride=16)


def test_convert_command_writes_a_segformer_model_dir(b0_reference, tmp_path):
    path = tmp_path / "segformer.pth"
    torch.save({"state_dict": b0_reference.state_dict()}, path)
    parser = argparse.ArgumentParser(prog="kdjax")
    add_convert_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "teacher"
    args = parser.parse_args(["convert", "--model=segformer_mit_b0", f"--torch={path}",
                              f"--out={out}"])
    assert run_convert(args) == 0
    assert read_spec(out) == {"name": "segformer_mit_b0", "num_classes": 19, "variant": "cirkd",
                              "output_stride": 8, "head_width": 256, "aux": False,
                              "width_multiplier": 1.0}
    images = random_images(33, 45)
    assert_outputs_match(kdjax_segmentor_outputs(load_model(out), images),
                         torch_segmentor_outputs(b0_reference, images))
