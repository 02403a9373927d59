"""ResNet and MobileNetV2 backbones: shapes, widths, parameter counts, dilation rules
(cirkd-models.md §3.2, §3.5), BatchNorm modes, jit, bf16 and sharding."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.models import MobileNetV2, ResNet
from kdjax.models.layers import BatchNorm2d, Conv2d
from kdjax.models.mobilenet import make_divisible

H, W = 33, 41  # odd sizes: every stride-2 layer rounds up


def abstract(factory):
    """The model with ShapeDtypeStruct leaves: no initialisation cost."""
    return nnx.eval_shape(factory)


def random_model(factory, seed=0):
    """The model with NumPy-drawn weights and BN statistics (running stats far from 0/1, so eval
    mode differs from train mode); avoids compiling one random-init program per kernel shape.

    Kernels are LeCun-normal: at He gain a random MobileNetV2 is chaotic (a 2^-9 relative input
    perturbation moves c4 by 8 %), which would hide the rounding error the bf16 test measures."""
    model = abstract(factory)
    rng = np.random.default_rng(seed)
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Variable):
            continue
        name, shape = path[-1], node.shape
        if name == "kernel":
            value = rng.standard_normal(shape) * math.sqrt(1.0 / math.prod(shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # BN bias and running mean
            value = 0.1 * rng.standard_normal(shape)
        node.set_value(jnp.asarray(value, node.dtype))
    return model


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef, state, x, train):
    model = nnx.merge(graphdef, state)
    return model(x, train), nnx.state(model)


def run(model, x, train, graphdef=None):
    """Jitted functional forward: (features, state after the call)."""
    own_graphdef, state = nnx.split(model)
    return _forward(graphdef or own_graphdef, state, x, train)


def output_shapes(model, shape):
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, False), state,
                         jax.ShapeDtypeStruct(shape, jnp.float32))
    return {k: v.shape for k, v in out.items()}


def param_count(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def images(seed=0, n=2, h=H, w=W):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, h, w, 3)), jnp.float32)


@pytest.fixture(scope="module")
def resnet18():
    return random_model(lambda: ResNet(18, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def mobilenet():
    return random_model(lambda: MobileNetV2(rngs=nnx.Rngs(0)))


# --- shapes and widths ---------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("variant", ["cirkd", "torchvision"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_resnet_shapes_and_channels(depth, variant, output_stride):
    model = abstract(lambda: ResNet(depth, variant=variant, output_stride=output_stride,
                                    rngs=nnx.Rngs(0)))
    c = (64, 128, 256, 512) if depth == 18 else (256, 512, 1024, 2048)
    assert model.channels == c
    deep = -(-H // output_stride), -(-W // output_stride)
    assert output_shapes(model, (2, H, W, 3)) == {
        "c1": (2, 9, 11, c[0]), "c2": (2, 5, 6, c[1]),
        "c3": (2, *deep, c[2]), "c4": (2, *deep, c[3])}


@pytest.mark.parametrize("variant", ["cirkd", "torchvision"])
def test_resnet_width_multiplier_scales_every_width(variant):
    model = abstract(lambda: ResNet(18, variant=variant, width_multiplier=0.25, rngs=nnx.Rngs(0)))
    assert model.channels == (16, 32, 64, 128)
    assert output_shapes(model, (1, H, W, 3))["c4"][-1] == 128
    with pytest.raises(ValueError, match="width_multiplier must be positive"):
        ResNet(18, width_multiplier=0.0, rngs=nnx.Rngs(0))


def test_cirkd_resolution_examples():
    # cirkd-models.md §3.1: ceil(ceil(ceil(H/2)/2)/2) = ceil(H/8).
    for factory in (lambda: ResNet(50, rngs=nnx.Rngs(0)), lambda: MobileNetV2(rngs=nnx.Rngs(0))):
        model = abstract(factory)
        assert output_shapes(model, (1, 297, 329, 3))["c4"][1:3] == (38, 42)
        assert output_shapes(model, (1, 512, 1024, 3))["c4"][1:3] == (64, 128)
        assert output_shapes(model, (1, 64, 96, 3))["c4"][1:3] == (8, 12)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_mobilenet_shapes_and_channels(output_stride):
    model = abstract(lambda: MobileNetV2(output_stride=output_stride, rngs=nnx.Rngs(0)))
    assert model.channels == (24, 32, 96, 320)
    deep = -(-H // output_stride), -(-W // output_stride)
    assert output_shapes(model, (2, H, W, 3)) == {
        "c1": (2, 9, 11, 24), "c2": (2, 5, 6, 32), "c3": (2, *deep, 96), "c4": (2, *deep, 320)}


def test_mobilenet_width_multiplier_rounds_like_torchvision():
    # int(v + 4) // 8 * 8, at least 8, bumped by 8 when more than 10 % below v.
    values = (32, 11.2, 16 * 0.75, 24 * 0.5, 3.2, 91.2)
    assert [make_divisible(v) for v in values] == [32, 16, 16, 16, 8, 88]
    model = abstract(lambda: MobileNetV2(width_multiplier=0.5, rngs=nnx.Rngs(0)))
    assert model.channels == (16, 16, 48, 160)
    assert model.features[0].conv.kernel.shape == (3, 3, 3, 16)
    assert output_shapes(model, (2, H, W, 3))["c4"] == (2, 5, 6, 160)


# --- parameter and state counts -------------------------------------------------------------------

def test_cirkd_resnet18_parameter_count_by_hand():
    # Stem: convs 3·64·9 + 64·64·9 + 64·128·9, BN scale+bias 2·(64+64+128).
    stem = 1_728 + 36_864 + 73_728 + 512
    # layer1.0: 128→64 3×3, 64→64 3×3, 128→64 1×1 downsample, 3 BN(64);
    # layer1.1: 2·64·64·9 + 2 BN(64). layer2..4 follow the same pattern.
    layer1 = (73_728 + 36_864 + 8_192 + 3 * 128) + (2 * 36_864 + 2 * 128)
    layer2 = (64 * 128 * 9 + 128 * 128 * 9 + 64 * 128 + 3 * 256) + (2 * 128 * 128 * 9 + 2 * 256)
    layer3 = (128 * 256 * 9 + 256 * 256 * 9 + 128 * 256 + 3 * 512) + (2 * 256 * 256 * 9 + 2 * 512)
    layer4 = (256 * 512 * 9 + 512 * 512 * 9 + 256 * 512 + 3 * 1024) + (2 * 512 * 512 * 9 + 2 * 1024)
    backbone = stem + layer1 + layer2 + layer3 + layer4
    assert backbone == 11_324_992
    # With CIRKD-HEAD's DeepLabV3 head (ASPP C=512: b0 and b4 512·512, b1..b3 512·512·9, project
    # 2560·512, block 512·512·9, seven BN(512), classifier 512·19+19) and the FCN aux head on c3
    # (256·64·9 + BN(64) + 64·19+19), DeepLabV3-R18 (K=19) totals 22,762,918 (cirkd-models.md).
    head = 2 * 512 * 512 + 3 * 512 * 512 * 9 + 2560 * 512 + 512 * 512 * 9 + 7 * 1024 + 512 * 19 + 19
    aux = 256 * 64 * 9 + 128 + 64 * 19 + 19
    assert backbone + head + aux == 22_762_918
    assert param_count(abstract(lambda: ResNet(18, rngs=nnx.Rngs(0)))) == backbone


@pytest.mark.parametrize("depth,variant,expected", [
    # torchvision totals minus the fc layer (512·1000+1000 or 2048·1000+1000).
    (18, "torchvision", 11_689_512 - 513_000),
    (50, "torchvision", 25_557_032 - 2_049_000),
    (101, "torchvision", 44_549_160 - 2_049_000),
    # CIRKD: deep stem (112,832) instead of the 7×7 stem + BN (9,536), and layer1.0 reads 128
    # channels, adding 64·64 to its conv1 and 64·256 to its downsample.
    (50, "cirkd", 23_508_032 - 9_536 + 112_832 + 4_096 + 16_384),
    # 42,623,936 + DeepLabV3 head 34,095,635 + aux 2,364,691 = 79,084,262 (cirkd-models.md).
    (101, "cirkd", 42_500_160 - 9_536 + 112_832 + 4_096 + 16_384),
])
def test_resnet_parameter_counts(depth, variant, expected):
    model = abstract(lambda: ResNet(depth, variant=variant, rngs=nnx.Rngs(0)))
    assert param_count(model) == expected


def test_mobilenet_parameter_count():
    # torchvision's 3,504,872 minus the classifier (1280·1000+1000) and the final 1×1 conv 320→1280
    # + BN (409,600 + 2,560). With the MobileNetV2 DeepLabV3 head (1,421,459) this is CIRKD's
    # 3,233,171 (cirkd-models.md).
    backbone = 3_504_872 - 1_281_000 - 412_160
    assert backbone + 1_421_459 == 3_233_171
    assert param_count(abstract(lambda: MobileNetV2(rngs=nnx.Rngs(0)))) == backbone


@pytest.mark.parametrize("factory,torch_keys", [
    # Backbone keys of CIRKD's state dicts (cirkd-models.md §4): DLV3 keys minus head (44) and
    # aux (8).
    (lambda: ResNet(18, rngs=nnx.Rngs(0)), 190 - 44 - 8),
    (lambda: ResNet(50, rngs=nnx.Rngs(0)), 382 - 44 - 8),
    (lambda: ResNet(101, rngs=nnx.Rngs(0)), 688 - 44 - 8),
    (lambda: MobileNetV2(rngs=nnx.Rngs(0)), 350 - 44),
])
def test_state_maps_one_to_one_onto_cirkd_keys(factory, torch_keys):
    # Every conv is followed by a BN: 6 PyTorch keys per pair (weight + 5 BN entries including
    # num_batches_tracked) and 5 kdjax leaves (kernel, scale, bias, mean, var).
    model = abstract(factory)
    convs = [n for _, n in nnx.iter_graph(model) if isinstance(n, Conv2d)]
    bns = [n for _, n in nnx.iter_graph(model) if isinstance(n, BatchNorm2d)]
    assert len(convs) == len(bns) == torch_keys // 6 and torch_keys % 6 == 0
    assert len(jax.tree.leaves(nnx.state(model))) == 5 * len(convs)


def test_resnet_module_names_mirror_pytorch():
    cirkd = abstract(lambda: ResNet(18, rngs=nnx.Rngs(0)))
    assert [cirkd.conv1.kernel.shape, cirkd.conv2.kernel.shape, cirkd.conv3.kernel.shape] == [
        (3, 3, 3, 64), (3, 3, 64, 64), (3, 3, 64, 128)]
    assert cirkd.layer1[0].conv1.kernel.shape == (3, 3, 128, 64)
    assert cirkd.layer1[0].downsample_conv.kernel.shape == (1, 1, 128, 64)  # torchvision has none
    assert cirkd.layer1[1].downsample_conv is None
    assert [len(cirkd.layer1), len(cirkd.layer4)] == [2, 2]
    tv = abstract(lambda: ResNet(18, variant="torchvision", rngs=nnx.Rngs(0)))
    assert tv.conv1.kernel.shape == (7, 7, 3, 64) and not hasattr(tv, "conv2")
    assert tv.layer1[0].downsample_conv is None
    r50 = abstract(lambda: ResNet(50, variant="torchvision", rngs=nnx.Rngs(0)))
    assert r50.layer1[0].downsample_conv.kernel.shape == (1, 1, 64, 256)
    assert r50.layer2[0].conv2.stride == (2, 2) and r50.layer2[0].conv1.stride == (1, 1)  # v1b
    assert r50.layer2[0].downsample_bn.scale.shape == (512,)
    assert len(abstract(lambda: ResNet(101, rngs=nnx.Rngs(0))).layer3) == 23


def test_mobilenet_module_layout_mirrors_pytorch():
    model = abstract(lambda: MobileNetV2(rngs=nnx.Rngs(0)))
    assert len(model.features) == 18
    # t = 1: dw, BN, pw, BN (PyTorch conv.0, .1, .3, .4); t = 6: pw, BN, dw, BN, pw, BN.
    assert [type(m).__name__ for m in model.features[1].layers] == [
        "Conv2d", "BatchNorm2d", "Conv2d", "BatchNorm2d"]
    assert [m.kernel.shape for m in model.features[1].layers[::2]] == [
        (3, 3, 1, 32), (1, 1, 32, 16)]
    assert [m.kernel.shape for m in model.features[2].layers[::2]] == [
        (1, 1, 16, 96), (3, 3, 1, 96), (1, 1, 96, 24)]
    # Residual: stride 1 and equal widths in the undilated network, i.e. every non-first block.
    assert [i for i, f in enumerate(model.features) if getattr(f, "residual", False)] == [
        3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    # Residuals are fixed before dilation: at width 0.1 features 6 and 7 both have 8 channels, and
    # features 7, although no longer strided, still has none.
    tiny = abstract(lambda: MobileNetV2(width_multiplier=0.1, rngs=nnx.Rngs(0)))
    assert tiny.features[7].layers[-1].scale.shape == (8,) and not tiny.features[7].residual


# --- dilation rules -------------------------------------------------------------------------------

def _dilations(block):
    convs = [block.conv1, block.conv2] if not hasattr(block, "conv3") else [block.conv2]
    for conv in convs:
        assert conv.padding == conv.dilation  # padding = dilation everywhere
    return tuple(conv.dilation[0] for conv in convs), block.conv1.stride[0] * (
        block.conv2.stride[0])


@pytest.mark.parametrize("depth,variant,output_stride,expected", [
    # (dilations of the 3×3 convs, stride) of layer3.0, layer3.1, layer4.0, layer4.1 (§3.2 table)
    (18, "cirkd", 8, [((1, 2), 1), ((2, 2), 1), ((2, 4), 1), ((4, 4), 1)]),
    (18, "torchvision", 8, [((1, 1), 1), ((2, 2), 1), ((2, 2), 1), ((4, 4), 1)]),
    (50, "cirkd", 8, [((1,), 1), ((2,), 1), ((2,), 1), ((4,), 1)]),
    (50, "torchvision", 8, [((1,), 1), ((2,), 1), ((2,), 1), ((4,), 1)]),
    (18, "cirkd", 16, [((1, 1), 2), ((1, 1), 1), ((1, 2), 1), ((2, 2), 1)]),
    (18, "torchvision", 16, [((1, 1), 2), ((1, 1), 1), ((1, 1), 1), ((2, 2), 1)]),
    (101, "cirkd", 16, [((1,), 2), ((1,), 1), ((1,), 1), ((2,), 1)]),
])
def test_resnet_dilation_rule(depth, variant, output_stride, expected):
    model = abstract(lambda: ResNet(depth, variant=variant, output_stride=output_stride,
                                    rngs=nnx.Rngs(0)))
    blocks = [model.layer3[0], model.layer3[1], model.layer4[0], model.layer4[1]]
    assert [_dilations(b) for b in blocks] == expected
    assert all(_dilations(b)[0] == expected[1][0] for b in model.layer3[1:])
    assert all(_dilations(b) == (tuple(1 for _ in expected[0][0]), 1) for b in model.layer1)


@pytest.mark.parametrize("output_stride,expected", [
    # (stride, depthwise dilation) of features 7, 8..13, 14, 15..17 (§3.5 table)
    (8, [(1, 1)] + [(1, 2)] * 6 + [(1, 2)] + [(1, 4)] * 3),
    (16, [(2, 1)] + [(1, 1)] * 6 + [(1, 1)] + [(1, 2)] * 3),
])
def test_mobilenet_dilation_table(output_stride, expected):
    model = abstract(lambda: MobileNetV2(output_stride=output_stride, rngs=nnx.Rngs(0)))
    depthwise = [f.layers[-4] for f in model.features[7:]]
    assert all(dw.groups == dw.in_ch and dw.padding == dw.dilation for dw in depthwise)
    assert [(dw.stride[0], dw.dilation[0]) for dw in depthwise] == expected
    assert all(f.layers[-4].dilation == (1, 1) for f in model.features[1:7])


def _largest_fusion_operand_count(compiled_text: str) -> int:
    counts = [line.split(" fusion(", 1)[1].split("), kind=", 1)[0].count("%")
              for line in compiled_text.splitlines() if " fusion(" in line]
    return max(counts)


@pytest.mark.parametrize("train", [False, True])
def test_residual_stream_is_not_recomputed_block_after_block(train):
    # ResNet-101's layer3 chains 23 blocks. Had XLA copied each block's output ReLU into the next
    # block's residual sum, the last block's fusion would read every earlier block's convolution
    # output and BatchNorm parameters (over 100 operands; see ``benchmarks/memory.py --train_step``).
    model = ResNet(101, width_multiplier=0.125, rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graph, state)(x, train=train)["c4"]

    x = jnp.zeros((2, 16, 16, 3))
    # In train mode the program is the parameters' gradient, the step's forward and backward.
    program = jax.jit(jax.grad(lambda s, v: jnp.sum(forward(s, v))) if train else forward)
    assert _largest_fusion_operand_count(program.lower(state, x).compile().as_text()) < 30


# --- running the networks -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "mobilenet"])
def test_train_updates_running_stats_and_eval_changes_nothing(name, request):
    model = request.getfixturevalue(name)
    x = images(1)
    state = nnx.state(model)
    eval_out, eval_state = run(model, x, train=False)
    jax.tree.map(np.testing.assert_array_equal, state, eval_state)
    train_out, train_state = run(model, x, train=True)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param),
                 nnx.filter_state(train_state, nnx.Param))
    stats_before = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    stats_after = jax.tree.leaves(nnx.filter_state(train_state, nnx.BatchStat))
    assert all(not np.allclose(a, b) for a, b in zip(stats_before, stats_after))
    for key in ("c1", "c2", "c3", "c4"):
        assert np.all(np.isfinite(eval_out[key])) and np.all(np.isfinite(train_out[key]))
        assert not np.allclose(eval_out[key], train_out[key], rtol=1e-2, atol=1e-2)


def test_jit_matches_eager(resnet18):
    x = images(2)
    jitted, _ = run(resnet18, x, train=False)
    eager = resnet18(x, train=False)
    for key in eager:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-4,
                                   atol=1e-5 * np.abs(eager[key]).max())


def _relative_error(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("name,factory", [
    ("resnet18", lambda: ResNet(18, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))),
    ("mobilenet", lambda: MobileNetV2(dtype=jnp.bfloat16, rngs=nnx.Rngs(0))),
])
def test_bf16_compute_stays_close_to_float32(name, factory, request):
    model = request.getfixturevalue(name)
    bf16_graphdef, _ = nnx.split(abstract(factory))
    x = images(3)
    reference, _ = run(model, x, train=False)
    low, _ = run(model, x, train=False, graphdef=bf16_graphdef)
    for key in reference:
        assert low[key].dtype == jnp.bfloat16
        assert _relative_error(low[key], reference[key]) < 0.03, key


@pytest.mark.parametrize("train", [False, True])
def test_sharded_batch_equals_single_device(resnet18, train, eight_devices):
    mesh = jax.make_mesh((8,), ("data",))
    x = images(4, n=8)
    single, single_state = run(resnet18, x, train)
    graphdef, state = nnx.split(resnet18)
    sharded, sharded_state = _forward(graphdef, jax.device_put(state, NamedSharding(mesh, P())),
                                      jax.device_put(x, NamedSharding(mesh, P("data"))), train)
    assert len(sharded["c4"].sharding.device_set) == 8
    for key in single:
        np.testing.assert_allclose(sharded[key], single[key], rtol=1e-4,
                                   atol=1e-4 * np.abs(single[key]).max())
    # Train-mode BN statistics are global over the sharded batch (synchronised BN).
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
                 nnx.filter_state(single_state, nnx.BatchStat),
                 nnx.filter_state(sharded_state, nnx.BatchStat))


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,match", [
    (lambda: ResNet(34, rngs=nnx.Rngs(0)), "depth.*34"),
    (lambda: ResNet(18, variant="mmseg", rngs=nnx.Rngs(0)), "variant.*mmseg"),
    (lambda: ResNet(18, output_stride=32, rngs=nnx.Rngs(0)), "output_stride.*32"),
    (lambda: MobileNetV2(output_stride=4, rngs=nnx.Rngs(0)), "output_stride.*4"),
    (lambda: MobileNetV2(width_multiplier=0.0, rngs=nnx.Rngs(0)), "width_multiplier.*0.0"),
])
def test_bad_configuration_raises(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_input_rank_raises():
    model = abstract(lambda: ResNet(18, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="rank 4"):
        output_shapes(model, (H, W, 3))
    with pytest.raises(ValueError, match="3 channels"):
        output_shapes(abstract(lambda: MobileNetV2(rngs=nnx.Rngs(0))), (1, H, W, 4))
