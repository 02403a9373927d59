"""Which example comes when: per-process shards and the seeded, resumable order of training records.

The training stream of a process is its shard's records, epoch after epoch, each epoch in its own
order. That order is a pure function of (seed, epoch), computed with stateless random ops, so the
record at any position of the stream is known without reading what came before it: resuming at
position p starts at epoch p // n and skips p % n records, before anything is decoded.

An epoch is shuffled in windows of ``window`` consecutive records (all of it when the window is at
least the shard size): a window is permuted in memory, as a shuffle buffer would, but with a stateless
permutation. When windows are smaller than the shard, each epoch also rotates the shard by a random
offset so that windows hold different records from one epoch to the next.
"""

from __future__ import annotations

import tensorflow as tf

from kdjax.data import errors

# Salts that separate the random streams derived from one seed.
_ORDER_SALT = 0x5EED_0D3E
_AUGMENT_SALT = 0x5EED_A06E
_MAX_EPOCHS = 1 << 62  # the training stream repeats "forever"


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of the contiguous share of process ``process_index``; shares differ by at most 1,
    are disjoint and together cover all examples."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    return num_examples * process_index // process_count, num_examples * (process_index + 1) // process_count


def _key(seed: int, salt: int, *data: tf.Tensor) -> tf.Tensor:
    """int64 (2,) stateless key for (seed, salt, *data)."""
    key = tf.constant([seed, salt], tf.int64)
    for value in data:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
    return key


def augmentation_key(seed: int, epoch: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """int64 (2,) random key of example ``index`` in ``epoch``."""
    return _key(seed, _AUGMENT_SALT, epoch, index)


def training_records(records: tf.data.Dataset, size: int, *, seed: int, window: int,
                     start_position: int = 0) -> tf.data.Dataset:
    """The endless, seeded stream of a shard's records, starting at ``start_position``.

    Args:
      records: the shard's records in a fixed order (scalar features only).
      size: number of records in the shard (> 0).
      seed: seed of the order.
      window: number of consecutive records permuted together (> 0).
      start_position: number of records of the stream to skip (0 = the start of epoch 0).

    Returns:
      The records, each with an added int64 ``epoch``.
    """
    if size <= 0:
        raise errors.EmptySplitError("cannot build a training stream over an empty shard")
    if window <= 0:
        raise errors.DataError(f"data.shuffle_buffer must be positive, got {window}")
    start_epoch, offset = divmod(start_position, size)

    def permute(window_index, batch, epoch):
        count = tf.shape(batch["index"], out_type=tf.int64)[0]
        order = tf.random.experimental.index_shuffle(
            tf.range(count), _key(seed, _ORDER_SALT, epoch, window_index), count - 1)
        return {name: tf.gather(values, order) for name, values in batch.items()}

    def epoch_records(epoch):
        rotated = records
        if window < size:
            shift = tf.random.stateless_uniform([], _key(seed, _ORDER_SALT, epoch, -1), 0, size, tf.int64)
            rotated = records.skip(shift).concatenate(records.take(shift))
        windows = rotated.batch(window).enumerate().map(lambda i, batch: permute(i, batch, epoch))
        return windows.unbatch().map(lambda record: {**record, "epoch": epoch})

    return tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch_records).skip(offset)
