"""Whole / sliding-window / multi-scale / flip inference against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.evaluation import EvalMode, infer_probabilities, predict_classes
from kdjax.evaluation.inference import window_starts
from tests.evaluation import MESH_AXIS_TYPES, batch_sharding

K = 3
_RNG = np.random.default_rng(0)
MIX = _RNG.standard_normal((3, K))  # per-pixel colour → class logits
RAMP = np.array([-0.2, 0.05, 0.3])  # logit slope along the width: breaks translation and flip


def make_logits_fn(xp, subsample=1, position=False):
    """A toy model: keep every ``subsample``-th pixel (a fake low-resolution head), mix colours
    into K logits per pixel and, with ``position``, add a ramp over the column index (so the
    output depends on where a pixel sits inside the array it is given)."""

    def logits_fn(images):
        x = images[:, ::subsample, ::subsample]
        logits = xp.einsum("nhwc,ck->nhwk", x, xp.asarray(MIX, x.dtype))
        if position:
            logits = logits + xp.arange(x.shape[2])[:, None] * xp.asarray(RAMP, x.dtype)
        return logits

    return logits_fn


# --- NumPy reference --------------------------------------------------------------------------

def _align_corners_matrix(n_in, n_out):
    """(n_out, n_in) interpolation weights: output i samples input i·(n_in − 1)/(n_out − 1)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (src - lo)
        m[i, hi] += src - lo
    return m


def _resize(x, h, w):
    return np.einsum("ih,jw,nhwc->nijc", _align_corners_matrix(x.shape[1], h),
                     _align_corners_matrix(x.shape[2], w), x)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _view_probabilities(logits_fn, x):
    return _softmax(_resize(logits_fn(x), *x.shape[1:3]))


def _mmseg_starts(size, crop, stride):
    """Window starts as mmsegmentation's slide_inference computes them."""
    grids = max(size - crop + stride - 1, 0) // stride + 1
    starts = []
    for i in range(grids):
        end = min(i * stride + crop, size)
        starts.append(max(end - crop, 0))
    return starts


def _slide_probabilities(logits_fn, x, crop, stride):
    n, h, w, c = x.shape
    ch, cw = max(h, crop[0]), max(w, crop[1])
    canvas = np.zeros((n, ch, cw, c))
    canvas[:, :h, :w] = x
    total = np.zeros((n, ch, cw, K))
    count = np.zeros((ch, cw))
    for y in _mmseg_starts(ch, crop[0], stride[0]):
        for x0 in _mmseg_starts(cw, crop[1], stride[1]):
            window = canvas[:, y:y + crop[0], x0:x0 + crop[1]]
            total[:, y:y + crop[0], x0:x0 + crop[1]] += _view_probabilities(logits_fn, window)
            count[y:y + crop[0], x0:x0 + crop[1]] += 1
    return (total / count[None, :, :, None])[:, :h, :w]


def _reference(logits_fn, images, mode: EvalMode):
    n, h, w, _ = images.shape
    total, views = 0.0, 0
    for scale in mode.scales:
        scaled = _resize(images, int(h * scale + 0.5), int(w * scale + 0.5))
        for flip in ((False, True) if mode.flip else (False,)):
            view = scaled[:, :, ::-1] if flip else scaled
            if mode.mode == "slide":
                probs = _slide_probabilities(logits_fn, view, mode.crop_size, mode.stride)
            else:
                probs = _view_probabilities(logits_fn, view)
            if flip:
                probs = probs[:, :, ::-1]
            total, views = total + _resize(probs, h, w), views + 1
    return total / views


def _images(seed, n=2, h=11, w=13):
    return np.random.default_rng(seed).standard_normal((n, h, w, 3)).astype(np.float32)


def _infer(mode, images, subsample=1, position=False):
    return np.asarray(infer_probabilities(make_logits_fn(jnp, subsample, position),
                                          jnp.asarray(images), eval_mode=mode, num_classes=K))


# --- window placement -------------------------------------------------------------------------

def test_window_starts_known_values():
    assert window_starts(1024, 512, 341) == (0, 341, 512)
    assert window_starts(2048, 1024, 682) == (0, 682, 1024)
    assert window_starts(512, 512, 341) == (0,)


@pytest.mark.parametrize("size,crop,stride", [(13, 6, 4), (11, 5, 5), (11, 5, 1), (9, 9, 3),
                                              (40, 7, 6)])
def test_windows_cover_every_pixel_and_end_at_the_border(size, crop, stride):
    starts = window_starts(size, crop, stride)
    assert list(starts) == _mmseg_starts(size, crop, stride)
    covered = np.zeros(size, int)
    for s in starts:
        covered[s:s + crop] += 1
    assert covered.min() >= 1
    assert starts[-1] + crop == size and starts[0] == 0


# --- modes against the reference --------------------------------------------------------------

@pytest.mark.parametrize("crop,stride", [((5, 6), (3, 4)), ((16, 6), (16, 5))])
def test_slide_equals_whole_for_a_per_pixel_model(crop, stride):
    # (16, 6) is taller than the 11-row image: the padded-canvas path.
    images = _images(1)
    whole = _infer(EvalMode(), images)
    slide = _infer(EvalMode("slide", crop_size=crop, stride=stride), images)
    np.testing.assert_allclose(slide, whole, atol=1e-6)
    np.testing.assert_allclose(whole, _reference(make_logits_fn(np), images, EvalMode()),
                               atol=1e-5)


def test_slide_averages_overlapping_windows_like_the_reference():
    images = _images(2)
    mode = EvalMode("slide", crop_size=(6, 8), stride=(4, 3))
    got = _infer(mode, images, subsample=2, position=True)
    expected = _reference(make_logits_fn(np, 2, True), images, mode)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # The model depends on the window, so slide must differ from whole here.
    assert np.abs(got - _infer(EvalMode(), images, subsample=2, position=True)).max() > 1e-2


def test_multi_scale_and_flip_match_the_reference():
    images = _images(3)
    for mode in (EvalMode(scales=(0.5, 1.0, 1.5), flip=True),
                 EvalMode("slide", crop_size=(7, 7), stride=(5, 5), scales=(0.75, 1.25),
                          flip=True)):
        got = _infer(mode, images, subsample=2, position=True)
        np.testing.assert_allclose(got, _reference(make_logits_fn(np, 2, True), images, mode),
                                   atol=1e-5)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_flip_changes_nothing_for_a_flip_equivariant_model_only():
    images = _images(4)
    np.testing.assert_allclose(_infer(EvalMode(flip=True), images), _infer(EvalMode(), images),
                               atol=1e-6)
    flipped = _infer(EvalMode(flip=True), images, position=True)
    assert np.abs(flipped - _infer(EvalMode(), images, position=True)).max() > 1e-2


def test_repeated_unit_scale_equals_single_scale():
    images = _images(5)
    np.testing.assert_allclose(_infer(EvalMode(scales=(1.0, 1.0)), images, 2, True),
                               _infer(EvalMode(scales=(1.0,)), images, 2, True), atol=1e-6)


@pytest.mark.parametrize("axis_type", MESH_AXIS_TYPES)
def test_jit_and_sharded_batch_give_the_eager_result(axis_type):
    images = _images(6, n=8, h=9, w=10)
    mode = EvalMode("slide", crop_size=(6, 6), stride=(4, 4), scales=(0.5, 1.0), flip=True)
    fn = jax.jit(lambda x: infer_probabilities(make_logits_fn(jnp, 2, True), x, eval_mode=mode,
                                               num_classes=K))
    sharding = batch_sharding(axis_type)
    eager = _infer(mode, images, 2, True)
    np.testing.assert_allclose(np.asarray(fn(images)), eager, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fn(jax.device_put(images, sharding))), eager, atol=1e-6)


def test_predict_classes_is_the_argmax():
    images = _images(7)
    classes = predict_classes(make_logits_fn(jnp), jnp.asarray(images), eval_mode=EvalMode(),
                              num_classes=K)
    assert classes.dtype == jnp.int32 and classes.shape == images.shape[:3]
    np.testing.assert_array_equal(np.asarray(classes), np.argmax(images @ MIX, axis=-1))


def test_logits_with_wrong_class_count_are_rejected():
    with pytest.raises(ValueError, match="logits_fn must return"):
        infer_probabilities(make_logits_fn(jnp), jnp.asarray(_images(8)), eval_mode=EvalMode(),
                            num_classes=K + 1)


# --- EvalMode ---------------------------------------------------------------------------------

def test_eval_mode_describe_and_to_dict():
    slide = EvalMode("slide", crop_size=[512, 1024], stride=[341, 682],
                     scales=[0.5, 0.75, 1, 1.25, 1.5, 1.75], flip=True)
    assert slide.describe() == ("slide 512x1024 stride 341x682, "
                                "scales 0.5/0.75/1.0/1.25/1.5/1.75, flip")
    assert slide.to_dict() == {"mode": "slide", "crop_size": [512, 1024], "stride": [341, 682],
                               "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "flip": True}
    assert EvalMode().describe() == "whole, scale 1.0"
    # Lists from a config are normalised, so equal modes hash equally (a jit static argument).
    assert hash(slide) == hash(EvalMode("slide", (512, 1024), (341, 682),
                                        (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True))


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="tiles"), "mode must be"),
    (dict(mode="slide"), "needs crop_size"),
    (dict(mode="slide", crop_size=(4, 4), stride=(5, 2)), "must not exceed"),
    (dict(crop_size=(4, 4)), "takes no crop_size"),
    (dict(scales=()), "scales"),
    (dict(scales=(1.0, -0.5)), "scales"),
    (dict(mode="slide", crop_size=(4, 0), stride=(1, 1)), "crop_size"),
])
def test_eval_mode_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalMode(**kwargs)
