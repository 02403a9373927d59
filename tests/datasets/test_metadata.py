"""kdjax.data.metadata: the registry and each dataset's label map, names and palette."""

from __future__ import annotations

import numpy as np
import pytest

from kdjax.data import metadata
from tests.datasets import builder_testing

ALL_VALUES = np.arange(256, dtype=np.uint8)
KITTI_LABEL_IDS = builder_testing.SAMPLES / "cityscapes_labelids_kitti"
ADE_OBJECT_INFO = builder_testing.SAMPLES / "ade20k" / "objectInfo150.txt"
BUILT_IN = ("ade20k", "camvid", "cityscapes", "pascal_context_59", "pascal_context_60", "voc_aug")


def test_cityscapes_maps_34_label_ids_to_19_train_ids():
    mapped = metadata.dataset_info("cityscapes").map_labels(ALL_VALUES)
    assert mapped[7] == 0  # road
    assert mapped[26] == 13  # car
    assert mapped[33] == 18  # bicycle
    assert list(mapped[:7]) == [255] * 7  # unlabeled, ego vehicle, ..., ground
    assert mapped[255] == 255  # license plate (-1) as stored in uint8
    used = mapped[:34]
    assert sorted(used[used != 255]) == list(range(19))
    assert list(np.flatnonzero(used != 255)) == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24,
                                                 25, 26, 27, 28, 31, 32, 33]
    # Values no Cityscapes label uses are flagged, not silently ignored.
    assert set(mapped[34:255]) == {metadata.UNKNOWN_VALUE}


@pytest.mark.skipif(not KITTI_LABEL_IDS.is_dir(), reason="shared KITTI label-id samples absent")
def test_cityscapes_mapping_yields_all_19_classes_on_real_label_ids():
    info = metadata.dataset_info("cityscapes")
    found = set()
    for path in sorted(KITTI_LABEL_IDS.glob("*.png")):
        found |= set(np.unique(info.map_labels(builder_testing.png_values(path))))
    assert found == {*range(19), 255}


def test_ade20k_reduces_the_zero_label():
    mapped = metadata.dataset_info("ade20k").map_labels(ALL_VALUES)
    assert (mapped[0], mapped[1], mapped[150], mapped[255]) == (255, 0, 149, 255)
    np.testing.assert_array_equal(mapped[1:255], np.arange(254))


@pytest.mark.skipif(not ADE_OBJECT_INFO.is_file(), reason="shared ADE20K sample absent")
def test_ade20k_class_names_follow_object_info():
    rows = ADE_OBJECT_INFO.read_text().splitlines()[1:]
    first_names = tuple(row.split("\t")[4].split(",")[0].strip() for row in rows)
    assert metadata.ADE20K.class_names == first_names


def test_camvid_void_is_ignored():
    info = metadata.dataset_info("camvid")
    mapped = info.map_labels(np.array([[0, 5, 10, 11, 12]], np.uint8))
    np.testing.assert_array_equal(mapped, [[0, 5, 10, 255, metadata.UNKNOWN_VALUE]])
    assert info.class_names[0] == "Sky" and info.class_names[10] == "Bicyclist"


def test_voc_labels_are_train_ids_with_255_kept():
    info = metadata.dataset_info("voc_aug")
    labels = np.array([0, 15, 20, 255], np.uint8)
    np.testing.assert_array_equal(info.map_labels(labels), labels)
    assert info.class_names[15] == "person"
    np.testing.assert_array_equal(info.palette[15], [192, 128, 128])


def test_pascal_context_59_ignores_background_and_60_keeps_it():
    assert metadata.dataset_info("pascal_context") is metadata.PASCAL_CONTEXT_59
    stored = np.array([0, 1, 59], np.uint8)
    np.testing.assert_array_equal(metadata.dataset_info("pascal_context_59").map_labels(stored), [255, 0, 58])
    np.testing.assert_array_equal(metadata.dataset_info("pascal_context_60").map_labels(stored), [0, 1, 59])
    assert metadata.PASCAL_CONTEXT_60.class_names[0] == "background"
    assert metadata.PASCAL_CONTEXT_60.class_names[1:] == metadata.PASCAL_CONTEXT_59.class_names


@pytest.mark.parametrize("name, num_classes, tfds_name", [
    ("cityscapes", 19, "cityscapes"), ("camvid", 11, "camvid"), ("voc_aug", 21, "voc_aug/aug"),
    ("ade20k", 150, "ade20k"), ("pascal_context_59", 59, "pascal_context/59"),
    ("pascal_context_60", 60, "pascal_context/60"),
])
def test_each_dataset_has_names_and_distinct_colours(name, num_classes, tfds_name):
    info = metadata.dataset_info(name)
    assert (info.name, info.num_classes, info.tfds_name) == (name, num_classes, tfds_name)
    assert info.palette.shape == (num_classes, 3) and info.palette.dtype == np.uint8
    assert len({tuple(c) for c in info.palette}) == num_classes
    assert len(set(info.class_names)) == num_classes
    assert info.ignore_label == 255
    assert info.splits["train"] == "train" and info.splits["val"] == "validation"


def test_bit_palette_is_the_voc_colour_map():
    first_four = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    np.testing.assert_array_equal(metadata.bit_palette(4), first_four)
    np.testing.assert_array_equal(metadata.bit_palette(1, first=20), [[0, 64, 128]])  # tvmonitor


def test_map_labels_wants_uint8():
    with pytest.raises(ValueError, match="camvid: labels must be uint8, got int32"):
        metadata.CAMVID.map_labels(np.zeros(3, np.int32))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'kitti'; known datasets: ade20k, camvid"):
        metadata.dataset_info("kitti")
    names = metadata.dataset_names()
    assert set(BUILT_IN) | {"pascal_context", "synthetic"} <= set(names)


def test_register_dataset_info(monkeypatch):
    monkeypatch.setattr(metadata, "_REGISTRY", dict(metadata._REGISTRY))
    extra = metadata.DatasetInfo(name="extra", class_names=("a", "b"), palette=metadata.bit_palette(2))
    metadata.register_dataset_info(extra)
    metadata.register_dataset_info(extra)  # the same object again is fine
    assert metadata.dataset_info("extra") is extra
    clash = metadata.DatasetInfo(name="camvid", class_names=("a",), palette=metadata.bit_palette(1))
    with pytest.raises(ValueError, match="dataset 'camvid' is already registered"):
        metadata.register_dataset_info(clash)
