"""Shared pieces of the dataset builder tests: the TFDS test case adapted to builders loaded by
path, locations of the fake and real data, and readers of prepared examples."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets import testing

from kdjax.data import builders

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SAMPLES = SHARED_DATA / "samples"


def dummy_data(name: str) -> Path:
    """The fake examples of builder ``name`` (written by datasets/make_fake_data.py)."""
    return builders.datasets_dir() / name / "dummy_data"


def copy_dummy_data(name: str, destination: Path) -> Path:
    """A writable copy of ``dummy_data(name)`` at ``destination``, for tests that damage it."""
    shutil.copytree(dummy_data(name), destination)
    return destination


def read_examples(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, dict]:
    """file_name → example (NumPy) of a prepared split; ``image`` stays as its stored bytes."""
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    examples = {}
    for example in dataset.as_numpy_iterator():
        examples[example["file_name"].decode()] = example
    return examples


def png_values(path: Path) -> np.ndarray:
    """Pixel values of a single-channel PNG as PIL reads them (palette PNGs: the indices)."""
    with PIL.Image.open(path) as image:
        return np.asarray(image)


class SegmentationBuilderTestCase(testing.DatasetBuilderTestCase):
    """``tfds.testing.DatasetBuilderTestCase`` for the builders in datasets/.

    They are loaded by ``kdjax.data.builders`` outside TFDS's name registry (TFDS has a different
    ``cityscapes``), so the registry check becomes a check of the builder's name.
    """

    def test_registered(self):
        self.assertEqual(self.builder.name, Path(self.DATASET_CLASS.code_path).parent.name)

    def _download_and_prepare_as_dataset(self, builder):
        # TFDS's hook that prepares each tested config; the stored values are checked right after.
        super()._download_and_prepare_as_dataset(builder)
        self.check_examples(builder)

    def check_examples(self, builder: tfds.core.DatasetBuilder) -> None:
        """Checks the values of the examples ``builder`` prepared from the fake data."""
        raise NotImplementedError(f"{type(self).__name__} must check the prepared examples")
