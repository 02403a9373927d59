"""Pascal Context builder on fake VOC 2010 + trainval/*.mat data (both configs)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from kdjax.data import builders, errors, metadata
from tests.datasets import builder_testing

module = builders.builder_module("pascal_context")
DUMMY = builder_testing.dummy_data("pascal_context")
# The fake .mat files hold 459-class ids 0 (unlabeled), 2 (aeroplane), 100 (not among the 59)
# and 458 (wood); stored: background 0, aeroplane 1, background 0, wood 59.
STORED = {0: 0, 2: 1, 100: 0, 458: 59}


def check_context_examples(test, builder):
    for split, ids in (("train", ["2008_000002", "2008_000003", "2008_000007"]),
                       ("validation", ["2008_000009", "2008_000016"])):
        examples = builder_testing.read_examples(builder, split)
        test.assertEqual(sorted(examples), [f"{i}.jpg" for i in ids])
        for image_id in ids:
            source = scipy.io.loadmat(DUMMY / "trainval" / f"{image_id}.mat")["LabelMap"]
            expected = np.vectorize(STORED.__getitem__)(source)
            np.testing.assert_array_equal(examples[f"{image_id}.jpg"]["label"][:, :, 0], expected)


class PascalContext59BuilderTest(builder_testing.SegmentationBuilderTestCase):
    DATASET_CLASS = module.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["59"]
    SPLITS = {"train": 3, "validation": 2}

    def check_examples(self, builder):
        check_context_examples(self, builder)


class PascalContext60BuilderTest(builder_testing.SegmentationBuilderTestCase):
    DATASET_CLASS = module.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["60"]
    SPLITS = {"train": 3, "validation": 2}

    def check_examples(self, builder):
        check_context_examples(self, builder)


def test_class_ids_line_up_with_the_class_names():
    assert len(module.CLASS_IDS) == len(metadata.PASCAL_CONTEXT_CLASSES) == 59
    assert list(module.CLASS_IDS) == sorted(set(module.CLASS_IDS))
    names = dict(zip(module.CLASS_IDS, metadata.PASCAL_CONTEXT_CLASSES))
    assert (names[2], names[284], names[458]) == ("aeroplane", "person", "wood")


def test_context_label_rejects_ids_beyond_459(tmp_path):
    path = tmp_path / "2008_000002.mat"
    scipy.io.savemat(path, {"LabelMap": np.array([[1, 460]], np.uint16)})
    with pytest.raises(errors.CorruptExampleError, match=r"2008_000002\.mat.*0\.\.459"):
        module.read_context_label(path)
