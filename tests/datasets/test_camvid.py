"""CamVid builder on its fake SegNet-layout data."""

from __future__ import annotations

import numpy as np
import pytest

from kdjax.data import builders, errors
from tests.datasets import builder_testing

module = builders.builder_module("camvid")
DUMMY = builder_testing.dummy_data("camvid")


class CamvidBuilderTest(builder_testing.SegmentationBuilderTestCase):
    DATASET_CLASS = module.Builder
    SPLITS = {"train": 3, "validation": 2, "test": 1}

    def check_examples(self, builder):
        for split, folder in (("train", "train"), ("validation", "val"), ("test", "test")):
            for name, example in builder_testing.read_examples(builder, split).items():
                image_file = DUMMY / folder / name
                self.assertEqual(example["image"], image_file.read_bytes())
                expected = builder_testing.png_values(DUMMY / f"{folder}annot" / name)
                np.testing.assert_array_equal(example["label"][:, :, 0], expected)
        train = builder_testing.read_examples(builder, "train")
        names = ["fake_006690.png", "fake_006720.png", "fake_006750.png"]
        self.assertEqual(sorted(train), names)
        stored = np.concatenate([e["label"].ravel() for e in train.values()])
        self.assertEqual(set(np.unique(stored)), set(range(12)))  # raw values, void 11 kept


def test_read_pairs_strips_the_segnet_prefix():
    pairs = module.read_pairs(DUMMY, "val.txt")
    assert [(p.image, p.label) for p in pairs] == [
        (DUMMY / "val" / "fake_006780.png", DUMMY / "valannot" / "fake_006780.png"),
        (DUMMY / "val" / "fake_006810.png", DUMMY / "valannot" / "fake_006810.png"),
    ]


def test_read_pairs_names_a_malformed_line(tmp_path):
    (tmp_path / "train.txt").write_text("train/a.png trainannot/a.png\ntrain/b.png\n")
    with pytest.raises(errors.DataError, match=r"train\.txt, line 2"):
        module.read_pairs(tmp_path, "train.txt")
