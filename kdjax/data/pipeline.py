"""Training and evaluation batches for the trainer.

Training: this process's shard → seeded epoch order (skipped to the resume point while still
undecoded) → decode → label mapping → random scale, crop with padding, flip → optional photometric
distortion → normalisation → batch (drop remainder) → prefetch. The batch of global step s is a pure
function of (seed, s, process index, process count, data config).

Evaluation: every example once, at full resolution, padded to one size per split and batched; each
process yields the same number of batches, topped up with examples flagged invalid.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple

import ml_collections
import numpy as np
import tensorflow as tf

from kdjax.data import augment, errors, labels, order, sources

# The trainer owns the accelerators; tf.data must never allocate memory on them.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already initialised its devices; it was imported and used elsewhere
    pass

_log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class LabelStats:
    """Label pixels that were mapped to ignore for being out of range (``out_of_range_labels='ignore'``)."""

    out_of_range_pixels: int = 0
    examples_with_out_of_range: int = 0

    def record(self, per_example: np.ndarray) -> None:
        """Adds a batch's per-example counts; warns the first time any appear."""
        if self.out_of_range_pixels == 0 and per_example.any():
            _log.warning("label values outside the classes were mapped to the ignore label; "
                         "see the iterator's stats for the running count")
        self.out_of_range_pixels += int(per_example.sum())
        self.examples_with_out_of_range += int(np.count_nonzero(per_example))


class BatchIterator(Iterator[Batch]):
    """numpy batches of a tf.data pipeline, with bad input named and out-of-range labels counted.

    Attributes:
      next_batch: number of the batch the next ``next()`` returns (the global step, for training).
      stats: out-of-range label counts so far.
    """

    def __init__(self, dataset: tf.data.Dataset, *, first_batch: int,
                 batch_records: Callable[[int], tf.data.Dataset], per_example: Callable[[dict], object]):
        self._batches = dataset.as_numpy_iterator()
        self._batch_records = batch_records
        self._per_example = per_example
        self.next_batch = first_batch
        self.stats = LabelStats()

    def __next__(self) -> Batch:
        try:
            batch = next(self._batches)
        except tf.errors.OpError as error:
            # The order is deterministic, so the failing batch's records are known: re-run them one by
            # one to name the example.
            raise errors.explain_failure(self._batch_records(self.next_batch), self._per_example, error) from None
        self.stats.record(batch.pop("out_of_range_pixels"))
        self.next_batch += 1
        return batch


def make_train_iterator(data_config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                        start_step: int = 0, process_index: int | None = None, process_count: int | None = None,
                        source: sources.Source | None = None) -> BatchIterator:
    """Endless training batches of this process.

    Args:
      data_config: the ``data`` config section (``default_data_config``).
      global_batch_size: examples per step over all processes; divisible by ``process_count``.
      seed: seed of the order and of the augmentation.
      start_step: the first batch is the one an uninterrupted run yields at this step.
      process_index, process_count: this process and the number of processes; default to JAX's.
      source: read examples from here instead of the source ``data_config`` names.

    Yields:
      ``{'image': float32 (B, h, w, 3) normalised, 'label': int32 (B, h, w)}`` with
      B = global_batch_size // process_count and (h, w) = ``data_config.crop_size``.
    """
    process_index, process_count = _process(process_index, process_count)
    pipeline = _pipeline(_train_pipeline, data_config, source, global_batch_size=global_batch_size,
                         seed=seed, start_step=start_step, process_index=process_index,
                         process_count=process_count)
    return BatchIterator(pipeline.dataset, first_batch=start_step,
                         per_example=pipeline.per_example, batch_records=pipeline.batch_records)


def _train_pipeline(data_config: ml_collections.ConfigDict, source: sources.Source, *,
                    global_batch_size: int, seed: int, start_step: int, process_index: int,
                    process_count: int) -> _Pipeline:
    local_batch = _local_batch_size(global_batch_size, process_count)
    info = source.info
    settings = augment.TrainAugmentation.from_config(data_config, info.ignore_label)
    _check_settings(data_config)
    shard = _shard(source, data_config, data_config.train_split, process_index, process_count)
    if shard.size == 0:
        raise errors.EmptySplitError(
            f"split {data_config.train_split!r} of {info.name!r} has {source.num_examples(data_config.train_split)} "
            f"examples, fewer than the {process_count} processes")

    def stream(position: int) -> tf.data.Dataset:
        return order.training_records(shard.records, shard.size, seed=seed, window=data_config.shuffle_buffer,
                                      start_position=position)

    def per_example(record):
        example = shard.load(record)
        label, out_of_range = labels.to_train_ids(example, info, data_config.out_of_range_labels)
        geometry_key, photometric_key = tf.unstack(tf.random.experimental.stateless_split(
            order.augmentation_key(seed, record["epoch"], record["index"]), 2))
        image, label, valid = augment.scale_crop_flip(example["image"], label, geometry_key, settings)
        if settings.photometric:
            image = augment.photometric_distortion(image, valid, photometric_key)
        return {"image": augment.normalize(image, data_config.normalization), "label": label,
                "out_of_range_pixels": out_of_range}

    dataset = (stream(start_step * local_batch)
               .map(per_example, num_parallel_calls=data_config.num_parallel_calls, deterministic=True)
               .batch(local_batch, drop_remainder=True)
               .prefetch(data_config.prefetch)
               .with_options(_options()))
    return _Pipeline(dataset, per_example,
                     batch_records=lambda step: stream(step * local_batch).take(local_batch))


def make_eval_iterator(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       source: sources.Source | None = None) -> BatchIterator:
    """One pass over the evaluation split, at full resolution.

    Every process yields ceil(ceil(N / process_count) / B) batches, so a multi-host evaluation never
    waits on a process that ran out; batches are topped up with filler examples (``valid`` False).
    Each real example appears exactly once over all processes.

    Yields:
      ``{'image': float32 (B, Hp, Wp, 3)`` normalised, then zero-padded on the bottom and right;
      ``'label': int32 (B, Hp, Wp)`` padded with the ignore label; ``'valid': bool (B,)``;
      ``'height', 'width': int32 (B,)`` the original sizes (0 for fillers)``}``. (Hp, Wp) is
      ``data_config.eval_pad_size`` or the largest image size of the split.
    """
    process_index, process_count = _process(process_index, process_count)
    pipeline = _pipeline(_eval_pipeline, data_config, source, global_batch_size=global_batch_size,
                         process_index=process_index, process_count=process_count)
    return BatchIterator(pipeline.dataset, first_batch=0, per_example=pipeline.per_example,
                         batch_records=pipeline.batch_records)


def _eval_pipeline(data_config: ml_collections.ConfigDict, source: sources.Source, *,
                   global_batch_size: int, process_index: int, process_count: int) -> _Pipeline:
    local_batch = _local_batch_size(global_batch_size, process_count)
    info = source.info
    _check_settings(data_config)
    split = data_config.eval_split
    shard = _shard(source, data_config, split, process_index, process_count)
    pad_h, pad_w = eval_image_size(data_config, source)
    largest_shard = -(-source.num_examples(split) // process_count)
    num_batches = -(-largest_shard // local_batch)

    def per_example(record):
        example = shard.load(record)
        label, out_of_range = labels.to_train_ids(example, info, data_config.out_of_range_labels)
        image = augment.normalize(tf.cast(example["image"], tf.float32), data_config.normalization)
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        fits = errors.require(
            (height <= pad_h) & (width <= pad_w), "too_large",
            lambda: errors.about(record["file_name"], f": the image is {{}}x{{}} but evaluation batches are padded to "
                                 f"{pad_h}x{pad_w}; raise data.eval_pad_size", height, width))
        with tf.control_dependencies([fits]):
            image = tf.pad(image, [[0, pad_h - height], [0, pad_w - width], [0, 0]])
            label = tf.pad(label, [[0, pad_h - height], [0, pad_w - width]], constant_values=info.ignore_label)
        image.set_shape([pad_h, pad_w, 3])
        label.set_shape([pad_h, pad_w])
        return {"image": image, "label": label, "valid": tf.constant(True), "height": height, "width": width,
                "out_of_range_pixels": out_of_range}

    def filler(_):
        return {"image": tf.zeros([pad_h, pad_w, 3]), "label": tf.fill([pad_h, pad_w], info.ignore_label),
                "valid": tf.constant(False), "height": tf.constant(0), "width": tf.constant(0),
                "out_of_range_pixels": tf.constant(0)}

    dataset = (shard.records
               .map(per_example, num_parallel_calls=data_config.num_parallel_calls, deterministic=True)
               .concatenate(tf.data.Dataset.range(num_batches * local_batch - shard.size).map(filler))
               .batch(local_batch, drop_remainder=True)
               .prefetch(data_config.prefetch)
               .with_options(_options()))
    return _Pipeline(dataset, per_example,
                     batch_records=lambda b: shard.records.skip(b * local_batch).take(local_batch))


class _Pipeline(NamedTuple):
    """A built tf.data pipeline: its batches, the per-example function it maps and the records
    of a batch by number (to name a failing example)."""

    dataset: tf.data.Dataset
    per_example: Callable[[dict], object]
    batch_records: Callable[[int], tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class _ByValue:
    """A config compared and hashed by its values."""

    values: str
    config: ml_collections.ConfigDict = dataclasses.field(compare=False)


def _pipeline(build: Callable[..., _Pipeline], data_config: ml_collections.ConfigDict,
              source: sources.Source | None, **settings) -> _Pipeline:
    """``build(data_config, source, **settings)``, memoised when the data is cached in memory.

    Building a pipeline traces its per-example function, about a second each time; a comparison
    builds the same training and evaluation pipelines for every run (``benchmarks/NOTES.md`` item
    57). Over a shard held in memory (``data.cache``) the pipeline is a pure function of the data
    config and the settings, so one built pipeline serves them all, each caller with iterators
    of its own.
    """
    source = source or sources.open_source(data_config)
    if not data_config.cache:
        return build(data_config, source, **settings)
    return _memoised_pipeline(build, _ByValue(data_config.to_json(sort_keys=True), data_config),
                              source, tuple(sorted(settings.items())))


@functools.lru_cache(maxsize=8)
def _memoised_pipeline(build: Callable[..., _Pipeline], data_config: _ByValue,
                       source: sources.Source, settings: tuple) -> _Pipeline:
    return build(data_config.config, source, **dict(settings))


def eval_image_size(data_config: ml_collections.ConfigDict,
                    source: sources.Source | None = None) -> tuple[int, int]:
    """(Hp, Wp): the size evaluation batches are padded to, ``data_config.eval_pad_size`` or the
    largest image size of the evaluation split."""
    if data_config.eval_pad_size:
        return tuple(data_config.eval_pad_size)
    return _max_image_size(source or sources.open_source(data_config), data_config.eval_split)


def _check_settings(data_config: ml_collections.ConfigDict) -> None:
    """Fails early, outside any tf.data tracing, on settings the per-example functions would reject."""
    augment.check_normalization(data_config.normalization)
    labels.check_out_of_range_mode(data_config.out_of_range_labels)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the defaults; the pipeline itself never touches JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise errors.DataError(f"the global batch size {global_batch_size} must be a positive multiple of the "
                               f"process count {process_count}")
    return global_batch_size // process_count


def _shard(source: sources.Source, data_config: ml_collections.ConfigDict, split: str, process_index: int,
           process_count: int) -> sources.Shard:
    """This process's shard of ``split``, decoded into memory when ``data_config.cache`` is set."""
    num_examples = source.num_examples(split)
    if num_examples == 0:
        raise errors.EmptySplitError(f"split {split!r} of dataset {source.info.name!r} has no examples")
    start, stop = order.shard_bounds(num_examples, process_index, process_count)
    if start == stop:  # more processes than examples: an empty shard with the records' structure
        shard = source.shard(split, 0, 1)
        return sources.Shard(shard.records.take(0), 0, shard.load)
    if data_config.cache:
        return _cached_shard(source, split, start, stop, data_config.num_parallel_calls)
    return source.shard(split, start, stop)


@functools.lru_cache(maxsize=8)
def _cached_shard(source: sources.Source, split: str, start: int, stop: int,
                  num_parallel_calls: int) -> sources.Shard:
    # Memoised: evaluation builds a new iterator every time it runs and should reuse the decoded shard.
    return source.cached_shard(split, start, stop, num_parallel_calls)


@functools.lru_cache(maxsize=32)
def _max_image_size(source: sources.Source, split: str) -> tuple[int, int]:
    # Memoised: reading every header of a split is cheap once but not at every evaluation.
    return source.max_image_size(split)


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options
