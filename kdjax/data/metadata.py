"""What the trainer and evaluator need to know about a dataset: classes, palette, ignore label and
the mapping from stored label values to train ids.

The registry covers the datasets built by the repository's TFDS builders (``datasets/``). Builders
store label values as the source has them (Cityscapes label ids, ADE20K 0..150, CamVid 0..11,
...); :meth:`DatasetInfo.map_labels` turns them into train ids, so the 34 → 19 Cityscapes mapping,
ADE20K's reduce-zero-label and the CamVid void class live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable

import numpy as np

IGNORE_LABEL = 255


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a segmentation dataset.

    Attributes:
      name: registry name, e.g. ``'camvid'`` (also the TFDS builder name where there is one).
      class_names: the K evaluated classes, in train-id order.
      palette: (K, 3) uint8 RGB colours, one per class, for overlays and grids.
      ignore_label: train id that is excluded from losses and metrics.
      label_map: None when stored labels already are train ids; otherwise a (256,) int array that
        maps each stored uint8 value to a train id or ``ignore_label`` (e.g. Cityscapes 34 → 19).
      splits: split names, e.g. ``{'train': 'train', 'val': 'validation'}`` from role to TFDS split.
      tfds_name: the TFDS builder that holds the data, as ``'name'`` or ``'name/config'``; None for
        datasets without a builder.
    """

    name: str
    class_names: tuple[str, ...]
    palette: np.ndarray
    ignore_label: int = IGNORE_LABEL
    label_map: np.ndarray | None = None
    splits: dict[str, str] = dataclasses.field(default_factory=dict)
    tfds_name: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def map_labels(self, labels: np.ndarray) -> np.ndarray:
        """Stored label values → train ids.

        Args:
          labels: uint8 array of any shape, as stored by the dataset's builder.

        Returns:
          uint8 array of the same shape with values in 0..K-1 or ``ignore_label``.
        """
        labels = np.asarray(labels)
        if labels.dtype != np.uint8:
            raise ValueError(f"{self.name}: labels must be uint8, got {labels.dtype}")
        if self.label_map is None:
            return labels
        return self.label_map[labels]


# A stored value that the dataset never uses: the pipeline reports it (or ignores it, as configured).
UNKNOWN_VALUE = -1


def _label_map(pairs: dict[int, int], *, ignored: Iterable[int]) -> np.ndarray:
    """(256,) int16 table: ``pairs`` maps stored value → train id, ``ignored`` values → the ignore
    label, and every other value → ``UNKNOWN_VALUE``, so corrupt labels do not pass silently."""
    table = np.full(256, UNKNOWN_VALUE, np.int16)
    table[list(ignored)] = IGNORE_LABEL
    for stored, train_id in pairs.items():
        table[stored] = train_id
    return table


def _reduce_zero_label() -> np.ndarray:
    """0 → ignore, v → v - 1 for v in 1..254, 255 stays ignore."""
    table = np.arange(-1, 255, dtype=np.int64)
    table[0] = IGNORE_LABEL
    table[255] = IGNORE_LABEL
    return table.astype(np.uint8)


def bit_palette(num_colours: int, *, first: int = 0) -> np.ndarray:
    """The Pascal VOC colour map: colour i spreads the bits of i over the high bits of R, G and B.

    Args:
      num_colours: number of colours.
      first: index of the first colour (1 skips black).

    Returns:
      (num_colours, 3) uint8 array.
    """
    index = np.arange(first, first + num_colours)
    palette = np.zeros((num_colours, 3), np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


_TRAIN_VAL = {"train": "train", "val": "validation"}

# Cityscapes label id → train id (cityscapesScripts' labels.py); the other ids are ignored.
_CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

CITYSCAPES = DatasetInfo(
    name="cityscapes",
    class_names=(
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    ),
    palette=np.array(
        [
            (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
            (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
            (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
            (0, 80, 100), (0, 0, 230), (119, 11, 32),
        ],
        np.uint8,
    ),
    # Label ids 0..33 exist; 255 is the license plate (id −1) in 8-bit PNGs.
    label_map=_label_map(_CITYSCAPES_TRAIN_IDS, ignored=(*range(34), 255)),
    splits=dict(_TRAIN_VAL),
    tfds_name="cityscapes",
)

CAMVID = DatasetInfo(
    name="camvid",
    class_names=(
        "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
        "Pedestrian", "Bicyclist",
    ),
    # The SegNet colours of these classes.
    palette=np.array(
        [
            (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
            (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
        ],
        np.uint8,
    ),
    # Stored 0..10 are the classes, 11 is void.
    label_map=_label_map({value: value for value in range(11)}, ignored=(11,)),
    splits={"train": "train", "val": "validation", "test": "test"},
    tfds_name="camvid",
)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

VOC_AUG = DatasetInfo(
    name="voc_aug",
    class_names=VOC_CLASSES,
    palette=bit_palette(21),
    # Stored values already are train ids; the 255 object borders stay ignored.
    label_map=None,
    splits=dict(_TRAIN_VAL),
    tfds_name="voc_aug/aug",
)

# First names of objectInfo150.txt (SceneParsing devkit), in label order 1..150.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall",
    "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag",
)

def _zero_ignored(name: str, class_names: tuple[str, ...], tfds_name: str) -> DatasetInfo:
    """A dataset whose stored 0 is ignored and 1..K are its K classes (reduce-zero-label)."""
    return DatasetInfo(name=name, class_names=class_names,
                       palette=bit_palette(len(class_names), first=1),
                       label_map=_reduce_zero_label(), splits=dict(_TRAIN_VAL),
                       tfds_name=tfds_name)


# Stored 0 is "other objects" (ignored), 1..150 are the classes.
ADE20K = _zero_ignored("ade20k", ADE20K_CLASSES, "ade20k")

# The 59 frequent Pascal Context classes, in the order of their stored values 1..59.
PASCAL_CONTEXT_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)

# Both configs of the pascal_context builder store 0 = background (everything else) and 1..59.
PASCAL_CONTEXT_59 = _zero_ignored("pascal_context_59", PASCAL_CONTEXT_CLASSES,
                                  "pascal_context/59")

PASCAL_CONTEXT_60 = DatasetInfo(
    name="pascal_context_60",
    class_names=("background", *PASCAL_CONTEXT_CLASSES),
    palette=bit_palette(60),
    label_map=None,
    splits=dict(_TRAIN_VAL),
    tfds_name="pascal_context/60",
)

_REGISTRY: dict[str, DatasetInfo] = {}
_ALIASES = {"pascal_context": "pascal_context_59"}
# Registered by their own modules on import, so that the registry does not import them eagerly.
_SELF_REGISTERING = {"synthetic": "kdjax.data.synthetic"}


def register_dataset_info(info: DatasetInfo) -> None:
    """Adds ``info`` to the registry under ``info.name``.

    Raises:
      ValueError: if another DatasetInfo is already registered under that name.
    """
    registered = _REGISTRY.get(info.name)
    if registered is not None and registered is not info:
        raise ValueError(f"dataset {info.name!r} is already registered")
    _REGISTRY[info.name] = info


def dataset_names() -> tuple[str, ...]:
    """Every name :func:`dataset_info` accepts, sorted."""
    return tuple(sorted({*_REGISTRY, *_ALIASES, *_SELF_REGISTERING}))


def dataset_info(name: str) -> DatasetInfo:
    """The registered :class:`DatasetInfo` for ``name`` (``'pascal_context'`` means the 59-class one).

    Raises:
      ValueError: for an unknown name; the message lists the known names.
    """
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY and name in _SELF_REGISTERING:
        importlib.import_module(_SELF_REGISTERING[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    return _REGISTRY[name]


for _info in (CITYSCAPES, CAMVID, VOC_AUG, ADE20K, PASCAL_CONTEXT_59, PASCAL_CONTEXT_60):
    register_dataset_info(_info)
del _info
