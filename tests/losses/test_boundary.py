import jax
import numpy as np
import pytest

from kdjax.losses._common import nearest_resize_labels
from kdjax.losses.boundary import BpkdParts, boundary_regions, bpkd, bpkd_parts, class_regions
from kdjax.losses.channel_wise import channel_wise_divergence
from kdjax.losses.pixel_kd import pixel_kd
from tests.losses.contract import (LossCase, LossContract, assert_matches_reference, call, grads,
                                   to_jax)
from tests.references import boundary_ref

CLASSES = 4


def make_blocks(rng, batch, size, classes=CLASSES, cells=(2, 2)):
    """A (batch, *size) map of cells[0]×cells[1] blocks of one random class each."""
    coarse = rng.integers(0, classes, (batch, *cells))
    rows = np.arange(size[0]) * cells[0] // size[0]
    cols = np.arange(size[1]) * cells[1] // size[1]
    return coarse[:, rows][:, :, cols]


def make_labels(rng, batch, label_size=(12, 16), classes=CLASSES, cells=(2, 2)):
    """Blocks of one class each (so that both regions are populated), with scattered ignored
    pixels: 255, CIRKD's −1 and a label >= K."""
    labels = make_blocks(rng, batch, label_size, classes, cells)
    odd = rng.random(labels.shape)
    labels[odd < 0.06] = 255
    labels[(odd >= 0.06) & (odd < 0.08)] = -1
    labels[(odd >= 0.08) & (odd < 0.1)] = classes + 2
    return labels


def make_inputs(rng, batch, size=(6, 8), label_size=(12, 16), classes=CLASSES):
    shape = (batch, *size, classes)
    # A confident teacher whose arg-max is blocky too, so that edge_source='teacher' gives both
    # regions.
    blocks = make_blocks(rng, batch, size, classes, cells=(2, 3))
    return {
        "student_logits": rng.normal(0, 2, shape),
        "teacher_logits": rng.normal(0, 1.5, shape) + 4.0 * np.eye(classes)[blocks],
        "labels": make_labels(rng, batch, label_size, classes),
        "mask": rng.random(shape[:3]) > 0.2,
    }


def same_teacher(inputs):
    return {**inputs, "teacher_logits": inputs["student_logits"].copy()}


LOGITS = ("student_logits",)
TEACHER = ("teacher_logits",)


class TestBpkdPartsContract(LossContract):
    case = LossCase(loss=bpkd_parts, make_inputs=make_inputs, student=LOGITS, teacher=TEACHER,
                    options={"num_classes": CLASSES}, identical=same_teacher, outputs=2)


class TestBpkdVariantContract(LossContract):
    case = LossCase(loss=bpkd, make_inputs=make_inputs, student=LOGITS, teacher=TEACHER,
                    options={"num_classes": CLASSES, "width": 2, "edge_tau": 2.0,
                             "ignore_borders": True, "edge_reduction": "class_mean",
                             "body_masking": "zero"},
                    identical=same_teacher)


# --------------------------------------------------------------------------------------------------
# Against the float64 reference.

REFERENCE_CASES = [
    {},
    {"width": 2},
    {"width": 0},
    {"ignore_borders": True},
    {"edge_reduction": "class_mean"},
    {"body_masking": "zero"},
    {"edge_source": "teacher"},
    {"edge_source": "teacher", "edge_reduction": "class_mean", "width": 2},
    {"edge_tau": 2.0, "body_tau": 1.0, "ignore_label": 2},
    {"ignore_borders": True, "body_masking": "zero", "edge_reduction": "class_mean"},
]


@pytest.mark.parametrize("options", REFERENCE_CASES, ids=lambda o: ",".join(map(str, o.items())))
@pytest.mark.parametrize("masked", [False, True])
def test_parts_match_reference(options, masked):
    inputs = make_inputs(np.random.default_rng(1), 2)
    if masked:
        inputs["mask"][1] = False  # an image without any pixel of either region
    else:
        inputs.pop("mask")
    assert_matches_reference(bpkd_parts, boundary_ref.bpkd_parts, inputs, LOGITS,
                             num_classes=CLASSES, **options)


@pytest.mark.parametrize("label_size", [(6, 8), (13, 19)])
def test_weighted_sum_matches_reference(label_size):
    inputs = make_inputs(np.random.default_rng(2), 2, label_size=label_size)
    assert_matches_reference(bpkd, boundary_ref.bpkd, inputs, LOGITS, num_classes=CLASSES,
                             edge_weight=2.5, body_weight=0.5)


@pytest.mark.parametrize("width", [0, 1, 2, 3])
@pytest.mark.parametrize("ignore_borders", [False, True])
@pytest.mark.parametrize("num_classes", [None, CLASSES])
def test_regions_match_reference(width, ignore_borders, num_classes):
    labels = make_labels(np.random.default_rng(3), 3, (13, 17), cells=(3, 4))
    options = {"width": width, "ignore_borders": ignore_borders, "num_classes": num_classes}
    got = boundary_regions(labels, (9, 11), **options)
    want = boundary_ref.boundary_regions(labels, (9, 11), **options)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)


# --------------------------------------------------------------------------------------------------
# Hand-drawn regions.

def draw(*rows):
    """A (1, H, W) map from strings: a digit is a class, '.' the ignore label 255."""
    return np.array([[255 if ch == "." else int(ch) for ch in row] for row in rows])[None]


def regions(labels, **options):
    edge, body = boundary_regions(labels, labels.shape[1:], **options)
    return np.asarray(edge[0]).astype(int), np.asarray(body[0]).astype(int)


def test_two_classes_side_by_side():
    labels = draw("000111", "000111", "000111", "000111")
    edge, body = regions(labels, width=1)
    np.testing.assert_array_equal(edge, draw(*["001100"] * 4)[0])
    np.testing.assert_array_equal(body, draw(*["110011"] * 4)[0])
    edge, body = regions(labels, width=2)
    np.testing.assert_array_equal(edge, draw(*["011110"] * 4)[0])
    np.testing.assert_array_equal(body, draw(*["100001"] * 4)[0])
    edge, _ = regions(labels, width=3)
    assert edge.all()


def test_a_single_pixel_object():
    labels = draw("0000000", "0000000", "0000000", "0001000", "0000000", "0000000", "0000000")
    edge, body = regions(labels, width=1)
    np.testing.assert_array_equal(edge, draw("0000000", "0000000", "0011100", "0011100",
                                             "0011100", "0000000", "0000000")[0])
    np.testing.assert_array_equal(body, 1 - edge)
    edge, body = regions(labels, width=2)
    np.testing.assert_array_equal(edge, draw("0000000", "0111110", "0111110", "0111110",
                                             "0111110", "0111110", "0000000")[0])
    np.testing.assert_array_equal(body, 1 - edge)


def test_a_diagonal_boundary_uses_the_square_window():
    labels = draw("0001", "0011", "0111", "1111")
    edge, _ = regions(labels, width=1)
    # Diagonal neighbours count: (0, 1) touches the 1 at (1, 2).
    np.testing.assert_array_equal(edge, draw("0111", "1111", "1110", "1100")[0])


def test_ignored_pixels_are_unknown_by_default():
    labels = draw(*["000.111"] * 3)
    edge, body = regions(labels, width=1)
    assert not edge.any()
    np.testing.assert_array_equal(body, draw(*["1110111"] * 3)[0])
    # Two pixels away, the classes see each other across the ignored column.
    edge, body = regions(labels, width=2)
    np.testing.assert_array_equal(edge, draw(*["0010100"] * 3)[0])
    np.testing.assert_array_equal(body, draw(*["1100011"] * 3)[0])


def test_ignored_pixels_draw_edges_with_ignore_borders():
    labels = draw(*["000.111"] * 3)
    edge, body = regions(labels, width=1, ignore_borders=True)
    np.testing.assert_array_equal(edge, draw(*["0010100"] * 3)[0])
    np.testing.assert_array_equal(body, draw(*["1100011"] * 3)[0])
    # A void blob inside one class: only the ring around it becomes edge.
    labels = draw("00000", "00000", "00.00", "00000", "00000")
    edge, body = regions(labels, width=1, ignore_borders=True)
    np.testing.assert_array_equal(edge, draw("00000", "01110", "01010", "01110", "00000")[0])
    assert body.sum() == 16
    edge, _ = regions(labels, width=1)
    assert not edge.any()


def test_one_class_or_no_label_gives_no_edge():
    edge, body = regions(draw("222", "222"), width=2)
    assert not edge.any() and body.all()
    edge, body = regions(draw("...", "..."), width=1, ignore_borders=True)
    assert not edge.any() and not body.any()


def test_labels_out_of_range_follow_num_classes():
    labels = draw(*["0007"] * 2)
    edge, body = regions(labels, width=1, num_classes=4)  # 7 is no class: ignored
    assert not edge.any()
    np.testing.assert_array_equal(body, draw(*["1110"] * 2)[0])
    edge, _ = regions(labels, width=1)  # any label >= 0 other than the ignore label is a class
    np.testing.assert_array_equal(edge, draw(*["0011"] * 2)[0])
    edge, body = regions(np.array([[[0, 0, -1]]]), width=1)  # negative labels are never a class
    assert not edge.any() and body.sum() == 2


def test_labels_are_resized_to_the_logits_first():
    labels = make_labels(np.random.default_rng(4), 2, (25, 31), cells=(3, 3))
    for size in [(7, 9), (25, 31), (50, 10)]:
        small = np.asarray(nearest_resize_labels(labels, *size))
        got = boundary_regions(labels, size, width=1)
        want = boundary_regions(small, size, width=1)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_regions_run_under_jit_and_vmap():
    labels = make_labels(np.random.default_rng(5), 2, (12, 16))
    stacked = np.stack([labels, labels[::-1]])
    fn = jax.jit(jax.vmap(lambda lab: boundary_regions(lab, (6, 8), width=1, num_classes=CLASSES)))
    edges, bodies = fn(stacked)
    for i in range(2):
        edge, body = boundary_regions(stacked[i], (6, 8), width=1, num_classes=CLASSES)
        np.testing.assert_array_equal(np.asarray(edges[i]), np.asarray(edge))
        np.testing.assert_array_equal(np.asarray(bodies[i]), np.asarray(body))


# --------------------------------------------------------------------------------------------------
# Properties of the loss.

def arrays(seed=0, masked=False, **kwargs):
    inputs = make_inputs(np.random.default_rng(seed), 2, **kwargs)
    if not masked:
        inputs.pop("mask")
    return to_jax(inputs)


VARIANTS = [{}, {"edge_reduction": "class_mean", "body_masking": "zero", "ignore_borders": True},
            {"edge_source": "teacher", "width": 2}]


@pytest.mark.parametrize("options", VARIANTS)
def test_parts_are_non_negative(options):
    for seed in range(3):
        edge, body = call(LossCase(bpkd_parts, None, LOGITS, TEACHER,
                                   options={"num_classes": CLASSES, **options}), arrays(seed))
        assert float(edge) >= 0 and float(body) >= 0 and float(edge) + float(body) > 0


def test_parts_read_only_their_own_region():
    a = arrays(6)
    edge, body = boundary_regions(a["labels"], (6, 8), num_classes=CLASSES)
    edge, body = np.asarray(edge)[..., None], np.asarray(body)[..., None]
    assert edge.any() and body.any()
    rng = np.random.default_rng(7)
    noise = {k: rng.normal(0, 5, a[k].shape).astype(np.float32) for k in LOGITS + TEACHER}
    for masking in ("exclude", "zero"):
        base = bpkd_parts(**a, num_classes=CLASSES, body_masking=masking)
        # Logits changed everywhere but on the edges: the edge part stays.
        off_edge = {**a, **{k: a[k] + np.where(edge, 0, noise[k]) for k in noise}}
        moved = bpkd_parts(**off_edge, num_classes=CLASSES, body_masking=masking)
        np.testing.assert_allclose(float(moved.edge), float(base.edge), rtol=1e-6)
        assert abs(float(moved.body) - float(base.body)) > 1e-3
        # Logits changed everywhere but in the body: the body part stays.
        off_body = {**a, **{k: a[k] + np.where(body, 0, noise[k]) for k in noise}}
        moved = bpkd_parts(**off_body, num_classes=CLASSES, body_masking=masking)
        np.testing.assert_allclose(float(moved.body), float(base.body), rtol=1e-6)
        assert abs(float(moved.edge) - float(base.edge)) > 1e-3


def test_student_gradient_stays_in_its_region():
    a = arrays(8)
    edge, body = (np.asarray(r)[..., None] for r in
                  boundary_regions(a["labels"], (6, 8), num_classes=CLASSES))
    for part, region in (("edge", edge), ("body", body)):
        case = LossCase(lambda part=part, **kw: getattr(bpkd_parts(**kw), part), None, LOGITS,
                        TEACHER, options={"num_classes": CLASSES})
        g = np.asarray(grads(case, a, LOGITS)["student_logits"])
        assert np.all(g[~np.broadcast_to(region, g.shape)] == 0)
        assert np.any(g != 0)


def test_parts_are_pixel_kd_and_cwd_on_their_regions():
    a = arrays(9, masked=True)
    options = {"edge_tau": 2.0, "body_tau": 3.0, "width": 1}
    parts = bpkd_parts(**a, num_classes=CLASSES, **options)
    edge, body = boundary_regions(a["labels"], (6, 8), num_classes=CLASSES)
    edge, body = edge & a["mask"], body & a["mask"]
    s, t = a["student_logits"], a["teacher_logits"]
    np.testing.assert_allclose(float(parts.edge), float(pixel_kd(s, t, temperature=2.0, mask=edge)),
                               rtol=1e-6)
    np.testing.assert_allclose(float(parts.body),
                               float(channel_wise_divergence(s, t, tau=3.0, mask=body)), rtol=1e-6)
    total = bpkd(**a, num_classes=CLASSES, edge_weight=0.7, body_weight=1.9, **options)
    np.testing.assert_allclose(float(total), 0.7 * float(parts.edge) + 1.9 * float(parts.body),
                               rtol=1e-6)
    assert isinstance(parts, BpkdParts)


def test_width_zero_is_cwd_on_the_labelled_pixels():
    a = arrays(10)
    parts = bpkd_parts(**a, num_classes=CLASSES, width=0)
    valid = np.asarray(nearest_resize_labels(a["labels"], 6, 8))
    valid = (valid >= 0) & (valid < CLASSES)
    assert float(parts.edge) == 0.0
    want = channel_wise_divergence(a["student_logits"], a["teacher_logits"], tau=4.0, mask=valid)
    np.testing.assert_allclose(float(parts.body), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(bpkd(**a, num_classes=CLASSES, width=0)), 3.0 * float(want),
                               rtol=1e-6)


def test_teacher_source_equals_labels_when_the_teacher_predicts_them():
    a = arrays(11)
    labels = np.asarray(a["labels"])
    # The teacher's arg-max is the label wherever there is one (at the logits' size).
    small = np.asarray(nearest_resize_labels(labels, 6, 8))
    onehot = np.eye(CLASSES)[np.clip(small, 0, CLASSES - 1)] * 6.0
    teacher = to_jax({"t": np.asarray(a["teacher_logits"]) * 0.1 + onehot})["t"]
    inputs = {**a, "teacher_logits": teacher}
    for reduction in ("pixel_mean", "class_mean"):
        by_labels = bpkd_parts(**inputs, num_classes=CLASSES, edge_reduction=reduction)
        by_teacher = bpkd_parts(**inputs, num_classes=CLASSES, edge_reduction=reduction,
                                edge_source="teacher")
        for g, w in zip(by_teacher, by_labels, strict=True):
            np.testing.assert_allclose(float(g), float(w), rtol=1e-6)


def test_regions_of_one_class_leave_the_edge_part_zero():
    a = arrays(12)
    flat = {**a, "labels": to_jax({"l": np.full((2, 12, 16), 3)})["l"]}
    parts = bpkd_parts(**flat, num_classes=CLASSES, width=2)
    assert float(parts.edge) == 0.0 and float(parts.body) > 0


def test_class_regions_takes_any_class_map():
    classes = np.array([[[0, 0, 5, 5], [0, 0, 5, 5]]])
    valid = np.array([[[True, True, True, False], [True, True, True, True]]])
    edge, body = class_regions(classes, valid, width=1)
    np.testing.assert_array_equal(np.asarray(edge[0]), [[0, 1, 1, 0], [0, 1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(body[0]), [[1, 0, 0, 0], [1, 0, 0, 1]])


# --------------------------------------------------------------------------------------------------
# Errors.

def test_bad_input_raises():
    a = arrays(0, masked=True)
    s, t, labels, mask = a["student_logits"], a["teacher_logits"], a["labels"], a["mask"]
    k = {"num_classes": CLASSES}
    with pytest.raises(ValueError, match=r"student_logits and teacher_logits must have the same"):
        bpkd(s, t[..., :3], labels, **k)
    with pytest.raises(ValueError, match="student_logits must have rank 4"):
        bpkd(s[0], t[0], labels, **k)
    with pytest.raises(ValueError, match=r"labels must have rank 3.*\(2, 12, 16, 1\)"):
        bpkd(s, t, labels[..., None], **k)
    with pytest.raises(ValueError, match=r"labels and student_logits must have the same batch"):
        bpkd(s, t, labels[:1], **k)
    with pytest.raises(ValueError, match="labels must be an integer"):
        bpkd(s, t, labels.astype(np.float32), **k)
    with pytest.raises(ValueError, match=r"num_classes \(5\) must equal the logits' class axis"):
        bpkd(s, t, labels, num_classes=5)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        bpkd(s, t, labels, num_classes=0)
    with pytest.raises(ValueError, match="mask"):
        bpkd(s, t, labels, **k, mask=mask[:, :3])
    for name, value, match in [("width", -1, "width must be an int >= 0"),
                               ("width", 1.5, "width must be an int >= 0"),
                               ("width", True, "width must be an int >= 0"),
                               ("edge_tau", 0.0, "edge_tau must be positive"),
                               ("body_tau", -2.0, "body_tau must be positive"),
                               ("edge_weight", -1.0, "edge_weight must be a non-negative"),
                               ("body_weight", "3", "body_weight must be a non-negative"),
                               ("edge_source", "prediction", "edge_source must be one of"),
                               ("edge_reduction", "sum", "edge_reduction must be one of"),
                               ("body_masking", "drop", "body_masking must be one of"),
                               ("ignore_borders", "yes", "ignore_borders must be one of")]:
        with pytest.raises(ValueError, match=match):
            bpkd(s, t, labels, **k, **{name: value})


def test_bad_region_arguments_raise():
    labels = draw("0011")
    with pytest.raises(ValueError, match=r"size must be a pair of positive ints"):
        boundary_regions(labels, (0, 4))
    with pytest.raises(ValueError, match=r"size must be a pair of positive ints"):
        boundary_regions(labels, 4)
    with pytest.raises(ValueError, match="labels must have rank 3"):
        boundary_regions(labels[0], (1, 4))
    with pytest.raises(ValueError, match="labels must be an integer"):
        boundary_regions(labels.astype(float), (1, 4))
    with pytest.raises(ValueError, match="width must be an int >= 0"):
        boundary_regions(labels, (1, 4), width=-1)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        boundary_regions(labels, (1, 4), num_classes=0)
