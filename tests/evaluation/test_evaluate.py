"""The evaluation loop: padded batches with filler examples, model state, sharded batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.evaluation import EvalMode, evaluate, segmentation_metrics
from tests.evaluation import MESH_AXIS_TYPES, batch_sharding

K = 3
IGNORE = 255
MIX = np.random.default_rng(0).standard_normal((3, K)).astype(np.float32)


def per_pixel_logits(state, images):
    return jnp.einsum("nhwc,ck->nhwk", images, state["mix"])


def _batch(seed, valid, h=6, w=7, real_size=(4, 5)):
    """An eval batch: images zero-padded beyond ``real_size``, labels ignore-padded there."""
    rng = np.random.default_rng(seed)
    b = len(valid)
    images = np.zeros((b, h, w, 3), np.float32)
    images[:, :real_size[0], :real_size[1]] = rng.standard_normal((b, *real_size, 3))
    labels = np.full((b, h, w), IGNORE, np.int32)
    labels[:, :real_size[0], :real_size[1]] = rng.integers(0, K, (b, *real_size))
    return {"image": images, "label": labels, "valid": np.asarray(valid),
            "height": np.full((b,), real_size[0], np.int32),
            "width": np.full((b,), real_size[1], np.int32)}


def _only_real(batch):
    return {key: value[batch["valid"]] for key, value in batch.items()}


def _reference_confusion(batches):
    """np.add.at over real, labelled pixels; the per-pixel model predicts argmax(image @ MIX)."""
    confusion = np.zeros((K, K), np.int64)
    for batch in batches:
        real = batch["valid"]
        labels = batch["label"][real]
        predictions = np.argmax(batch["image"][real] @ MIX, axis=-1)
        keep = labels != IGNORE
        np.add.at(confusion, (labels[keep], predictions[keep]), 1)
    return confusion


def test_filler_examples_count_for_nothing():
    batches = [_batch(1, [True, True, True]), _batch(2, [True, False, False])]
    state = {"mix": jnp.asarray(MIX)}
    metrics, confusion = evaluate(per_pixel_logits, batches, state=state, num_classes=K,
                                  ignore_label=IGNORE)
    _, real_only = evaluate(per_pixel_logits, [_only_real(b) for b in batches], state=state,
                            num_classes=K, ignore_label=IGNORE)
    expected = _reference_confusion(batches)
    assert confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, expected)
    np.testing.assert_array_equal(real_only, expected)
    assert expected.sum() == 4 * 4 * 5  # four real images of 4x5 labelled pixels
    assert metrics.miou == segmentation_metrics(expected).miou


def test_closure_model_unjitted_and_whole_vs_slide_agree():
    batches = [_batch(3, [True, True]), _batch(4, [False, True])]
    closure = lambda images: per_pixel_logits({"mix": jnp.asarray(MIX)}, images)  # noqa: E731
    expected = _reference_confusion(batches)
    for mode in (EvalMode(), EvalMode("slide", crop_size=(4, 4), stride=(3, 3))):
        _, confusion = evaluate(closure, batches, num_classes=K, ignore_label=IGNORE,
                                eval_mode=mode, jit=False)
        np.testing.assert_array_equal(confusion, expected)


@pytest.mark.parametrize("axis_type", MESH_AXIS_TYPES)
def test_batches_sharded_over_eight_devices(axis_type):
    batch = _batch(5, [True] * 6 + [False] * 2)
    sharding = batch_sharding(axis_type)
    sharded = {key: jax.device_put(value, sharding) for key, value in batch.items()}
    _, confusion = evaluate(per_pixel_logits, [sharded], state={"mix": jnp.asarray(MIX)},
                            num_classes=K, ignore_label=IGNORE,
                            eval_mode=EvalMode("slide", crop_size=(4, 4), stride=(3, 3)))
    np.testing.assert_array_equal(confusion, _reference_confusion([batch]))


def test_empty_eval_set_is_reported():
    with pytest.raises(ValueError, match="no labelled pixel"):
        evaluate(per_pixel_logits, [], state={"mix": jnp.asarray(MIX)}, num_classes=K)
