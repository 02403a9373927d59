"""Segmentors built by name: CIRKD parameter counts, shapes, train/eval, jit, bf16, sharding,
`predict` and `summary`. Big models only run abstractly (`nnx.eval_shape` / `jax.eval_shape`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.models.layers import resize_bilinear_align_corners
from kdjax.models.segmentor import (MODEL_NAMES, Segmentor, SegmentorOutput, build_segmentor,
                                    count_params, predict, summary)
from tests.models.random_state import random_module

K = 19


def _abstract(name, num_classes=K, **kwargs):
    return nnx.eval_shape(lambda: build_segmentor(name, num_classes=num_classes,
                                                  rngs=nnx.Rngs(0), **kwargs))


def _abstract_forward(name, image_shape, **kwargs):
    """Output shapes of the eval-mode forward pass, computed without any weights or FLOPs."""
    graphdef, state = nnx.split(_abstract(name, **kwargs))
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=False), state,
                          jax.ShapeDtypeStruct(image_shape, jnp.float32))


@nnx.jit(static_argnames="train")
def run(model, images, train=False, key=None):
    """The forward pass; ``key`` keys the dropout in train mode."""
    return model(images, train, rngs=None if key is None else nnx.Rngs(dropout=key))


def _images(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def _batch_stats(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


@pytest.fixture(scope="module")
def resnet_model():
    """DeepLabV3-R18 (CIRKD backbone, narrow head) with the aux head, random weights."""
    return random_module(lambda: build_segmentor(
        "deeplabv3_resnet18", num_classes=K, head_width=16, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def mobilenet_model():
    return random_module(lambda: build_segmentor(
        "pspnet_mobilenetv2", num_classes=K, head_width=16, rngs=nnx.Rngs(0)), seed=1)


# --------------------------------------------------------------------------------------------------
# Parameter counts of the PyTorch definitions (cirkd-models.md, K = 19).

@pytest.mark.parametrize("name, head_width, expected", [
    ("deeplabv3_resnet18", None, 22_762_918),      # CIRKD HEAD layout
    ("deeplabv3_resnet101", None, 79_084_262),     # CIRKD HEAD layout
    ("deeplabv3_mobilenetv2", None, 3_233_171),
    ("pspnet_resnet18", None, 12_919_334),
    ("deeplabv3_resnet18", 128, 13_607_974),       # paper-era layout, "about 13.6M"
    ("deeplabv3_resnet101", 256, 61_118_950),      # paper-era layout, "about 61.1M"
])
def test_parameter_counts_match_cirkd(name, head_width, expected):
    assert count_params(_abstract(name, head_width=head_width)) == expected


def test_default_heads_follow_cirkd_head_layout():
    assert _abstract("deeplabv3_resnet101").head.block.conv.kernel.shape == (3, 3, 512, 512)
    assert _abstract("pspnet_resnet101").head.block.conv.kernel.shape == (3, 3, 4096, 256)
    assert _abstract("pspnet_resnet18").head.block.conv.kernel.shape == (3, 3, 1024, 128)
    mobile = _abstract("deeplabv3_mobilenetv2")
    assert mobile.head.aspp.b0.conv.kernel.shape == (1, 1, 320, 128)
    assert mobile.aux_head is None
    # The aux head reads layer3: in/4 = 64 inner channels for R18, 256 for R101.
    assert _abstract("pspnet_resnet18").aux_head.block.conv.kernel.shape == (3, 3, 256, 64)
    assert _abstract("deeplabv3_resnet101").aux_head.block.conv.kernel.shape == (3, 3, 1024, 256)
    assert _abstract("deeplabv3_resnet18", aux=False).aux_head is None
    assert _abstract("deeplabv3_mobilenetv2", aux=True).aux_head.block.conv.kernel.shape \
        == (3, 3, 96, 24)


def test_every_name_builds():
    for name in MODEL_NAMES:
        assert isinstance(_abstract(name), Segmentor), name


# --------------------------------------------------------------------------------------------------
# Shapes: a Cityscapes crop at OS8 and OS16, abstractly; odd sizes give ceil(H/8).

@pytest.mark.parametrize("name, head_ch", [("deeplabv3_resnet18", 512), ("pspnet_resnet18", 128),
                                           ("deeplabv3_mobilenetv2", 128)])
def test_cityscapes_crop_gives_64x128_logits_at_os8(name, head_ch):
    out = _abstract_forward(name, (1, 512, 1024, 3))
    assert out.logits.shape == (1, 64, 128, K)
    assert out.features["head"].shape == (1, 64, 128, head_ch)
    assert out.features["pre_classifier"].shape == (1, 64, 128, head_ch)
    assert out.features["c1"].shape[1:3] == (128, 256)
    assert out.features["c4"].shape[1:3] == (64, 128)
    assert (out.aux_logits is None) == name.endswith("mobilenetv2")


def test_output_stride_16_and_deeplabv3plus_resolutions():
    out = _abstract_forward("deeplabv3_resnet101", (1, 512, 1024, 3), output_stride=16)
    assert out.logits.shape == (1, 32, 64, K)
    assert out.aux_logits.shape == (1, 32, 64, K)
    model = _abstract("deeplabv3_resnet101", output_stride=16)
    assert model.head.aspp.b1.conv.dilation == (6, 6)
    plus = _abstract_forward("deeplabv3plus_resnet50", (1, 512, 1024, 3))
    assert plus.logits.shape == (1, 128, 256, K)       # the c1 resolution, output stride 4


def test_odd_input_297x329_gives_38x42():
    out = _abstract_forward("pspnet_resnet18", (2, 297, 329, 3))
    assert out.logits.shape == (2, 38, 42, K)
    assert out.aux_logits.shape == (2, 38, 42, K)


def test_small_odd_images_run(resnet_model, mobilenet_model):
    images = _images(0, 2, 33, 41, 3)
    out = run(resnet_model, images)
    assert isinstance(out, SegmentorOutput)
    assert out.logits.shape == (2, 5, 6, K) and out.aux_logits.shape == (2, 5, 6, K)
    assert {k: v.shape for k, v in out.features.items()} == {
        "c1": (2, 9, 11, 64), "c2": (2, 5, 6, 128), "c3": (2, 5, 6, 256), "c4": (2, 5, 6, 512),
        "head": (2, 5, 6, 16), "pre_classifier": (2, 5, 6, 16)}
    np.testing.assert_array_equal(out.features["head"], out.features["pre_classifier"])
    assert np.all(np.isfinite(out.logits))
    mobile = run(mobilenet_model, images)
    assert mobile.logits.shape == (2, 5, 6, K) and mobile.aux_logits is None
    assert mobile.features["c1"].shape == (2, 9, 11, 24)


# --------------------------------------------------------------------------------------------------
# Train vs eval: the teacher path (eval) never updates anything.

def test_train_updates_batch_stats_and_eval_changes_nothing(resnet_model):
    model = nnx.clone(resnet_model)
    images = _images(1, 2, 33, 41, 3)
    before = _batch_stats(model)
    evaluated = run(model, images)
    for old, new in zip(before, _batch_stats(model)):
        np.testing.assert_array_equal(old, new)

    trained = run(model, images, train=True, key=jax.random.key(1))
    changed = [not np.array_equal(old, new) for old, new in zip(before, _batch_stats(model))]
    assert all(changed), f"{sum(changed)} of {len(changed)} statistics changed"
    assert not np.allclose(trained.logits, evaluated.logits)


def test_bf16_compute_stays_close_to_float32(resnet_model):
    images = _images(2, 2, 33, 41, 3)
    reference = np.asarray(run(resnet_model, images).logits)
    graphdef = nnx.graphdef(_abstract("deeplabv3_resnet18", head_width=16, dtype=jnp.bfloat16))
    out = run(nnx.merge(graphdef, nnx.state(resnet_model)), images).logits
    assert out.dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(out, np.float32) - reference)) / np.max(np.abs(reference))
    assert err < 5e-2, err


def test_data_parallel_train_step_on_8_devices(resnet_model, eight_devices):
    """Batch sharded over a ('data',) mesh, parameters replicated: the same logits and BN updates as
    on one device, i.e. train-mode BN uses the statistics of the global batch (synchronised BN)."""
    mesh = jax.make_mesh((8,), ("data",))
    images = _images(3, 8, 33, 41, 3)
    graphdef, state = nnx.split(nnx.clone(resnet_model))

    def forward(state, images):
        model = nnx.merge(graphdef, state)
        logits = model(images, train=True, rngs=nnx.Rngs(dropout=jax.random.key(2))).logits
        return logits, nnx.state(model, nnx.BatchStat)

    replicated, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sharded = jax.jit(forward, in_shardings=(replicated, by_batch),
                      out_shardings=(by_batch, replicated))
    logits, stats = sharded(jax.device_put(state, replicated), jax.device_put(images, by_batch))
    assert logits.sharding.spec == P("data")
    ref_logits, ref_stats = jax.jit(forward)(state, images)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# predict and summary.

def test_predict_upsamples_eval_logits_to_the_input_size(resnet_model):
    images = _images(4, 2, 33, 41, 3)
    full = nnx.jit(predict)(resnet_model, images)
    logits = run(resnet_model, images).logits
    assert full.shape == (2, 33, 41, K)
    # align_corners=True: the corner pixels of input and output coincide.
    for i, j in ((0, 0), (-1, -1), (0, -1)):
        np.testing.assert_allclose(full[:, i, j], logits[:, i, j], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full, resize_bilinear_align_corners(logits, (33, 41)), atol=1e-5)


def test_summary_prints_and_returns_params_and_flops(capsys):
    result = summary("deeplabv3_resnet18", (1, 64, 64, 3))
    assert result.params == 22_762_918
    assert "22,762,918" in capsys.readouterr().out
    # Bounds from the weights: the ASPP convs, projection and 3×3 block alone run at 8×8 positions;
    # no conv runs at more than the stem's 32×32 positions (a multiply-add counts 2 FLOPs).
    model = _abstract("deeplabv3_resnet18")
    head = model.head
    head_convs = [head.aspp.b0, head.aspp.b1, head.aspp.b2, head.aspp.b3, head.aspp.project,
                  head.block]
    head_macs = 8 * 8 * sum(c.conv.kernel.size for c in head_convs)
    assert 2 * head_macs < result.flops < 2 * 32 * 32 * result.params


# --------------------------------------------------------------------------------------------------
# Bad input.

def test_bad_arguments_raise_value_errors(resnet_model):
    with pytest.raises(ValueError, match="name.*'deeplabv3_resnet34'"):
        build_segmentor("deeplabv3_resnet34", num_classes=K, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="variant.*'caffe'"):
        _abstract("deeplabv3_mobilenetv2", variant="caffe")
    with pytest.raises(ValueError, match="num_classes.*0"):
        _abstract("pspnet_resnet18", num_classes=0)
    with pytest.raises(ValueError, match="head_width.*0"):
        _abstract("pspnet_resnet18", head_width=0)
    with pytest.raises(ValueError, match="output_stride.*32"):
        _abstract("deeplabv3_resnet18", output_stride=32)
    with pytest.raises(ValueError, match="output_stride.*4"):
        _abstract("deeplabv3_mobilenetv2", output_stride=4)
    with pytest.raises(ValueError, match="images must be .*rank 4"):
        resnet_model(jnp.zeros((33, 41, 3)), train=False)
    with pytest.raises(ValueError, match="input_shape"):
        summary("deeplabv3_resnet18", (64, 64, 3))
