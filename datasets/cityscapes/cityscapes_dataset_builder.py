"""Cityscapes with fine annotations: 2,975 train and 500 val street scenes (2048x1024).

Reads the official zips or the folders they extract to. Stored labels are the raw label ids of
``*_gtFine_labelIds.png`` (0..33, 255 for the license plate); the 34 → 19 train-id mapping lives
in ``kdjax.data.metadata`` only. The test split is left out: its public labels are placeholders.
"""

from __future__ import annotations

from etils.epath import Path
import tensorflow_datasets as tfds

try:
    from .. import _common
except ImportError:  # `tfds build datasets/cityscapes` imports this as a top-level package
    import _common

IMAGES = _common.Source(
    name="Cityscapes left 8-bit images",
    folders=(".", "cityscapes"),
    required=("leftImg8bit/train", "leftImg8bit/val"),
    archives=("leftImg8bit_trainvaltest.zip",),
)
LABELS = _common.Source(
    name="Cityscapes fine annotations",
    folders=(".", "cityscapes"),
    required=("gtFine/train", "gtFine/val"),
    archives=("gtFine_trainvaltest.zip",),
)

# TFDS split → Cityscapes split folder.
SPLIT_FOLDERS = {"train": "train", "validation": "val"}
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def read_pairs(images_root: Path, labels_root: Path, folder: str) -> list[_common.Pair]:
    """Pairs of ``leftImg8bit/<folder>/<city>/<frame>_leftImg8bit.png`` and
    ``gtFine/<folder>/<city>/<frame>_gtFine_labelIds.png``, sorted by image path."""
    pairs = []
    for image in sorted((images_root / "leftImg8bit" / folder).glob(f"*/*{IMAGE_SUFFIX}")):
        frame = image.name[: -len(IMAGE_SUFFIX)]
        label = labels_root / "gtFine" / folder / image.parent.name / f"{frame}{LABEL_SUFFIX}"
        pairs.append(_common.Pair(image, label, _common.read_png_label))
    return pairs


class Builder(_common.SegmentationBuilder):
    """Cityscapes semantic segmentation, fine annotations, raw label ids."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    IMAGE_ENCODING = "png"
    HOMEPAGE = "https://www.cityscapes-dataset.com"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Register at https://www.cityscapes-dataset.com/login/ and download from
    https://www.cityscapes-dataset.com/downloads/ the packages leftImg8bit_trainvaltest.zip
    (11 GB) and gtFine_trainvaltest.zip (241 MB). Put into manual_dir either the two zips or
    what they extract to: leftImg8bit/{train,val}/<city>/ and gtFine/{train,val}/<city>/.
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        images_root, labels_root = self._find_sources(dl_manager, [IMAGES, LABELS])
        splits = {}
        for split, folder in SPLIT_FOLDERS.items():
            pairs = read_pairs(images_root, labels_root, folder)
            searched = images_root / "leftImg8bit" / folder / f"*/*{IMAGE_SUFFIX}"
            splits[split] = self._generate_examples(self._checked_pairs(split, pairs, searched))
        return splits
