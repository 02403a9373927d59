"""Training and evaluation iterators: determinism, resumption, per-process shards, evaluation padding."""

import numpy as np
import pytest
import tensorflow as tf

from kdjax.config.data_defaults import default_data_config
from kdjax.data import augment, make_eval_iterator, make_train_iterator, sources
from kdjax.data.order import shard_bounds
from tests.data import example_numbers, numbered_examples, plain_config, source_of


def synthetic_config(**overrides):
    config = default_data_config()
    config.synthetic.update(num_train=6, num_val=2, height=24, width=40)
    config.crop_size = (16, 24)
    config.num_parallel_calls = 2
    config.update(overrides)
    return config


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def train(config, *, seed=0, start_step=0, global_batch_size=4, process_index=0, process_count=1, source=None):
    return make_train_iterator(config, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
                               process_index=process_index, process_count=process_count, source=source)


def test_training_batches_are_float_images_and_int_labels():
    batch = next(train(synthetic_config(), global_batch_size=4, process_count=2))
    assert batch.keys() == {"image", "label"}
    assert batch["image"].shape == (2, 16, 24, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 16, 24) and batch["label"].dtype == np.int32


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    config = synthetic_config(photometric=True)
    first, second = take(train(config, seed=3), 4), take(train(config, seed=3), 4)
    assert_same_batches(first, second)
    other = take(train(config, seed=4), 4)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


@pytest.mark.parametrize("shuffle_buffer", [1000, 4])  # whole-epoch permutation; windows with rotation
def test_resuming_at_step_k_gives_the_uninterrupted_batches(shuffle_buffer):
    config = synthetic_config(shuffle_buffer=shuffle_buffer)
    uninterrupted = take(train(config, seed=7), 7)  # 28 examples: several epochs of 6
    for k in (1, 3, 5):
        assert_same_batches(take(train(config, seed=7, start_step=k), 7 - k), uninterrupted[k:])


class CountingSource(sources.Source):
    """Wraps a source and records the index of every example it loads."""

    def __init__(self, inner):
        self.inner, self.info, self.loaded = inner, inner.info, []

    def num_examples(self, split):
        return self.inner.num_examples(split)

    def max_image_size(self, split):
        return self.inner.max_image_size(split)

    def shard(self, split, start, stop):
        shard = self.inner.shard(split, start, stop)

        def load(record):
            seen = tf.numpy_function(lambda i: self.loaded.append(int(i)) or i, [record["index"]], tf.int64)
            with tf.control_dependencies([seen]):
                return shard.load(record)

        return sources.Shard(shard.records, shard.size, load)


def test_resuming_skips_examples_without_decoding_them():
    source = CountingSource(source_of(train=numbered_examples(6)))
    iterator = train(plain_config(prefetch=1), start_step=60, global_batch_size=2, source=source)
    next(iterator)
    assert len(source.loaded) < 30  # the batch, plus what prefetching and parallel calls ran ahead


@pytest.mark.parametrize("shuffle_buffer", [1000, 4])
def test_every_epoch_shows_every_example_once_in_a_new_order(shuffle_buffer):
    source = source_of(train=numbered_examples(6))
    batches = take(train(plain_config(shuffle_buffer=shuffle_buffer), global_batch_size=2, source=source), 9)
    seen = [n for batch in batches for n in example_numbers(batch["image"])]
    epochs = [seen[0:6], seen[6:12], seen[12:18]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(6))
    assert len({tuple(epoch) for epoch in epochs}) > 1


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_complete(process_count):
    total = 10
    source = source_of(train=numbered_examples(total))
    shards = []
    for process in range(process_count):
        start, stop = shard_bounds(total, process, process_count)
        iterator = train(plain_config(), global_batch_size=process_count, process_index=process,
                         process_count=process_count, source=source)
        epoch = [n for batch in take(iterator, stop - start) for n in example_numbers(batch["image"])]
        assert sorted(epoch) == list(range(start, stop))  # one epoch of the process: its whole shard, once
        shards.append(set(epoch))
    assert sorted(n for shard in shards for n in shard) == list(range(total))


def test_caching_decoded_examples_changes_nothing():
    source = source_of(train=numbered_examples(5), val=numbered_examples(3, height=5, width=7))
    plain = plain_config(crop=(5, 7), scale_range=(0.5, 2.0), flip=True)
    cached = plain_config(crop=(5, 7), scale_range=(0.5, 2.0), flip=True, cache=True)
    assert_same_batches(take(train(plain, source=source), 4), take(train(cached, source=source), 4))
    evaluate = dict(global_batch_size=2, process_index=0, process_count=1, source=source)
    assert_same_batches(list(make_eval_iterator(plain, **evaluate)), list(make_eval_iterator(cached, **evaluate)))


def test_over_a_cached_shard_equal_configs_share_one_built_pipeline(monkeypatch):
    """Each run of a comparison asks for the same pipelines: with ``cache`` they are built (their
    per-example functions traced) once, and every caller still gets a fresh iterator from the
    first batch; a changed setting builds its own."""
    traced = []
    real = augment.normalize
    monkeypatch.setattr(augment, "normalize", lambda *a, **k: traced.append(1) or real(*a, **k))
    source = source_of(train=numbered_examples(5), val=numbered_examples(3, height=5, width=7))
    config = plain_config(crop=(5, 7), flip=True, cache=True)
    first = take(train(config, seed=11, source=source), 3)
    assert len(traced) == 1
    equal = plain_config(crop=(5, 7), flip=True, cache=True)  # another object, the same values
    assert_same_batches(take(train(equal, seed=11, source=source), 3), first)
    assert len(traced) == 1
    assert_same_batches(take(train(config, seed=11, start_step=1, source=source), 2), first[1:])
    take(train(config, seed=12, source=source), 1)
    assert len(traced) == 3
    evaluate = dict(global_batch_size=2, process_index=0, process_count=1, source=source)
    once = list(make_eval_iterator(config, **evaluate))
    assert_same_batches(list(make_eval_iterator(equal, **evaluate)), once)
    assert len(traced) == 4
    uncached = plain_config(crop=(5, 7), flip=True)
    take(train(uncached, seed=11, source=source), 1)
    take(train(uncached, seed=11, source=source), 1)
    assert len(traced) == 6


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_evaluation_pads_full_images_and_every_process_yields_the_same_number_of_batches(process_count):
    sizes = [(5, 9), (7, 4), (3, 3), (6, 8), (2, 9), (7, 6), (4, 5)]
    examples = []
    for i, (h, w) in enumerate(sizes):
        label = np.arange(h * w).reshape(h, w) % 3
        examples.append((f"v{i}.png", np.full((h, w, 3), (i + 1, 9, 9), np.uint8), label.astype(np.uint8)))
    source = source_of(val=examples)
    config = plain_config()
    batch_counts, seen = set(), []
    for process in range(process_count):
        batches = list(make_eval_iterator(config, global_batch_size=2 * process_count, process_index=process,
                                          process_count=process_count, source=source))
        batch_counts.add(len(batches))
        for batch in batches:
            assert batch["image"].shape[1:] == (7, 9, 3) and batch["label"].shape[1:] == (7, 9)
            for image, label, valid, h, w in zip(batch["image"], batch["label"], batch["valid"], batch["height"],
                                                 batch["width"]):
                if not valid:
                    assert h == w == 0 and (label == 255).all() and (image == 0).all()
                    continue
                number = int(image[0, 0, 0]) - 1
                seen.append(number)
                assert (h, w) == sizes[number]
                np.testing.assert_array_equal(label[:h, :w], examples[number][2])
                assert (label[h:] == 255).all() and (label[:, w:] == 255).all()
                assert (image[h:] == 0).all() and (image[:, w:] == 0).all()
    assert len(batch_counts) == 1
    assert sorted(seen) == list(range(len(sizes)))


def test_evaluation_pads_after_normalisation():
    source = source_of(val=numbered_examples(1, height=3, width=4) + numbered_examples(1, height=5, width=6))
    batch = next(make_eval_iterator(plain_config(normalization="imagenet"), global_batch_size=2, process_index=0,
                                    process_count=1, source=source))
    assert (batch["image"][0, 3:] == 0).all() and (batch["image"][0, :, 4:] == 0).all()
    assert (batch["image"][0, :3, :4] < 0).all()  # dark pixels normalise below zero
