"""from_torch / load_torch_checkpoint: shape inference, prefixes, dtypes and every error path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from kdjax.convert import (  # noqa: E402
    CheckpointMismatchError,
    TorchCheckpointError,
    from_torch,
    load_torch_checkpoint,
)
from tests.convert.parity import (  # noqa: E402
    assert_outputs_match,
    kdjax_segmentor_outputs,
    random_images,
    torch_segmentor_outputs,
)
from tests.torch_reference import build_cirkd, randomize  # noqa: E402

pytestmark = pytest.mark.torch


def zeros_state_dict(name, num_classes=19, **options):
    """A CIRKD state dict with the right keys and shapes and cheap (zero) values."""
    with torch.device("meta"):
        model = build_cirkd(name, num_classes, **options)
    return {key: np.zeros(value.shape, np.float32) for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def mobile_reference():
    return randomize(build_cirkd("pspnet_mobilenetv2", 19), seed=5)


@pytest.mark.parametrize("name, layout, width_of", [
    ("deeplabv3_resnet18", "paper", lambda m: m.head.aspp.b0.conv.out_ch),
    ("deeplabv3_resnet18", "head", lambda m: m.head.aspp.b0.conv.out_ch),
    ("pspnet_resnet18", "head", lambda m: m.head.block.conv.out_ch),
])
def test_head_width_is_read_from_the_shapes(name, layout, width_of):
    model = from_torch(name, zeros_state_dict(name, layout=layout), num_classes=19)
    width = zeros_state_dict(name, layout=layout)["head.block.0.weight"].shape[0]
    assert width_of(model) == width == {"paper": 128, "head": 512 if "deeplab" in name else 128}[layout]


def test_class_count_and_aux_head_are_read_from_the_shapes():
    model = from_torch("pspnet_resnet18", zeros_state_dict("pspnet_resnet18", 21, aux=False))
    assert model.head.classifier.out_ch == 21
    assert model.aux_head is None
    model = from_torch("pspnet_resnet18", zeros_state_dict("pspnet_resnet18", 21))
    assert model.aux_head.classifier.out_ch == 21


def test_module_prefix_and_missing_batch_counters_are_accepted(mobile_reference):
    state = mobile_reference.state_dict()
    plain = from_torch("pspnet_mobilenetv2", state)
    wrapped = {f"module.{key}": value for key, value in state.items()
               if not key.endswith("num_batches_tracked")}
    prefixed = from_torch("pspnet_mobilenetv2", wrapped)
    for a, b in zip(jax.tree.leaves(nnx.state(plain, nnx.Param)),
                    jax.tree.leaves(nnx.state(prefixed, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def test_kernels_are_transposed_to_hwio(mobile_reference):
    model = from_torch("pspnet_mobilenetv2", mobile_reference.state_dict())
    depthwise = mobile_reference.state_dict()["pretrained.net.features.2.conv.3.weight"]  # (96, 1, 3, 3)
    kernel = model.backbone.features[2].layers[2].kernel[...]
    assert kernel.shape == (3, 3, 1, 96)
    np.testing.assert_array_equal(kernel, depthwise.numpy().transpose(2, 3, 1, 0))
    bn = mobile_reference.state_dict()
    np.testing.assert_array_equal(model.head.block.bn.var[...], bn["head.block.1.running_var"].numpy())
    np.testing.assert_array_equal(model.head.classifier.bias[...], bn["head.classifier.bias"].numpy())


def test_param_dtype_option_is_honoured(mobile_reference):
    model = from_torch("pspnet_mobilenetv2", mobile_reference.state_dict(), param_dtype=jnp.bfloat16)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat)))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_converted_model_trains(mobile_reference):
    # The converted model holds its weights only (dropout keys are call arguments), and train mode
    # moves the BN statistics.
    model = from_torch("pspnet_mobilenetv2", mobile_reference.state_dict())
    assert not jax.tree.leaves(nnx.state(model, nnx.RngState))
    graphdef, state = nnx.split(model)

    @jax.jit
    def train_forward(state, images):
        model = nnx.merge(graphdef, state)
        logits = model(images, train=True, rngs=nnx.Rngs(dropout=1)).logits
        return logits, nnx.state(model)

    logits, new_state = train_forward(state, jnp.asarray(random_images(33, 41)))
    assert logits.shape == (2, 5, 6, 19) and bool(jnp.isfinite(logits).all())
    before = nnx.state(model, nnx.BatchStat)
    after = nnx.split(nnx.merge(graphdef, new_state), nnx.BatchStat, ...)[1]
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert all(changed)


def test_the_seed_argument_is_deprecated(mobile_reference):
    with pytest.warns(DeprecationWarning, match="rngs=nnx.Rngs"):
        from_torch("pspnet_mobilenetv2", mobile_reference.state_dict(), seed=1)


def test_missing_unexpected_and_misshaped_keys_are_listed_together():
    state = zeros_state_dict("deeplabv3_resnet18")
    del state["head.block.1.running_var"]
    state["head.extra.weight"] = np.zeros((3, 3), np.float32)
    state["pretrained.conv1.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    with pytest.raises(CheckpointMismatchError) as caught:
        from_torch("deeplabv3_resnet18", state, num_classes=19)
    error = caught.value
    assert isinstance(error, ValueError)
    assert error.missing == {"head.block.1.running_var": (512,)}
    assert error.unexpected == {"head.extra.weight": (3, 3)}
    assert error.mismatched == {"pretrained.conv1.weight": ((64, 3, 5, 5), (64, 3, 3, 3))}
    message = str(error)
    assert "nothing was loaded" in message
    assert "head.block.1.running_var: expected (512,)" in message
    assert "head.extra.weight: (3, 3)" in message
    assert "pretrained.conv1.weight: checkpoint (64, 3, 5, 5), model expects (64, 3, 3, 3)" in message


def test_wrong_class_count_names_the_classifier_shapes():
    with pytest.raises(CheckpointMismatchError) as caught:
        from_torch("deeplabv3_resnet18", zeros_state_dict("deeplabv3_resnet18", 19), num_classes=21)
    error = caught.value
    assert error.mismatched == {
        "head.block.4.weight": ((19, 512, 1, 1), (21, 512, 1, 1)),
        "head.block.4.bias": ((19,), (21,)),
        "auxlayer.block.4.weight": ((19, 64, 1, 1), (21, 64, 1, 1)),
        "auxlayer.block.4.bias": ((19,), (21,)),
    }
    assert not error.missing and not error.unexpected
    assert "num_classes=21, but the checkpoint's classifier has 19 classes" in str(error)


def test_wrong_architecture_is_reported():
    with pytest.raises(CheckpointMismatchError) as caught:
        from_torch("deeplabv3_resnet18", zeros_state_dict("pspnet_resnet18"), num_classes=19)
    error = caught.value
    assert "head.aspp.b0.0.weight" in error.missing
    assert "head.psp.conv4.0.weight" in error.unexpected
    assert "Is deeplabv3_resnet18 the checkpoint's architecture?" in str(error)
    with pytest.raises(CheckpointMismatchError) as caught:
        from_torch("deeplabv3_resnet50", zeros_state_dict("deeplabv3_resnet18"))
    assert "pretrained.layer1.0.conv3.weight" in caught.value.missing
    assert caught.value.mismatched["pretrained.layer1.0.conv1.weight"] == ((64, 128, 3, 3), (64, 128, 1, 1))


def test_unreadable_class_count():
    state = zeros_state_dict("pspnet_resnet18")
    del state["head.classifier.weight"]
    with pytest.raises(TorchCheckpointError, match="head.classifier.weight"):
        from_torch("pspnet_resnet18", state)


@pytest.mark.parametrize("call, argument", [
    (lambda: from_torch("deeplabv3plus_resnet18", {}), "name"),
    (lambda: from_torch("resnet18", {}), "name"),
    (lambda: from_torch("torchvision_resnet18", {}, num_classes=19), "num_classes"),
])
def test_bad_arguments(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_checkpoint_file_round_trip_with_wrappers(tmp_path, mobile_reference):
    state = mobile_reference.state_dict()
    for wrapper in ("state_dict", "model"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
        loaded = load_torch_checkpoint(path)
        assert sorted(loaded) == sorted(f"module.{k}" for k in state)
        np.testing.assert_array_equal(loaded["module.head.classifier.weight"],
                                      state["head.classifier.weight"].numpy())
    images = random_images(33, 41)
    model = from_torch("pspnet_mobilenetv2", loaded)
    assert_outputs_match(kdjax_segmentor_outputs(model, images),
                         torch_segmentor_outputs(mobile_reference, images))


def test_truncated_checkpoint_names_the_path(tmp_path, mobile_reference):
    path = tmp_path / "teacher.pth"
    torch.save(mobile_reference.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchCheckpointError, match="teacher.pth.*truncated or corrupt"):
        load_torch_checkpoint(path)


def test_unusable_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_checkpoint(tmp_path / "missing.pth")
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(TorchCheckpointError, match="list.pth holds no state dict"):
        load_torch_checkpoint(not_a_state_dict)
    pickled_module = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled_module)  # a whole module: refused by weights_only
    with pytest.raises(TorchCheckpointError, match="module.pth"):
        load_torch_checkpoint(pickled_module)
