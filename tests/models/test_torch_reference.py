"""The PyTorch reference architectures reproduce CIRKD's and torchvision's state dicts and output shapes.

Numbers are from cirkd-models.md (§3.1 shapes, §3.2/§3.5 dilations, §4 keys and counts, parameter
counts at the top) and torchvision's published models. Big models are built on the ``meta`` device.
"""

import math

import pytest

torch = pytest.importorskip("torch")

from tests.torch_reference import (  # noqa: E402
    build_cirkd,
    cirkd_head_channels,
    randomize,
    torchvision_mobilenet_v2,
    torchvision_resnet,
)

pytestmark = pytest.mark.torch

# The first 40 and last 40 of the 190 keys of DeepLabV3-ResNet18 (HEAD, K=19), cirkd-models.md §4.
LISTED_DLV3_R18_KEYS = """
      1  pretrained.conv1.weight (64, 3, 3, 3)
      2  pretrained.bn1.weight (64,)
      3  pretrained.bn1.bias (64,)
      4  pretrained.bn1.running_mean (64,)
      5  pretrained.bn1.running_var (64,)
      6  pretrained.bn1.num_batches_tracked ()
      7  pretrained.conv2.weight (64, 64, 3, 3)
      8  pretrained.bn2.weight (64,)
      9  pretrained.bn2.bias (64,)
     10  pretrained.bn2.running_mean (64,)
     11  pretrained.bn2.running_var (64,)
     12  pretrained.bn2.num_batches_tracked ()
     13  pretrained.conv3.weight (128, 64, 3, 3)
     14  pretrained.bn3.weight (128,)
     15  pretrained.bn3.bias (128,)
     16  pretrained.bn3.running_mean (128,)
     17  pretrained.bn3.running_var (128,)
     18  pretrained.bn3.num_batches_tracked ()
     19  pretrained.layer1.0.conv1.weight (64, 128, 3, 3)
     20  pretrained.layer1.0.bn1.weight (64,)
     21  pretrained.layer1.0.bn1.bias (64,)
     22  pretrained.layer1.0.bn1.running_mean (64,)
     23  pretrained.layer1.0.bn1.running_var (64,)
     24  pretrained.layer1.0.bn1.num_batches_tracked ()
     25  pretrained.layer1.0.conv2.weight (64, 64, 3, 3)
     26  pretrained.layer1.0.bn2.weight (64,)
     27  pretrained.layer1.0.bn2.bias (64,)
     28  pretrained.layer1.0.bn2.running_mean (64,)
     29  pretrained.layer1.0.bn2.running_var (64,)
     30  pretrained.layer1.0.bn2.num_batches_tracked ()
     31  pretrained.layer1.0.downsample.0.weight (64, 128, 1, 1)
     32  pretrained.layer1.0.downsample.1.weight (64,)
     33  pretrained.layer1.0.downsample.1.bias (64,)
     34  pretrained.layer1.0.downsample.1.running_mean (64,)
     35  pretrained.layer1.0.downsample.1.running_var (64,)
     36  pretrained.layer1.0.downsample.1.num_batches_tracked ()
     37  pretrained.layer1.1.conv1.weight (64, 64, 3, 3)
     38  pretrained.layer1.1.bn1.weight (64,)
     39  pretrained.layer1.1.bn1.bias (64,)
     40  pretrained.layer1.1.bn1.running_mean (64,)
    151  head.aspp.b2.block.0.weight (512, 512, 3, 3)
    152  head.aspp.b2.block.1.weight (512,)
    153  head.aspp.b2.block.1.bias (512,)
    154  head.aspp.b2.block.1.running_mean (512,)
    155  head.aspp.b2.block.1.running_var (512,)
    156  head.aspp.b2.block.1.num_batches_tracked ()
    157  head.aspp.b3.block.0.weight (512, 512, 3, 3)
    158  head.aspp.b3.block.1.weight (512,)
    159  head.aspp.b3.block.1.bias (512,)
    160  head.aspp.b3.block.1.running_mean (512,)
    161  head.aspp.b3.block.1.running_var (512,)
    162  head.aspp.b3.block.1.num_batches_tracked ()
    163  head.aspp.b4.gap.1.weight (512, 512, 1, 1)
    164  head.aspp.b4.gap.2.weight (512,)
    165  head.aspp.b4.gap.2.bias (512,)
    166  head.aspp.b4.gap.2.running_mean (512,)
    167  head.aspp.b4.gap.2.running_var (512,)
    168  head.aspp.b4.gap.2.num_batches_tracked ()
    169  head.aspp.project.0.weight (512, 2560, 1, 1)
    170  head.aspp.project.1.weight (512,)
    171  head.aspp.project.1.bias (512,)
    172  head.aspp.project.1.running_mean (512,)
    173  head.aspp.project.1.running_var (512,)
    174  head.aspp.project.1.num_batches_tracked ()
    175  head.block.0.weight (512, 512, 3, 3)
    176  head.block.1.weight (512,)
    177  head.block.1.bias (512,)
    178  head.block.1.running_mean (512,)
    179  head.block.1.running_var (512,)
    180  head.block.1.num_batches_tracked ()
    181  head.block.4.weight (19, 512, 1, 1)
    182  head.block.4.bias (19,)
    183  auxlayer.block.0.weight (64, 256, 3, 3)
    184  auxlayer.block.1.weight (64,)
    185  auxlayer.block.1.bias (64,)
    186  auxlayer.block.1.running_mean (64,)
    187  auxlayer.block.1.running_var (64,)
    188  auxlayer.block.1.num_batches_tracked ()
    189  auxlayer.block.4.weight (19, 64, 1, 1)
    190  auxlayer.block.4.bias (19,)
"""


def on_meta(build, *args, **kwargs):
    with torch.device("meta"):
        return build(*args, **kwargs)


def shapes(model):
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, keys", [
    ("deeplabv3_resnet18", 190), ("deeplabv3_resnet50", 382), ("deeplabv3_resnet101", 688),
    ("deeplabv3_mobilenetv2", 350), ("pspnet_resnet18", 178), ("pspnet_resnet101", 676),
    ("pspnet_mobilenetv2", 338),
])
@pytest.mark.parametrize("layout", ["head", "paper"])
def test_cirkd_key_counts(name, keys, layout):
    assert len(on_meta(build_cirkd, name, 19, layout=layout).state_dict()) == keys


def test_deeplabv3_resnet18_listed_keys_and_shapes():
    listed = []
    for line in LISTED_DLV3_R18_KEYS.strip().splitlines():
        index, key, shape = line.split(maxsplit=2)
        listed.append((int(index), key, shape))
    actual = list(shapes(on_meta(build_cirkd, "deeplabv3_resnet18", 19)).items())
    assert len(actual) == 190
    for index, key, shape in listed:
        assert (actual[index - 1][0], str(actual[index - 1][1])) == (key, shape), index


@pytest.mark.parametrize("name, layout, count", [
    ("deeplabv3_resnet18", "head", 22_762_918),
    ("deeplabv3_resnet101", "head", 79_084_262),
    ("deeplabv3_mobilenetv2", "head", 3_233_171),
    ("pspnet_resnet18", "head", 12_919_334),
])
def test_cirkd_parameter_counts(name, layout, count):
    assert parameter_count(on_meta(build_cirkd, name, 19, layout=layout)) == count


@pytest.mark.parametrize("name, millions", [("deeplabv3_resnet18", 13.6), ("deeplabv3_resnet101", 61.1)])
def test_paper_era_parameter_counts(name, millions):
    # cirkd-models.md gives these only as "about"; the exact values are 13,607,974 and 61,118,950.
    count = parameter_count(on_meta(build_cirkd, name, 19, layout="paper"))
    assert round(count / 1e6, 1) == millions


def test_head_layouts_differ_in_36_head_shapes_only():
    current = shapes(on_meta(build_cirkd, "deeplabv3_resnet18", 19, layout="head"))
    paper = shapes(on_meta(build_cirkd, "deeplabv3_resnet18", 19, layout="paper"))
    assert list(current) == list(paper)
    differing = [key for key in current if current[key] != paper[key]]
    assert len(differing) == 36
    assert all(key.startswith("head.") for key in differing)
    assert paper["head.aspp.b0.0.weight"] == (128, 512, 1, 1)


@pytest.mark.parametrize("head, backbone, current, paper", [
    ("deeplabv3", "resnet18", 512, 128), ("deeplabv3", "resnet101", 512, 256),
    ("deeplabv3", "mobilenetv2", 128, 128), ("pspnet", "resnet18", 128, 128),
    ("pspnet", "resnet101", 256, 512), ("pspnet", "mobilenetv2", 128, 128),
])
def test_head_widths_follow_the_layout_table(head, backbone, current, paper):
    assert cirkd_head_channels(head, backbone, "head") == current
    assert cirkd_head_channels(head, backbone, "paper") == paper
    model = on_meta(build_cirkd, f"{head}_{backbone}", 7, layout="paper")
    classifier = "head.block.4.weight" if head == "deeplabv3" else "head.classifier.weight"
    assert shapes(model)[classifier] == (7, paper, 1, 1)


def test_head_channels_override_the_layout():
    model = on_meta(build_cirkd, "pspnet_resnet18", 19, head_channels=48)
    assert shapes(model)["head.block.0.weight"] == (48, 1024, 3, 3)


def test_cirkd_mobilenetv2_flat_keys_without_final_conv():
    table = shapes(on_meta(build_cirkd, "deeplabv3_mobilenetv2", 19))
    prefix = "pretrained.net.features."
    assert table[prefix + "0.0.weight"] == (32, 3, 3, 3)
    assert table[prefix + "1.conv.0.weight"] == (32, 1, 3, 3)
    assert table[prefix + "1.conv.3.weight"] == (16, 32, 1, 1)
    assert table[prefix + "2.conv.0.weight"] == (96, 16, 1, 1)
    assert table[prefix + "2.conv.3.weight"] == (96, 1, 3, 3)
    assert table[prefix + "2.conv.6.weight"] == (24, 96, 1, 1)
    assert table[prefix + "17.conv.7.running_var"] == (320,)
    assert table["head.aspp.b0.0.weight"] == (128, 320, 1, 1)
    assert not any(key.startswith(prefix + "18") or key.startswith("auxlayer") for key in table)


def test_pspnet_keys():
    table = shapes(on_meta(build_cirkd, "pspnet_resnet101", 19))
    assert table["head.psp.conv4.0.weight"] == (512, 2048, 1, 1)
    assert table["head.block.0.weight"] == (256, 4096, 3, 3)
    assert table["head.classifier.weight"] == (19, 256, 1, 1)
    assert table["auxlayer.block.0.weight"] == (256, 1024, 3, 3)
    assert table["pretrained.layer4.2.conv3.weight"] == (2048, 512, 1, 1)


@pytest.mark.parametrize("depth, keys, count", [
    (18, 122, 11_689_512), (50, 320, 25_557_032), (101, 626, 44_549_160),
])
def test_torchvision_resnet_state_dict(depth, keys, count):
    model = on_meta(torchvision_resnet, depth)
    table = shapes(model)
    assert (len(table), parameter_count(model)) == (keys, count)
    assert table["conv1.weight"] == (64, 3, 7, 7)
    assert table["fc.weight"] == (1000, 512 if depth == 18 else 2048)
    assert ("layer1.0.downsample.0.weight" in table) == (depth != 18)
    assert list(table)[:2] == ["conv1.weight", "bn1.weight"]
    assert list(table)[-2:] == ["fc.weight", "fc.bias"]


def test_torchvision_mobilenet_v2_state_dict():
    model = on_meta(torchvision_mobilenet_v2)
    table = shapes(model)
    assert (len(table), parameter_count(model)) == (314, 3_504_872)
    assert table["features.0.0.weight"] == (32, 3, 3, 3)
    assert table["features.1.conv.0.0.weight"] == (32, 1, 3, 3)
    assert table["features.1.conv.1.weight"] == (16, 32, 1, 1)
    assert table["features.2.conv.0.0.weight"] == (96, 16, 1, 1)
    assert table["features.2.conv.1.0.weight"] == (96, 1, 3, 3)
    assert table["features.2.conv.2.weight"] == (24, 96, 1, 1)
    assert table["features.2.conv.3.running_mean"] == (24,)
    assert table["features.18.0.weight"] == (1280, 320, 1, 1)
    assert table["classifier.1.weight"] == (1000, 1280)
    assert list(table)[-2:] == ["classifier.1.weight", "classifier.1.bias"]


def test_torchvision_mobilenet_v2_width_multiplier():
    table = shapes(on_meta(torchvision_mobilenet_v2, width_mult=0.5))
    # 32·0.5 = 16; 16·0.5 = 8; 320·0.5 = 160; the last conv keeps 1280 below width 1.
    assert table["features.0.0.weight"] == (16, 3, 3, 3)
    assert table["features.1.conv.1.weight"] == (8, 16, 1, 1)
    assert table["features.18.0.weight"] == (1280, 160, 1, 1)


def conv_geometry(conv):
    return conv.stride[0], conv.dilation[0], conv.padding[0]


def test_cirkd_resnet_dilation_rule():
    r18 = on_meta(build_cirkd, "deeplabv3_resnet18", 19).pretrained
    # (stride, dilation, padding) of conv1 / conv2, cirkd-models.md §3.2 table.
    assert [conv_geometry(r18.layer2[0].conv1), conv_geometry(r18.layer2[0].conv2)] == [(2, 1, 1), (1, 1, 1)]
    assert [conv_geometry(r18.layer3[0].conv1), conv_geometry(r18.layer3[0].conv2)] == [(1, 1, 1), (1, 2, 2)]
    assert [conv_geometry(r18.layer3[1].conv1), conv_geometry(r18.layer3[1].conv2)] == [(1, 2, 2), (1, 2, 2)]
    assert [conv_geometry(r18.layer4[0].conv1), conv_geometry(r18.layer4[0].conv2)] == [(1, 2, 2), (1, 4, 4)]
    assert [conv_geometry(r18.layer4[1].conv1), conv_geometry(r18.layer4[1].conv2)] == [(1, 4, 4), (1, 4, 4)]
    assert conv_geometry(r18.layer1[0].downsample[0]) == (1, 1, 0)
    r50 = on_meta(build_cirkd, "deeplabv3_resnet50", 19).pretrained
    assert [conv_geometry(r50.layer3[i].conv2)[1] for i in range(6)] == [1, 2, 2, 2, 2, 2]
    assert [conv_geometry(r50.layer4[i].conv2)[1] for i in range(3)] == [2, 4, 4]
    assert conv_geometry(r50.layer2[0].conv2) == (2, 1, 1)
    assert conv_geometry(r50.layer2[0].conv1)[0] == 1


@pytest.mark.parametrize("replace, layer3, layer4", [
    ((False, True, True), [(1, 1), (1, 2)], [(1, 2), (2, 4)]),
    ((False, False, True), [(2, 1), (1, 1)], [(1, 1), (1, 2)]),
])
def test_torchvision_resnet_dilation_uses_the_previous_dilation_in_the_first_block(replace, layer3, layer4):
    model = on_meta(torchvision_resnet, 18, replace_stride_with_dilation=replace)
    for layer, expected in ((model.layer3, layer3), (model.layer4, layer4)):
        first, second = layer[0], layer[1]
        assert (first.conv1.stride[0], first.conv1.dilation[0]) == expected[0]
        assert (first.conv2.dilation[0], second.conv1.dilation[0]) == expected[1]


@pytest.mark.parametrize("output_stride, plan", [
    (8, {2: (2, 1), 4: (2, 1), 6: (1, 1), 7: (1, 1), 8: (1, 2), 13: (1, 2), 14: (1, 2), 15: (1, 4), 17: (1, 4)}),
    (16, {7: (2, 1), 13: (1, 1), 14: (1, 1), 15: (1, 2), 17: (1, 2)}),
])
@pytest.mark.parametrize("build", [
    lambda os: build_cirkd("deeplabv3_mobilenetv2", 19, output_stride=os).pretrained.net,
    lambda os: torchvision_mobilenet_v2(output_stride=os),
])
def test_mobilenet_dilation_table(build, output_stride, plan):
    features = on_meta(build, output_stride).features
    for index, (stride, dilation) in plan.items():
        depthwise = [m for m in features[index].modules()
                     if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(depthwise) == 1
        assert conv_geometry(depthwise[0]) == (stride, dilation, dilation), index
    residual = [i for i in range(1, 18) if features[i].use_residual]
    assert residual == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]


@pytest.fixture(scope="module")
def image():
    return torch.randn((2, 3, 33, 41), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name, feature_channels, stage_channels", [
    ("deeplabv3_resnet18", 128, (64, 128, 256, 512)),
    ("pspnet_resnet18", 128, (64, 128, 256, 512)),
    ("deeplabv3_mobilenetv2", 128, (24, 32, 96, 320)),
    ("pspnet_mobilenetv2", 128, (24, 32, 96, 320)),
])
def test_cirkd_outputs_at_output_stride_8(image, name, feature_channels, stage_channels):
    model = randomize(build_cirkd(name, 19, layout="paper"), seed=1)
    with torch.no_grad():
        outputs = model(image)
        stages = model.forward_all(image)
    # 33×41: ceil(33/8) × ceil(41/8) = 5 × 6 for everything past c1, which is at stride 4: 9 × 11.
    if name.endswith("mobilenetv2"):
        assert [tuple(o.shape) for o in outputs] == [(2, 19, 5, 6), (2, feature_channels, 5, 6)]
    else:
        assert [tuple(o.shape) for o in outputs] == [(2, 19, 5, 6), (2, 19, 5, 6), (2, feature_channels, 5, 6)]
    sizes = [(9, 11), (5, 6), (5, 6), (5, 6)]
    for key, channels, size in zip(("c1", "c2", "c3", "c4"), stage_channels, sizes):
        assert tuple(stages[key].shape) == (2, channels, *size)
    assert torch.equal(outputs[0], stages["logits"])
    assert torch.equal(outputs[-1], stages["feature"])
    # Measured-then-perturbed BN statistics keep activations of order one rather than exploding.
    assert all(bool(torch.isfinite(o).all()) and float(o.abs().max()) < 1e3 for o in outputs)


@pytest.mark.parametrize("height, width", [(297, 329), (512, 1024)])
def test_output_size_is_ceil_of_an_eighth(height, width):
    model = on_meta(build_cirkd, "deeplabv3_resnet18", 19).eval()
    logits = model(torch.empty((1, 3, height, width), device="meta"))[0]
    assert tuple(logits.shape[2:]) == (math.ceil(height / 8), math.ceil(width / 8))


@pytest.mark.parametrize("build, stage_sizes, out_shape", [
    (lambda: torchvision_resnet(18, (False, True, True)), [(9, 11), (5, 6), (5, 6), (5, 6)], (2, 1000)),
    (lambda: torchvision_resnet(50, (False, False, True)), [(9, 11), (5, 6), (3, 3), (3, 3)], (2, 1000)),
    (lambda: torchvision_resnet(18), [(9, 11), (5, 6), (3, 3), (2, 2)], (2, 1000)),
    (lambda: torchvision_mobilenet_v2(output_stride=8), [(9, 11), (5, 6), (5, 6), (5, 6)], (2, 1000)),
    (lambda: torchvision_mobilenet_v2(), [(9, 11), (5, 6), (3, 3), (2, 2)], (2, 1000)),
])
def test_torchvision_stage_sizes(build, stage_sizes, out_shape):
    model = on_meta(build).eval()
    x = torch.empty((2, 3, 33, 41), device="meta")
    assert [tuple(s.shape[2:]) for s in model.forward_stages(x)] == stage_sizes
    assert tuple(model(x).shape) == out_shape


@pytest.mark.parametrize("build", [
    lambda: build_cirkd("pspnet_mobilenetv2", 19),
    lambda: torchvision_mobilenet_v2(width_mult=0.5),
])
def test_randomize_draws_every_tensor_reproducibly(build):
    fresh = build()
    defaults = {k: v.clone() for k, v in fresh.state_dict().items()}
    first = randomize(fresh, seed=3)
    assert not first.training
    second = randomize(build(), seed=3).state_dict()
    other = randomize(build(), seed=4).state_dict()
    for key, value in first.state_dict().items():
        assert torch.equal(value, second[key]), key
        if key.endswith("num_batches_tracked"):
            continue
        assert not torch.equal(value, defaults[key]), key
        assert not torch.equal(value, other[key]), key
        if key.endswith("running_var"):
            assert bool((value > 0).all()), key


@pytest.mark.parametrize("call, argument", [
    (lambda: build_cirkd("fcn_resnet18"), "name"),
    (lambda: build_cirkd("deeplabv3_resnet34"), "name"),
    (lambda: build_cirkd("deeplabv3_resnet18", layout="v2"), "layout"),
    (lambda: build_cirkd("deeplabv3_mobilenetv2", aux=True), "aux"),
    (lambda: build_cirkd("deeplabv3_resnet18", output_stride=4), "output_stride"),
    (lambda: torchvision_resnet(18, (True, True, True)), "replace_stride_with_dilation"),
    (lambda: torchvision_mobilenet_v2(output_stride=12), "output_stride"),
])
def test_bad_arguments_raise_value_error_naming_them(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
