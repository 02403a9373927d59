"""Bad input is named in the error: corrupt files, size mismatches, empty splits, bad settings."""

import numpy as np
import pytest

from kdjax.config.data_defaults import default_data_config
from kdjax.data import (CorruptExampleError, DataError, EmptySplitError, ImageTooLargeError, SizeMismatchError,
                        make_eval_iterator, make_train_iterator)
from tests.data import numbered_examples, plain_config, png, source_of

GOOD = numbered_examples(5)
IMAGE, LABEL = GOOD[0][1], GOOD[0][2]


def train_pass(examples, *, global_batch_size=5, **overrides):
    """Reads one epoch of ``examples`` (in any order) through the training pipeline."""
    iterator = make_train_iterator(plain_config(**overrides), global_batch_size=global_batch_size, seed=0,
                                   process_index=0, process_count=1, source=source_of(train=examples))
    return next(iterator)


def with_bad(name, image, label):
    return GOOD[:2] + [(name, image, label)] + GOOD[2:]


@pytest.mark.parametrize("image, label, match", [
    (b"not an image at all", LABEL, r"bad\.png: the image is not a PNG or JPEG"),
    (IMAGE, b"\x00\x01garbage", r"bad\.png: the label is not a PNG or JPEG"),
    (png(IMAGE)[:60], LABEL, r"bad\.png: the image could not be decoded"),  # truncated, valid header
    (IMAGE, png(LABEL)[:40], r"bad\.png: the label could not be decoded"),
])
def test_a_corrupt_file_is_named(image, label, match):
    with pytest.raises(CorruptExampleError, match=match):
        train_pass(with_bad("bad.png", image, label))


def test_a_corrupt_file_is_named_in_evaluation_too():
    source = source_of(val=with_bad("bad.png", png(IMAGE)[:60], LABEL))
    with pytest.raises(CorruptExampleError, match=r"bad\.png"):
        list(make_eval_iterator(plain_config(), global_batch_size=2, process_index=0, process_count=1,
                                source=source))


def test_an_image_label_size_mismatch_is_named_with_both_sizes():
    with pytest.raises(SizeMismatchError, match=r"odd\.png: the image is \[6 8\] .* its label is \[5 8\]"):
        train_pass(with_bad("odd.png", IMAGE, LABEL[:5]))


def test_a_multichannel_label_is_rejected():
    with pytest.raises(SizeMismatchError, match=r"rgb\.png: the label has 3 channels"):
        train_pass(with_bad("rgb.png", IMAGE, np.zeros_like(IMAGE)))


def test_empty_splits_are_errors():
    source = source_of(train=GOOD[:2], val=[])
    with pytest.raises(EmptySplitError, match="'val'.* no examples"):
        make_eval_iterator(plain_config(), global_batch_size=2, process_index=0, process_count=1, source=source)
    with pytest.raises(EmptySplitError, match="fewer than the 4 processes"):
        make_train_iterator(plain_config(), global_batch_size=4, seed=0, process_index=0, process_count=4,
                            source=source)


def test_an_image_larger_than_the_eval_pad_size_is_named():
    source = source_of(val=GOOD[:1] + [("big.png", np.zeros((9, 8, 3), np.uint8), np.zeros((9, 8), np.uint8))])
    with pytest.raises(ImageTooLargeError, match=r"big\.png: the image is 9x8 .* padded to 6x8"):
        list(make_eval_iterator(plain_config(eval_pad_size=(6, 8)), global_batch_size=2, process_index=0,
                                process_count=1, source=source))


@pytest.mark.parametrize("overrides, match", [
    ({"normalization": "bgr"}, "normalization"),
    ({"out_of_range_labels": "drop"}, "out_of_range_labels"),
    ({"crop_size": (0, 8)}, "crop_size"),
    ({"scale_range": (2.0, 0.5)}, "scale_range"),
])
def test_bad_settings_are_named(overrides, match):
    with pytest.raises(DataError, match=match):
        train_pass(GOOD, **overrides)


def test_the_batch_size_must_split_evenly_over_processes():
    with pytest.raises(DataError, match="multiple of the process count 2"):
        make_train_iterator(plain_config(), global_batch_size=3, seed=0, process_index=0, process_count=2,
                            source=source_of(train=GOOD))


def test_an_unknown_dataset_name_is_named():
    config = default_data_config()
    config.name = "no_such_dataset"
    with pytest.raises(DataError, match="no_such_dataset"):
        make_train_iterator(config, global_batch_size=1, seed=0, process_index=0, process_count=1)
