"""Augmentation geometry (image and label stay aligned), padding, photometric distortion, normalisation."""

import numpy as np
import pytest
import tensorflow as tf

from kdjax.data import augment, make_train_iterator
from tests.data import CORNERS, block_examples, plain_config, source_of


def pixel_classes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For float (..., 3) pixels: the class whose corner colour they show exactly, and where they do."""
    distance = np.abs(images[..., None, :] - CORNERS.astype(np.float32)).max(-1)
    return distance.argmin(-1), distance.min(-1) < 0.5


def train_batches(config, source, count, batch_size=6, seed=1):
    iterator = make_train_iterator(config, global_batch_size=batch_size, seed=seed, process_index=0,
                                   process_count=1, source=source)
    return [next(iterator) for _ in range(count)]


def test_image_and_label_stay_aligned_under_scale_crop_and_flip():
    source = source_of(train=block_examples(6, 24, 32, block=4))
    config = plain_config(crop=(20, 28), scale_range=(0.5, 2.0), flip=True)
    for batch in train_batches(config, source, 4):
        from_pixels, pure = pixel_classes(batch["image"])
        checked = pure & (batch["label"] != 255)
        assert checked.mean() > 0.3
        np.testing.assert_array_equal(batch["label"][checked], from_pixels[checked])
        # The check is sensitive: a label off by one block disagrees with the pixels.
        shifted = np.roll(batch["label"], 4, axis=2)
        assert (shifted[checked] != from_pixels[checked]).mean() > 0.3


def test_padding_is_black_in_the_image_and_ignore_in_the_label():
    source = source_of(train=block_examples(6, 12, 12, block=3))
    config = plain_config(crop=(40, 36), scale_range=(0.5, 2.0), flip=True)
    for batch in train_batches(config, source, 3):
        padded = batch["label"] == 255
        assert padded.any()
        np.testing.assert_array_equal(padded, (batch["image"] == 0).all(-1))
        for real in ~padded:
            rows, cols = real.any(1), real.any(0)
            assert rows[0] and not np.diff(rows.astype(int)).clip(0).any()  # padding only below
            assert rows.sum() * cols.sum() == real.sum()  # the real part is one rectangle


def test_a_flip_mirrors_image_and_label_together():
    image = tf.constant(np.arange(4 * 5 * 3).reshape(4, 5, 3) % 251, tf.uint8)
    label = tf.constant(np.arange(20).reshape(4, 5), tf.int32)
    settings = augment.TrainAugmentation((4, 5), (1.0, 1.0), None, None, flip=True, photometric=False,
                                         ignore_label=255)
    flipped = 0
    for i in range(12):
        out_image, out_label, valid = augment.scale_crop_flip(image, label, tf.constant([i, 0], tf.int64), settings)
        assert bool(tf.reduce_all(valid))
        mirrored = bool(out_label[0, 0] == 4)
        flipped += mirrored
        expected = (image[:, ::-1], label[:, ::-1]) if mirrored else (image, label)
        np.testing.assert_allclose(out_image, tf.cast(expected[0], tf.float32), atol=0.01)
        np.testing.assert_array_equal(out_label, expected[1])
    assert 0 < flipped < 12


@pytest.mark.parametrize("scale_step, base_size, expected_heights", [
    (0.5, None, {5, 10, 15, 20}),  # 10-pixel image × {0.5, 1, 1.5, 2}
    (0.5, 20, {10, 20, 30, 40}),  # short side 10 → base size 20 × {0.5, 1, 1.5, 2}
])
def test_scales_follow_scale_step_and_base_size(scale_step, base_size, expected_heights):
    image = tf.ones([10, 16, 3], tf.uint8)
    label = tf.zeros([10, 16], tf.int32)
    settings = augment.TrainAugmentation((48, 48), (0.5, 2.0), scale_step, base_size, flip=False,
                                         photometric=False, ignore_label=255)
    heights = set()
    for i in range(40):
        _, _, valid = augment.scale_crop_flip(image, label, tf.constant([i, 1], tf.int64), settings)
        heights.add(int(tf.reduce_sum(tf.cast(valid[:, 0], tf.int32))))
    assert heights == expected_heights


def test_photometric_distortion_changes_colours_but_not_labels_or_padding():
    source = source_of(train=block_examples(6, 12, 12, block=3))
    plain, distorted = (train_batches(plain_config(crop=(16, 16), scale_range=(0.5, 2.0), photometric=p),
                                      source, 1)[0] for p in (False, True))
    np.testing.assert_array_equal(plain["label"], distorted["label"])
    assert not np.allclose(plain["image"], distorted["image"])
    assert (distorted["image"][distorted["label"] == 255] == 0).all()
    assert distorted["image"].min() >= 0 and distorted["image"].max() <= 255


def test_normalizations_and_their_inverse():
    rgb = np.array([[10.0, 20.0, 30.0]], np.float32)
    np.testing.assert_allclose(augment.normalize(rgb, "cirkd_bgr"),
                               [[30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434]], rtol=1e-6)
    np.testing.assert_allclose(augment.normalize(rgb, "imagenet"),
                               (rgb - augment.IMAGENET_MEAN) / augment.IMAGENET_STD, rtol=1e-6)
    for mode in augment.NORMALIZATIONS:
        np.testing.assert_array_equal(augment.denormalize(np.asarray(augment.normalize(rgb, mode)), mode), rgb)
    with pytest.raises(ValueError, match="normalization"):
        augment.normalize(rgb, "bgr")
