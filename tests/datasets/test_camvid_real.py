"""The CamVid builder on the real SegNet copy in ../shared/data/camvid (skipped when absent).

The images stay there (their licence forbids copying them into the repository).
"""

from __future__ import annotations

import numpy as np
import pytest

from kdjax.data import builders
from tests.datasets import builder_testing

CAMVID = builder_testing.SHARED_DATA / "camvid"
pytestmark = pytest.mark.skipif(not (CAMVID / "train.txt").is_file(), reason="shared CamVid absent")


def test_reads_real_files_through_the_builder_readers():
    module = builders.builder_module("camvid")
    pairs = module.read_pairs(CAMVID, "val.txt")
    assert len(pairs) == 101
    assert pairs[-1].image == CAMVID / "val" / "0016E5_08159.png"
    examples = list(module._common.generate_examples(pairs[:3], "png"))
    for (name, example), pair in zip(examples, pairs[:3]):
        assert name == example["file_name"] == pair.image.name
        assert example["image"] == pair.image.read_bytes()  # RGB PNG kept as it is
        assert example["label"].shape == (360, 480, 1)
        np.testing.assert_array_equal(example["label"][:, :, 0], builder_testing.png_values(pair.label))
        assert example["label"].max() <= 11


def test_builds_the_real_train_and_val_splits(tmp_path):
    builder = builders.prepare("camvid", data_dir=tmp_path, manual_dir=CAMVID)
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert splits == {"train": 367, "validation": 101}  # no test.txt there: no test split
    for split in splits:
        values = set()
        for example in builder.as_dataset(split=split).as_numpy_iterator():
            assert example["image"].shape == (360, 480, 3)
            values |= set(np.unique(example["label"]))
        assert values == set(range(12)), split  # the 11 classes and void
