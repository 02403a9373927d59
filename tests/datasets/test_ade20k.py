"""ADE20K builder on its fake ADEChallengeData2016 layout and on the real-format sample."""

from __future__ import annotations

import numpy as np
import pytest

from kdjax.data import builders
from tests.datasets import builder_testing

module = builders.builder_module("ade20k")
DUMMY = builder_testing.dummy_data("ade20k") / "ADEChallengeData2016"
SAMPLE = builder_testing.SAMPLES / "ade20k" / "ADEChallengeData2016"


class Ade20kBuilderTest(builder_testing.SegmentationBuilderTestCase):
    DATASET_CLASS = module.Builder
    SPLITS = {"train": 3, "validation": 2}

    def check_examples(self, builder):
        for split, folder in (("train", "training"), ("validation", "validation")):
            for name, example in builder_testing.read_examples(builder, split).items():
                # JPEG bytes are stored as they are, not re-encoded.
                self.assertEqual(example["image"], (DUMMY / "images" / folder / name).read_bytes())
                label = DUMMY / "annotations" / folder / name.replace(".jpg", ".png")
                np.testing.assert_array_equal(example["label"][:, :, 0], builder_testing.png_values(label))
        validation = builder_testing.read_examples(builder, "validation")
        self.assertEqual(sorted(validation), ["ADE_val_00000001.jpg", "ADE_val_00000002.jpg"])
        stored = np.concatenate([e["label"].ravel() for e in validation.values()])
        self.assertEqual(set(np.unique(stored)), {0, 1, 75, 150})  # raw: 0 is not reduced here


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared ADE20K sample absent")
def test_reads_the_real_samples():
    pairs = module.read_pairs(SAMPLE, "validation")
    assert [p.image.name for p in pairs] == [f"ADE_val_0000000{i}.jpg" for i in (1, 2, 3)]
    examples = dict(module._common.generate_examples(pairs, "jpeg"))
    first = examples["ADE_val_00000001.jpg"]
    assert first["image"] == pairs[0].image.read_bytes()
    assert first["label"].shape == (512, 683, 1)
    assert set(np.unique(first["label"])) == {0, 1, 2, 3, 5, 7, 10, 18}
    for example in examples.values():
        assert example["label"].max() <= 150
