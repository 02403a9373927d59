"""VOC 2012 + SBD builder on fake VOCdevkit and benchmark_RELEASE layouts (both configs)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from kdjax.data import builders, errors
from tests.datasets import builder_testing

module = builders.builder_module("voc_aug")
DUMMY = builder_testing.dummy_data("voc_aug")
VOC = DUMMY / "VOCdevkit" / "VOC2012"
SBD = DUMMY / "benchmark_RELEASE" / "dataset"
IDS = {key: f"2008_{n:06d}" for n, key in enumerate("abcdef", start=1)}  # see make_fake_data.py


def sbd_values(image_id: str) -> np.ndarray:
    return scipy.io.loadmat(SBD / "cls" / f"{image_id}.mat")["GTcls"][0, 0]["Segmentation"]


def voc_values(image_id: str) -> np.ndarray:
    return builder_testing.png_values(VOC / "SegmentationClass" / f"{image_id}.png")


def check_validation(test, builder):
    validation = builder_testing.read_examples(builder, "validation")
    test.assertEqual(sorted(validation), [f"{IDS[k]}.jpg" for k in "cd"])
    for key in "cd":
        label = validation[f"{IDS[key]}.jpg"]["label"][:, :, 0]
        np.testing.assert_array_equal(label, voc_values(IDS[key]))
        test.assertEqual(set(np.unique(label)), {0, 15, 20, 255})  # palette indices, not colours


class VocAugBuilderTest(builder_testing.SegmentationBuilderTestCase):
    DATASET_CLASS = module.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["aug"]
    SPLITS = {"train": 4, "validation": 2}

    def check_examples(self, builder):
        train = builder_testing.read_examples(builder, "train")
        self.assertEqual(sorted(train), [f"{IDS[k]}.jpg" for k in "abef"])
        for key in "ab":  # in VOC train: the VOC PNG wins over SBD
            np.testing.assert_array_equal(train[f"{IDS[key]}.jpg"]["label"][:, :, 0], voc_values(IDS[key]))
        for key in "ef":  # SBD only
            np.testing.assert_array_equal(train[f"{IDS[key]}.jpg"]["label"][:, :, 0], sbd_values(IDS[key]))
        image = train[f"{IDS['e']}.jpg"]["image"]
        self.assertEqual(image, (VOC / "JPEGImages" / f"{IDS['e']}.jpg").read_bytes())
        check_validation(self, builder)


class VocPlainBuilderTest(builder_testing.SegmentationBuilderTestCase):
    DATASET_CLASS = module.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["plain"]
    SPLITS = {"train": 2, "validation": 2}

    def check_examples(self, builder):
        train = builder_testing.read_examples(builder, "train")
        self.assertEqual(sorted(train), [f"{IDS[k]}.jpg" for k in "ab"])
        check_validation(self, builder)


def test_aug_train_takes_each_label_from_the_right_source():
    pairs = module.aug_train_pairs(VOC, SBD)
    assert [(p.image.name, p.label) for p in pairs] == [
        ("2008_000001.jpg", VOC / "SegmentationClass" / "2008_000001.png"),
        ("2008_000002.jpg", VOC / "SegmentationClass" / "2008_000002.png"),
        ("2008_000005.jpg", SBD / "cls" / "2008_000005.mat"),
        ("2008_000006.jpg", SBD / "cls" / "2008_000006.mat"),
    ]
    assert [p.read_label for p in pairs] == [module._common.read_png_label] * 2 + [module.read_sbd_label] * 2


def test_sbd_label_rejects_a_mat_file_without_gtcls(tmp_path):
    path = tmp_path / "2008_000005.mat"
    scipy.io.savemat(path, {"other": np.zeros((2, 2))})
    with pytest.raises(errors.CorruptExampleError, match=rf"GTcls\.Segmentation from {path}"):
        module.read_sbd_label(path)
