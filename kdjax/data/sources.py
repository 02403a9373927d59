"""Where examples come from: a TFDS builder, the synthetic scenes, or encoded examples in memory.

Every source hands the pipeline the same thing, a ``Shard``: a tf.data.Dataset of light records in a
fixed order (an int64 ``index`` that is unique within the split, a ``file_name`` and, for encoded
sources, the still-encoded bytes) and a ``load`` function that turns one record into pixels. Ordering,
sharding and skipping work on records, so resuming skips examples without decoding them; decoding
happens in ``load``, after the skip.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import re
from typing import Callable, ClassVar, Mapping, NamedTuple, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

from kdjax.data import errors, metadata, synthetic
from kdjax.runtime import coordination

Record = dict[str, tf.Tensor]
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class Shard:
    """Examples ``[start, stop)`` of a split, as records plus the function that decodes one.

    Attributes:
      records: fixed-order dataset of dicts with at least ``index`` (int64 scalar) and ``file_name``
        (string scalar); every other feature is a scalar too, so records batch and shuffle cheaply.
      size: number of records.
      load: record → ``{'image': uint8 (H, W, 3), 'label': uint8 (H, W, C) stored label values,
        'file_name': string}``; C should be 1 and is checked downstream.
    """

    records: tf.data.Dataset
    size: int
    load: Callable[[Record], Record]


class Source(abc.ABC):
    """A dataset's splits, readable by the pipeline."""

    info: metadata.DatasetInfo

    def split_name(self, split: str) -> str:
        """Source split for a role ('train', 'val') or a split given verbatim."""
        return self.info.splits.get(split, split)

    @abc.abstractmethod
    def num_examples(self, split: str) -> int:
        """Number of examples in ``split`` (a role or the source's own split name)."""

    @abc.abstractmethod
    def shard(self, split: str, start: int, stop: int) -> Shard:
        """Examples ``start`` to ``stop`` (exclusive) of ``split``."""

    @abc.abstractmethod
    def max_image_size(self, split: str) -> tuple[int, int]:
        """(height, width) of the tallest and of the widest image of ``split``."""

    def cached_shard(self, split: str, start: int, stop: int, num_parallel_calls: int) -> Shard:
        """:meth:`shard` with its examples decoded once and held in memory (:func:`cache_shard`)."""
        return cache_shard(self.shard(split, start, stop), num_parallel_calls)


def decode_encoded(record: Record) -> Record:
    """Decodes the ``image`` and ``label`` bytes of a record; PNG or JPEG."""
    file_name = record["file_name"]
    return {
        "image": _decode(record["image"], 3, file_name, "image"),
        "label": _decode(record["label"], 0, file_name, "label"),
        "file_name": file_name,
    }


def _decode(data: tf.Tensor, channels: int, file_name: tf.Tensor, field: str) -> tf.Tensor:
    known = tf.io.is_jpeg(data) | tf.equal(tf.strings.substr(data, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
    check = errors.require(known, "corrupt",
                           lambda: tf.strings.join([file_name, f": the {field} is not a PNG or JPEG file"]))
    with tf.control_dependencies([check]):
        try:
            pixels = tf.io.decode_image(data, channels=channels, expand_animations=False)
        except tf.errors.OpError as error:  # reached only when run eagerly, i.e. when diagnosing a failure
            name = file_name.numpy().decode(errors="replace")
            raise errors.CorruptExampleError(f"{name}: the {field} could not be decoded ({error.message})") from None
    pixels.set_shape([None, None, channels or None])
    return pixels


def encoded_image_size(data: tf.Tensor) -> tf.Tensor:
    """(height, width) int32 of PNG or JPEG bytes, read from the header without decoding."""

    def png_size():
        # The IHDR chunk follows the signature: width then height as big-endian uint32 at bytes 16..23.
        header = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.uint8), tf.int32)
        weights = tf.constant([1 << 24, 1 << 16, 1 << 8, 1])
        return tf.stack([tf.reduce_sum(header[4:] * weights), tf.reduce_sum(header[:4] * weights)])

    return tf.cond(tf.io.is_jpeg(data), lambda: tf.image.extract_jpeg_shape(data)[:2], png_size)


def _largest_encoded(records: tf.data.Dataset) -> tuple[int, int]:
    sizes = records.map(lambda r: encoded_image_size(r["image"]), num_parallel_calls=tf.data.AUTOTUNE)
    height, width = sizes.reduce(tf.zeros([2], tf.int32), tf.maximum).numpy()
    return int(height), int(width)


class EncodedExample(NamedTuple):
    """One example held in memory: PNG/JPEG bytes of the image and of its single-channel label."""

    file_name: str
    image: bytes
    label: bytes


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedSource(Source):
    """Examples held in memory as encoded bytes: tests, benchmarks and small custom datasets."""

    info: metadata.DatasetInfo
    splits: Mapping[str, Sequence[EncodedExample]]

    def _examples(self, split: str) -> Sequence[EncodedExample]:
        name = self.split_name(split)
        if name not in self.splits:
            raise errors.DataError(f"dataset {self.info.name!r} has no split {split!r}; "
                                   f"it has {sorted(self.splits)}")
        return self.splits[name]

    def num_examples(self, split: str) -> int:
        return len(self._examples(split))

    def _records(self, split: str, start: int, stop: int) -> tf.data.Dataset:
        examples = self._examples(split)[start:stop]
        return tf.data.Dataset.from_tensor_slices({
            "index": tf.range(start, start + len(examples), dtype=tf.int64),
            "file_name": tf.constant([e.file_name for e in examples], tf.string),
            "image": tf.constant([e.image for e in examples], tf.string),
            "label": tf.constant([e.label for e in examples], tf.string),
        })

    def shard(self, split: str, start: int, stop: int) -> Shard:
        return Shard(self._records(split, start, stop), stop - start, decode_encoded)

    def max_image_size(self, split: str) -> tuple[int, int]:
        return _largest_encoded(self._records(split, 0, self.num_examples(split)))


@dataclasses.dataclass(frozen=True)
class SyntheticSource(Source):
    """The procedural street scenes of ``kdjax.data.synthetic``, rendered when loaded."""

    num_train: int
    num_val: int
    height: int
    width: int
    seed: int
    info: ClassVar[metadata.DatasetInfo] = synthetic.SYNTHETIC_INFO

    def num_examples(self, split: str) -> int:
        sizes = {"train": self.num_train, "val": self.num_val}
        name = self.split_name(split)
        if name not in sizes:
            raise errors.DataError(f"the synthetic dataset has splits 'train' and 'val', not {split!r}")
        return sizes[name]

    def shard(self, split: str, start: int, stop: int) -> Shard:
        name = self.split_name(split)
        self.num_examples(name)  # validates the split name
        records = tf.data.Dataset.range(start, stop).map(
            lambda i: {"index": i, "file_name": tf.strings.format(f"synthetic/{name}/{{}}", i)})
        render = functools.partial(self._render, name)

        def load(record: Record) -> Record:
            image, label = tf.numpy_function(render, [record["index"]], [tf.uint8, tf.uint8], stateful=False)
            image.set_shape([self.height, self.width, 3])
            label.set_shape([self.height, self.width, 1])
            return {"image": image, "label": label, "file_name": record["file_name"]}

        return Shard(records, stop - start, load)

    def cached_shard(self, split: str, start: int, stop: int, num_parallel_calls: int) -> Shard:
        # Rendered in a plain loop: the scenes are NumPy code that holds the GIL, which tf.data's
        # parallel calls into Python only fight over (about 1.2-1.4x the loop's time alone, and
        # more beside the compiles of a starting run).
        name = self.split_name(split)
        self.num_examples(name)  # validates the split name
        if stop <= start:
            return self.shard(name, start, stop)
        return _shard_in_memory(
            [({"index": i, "file_name": f"synthetic/{name}/{i}".encode()},
              dict(zip(("image", "label"), self._render(name, i)))) for i in range(start, stop)])

    def _render(self, split: str, index: np.int64) -> tuple[np.ndarray, np.ndarray]:
        image, label = synthetic.render_scene(synthetic.scene_seed(self.seed, split, int(index)),
                                              self.height, self.width)
        return image, label[..., None]

    def max_image_size(self, split: str) -> tuple[int, int]:
        return self.height, self.width


@dataclasses.dataclass(frozen=True)
class TfdsSource(Source):
    """A prepared TFDS dataset whose examples have ``image``, ``label`` and ``file_name`` features.

    ``name`` is a registry name (``kdjax.data.metadata``); its ``tfds_name`` gives the builder and,
    unless ``builder_config`` overrides it, the builder config.
    """

    name: str
    builder_config: str | None = None
    data_dir: str | None = None
    manual_dir: str | None = None

    @functools.cached_property
    def info(self) -> metadata.DatasetInfo:
        try:
            return metadata.dataset_info(self.name)
        except ValueError as error:
            raise errors.DataError(f"data.name: {error}") from None

    @functools.cached_property
    def builder(self):
        from kdjax.data import builders

        builder_name, _, registry_config = (self.info.tfds_name or self.name).partition("/")
        where = {"data_dir": self.data_dir, "config": self.builder_config or registry_config or None}
        builder = builders.load_builder(builder_name, **where)
        if builder.is_prepared():
            return builder
        if self.manual_dir is None:
            raise errors.DataError(
                f"dataset {self.name!r} is not prepared in {builder.data_dir}. Set data.manual_dir to the folder "
                f"with its original files (kdjax then prepares it once), run `tfds build` for it, "
                f"or point data.data_dir at the TFDS data directory that holds it.")
        # Every process of a run opens the source at once: process 0 builds into data_dir, the
        # others wait for it and then open what it wrote.
        return coordination.once_for_all(
            f"prepare/{builder.info.full_name}/{builder.data_dir}",
            lambda: builders.prepare(builder_name, manual_dir=self.manual_dir, **where),
            lambda: builders.load_builder(builder_name, **where))

    def num_examples(self, split: str) -> int:
        name = self.split_name(split)
        try:
            return self.builder.info.splits[name].num_examples
        except (KeyError, ValueError) as error:
            raise errors.DataError(f"dataset {self.name!r} has no split {split!r}; it has "
                                   f"{sorted(self.builder.info.splits)}") from error

    def _records(self, split: str, start: int, stop: int) -> tf.data.Dataset:
        name = self.split_name(split)
        if re.fullmatch(r"\w+", name):  # a plain split: TFDS reads only the files holding the slice
            raw = self.builder.as_dataset(split=f"{name}[{start}:{stop}]", **_tfds_encoded_reading())
        else:  # an expression such as 'train[:10%]' or 'train+validation', which cannot be sliced again
            raw = self.builder.as_dataset(split=name, **_tfds_encoded_reading()).skip(start).take(stop - start)
        return raw.enumerate(start).map(
            lambda i, ex: {"index": i, "file_name": ex["file_name"], "image": ex["image"], "label": ex["label"]})

    def shard(self, split: str, start: int, stop: int) -> Shard:
        return Shard(self._records(split, start, stop), stop - start, decode_encoded)

    def max_image_size(self, split: str) -> tuple[int, int]:
        return _largest_encoded(self._records(split, 0, self.num_examples(split)))


def _tfds_encoded_reading() -> dict:
    """``as_dataset`` arguments that keep images and labels encoded and the records in split order."""
    import tensorflow_datasets as tfds  # slow to import, and only TFDS sources need it

    return {
        "decoders": {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()},
        # One file at a time keeps the records in split order, so ``index`` is the example's index.
        "read_config": tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1),
    }


def open_source(data_config: ml_collections.ConfigDict) -> Source:
    """The source named by ``data_config.name``."""
    if data_config.name == "synthetic":
        s = data_config.synthetic
        return SyntheticSource(num_train=s.num_train, num_val=s.num_val, height=s.height, width=s.width,
                               seed=s.seed)
    return TfdsSource(data_config.name, data_config.builder_config, data_config.data_dir, data_config.manual_dir)


def cache_shard(shard: Shard, num_parallel_calls: int) -> Shard:
    """Decodes a shard once and keeps its pixels in memory, so later epochs only slice them.

    Pixels of all examples are concatenated into one flat uint8 tensor each for images and labels
    (examples may differ in size); a record's ``slot`` locates its example.
    """
    loaded = shard.records.map(lambda r: (r, shard.load(r)), num_parallel_calls=num_parallel_calls)
    try:
        pairs = list(loaded.as_numpy_iterator())
    except tf.errors.OpError as error:
        raise errors.explain_failure(shard.records, shard.load, error) from None
    return _shard_in_memory(pairs) if pairs else shard


def _shard_in_memory(pairs: list[tuple[dict, dict]]) -> Shard:
    """The shard of decoded examples ``pairs``: (record with ``index`` and ``file_name``,
    example with ``image`` and ``label`` NumPy arrays), in order."""
    images = [example["image"] for _, example in pairs]
    labels = [example["label"] for _, example in pairs]
    image_offsets = tf.constant(np.cumsum([0] + [a.size for a in images]), tf.int64)
    label_offsets = tf.constant(np.cumsum([0] + [a.size for a in labels]), tf.int64)
    image_shapes = tf.constant([a.shape for a in images], tf.int64)
    label_shapes = tf.constant([a.shape for a in labels], tf.int64)
    image_pixels = tf.constant(np.concatenate([a.ravel() for a in images]))
    label_pixels = tf.constant(np.concatenate([a.ravel() for a in labels]))
    records = tf.data.Dataset.from_tensor_slices({
        "index": np.array([r["index"] for r, _ in pairs], np.int64),
        "file_name": np.array([r["file_name"] for r, _ in pairs], object),
        "slot": np.arange(len(pairs), dtype=np.int64),
    })

    def load(record: Record) -> Record:
        slot = record["slot"]
        image = tf.reshape(image_pixels[image_offsets[slot]:image_offsets[slot + 1]], image_shapes[slot])
        label = tf.reshape(label_pixels[label_offsets[slot]:label_offsets[slot + 1]], label_shapes[slot])
        image.set_shape([None, None, 3])
        label.set_shape([None, None, None])
        return {"image": image, "label": label, "file_name": record["file_name"]}

    return Shard(records, len(pairs), load)
