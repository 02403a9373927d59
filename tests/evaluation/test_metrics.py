"""Confusion matrix and segmentation metrics against NumPy references and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.evaluation import ConfusionAccumulator, confusion_matrix, segmentation_metrics
from tests.evaluation import MESH_AXIS_TYPES, batch_sharding


def _confusion_reference(predictions, labels, num_classes, ignore_label, weights=None):
    """Counts by an explicit loop over pixels."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    for n in range(labels.shape[0]):
        if weights is not None and not weights[n]:
            continue
        for truth, predicted in zip(labels[n].ravel(), predictions[n].ravel()):
            if truth != ignore_label and 0 <= truth < num_classes:
                counts[truth, predicted] += 1
    return counts


def _random_batch(seed, n=4, h=5, w=6, k=4, ignore_label=255):
    rng = np.random.default_rng(seed)
    predictions = rng.integers(0, k, (n, h, w)).astype(np.int32)
    # Labels: classes, the ignore label and out-of-range values (-1, K, 300).
    labels = rng.choice(np.array([0, 1, 2, 3, ignore_label, -1, k, 300]), (n, h, w))
    return predictions, labels.astype(np.int32)


@pytest.mark.parametrize("ignore_label", [255, 0])
def test_confusion_matches_loop_reference_with_ignore_and_out_of_range(ignore_label):
    predictions, labels = _random_batch(0, ignore_label=ignore_label)
    got = confusion_matrix(jnp.asarray(predictions), jnp.asarray(labels), num_classes=4,
                           ignore_label=ignore_label)
    assert got.dtype == jnp.int32 and got.shape == (4, 4)
    expected = _confusion_reference(predictions, labels, 4, ignore_label)
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert expected.sum() > 0


def test_confusion_weights_drop_filler_examples():
    predictions, labels = _random_batch(1)
    weights = np.array([True, False, True, False])
    got = jax.jit(lambda p, l, w: confusion_matrix(p, l, num_classes=4, weights=w))(
        predictions, labels, weights)
    np.testing.assert_array_equal(
        np.asarray(got), _confusion_reference(predictions, labels, 4, 255, weights))
    only_real = confusion_matrix(jnp.asarray(predictions[weights]), jnp.asarray(labels[weights]),
                                 num_classes=4)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(only_real))


@pytest.mark.parametrize("axis_type", MESH_AXIS_TYPES)
def test_confusion_sharded_over_eight_devices_equals_single_device(axis_type):
    predictions, labels = _random_batch(2, n=8)
    weights = np.arange(8) % 3 != 0
    sharding = batch_sharding(axis_type)
    sharded = [jax.device_put(x, sharding) for x in (predictions, labels, weights)]
    fn = jax.jit(lambda p, l, w: confusion_matrix(p, l, num_classes=4, weights=w))
    got = fn(*sharded)
    assert got.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(got), np.asarray(fn(predictions, labels, weights)))
    np.testing.assert_array_equal(
        np.asarray(got), _confusion_reference(predictions, labels, 4, 255, weights))


def test_confusion_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="predictions and labels"):
        confusion_matrix(jnp.zeros((1, 2, 3), int), jnp.zeros((1, 3, 2), int), num_classes=2)
    with pytest.raises(ValueError, match="weights"):
        confusion_matrix(jnp.zeros((2, 2, 2), int), jnp.zeros((2, 2, 2), int), num_classes=2,
                         weights=jnp.ones((3,), bool))


# Rows = ground truth, columns = prediction. Class 0: TP 3, GT 4, predicted 3 → IoU 3/4.
# Class 1: TP 2, GT 2, predicted 3 → IoU 2/3. Class 2: never seen → NaN (or 0).
# Class 3: only predicted (once), never in the ground truth → IoU 0/1 = 0, counted in both rules.
HAND_CONFUSION = np.array([[3, 1, 0, 0],
                           [0, 2, 0, 0],
                           [0, 0, 0, 0],
                           [0, 0, 0, 0]])
HAND_CONFUSION_WITH_FALSE_POSITIVE = HAND_CONFUSION + np.array([[0, 0, 0, 0],
                                                                [0, 0, 0, 1],
                                                                [0, 0, 0, 0],
                                                                [0, 0, 0, 0]])


def test_metrics_hand_example_absent_class_nan():
    m = segmentation_metrics(HAND_CONFUSION)
    np.testing.assert_allclose(m.per_class_iou[:2], [0.75, 2 / 3])
    assert np.isnan(m.per_class_iou[2]) and np.isnan(m.per_class_iou[3])
    assert math.isclose(m.miou, (0.75 + 2 / 3) / 2)
    assert math.isclose(m.pixel_accuracy, 5 / 6)
    assert math.isclose(m.mean_class_accuracy, (3 / 4 + 1) / 2)


def test_metrics_hand_example_absent_class_zero_as_cirkd():
    m = segmentation_metrics(HAND_CONFUSION, absent="zero")
    np.testing.assert_allclose(m.per_class_iou, [0.75, 2 / 3, 0.0, 0.0])
    assert math.isclose(m.miou, (0.75 + 2 / 3) / 4)
    assert math.isclose(m.pixel_accuracy, 5 / 6)


def test_metrics_class_only_predicted_counts_as_zero():
    m = segmentation_metrics(HAND_CONFUSION_WITH_FALSE_POSITIVE)
    # Class 1: TP 2, GT 3, predicted 3 → 2/4; class 3: TP 0, union 1 → 0.
    np.testing.assert_allclose(m.per_class_iou[[0, 1, 3]], [0.75, 0.5, 0.0])
    assert np.isnan(m.per_class_iou[2])
    assert math.isclose(m.miou, (0.75 + 0.5 + 0.0) / 3)
    assert math.isclose(m.mean_class_accuracy, (3 / 4 + 2 / 3) / 2)


def test_metrics_to_dict_in_percent_with_null_for_absent():
    d = segmentation_metrics(HAND_CONFUSION).to_dict(["a", "b", "c", "d"])
    assert d["per_class_iou"] == {"a": 75.0, "b": pytest.approx(200 / 3), "c": None, "d": None}
    assert d["miou"] == pytest.approx(100 * (0.75 + 2 / 3) / 2)
    assert d["pixel_accuracy"] == pytest.approx(500 / 6)
    with pytest.raises(ValueError, match="class_names"):
        segmentation_metrics(HAND_CONFUSION).to_dict(["a"])


def test_metrics_reject_empty_confusion_and_unknown_rule():
    with pytest.raises(ValueError, match="no labelled pixel"):
        segmentation_metrics(np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="absent"):
        segmentation_metrics(HAND_CONFUSION, absent="eps")


def test_accumulator_sums_in_int64_past_int32_range():
    accumulator = ConfusionAccumulator(2)
    big = jnp.array([[2**31 - 1, 0], [0, 1]], jnp.int32)
    for _ in range(3):
        accumulator.add(big)
    expected = np.array([[3 * (2**31 - 1), 0], [0, 3]], np.int64)
    np.testing.assert_array_equal(accumulator.confusion, expected)
    assert accumulator.confusion.dtype == np.int64
    assert accumulator.metrics().pixel_accuracy == 1.0
    with pytest.raises(ValueError, match="shape"):
        accumulator.add(jnp.zeros((3, 3), jnp.int32))
