"""ADE20K scene parsing (ADEChallengeData2016): 20,210 training and 2,000 validation images.

Stored labels are the annotation values 0..150 (0 = other objects); ``kdjax.data.metadata``
applies reduce-zero-label (0 → ignore, v → v - 1).
"""

from __future__ import annotations

from etils.epath import Path
import tensorflow_datasets as tfds

try:
    from .. import _common
except ImportError:  # `tfds build datasets/ade20k` imports this as a top-level package
    import _common

SOURCE = _common.Source(
    name="ADE20K SceneParsing (ADEChallengeData2016)",
    folders=("ADEChallengeData2016", "."),
    required=(
        "images/training",
        "annotations/training",
        "images/validation",
        "annotations/validation",
    ),
    archives=("ADEChallengeData2016.zip",),
)

# TFDS split → ADEChallengeData2016 split folder.
SPLIT_FOLDERS = {"train": "training", "validation": "validation"}


def read_pairs(root: Path, folder: str) -> list[_common.Pair]:
    """Pairs of ``images/<folder>/<stem>.jpg`` and ``annotations/<folder>/<stem>.png``."""
    labels = root / "annotations" / folder
    return [
        _common.Pair(image, labels / f"{image.stem}.png", _common.read_png_label)
        for image in sorted((root / "images" / folder).glob("*.jpg"))
    ]


class Builder(_common.SegmentationBuilder):
    """ADE20K SceneParsing benchmark, 150 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    IMAGE_ENCODING = "jpeg"
    HOMEPAGE = "http://sceneparsing.csail.mit.edu"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download ADEChallengeData2016.zip (923 MB) from
    http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip (linked from
    http://sceneparsing.csail.mit.edu) and put into manual_dir either the zip or the folder it
    extracts to: ADEChallengeData2016/{images,annotations}/{training,validation}/.
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        (root,) = self._find_sources(dl_manager, [SOURCE])
        return {
            split: self._generate_examples(
                self._checked_pairs(split, read_pairs(root, folder), root / "images" / folder)
            )
            for split, folder in SPLIT_FOLDERS.items()
        }
