"""Pascal VOC 2012 segmentation, with the SBD ("aug") training set.

Configs:

- ``aug`` (default): train = (VOC train ∪ SBD train ∪ SBD val) − VOC val, 10,582 images;
  validation = VOC val, 1,449 images.
- ``plain``: train = VOC train, 1,464 images; validation = VOC val. SBD is not needed.

Labels are train ids 0..20 with 255 on object borders. An image with a VOC
``SegmentationClass`` PNG takes its label from there (palette indices, border 255); the others
take it from SBD's ``cls/<id>.mat`` (``GTcls.Segmentation``, decoded here because a MATLAB file
is not an image). Images come from VOC 2012 ``JPEGImages``, which holds every SBD image too.
"""

from __future__ import annotations

import dataclasses

from etils.epath import Path
import numpy as np
import tensorflow_datasets as tfds

try:
    from .. import _common
except ImportError:  # `tfds build datasets/voc_aug` imports this as a top-level package
    import _common

VOC2012 = _common.Source(
    name="Pascal VOC 2012 trainval",
    folders=("VOCdevkit/VOC2012", "VOC2012"),
    required=(
        "JPEGImages",
        "SegmentationClass",
        "ImageSets/Segmentation/train.txt",
        "ImageSets/Segmentation/val.txt",
    ),
    archives=("VOCtrainval_11-May-2012.tar",),
)
SBD = _common.Source(
    name="SBD (Semantic Boundaries Dataset)",
    folders=("benchmark_RELEASE/dataset",),
    required=("cls", "train.txt", "val.txt"),
    archives=("benchmark.tgz",),
)


def read_sbd_label(path: Path) -> np.ndarray:
    """(H, W) uint8 class ids 0..20 of an SBD ``cls/*.mat`` file."""
    values = _common.read_mat_field(path, "GTcls", "Segmentation")
    return _common.check_range(values, path, 255).astype(np.uint8)


def _voc_pair(voc: Path, image_id: str) -> _common.Pair:
    label = voc / "SegmentationClass" / f"{image_id}.png"
    return _common.Pair(voc / "JPEGImages" / f"{image_id}.jpg", label, _common.read_png_label)


def _sbd_pair(voc: Path, sbd: Path, image_id: str) -> _common.Pair:
    label = sbd / "cls" / f"{image_id}.mat"
    return _common.Pair(voc / "JPEGImages" / f"{image_id}.jpg", label, read_sbd_label)


def aug_train_pairs(voc: Path, sbd: Path) -> list[_common.Pair]:
    """The 10,582-image training set: VOC train and SBD train+val, without any VOC val image."""
    voc_train = set(_common.read_list(voc / "ImageSets/Segmentation/train.txt"))
    voc_val = set(_common.read_list(voc / "ImageSets/Segmentation/val.txt"))
    sbd_ids = {*_common.read_list(sbd / "train.txt"), *_common.read_list(sbd / "val.txt")}
    return [
        _voc_pair(voc, image_id) if image_id in voc_train else _sbd_pair(voc, sbd, image_id)
        for image_id in sorted((voc_train | sbd_ids) - voc_val)
    ]


@dataclasses.dataclass
class VocAugConfig(tfds.core.BuilderConfig):
    """Whether the training split adds the SBD images."""

    with_sbd: bool = True


class Builder(_common.SegmentationBuilder):
    """Pascal VOC 2012 semantic segmentation, 21 classes, optionally with SBD."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        VocAugConfig(name="aug", with_sbd=True, description="train: VOC + SBD, 10,582 images."),
        VocAugConfig(name="plain", with_sbd=False, description="train: VOC only, 1,464 images."),
    ]
    IMAGE_ENCODING = "jpeg"
    HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download VOCtrainval_11-May-2012.tar (2 GB) from
    http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and, for the default "aug" config, SBD's
    benchmark.tgz (1.4 GB) from the SBD page,
    http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/
    Put into manual_dir either the archives or what they extract to:
    VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}/ and
    benchmark_RELEASE/dataset/{cls/,train.txt,val.txt}.
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        with_sbd = self.builder_config.with_sbd
        roots = self._find_sources(dl_manager, [VOC2012, SBD] if with_sbd else [VOC2012])
        voc = roots[0]
        if with_sbd:
            train, train_list = aug_train_pairs(voc, roots[1]), roots[1] / "train.txt"
        else:
            train_list = voc / "ImageSets/Segmentation/train.txt"
            train = [_voc_pair(voc, i) for i in _common.read_list(train_list)]
        val_list = voc / "ImageSets/Segmentation/val.txt"
        validation = [_voc_pair(voc, i) for i in _common.read_list(val_list)]
        return {
            "train": self._generate_examples(self._checked_pairs("train", train, train_list)),
            "validation": self._generate_examples(
                self._checked_pairs("validation", validation, val_list)
            ),
        }
