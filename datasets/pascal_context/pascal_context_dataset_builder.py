"""Pascal Context: VOC 2010 images with whole-scene labels; 4,998 train and 5,105 val images.

The source labels (``trainval/<id>.mat``, ``LabelMap``) index the 459 classes of the release's
``labels.txt`` (0 = unlabeled). A uint8 PNG cannot hold them, so the builder decodes them here
into the benchmark's 60 values: 0 = background (unlabeled and the 400 rarer classes) and 1..59 =
the 59 frequent classes in alphabetical order. Both configs store exactly that; they differ in
evaluation only (``kdjax.data.metadata``): ``59`` ignores the background, ``60`` counts it as a
class. Splits are VOC 2010 ``ImageSets/Main/{train,val}.txt``.
"""

from __future__ import annotations

from etils.epath import Path
import numpy as np
import tensorflow_datasets as tfds

try:
    from .. import _common
except ImportError:  # `tfds build datasets/pascal_context` imports this as a top-level package
    import _common

VOC2010 = _common.Source(
    name="Pascal VOC 2010 trainval",
    folders=("VOCdevkit/VOC2010", "VOC2010"),
    required=("JPEGImages", "ImageSets/Main/train.txt", "ImageSets/Main/val.txt"),
    archives=("VOCtrainval_03-May-2010.tar",),
)
CONTEXT = _common.Source(
    name="Pascal Context full annotations",
    folders=(".", "VOCdevkit/VOC2010"),
    required=("trainval",),
    archives=("trainval.tar.gz",),
)

# labels.txt ids of the 59 frequent classes, ascending, which is also their alphabetical order:
# aeroplane (2), bag (9), ..., wood (458). Stored value k + 1 is CLASS_IDS[k].
CLASS_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98,
    104, 105, 113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295,
    296, 308, 324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440,
    445, 454, 458,
)
NUM_SOURCE_CLASSES = 459

# Source id → stored value; everything outside the 59 classes is background 0.
_STORED_VALUE = np.zeros(NUM_SOURCE_CLASSES + 1, np.uint8)
_STORED_VALUE[list(CLASS_IDS)] = np.arange(1, len(CLASS_IDS) + 1)

SPLIT_LISTS = {"train": "train.txt", "validation": "val.txt"}


def read_context_label(path: Path) -> np.ndarray:
    """(H, W) uint8 values 0..59 of a ``trainval/<id>.mat`` file (see the module docstring)."""
    source = _common.read_mat_field(path, "LabelMap")
    return _STORED_VALUE[_common.check_range(source, path, NUM_SOURCE_CLASSES).astype(np.int64)]


def read_pairs(voc: Path, context: Path, list_file: str) -> list[_common.Pair]:
    """Pairs of VOC 2010 ``JPEGImages/<id>.jpg`` and ``trainval/<id>.mat`` for a Main list."""
    return [
        _common.Pair(
            voc / "JPEGImages" / f"{image_id}.jpg",
            context / "trainval" / f"{image_id}.mat",
            read_context_label,
        )
        for image_id in _common.read_list(voc / "ImageSets" / "Main" / list_file)
    ]


class Builder(_common.SegmentationBuilder):
    """Pascal Context semantic segmentation, 59 frequent classes plus background."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="59", description="59 classes, background ignored."),
        tfds.core.BuilderConfig(name="60", description="60 classes, background included."),
    ]
    IMAGE_ENCODING = "jpeg"
    HOMEPAGE = "https://cs.stanford.edu/~roozbeh/pascal-context/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download VOCtrainval_03-May-2010.tar (1.3 GB) from
    http://host.robots.ox.ac.uk/pascal/VOC/voc2010/ and the Pascal Context labels trainval.tar.gz
    from https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz . Put into manual_dir
    either the two archives or what they extract to: VOCdevkit/VOC2010/{JPEGImages,ImageSets/Main}/
    and trainval/<id>.mat (at the top of manual_dir or inside VOCdevkit/VOC2010/).
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        voc, context = self._find_sources(dl_manager, [VOC2010, CONTEXT])
        splits = {}
        for split, list_file in SPLIT_LISTS.items():
            pairs = read_pairs(voc, context, list_file)
            searched = voc / "ImageSets" / "Main" / list_file
            splits[split] = self._generate_examples(self._checked_pairs(split, pairs, searched))
        return splits
