"""What every segmentation builder in this folder shares: finding the user's downloads in
``manual_dir`` (extracted folders or the original archives), decoding and checking image/label
pairs, and the feature set.

Every builder stores

- ``image``: uint8 RGB (H, W, 3), in the source's encoding (PNG or JPEG bytes kept as they are);
- ``label``: uint8 (H, W, 1), PNG-encoded, so lossless;
- ``file_name``: the image's file name, e.g. ``0001TP_006690.png``.

Builder modules import this file as ``from .. import _common`` when loaded through
``kdjax.data.builders``, and as the top-level module ``_common`` under
``tfds build datasets/<name>`` (which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import dataclasses
import io
import textwrap
from collections.abc import Callable, Iterator, Sequence

from etils.epath import Path
import numpy as np
import PIL.Image
import scipy.io
import tensorflow_datasets as tfds

from kdjax.data.builders import DatasetFilesError
from kdjax.data.errors import CorruptExampleError, SizeMismatchError

# A missing list of files in an error message is cut after this many entries.
_MAX_LISTED = 20
# PIL format names of the two encodings TFDS stores.
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
# Single-channel modes whose pixel values are the label values (P: palette indices, 1: 0/1).
_LABEL_MODES = ("L", "P", "1")

LabelReader = Callable[[Path], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Source:
    """One download a builder reads, found extracted in ``manual_dir`` or as its archive.

    Attributes:
      name: what it is, for messages, e.g. ``'Pascal VOC 2012 trainval'``.
      folders: where its root may be, relative to ``manual_dir`` or to the extracted archive
        (``'.'`` = the top), tried in order.
      required: paths below the root that must exist, e.g. ``('JPEGImages', 'SegmentationClass')``.
      archives: file names in ``manual_dir`` that hold the root once extracted.
    """

    name: str
    folders: tuple[str, ...]
    required: tuple[str, ...]
    archives: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line naming what to put into ``manual_dir``."""
        places = " or ".join(f"manual_dir/{f}/" if f != "." else "manual_dir/" for f in self.folders)
        text = f"{self.name}: {', '.join(self.required)} in {places}"
        if self.archives:
            text += f"; or the archive {' or '.join(self.archives)}"
        return text


@dataclasses.dataclass(frozen=True)
class Pair:
    """An image and the file its label comes from.

    Attributes:
      image: path of the RGB image.
      label: path of the label file.
      read_label: ``path -> (H, W) uint8`` decoder of the label file.
    """

    image: Path
    label: Path
    read_label: LabelReader


def _listing(paths: Sequence[object]) -> str:
    shown = [f"  - {p}" for p in paths[:_MAX_LISTED]]
    if len(paths) > _MAX_LISTED:
        shown.append(f"  ... and {len(paths) - _MAX_LISTED} more")
    return "\n".join(shown)


def _files_error(
    dataset: str, manual_dir: object, missing: Sequence[str], instructions: str
) -> DatasetFilesError:
    """The :class:`DatasetFilesError` naming every missing file and where to download it."""
    message = (
        f"{dataset}: files missing from manual_dir {manual_dir}:\n{_listing(missing)}\n"
        f"Where to get them:\n{textwrap.dedent(instructions).strip()}"
    )
    return DatasetFilesError(message, missing)


def _find_root(base: Path, source: Source) -> Path | None:
    """The first candidate folder below ``base`` holding any of ``source.required``."""
    for folder in source.folders:
        root = base / folder
        if any((root / required).exists() for required in source.required):
            return root
    return None


def _find_in_archive(
    dl_manager: tfds.download.DownloadManager, manual_dir: Path, source: Source
) -> Path | None:
    """The root inside the first of ``source.archives`` found in ``manual_dir``, extracted."""
    for name in source.archives:
        if (manual_dir / name).is_file():
            return _find_root(Path(dl_manager.extract(manual_dir / name)), source)
    return None


def find_sources(
    dl_manager: tfds.download.DownloadManager,
    dataset: str,
    sources: Sequence[Source],
    instructions: str,
) -> list[Path]:
    """The root folder of each source, extracting its archive when no extracted copy is present.

    Archives are extracted by TFDS into ``<data_dir>/downloads/extracted`` once.

    Raises:
      DatasetFilesError: naming everything that is missing, for all sources at once.
    """
    try:
        manual_dir = Path(dl_manager.manual_dir)
    except AssertionError:  # TFDS's check: manual_dir does not exist or is empty
        # The property refuses to return the path, so name it from the manager's own attribute.
        manual_dir = getattr(dl_manager, "_manual_dir", "(not set)")
        expected = [source.describe() for source in sources]
        raise _files_error(dataset, manual_dir, expected, instructions) from None
    roots, missing = [], []
    for source in sources:
        root = _find_root(manual_dir, source) or _find_in_archive(dl_manager, manual_dir, source)
        if root is None:
            missing.append(source.describe())
            continue
        missing.extend(str(root / r) for r in source.required if not (root / r).exists())
        roots.append(root)
    if missing:
        raise _files_error(dataset, manual_dir, missing, instructions)
    return roots


def read_list(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text list such as ``ImageSets/Segmentation/train.txt``."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def checked_pairs(dataset: str, split: str, pairs: Sequence[Pair], searched: object) -> list[Pair]:
    """``pairs`` after checking that there is at least one and that every file exists.

    Args:
      searched: where the split's images were looked for, for the message of an empty split.

    Raises:
      DatasetFilesError: for an empty split, or naming every missing image or label file.
    """
    if not pairs:
        raise DatasetFilesError(
            f"{dataset}: split {split!r} is empty: no examples found in {searched}", [str(searched)]
        )
    missing = [str(p) for pair in pairs for p in (pair.image, pair.label) if not p.is_file()]
    if missing:
        raise DatasetFilesError(
            f"{dataset}: split {split!r} lacks {len(missing)} files:\n{_listing(missing)}", missing
        )
    return list(pairs)


def _open_image(path: Path, data: bytes, what: str) -> PIL.Image.Image:
    """Fully decoded PIL image; any decoding failure becomes a CorruptExampleError naming path."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptExampleError(f"cannot decode {what} {path}: {err}") from err
    return image


def read_image(path: Path, encoding: str) -> tuple[bytes | np.ndarray, tuple[int, int]]:
    """An RGB image for ``tfds.features.Image(encoding_format=encoding)`` and its (H, W).

    The file's own bytes are returned when they already are RGB in ``encoding``, so nothing is
    re-encoded; other files (grayscale, CMYK, palette, another format) come back as a decoded
    (H, W, 3) uint8 array, which TFDS encodes, so every stored image decodes to 3 channels.
    """
    data = path.read_bytes()
    image = _open_image(path, data, "image")
    size = (image.height, image.width)
    if image.mode == "RGB" and image.format == _PIL_FORMATS[encoding]:
        return data, size
    return np.asarray(image.convert("RGB")), size


def read_png_label(path: Path) -> np.ndarray:
    """(H, W) uint8 label values of a single-channel label image (palette images give indices)."""
    image = _open_image(path, path.read_bytes(), "label")
    if image.mode not in _LABEL_MODES:
        raise SizeMismatchError(
            f"label {path} has mode {image.mode}; expected a single-channel 8-bit image "
            f"(one of {', '.join(_LABEL_MODES)})"
        )
    return np.asarray(image, dtype=np.uint8)


def read_mat_field(path: Path, variable: str, field: str | None = None) -> np.ndarray:
    """A 2-D array stored in a MATLAB file: ``variable``, or the struct field ``variable.field``."""
    name = variable if field is None else f"{variable}.{field}"
    try:
        content = scipy.io.loadmat(io.BytesIO(path.read_bytes()), struct_as_record=False)
        value = content[variable]
        if field is not None:
            # A MATLAB struct loads as a (1, 1) object array holding the struct.
            value = getattr(value.item(), field)
    except (ValueError, TypeError, OSError, KeyError, AttributeError) as err:
        raise CorruptExampleError(f"cannot read {name} from {path}: {err!r}") from err
    value = np.asarray(value)
    if value.ndim != 2:
        raise CorruptExampleError(f"{path}: {name} has shape {value.shape}; expected (H, W)")
    return value


def check_range(values: np.ndarray, path: Path, high: int) -> np.ndarray:
    """``values`` unchanged if all lie in 0..high; a CorruptExampleError naming ``path`` if not."""
    if values.size and (values.min() < 0 or values.max() > high):
        raise CorruptExampleError(
            f"label {path} has values {values.min()}..{values.max()}; expected 0..{high}"
        )
    return values


def segmentation_features(image_encoding: str) -> tfds.features.FeaturesDict:
    """The features every builder stores; ``image_encoding`` is ``'png'`` or ``'jpeg'``."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_encoding),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "file_name": tfds.features.Text(),
        }
    )


def generate_examples(pairs: Sequence[Pair], image_encoding: str) -> Iterator[tuple[str, dict]]:
    """TFDS ``(key, example)`` pairs, keyed by image file name.

    Raises:
      CorruptExampleError: for an image or label that cannot be decoded.
      SizeMismatchError: when image and label sizes differ, or a label is not single-channel.
    """
    for pair in pairs:
        image, size = read_image(pair.image, image_encoding)
        label = pair.read_label(pair.label)
        if label.shape != size:
            raise SizeMismatchError(
                f"size mismatch: image {pair.image} is {size[0]}x{size[1]} (HxW) but label "
                f"{pair.label} is {label.shape[0]}x{label.shape[1]}"
            )
        name = pair.image.name
        yield name, {"image": image, "label": label[:, :, None], "file_name": name}


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders here: the shared features and example generation.

    Subclasses set ``VERSION``, ``MANUAL_DOWNLOAD_INSTRUCTIONS``, ``IMAGE_ENCODING`` and
    ``HOMEPAGE``, and implement ``_split_generators`` returning
    ``{split: self._generate_examples(pairs)}``.
    """

    IMAGE_ENCODING = "png"
    HOMEPAGE = ""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=segmentation_features(self.IMAGE_ENCODING),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
        )

    def _find_sources(self, dl_manager, sources: Sequence[Source]) -> list[Path]:
        return find_sources(dl_manager, self.name, sources, self.MANUAL_DOWNLOAD_INSTRUCTIONS)

    def _checked_pairs(self, split: str, pairs: Sequence[Pair], searched: object) -> list[Pair]:
        return checked_pairs(self.name, split, pairs, searched)

    def _generate_examples(self, pairs: Sequence[Pair]):
        return generate_examples(pairs, self.IMAGE_ENCODING)
