"""Cityscapes builder: fake extracted layout, the same files as official zips, TFDS's dummy zips
and the real-format sample frame."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest

from kdjax.data import builders, metadata
from tests.datasets import builder_testing

module = builders.builder_module("cityscapes")
DUMMY = builder_testing.dummy_data("cityscapes")
TRAIN_FRAMES = ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"]
TFDS_ZIPS = builder_testing.SAMPLES / "tfds_dummy_layouts" / "cityscapes"
SAMPLE = builder_testing.SAMPLES / "cityscapes"


def expected_label(folder: str, frame: str) -> np.ndarray:
    city = frame.split("_")[0]
    return builder_testing.png_values(DUMMY / "gtFine" / folder / city / f"{frame}_gtFine_labelIds.png")


class CityscapesBuilderTest(builder_testing.SegmentationBuilderTestCase):
    DATASET_CLASS = module.Builder
    SPLITS = {"train": 3, "validation": 1}  # the fake test frame is left out

    def check_examples(self, builder):
        train = builder_testing.read_examples(builder, "train")
        self.assertEqual(sorted(train), [f"{f}_leftImg8bit.png" for f in TRAIN_FRAMES])
        for frame in TRAIN_FRAMES:
            example = train[f"{frame}_leftImg8bit.png"]
            image = DUMMY / "leftImg8bit" / "train" / frame.split("_")[0] / f"{frame}_leftImg8bit.png"
            self.assertEqual(example["image"], image.read_bytes())
            np.testing.assert_array_equal(example["label"][:, :, 0], expected_label("train", frame))
        stored = np.concatenate([e["label"].ravel() for e in train.values()])
        # Raw label ids, not train ids: the 34 → 19 mapping happens in kdjax.data.metadata.
        self.assertEqual(set(np.unique(stored)), {*range(34), 255})


def _zip_folder(folder, archive):
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(folder.rglob("*")):
            out.write(path, path.relative_to(folder.parent))


def test_reads_the_official_zips(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    _zip_folder(DUMMY / "leftImg8bit", manual / "leftImg8bit_trainvaltest.zip")
    _zip_folder(DUMMY / "gtFine", manual / "gtFine_trainvaltest.zip")
    builder = builders.prepare("cityscapes", data_dir=tmp_path / "data", manual_dir=manual)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "validation": 1}
    validation = builder_testing.read_examples(builder, "validation")
    label = validation["frankfurt_000000_000294_leftImg8bit.png"]["label"][:, :, 0]
    np.testing.assert_array_equal(label, expected_label("val", "frankfurt_000000_000294"))


@pytest.mark.skipif(not TFDS_ZIPS.is_dir(), reason="shared TFDS dummy layouts absent")
def test_reads_tfds_dummy_zips(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"):
        shutil.copy(TFDS_ZIPS / name, manual / name)
    builder = builders.prepare("cityscapes", data_dir=tmp_path / "data", manual_dir=manual)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "validation": 1}
    (example,) = builder.as_dataset(split="validation").as_numpy_iterator()
    assert example["image"].shape == (1024, 2048, 3)
    assert example["label"].shape == (1024, 2048, 1)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared Cityscapes sample absent")
def test_reads_the_real_sample_frame():
    (pair,) = module.read_pairs(SAMPLE, SAMPLE, "val")
    assert pair.label.name == "frankfurt_000000_000294_gtFine_labelIds.png"
    ((name, example),) = module._common.generate_examples([pair], "png")
    assert name == "frankfurt_000000_000294_leftImg8bit.png"
    assert example["image"] == pair.image.read_bytes()
    assert example["label"].shape == (128, 256, 1)
    # The sample's labelTrainIds were downsampled apart from its labelIds (0.23% disagree).
    train_ids_file = pair.label.with_name("frankfurt_000000_000294_gtFine_labelTrainIds.png")
    train_ids = builder_testing.png_values(train_ids_file)
    agreement = np.mean(metadata.CITYSCAPES.map_labels(example["label"][:, :, 0]) == train_ids)
    assert agreement > 0.99
