"""SegFormer (MiT encoder + all-MLP decoder): parameter counts, taps at odd sizes, bf16, jit,
gradients, stochastic depth, spec round trip and bad input. Big variants only run abstractly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.io.model_dir import load_model, read_spec, save_model
from kdjax.models.layers import set_kernels
from kdjax.models.segformer import (EfficientSelfAttention, LayerNorm, MiTBlock, MixTransformer,
                                    SegFormerHead, drop_path_rates, min_input_size,
                                    resize_bilinear, stage_sizes)
from kdjax.models.segmentor import (MODEL_NAMES, SegmentorOutput, build_segmentor, count_params,
                                    summary)
from tests.models.random_state import random_module

K = 19


def _abstract(name, num_classes=K, **kwargs):
    return nnx.eval_shape(lambda: build_segmentor(name, num_classes=num_classes,
                                                  rngs=nnx.Rngs(0), **kwargs))


def _images(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


@nnx.jit(static_argnames="train")
def run(model, images, train=False):
    return model(images, train)


def _shapes(state):
    return jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(state))


@pytest.fixture(scope="module")
def abstract_b4():
    return _abstract("segformer_mit_b4")


@pytest.fixture(scope="module")
def b0():
    """SegFormer MiT-B0 with random weights and BN statistics, in plain XLA convolutions (they
    compile faster than the CPU forms, which the parity tests run)."""
    return random_module(lambda: build_segmentor("segformer_mit_b0", num_classes=K, kernels="xla",
                                                 rngs=nnx.Rngs(0)))


# --------------------------------------------------------------------------------------------------
# Structure: CIRKD's variants (models/segformer.py), counted against its PyTorch definition.

def test_b0_and_b4_parameter_counts_match_cirkd(abstract_b4):
    assert count_params(_abstract("segformer_mit_b0")) == 3_719_283     # "3.7M"
    assert count_params(abstract_b4) == 64_008_403


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [
    ("segformer_mit_b1", 13_682_387),
    ("segformer_mit_b2", 27_362_003),
    ("segformer_mit_b3", 47_237_843),
    ("segformer_mit_b5", 84_608_723),
])
def test_parameter_counts_match_cirkd(name, expected):
    assert name in MODEL_NAMES
    assert count_params(_abstract(name)) == expected


def test_b0_and_b4_layouts(abstract_b4):
    b0, b4 = _abstract("segformer_mit_b0"), abstract_b4
    assert b0.backbone.channels == (32, 64, 160, 256)
    assert b4.backbone.channels == (64, 128, 320, 512)
    assert [len(getattr(b4.backbone, f"block{i}")) for i in range(1, 5)] == [3, 8, 27, 3]
    assert b0.head.linear_fuse.conv.kernel.shape == (1, 1, 4 * 256, 256)
    assert b4.head.linear_fuse.conv.kernel.shape == (1, 1, 4 * 768, 768)
    assert b0.aux_head is None
    block = b0.backbone.block1[0]
    assert block.attn.sr.kernel.shape == (8, 8, 32, 32)                # sr ratio 8 in stage 1
    assert b0.backbone.block4[0].attn.sr is None                       # and 1 in stage 4
    assert block.mlp.dwconv.kernel.shape == (3, 3, 1, 128)             # depthwise, 4× hidden
    assert b0.backbone.patch_embed1.proj.kernel.shape == (7, 7, 3, 32)
    assert b0.backbone.patch_embed2.proj.stride == (2, 2)
    # LayerNorm eps as CIRKD: 1e-6 in blocks and after stages, PyTorch's 1e-5 elsewhere.
    assert block.norm1.eps == block.norm2.eps == b0.backbone.norm1.eps == 1e-6
    assert b0.backbone.patch_embed1.norm.eps == block.attn.norm.eps == 1e-5


def test_stage_sizes_and_minimum_input():
    assert stage_sizes(67, 93) == [(17, 24), (9, 12), (5, 6), (3, 3)]
    assert stage_sizes(1024, 2048)[-1] == (32, 64)
    assert min_input_size() == 29            # stage 1 must be at least the reduction ratio 8


# --------------------------------------------------------------------------------------------------
# Forward pass.

def test_every_tap_at_an_odd_input_size(b0):
    out = run(b0, _images(0, 2, 67, 93, 3))
    assert isinstance(out, SegmentorOutput)
    assert out.aux_logits is None
    assert out.logits.shape == (2, 17, 24, K)                   # stride 4, ceil(67/4) × ceil(93/4)
    assert {k: v.shape for k, v in out.features.items()} == {
        "c1": (2, 17, 24, 32), "c2": (2, 9, 12, 64), "c3": (2, 5, 6, 160), "c4": (2, 3, 3, 256),
        "head": (2, 17, 24, 256), "pre_classifier": (2, 17, 24, 256)}
    np.testing.assert_array_equal(out.features["head"], out.features["pre_classifier"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
    # The decoder feature is after the fuse ReLU.
    assert float(jnp.min(out.features["head"])) >= 0.0


def test_bf16_compute_stays_close_to_float32(b0):
    images = _images(1, 2, 33, 41, 3)
    reference = np.asarray(run(b0, images).logits)
    graphdef = nnx.graphdef(_abstract("segformer_mit_b0", dtype=jnp.bfloat16, kernels="xla"))
    out = run(nnx.merge(graphdef, nnx.state(b0)), images)
    assert out.logits.dtype == jnp.bfloat16
    assert out.features["c1"].dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(out.logits, np.float32) - reference)) / np.max(np.abs(reference))
    assert err < 5e-2, err


def test_layer_norm_statistics_are_float32_in_bf16():
    """A bf16 mean and variance of values near 1000 would lose every bit of the signal."""
    x = jnp.asarray(1000.0 + np.random.default_rng(0).normal(size=(4, 64)), jnp.bfloat16)
    f32 = LayerNorm(64, eps=1e-6)(x.astype(jnp.float32))
    bf16 = LayerNorm(64, eps=1e-6, dtype=jnp.bfloat16)(x)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, atol=2e-2)


def test_attention_softmax_is_float32_in_bf16():
    attn = random_module(lambda: EfficientSelfAttention(16, 2, 2, rngs=nnx.Rngs(0)), seed=2)
    x = _images(2, 1, 8, 6, 16)
    reference = np.asarray(attn(x))
    low = nnx.merge(nnx.graphdef(nnx.eval_shape(
        lambda: EfficientSelfAttention(16, 2, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))),
        nnx.state(attn))
    out = low(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kernels", ["xla", pytest.param("auto", marks=pytest.mark.slow)])
def test_train_mode_gradients_are_finite_and_reach_every_parameter(b0, kernels):
    model = nnx.clone(b0)
    set_kernels(model, kernels)
    images = _images(3, 2, 33, 41, 3)
    labels = jnp.asarray(np.random.default_rng(3).integers(0, K, (2, 9, 11)))

    @nnx.jit
    def step(model, images):
        def loss_fn(model):
            logits = model(images, train=True, rngs=nnx.Rngs(dropout=1)).logits
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None],
                                                 axis=-1))
        return nnx.value_and_grad(loss_fn)(model)

    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    loss, grads = step(model, images)
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(np.all(np.isfinite(g)) for g in leaves)
    # Stochastic depth may drop the attention of a block for both images, so only most parameters
    # must receive a gradient in one step.
    nonzero = sum(bool(np.any(np.asarray(g) != 0)) for g in leaves)
    assert nonzero > 0.8 * len(leaves), (nonzero, len(leaves))
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    assert not any(np.array_equal(a, b) for a, b in zip(before, after))   # the fuse BN moved


def test_eval_mode_changes_nothing_and_is_deterministic(b0):
    model = nnx.clone(b0)
    images = _images(4, 2, 33, 41, 3)
    state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    first, second = run(model, images).logits, run(model, images).logits
    np.testing.assert_array_equal(first, second)
    jax.tree.map(np.testing.assert_array_equal, state,
                 nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


# --------------------------------------------------------------------------------------------------
# Stochastic depth.

def test_drop_path_rates_rise_linearly_to_the_last_block():
    np.testing.assert_allclose(drop_path_rates((2, 2, 2, 2), 0.1), np.linspace(0, 0.1, 8))
    model = _abstract("segformer_mit_b0")
    assert model.backbone.block1[0].drop_path is None                 # rate 0: the identity
    assert model.backbone.block4[1].drop_path.rate == pytest.approx(0.1)
    plain = _abstract("segformer_mit_b0", drop_path_rate=0.0)
    assert all(block.drop_path is None for i in range(1, 5)
               for block in getattr(plain.backbone, f"block{i}"))
    # Not structural: the weights are the same.
    assert _shapes(nnx.state(plain, nnx.Param)) == _shapes(nnx.state(model, nnx.Param))


def test_drop_path_drops_whole_samples_in_train_mode_only():
    block = random_module(lambda: MiTBlock(8, 1, 1, drop_path=0.5, rngs=nnx.Rngs(0)))
    x = jnp.broadcast_to(_images(5, 1, 4, 5, 8), (32, 4, 5, 8))
    kept = random_module(lambda: MiTBlock(8, 1, 1, rngs=nnx.Rngs(0)))
    nnx.update(kept, nnx.state(block, nnx.Param))
    np.testing.assert_allclose(block(x, train=False), kept(x, train=False), rtol=1e-6)
    out = np.asarray(block(x, train=True, rngs=nnx.Rngs(dropout=3)))
    distinct = {tuple(np.round(sample.ravel(), 4)) for sample in out}
    assert 2 <= len(distinct) <= 4          # each branch kept or dropped per sample


# --------------------------------------------------------------------------------------------------
# Spec, model directories, summary.

def test_spec_round_trips(abstract_b4):
    assert abstract_b4.spec == {"name": "segformer_mit_b4", "num_classes": K, "variant": "cirkd",
                                "output_stride": 8, "head_width": 768, "aux": False,
                                "width_multiplier": 1.0}
    for model in (abstract_b4, _abstract("segformer_mit_b0", head_width=64,
                                         width_multiplier=0.25)):
        rebuilt = nnx.eval_shape(lambda spec=model.spec: build_segmentor(**spec,
                                                                         rngs=nnx.Rngs(1)))
        assert rebuilt.spec == model.spec
        assert _shapes(nnx.state(rebuilt)) == _shapes(nnx.state(model))


def test_model_directory_round_trips(tmp_path, b0):
    save_model(tmp_path / "b0", b0)
    assert read_spec(tmp_path / "b0") == b0.spec
    loaded = load_model(tmp_path / "b0")
    set_kernels(loaded, "xla")
    images = _images(6, 1, 33, 41, 3)
    np.testing.assert_array_equal(run(loaded, images).logits, run(b0, images).logits)


def test_width_multiplier_scales_every_head():
    model = _abstract("segformer_mit_b0", width_multiplier=0.25, head_width=16)
    assert model.backbone.channels == (8, 16, 40, 64)        # 8 channels per head
    assert model.head.linear_c4.kernel.shape == (64, 16)


@pytest.mark.slow
def test_summary_counts_segformer():
    assert summary("segformer_mit_b0", (1, 64, 64, 3)).params == 3_719_283


# --------------------------------------------------------------------------------------------------
# Pieces.

def test_resize_bilinear_is_half_pixel_sampling():
    x = _images(7, 2, 3, 5, 4)
    # Upsampling: the half-pixel triangle filter of jax.image.resize.
    np.testing.assert_allclose(resize_bilinear(x, (7, 11)),
                               jax.image.resize(x, (2, 7, 11, 4), "bilinear"), atol=1e-6)
    # By hand: row 0 of a 3 → 6 resize clamps to source row 0; row 1 samples row 0.25.
    y = resize_bilinear(x, (6, 5))
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)
    np.testing.assert_allclose(y[:, 1], 0.75 * x[:, 0] + 0.25 * x[:, 1], atol=1e-6)
    np.testing.assert_allclose(y[:, -1], x[:, -1], atol=1e-6)
    assert resize_bilinear(x, (3, 5)) is x


def test_head_reads_every_stage():
    assert SegFormerHead.taps == ("c1", "c2", "c3", "c4")
    assert isinstance(_abstract("segformer_mit_b0").backbone, MixTransformer)


def test_bad_arguments_raise_value_errors(b0):
    with pytest.raises(ValueError, match="name.*'segformer_mit_b6'"):
        _abstract("segformer_mit_b6")
    with pytest.raises(ValueError, match="no auxiliary head"):
        _abstract("segformer_mit_b0", aux=True)
    with pytest.raises(ValueError, match="output_stride does not apply"):
        _abstract("segformer_mit_b0", output_stride=16)
    with pytest.raises(ValueError, match="head_width.*0"):
        _abstract("segformer_mit_b0", head_width=0)
    with pytest.raises(ValueError, match="width_multiplier"):
        _abstract("segformer_mit_b0", width_multiplier=0.0)
    with pytest.raises(ValueError, match="drop_path_rate"):
        _abstract("segformer_mit_b0", drop_path_rate=1.0)
    with pytest.raises(ValueError, match="drop_path_rate applies to SegFormer only"):
        _abstract("deeplabv3_resnet18", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="at least 29 pixels"):
        b0(jnp.zeros((1, 28, 64, 3)), train=False)
