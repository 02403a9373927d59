"""Label mapping: stored values → train ids, and what happens to values outside the classes."""

import logging

import numpy as np
import pytest

from kdjax.data import LabelOutOfRangeError, make_eval_iterator, make_train_iterator
from tests.data import plain_config, source_of, tiny_info

IMAGE = np.full((4, 6, 3), 100, np.uint8)


def one_batch(label, info, **overrides):
    source = source_of(train=[("a.png", IMAGE, label)], info=info)
    iterator = make_train_iterator(plain_config(crop=(4, 6), **overrides), global_batch_size=1, seed=0,
                                   process_index=0, process_count=1, source=source)
    return next(iterator), iterator


def test_the_label_map_turns_stored_values_into_train_ids():
    label_map = np.full(256, 255)
    label_map[[10, 20, 30]] = [0, 1, 2]
    stored = np.array([[10, 20, 30, 255, 10, 77]] * 4, np.uint8)  # 77 is void in this map
    batch, _ = one_batch(stored, tiny_info(3, label_map))
    np.testing.assert_array_equal(batch["label"][0], np.array([[0, 1, 2, 255, 0, 255]] * 4))
    assert batch["label"].dtype == np.int32


def test_without_a_label_map_stored_values_are_train_ids():
    stored = np.array([[0, 1, 2, 255, 1, 0]] * 4, np.uint8)
    batch, _ = one_batch(stored, tiny_info(3))
    np.testing.assert_array_equal(batch["label"][0], stored)


@pytest.mark.parametrize("label_map", [None, np.array([0, 1, 2, 99] + [255] * 252)])
def test_a_value_outside_the_classes_is_an_error_naming_file_and_values(label_map):
    stored = np.array([[0, 1, 3, 3, 9, 255]] * 4, np.uint8)  # 3 → 99 under the map; 9 → 255 only under it
    with pytest.raises(LabelOutOfRangeError, match=r"a\.png: label values \[3( 9)?\] are neither"):
        one_batch(stored, tiny_info(3, label_map))


def test_out_of_range_values_can_be_mapped_to_ignore_and_counted(caplog):
    stored = np.array([[0, 1, 2, 7, 7, 1]] * 4, np.uint8)
    with caplog.at_level(logging.WARNING):
        batch, iterator = one_batch(stored, tiny_info(3), out_of_range_labels="ignore")
    np.testing.assert_array_equal(batch["label"][0], np.array([[0, 1, 2, 255, 255, 1]] * 4))
    assert iterator.stats.out_of_range_pixels == 8
    assert iterator.stats.examples_with_out_of_range == 1
    assert "ignore label" in caplog.text


def test_evaluation_maps_labels_the_same_way():
    label_map = np.full(256, 255)
    label_map[[10, 20]] = [0, 1]
    source = source_of(val=[("v.png", IMAGE, np.array([[10, 20, 5, 10, 20, 5]] * 4, np.uint8))],
                       info=tiny_info(2, label_map))
    batch = next(make_eval_iterator(plain_config(), global_batch_size=1, process_index=0, process_count=1,
                                    source=source))
    np.testing.assert_array_equal(batch["label"][0], np.array([[0, 1, 255, 0, 1, 255]] * 4))


def test_a_value_no_dataset_label_uses_is_reported_for_the_registered_maps():
    from kdjax.data import dataset_info
    stored = np.array([[0, 3, 11, 12, 10, 0]] * 4, np.uint8)  # CamVid: 11 is void, 12 is unused
    with pytest.raises(LabelOutOfRangeError, match=r"a\.png: label values \[12\] are neither"):
        one_batch(stored, dataset_info("camvid"))
