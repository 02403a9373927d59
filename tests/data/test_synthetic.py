"""The built-in synthetic street scenes."""

import itertools

import numpy as np

from kdjax.config.data_defaults import default_data_config
from kdjax.data import dataset_info, make_eval_iterator, make_train_iterator, sources
from kdjax.data.synthetic import CLASS_NAMES, SYNTHETIC_INFO, render_scene, scene_seed


def test_render_scene_returns_an_rgb_image_and_class_ids():
    image, label = render_scene(3, 40, 80)
    assert image.shape == (40, 80, 3) and image.dtype == np.uint8
    assert label.shape == (40, 80) and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(range(len(CLASS_NAMES))) | {255}


def test_a_seed_always_renders_the_same_scene_and_seeds_differ():
    image, label = render_scene(5, 32, 64)
    again_image, again_label = render_scene(5, 32, 64)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(label, again_label)
    assert (render_scene(6, 32, 64)[1] != label).mean() > 0.1


def test_the_layout_does_not_depend_on_the_resolution():
    _, small = render_scene(11, 48, 96)
    _, large = render_scene(11, 192, 384)
    # Pixel centre i of the small frame lies between large pixels 4i+1 and 4i+2.
    agreement = (large[1::4, 1::4] == small).mean()
    assert agreement > 0.95, agreement


def test_scenes_show_every_class_including_small_ones_and_void():
    labels = np.stack([render_scene(scene_seed(0, "train", i), 64, 128)[1] for i in range(16)])
    share = np.bincount(labels.ravel(), minlength=256) / labels.size
    assert (share[:len(CLASS_NAMES)] > 0).all(), share[:len(CLASS_NAMES)]
    assert share[255] > 0
    # Poles and people are thin or small: capacity matters for them.
    assert share[CLASS_NAMES.index("pole")] < 0.03 and share[CLASS_NAMES.index("person")] < 0.03


def test_train_and_val_scenes_are_disjoint():
    train = {scene_seed(0, "train", i) for i in range(500)}
    val = {scene_seed(0, "val", i) for i in range(500)}
    assert len(train) == 500 and not train & val


def test_the_dataset_is_registered():
    assert dataset_info("synthetic") is SYNTHETIC_INFO


def test_the_pipeline_reads_the_rendered_scenes():
    config = default_data_config()
    config.synthetic.update(num_val=3, height=24, width=48)
    config.normalization = "none"
    batch = next(make_eval_iterator(config, global_batch_size=3, process_index=0, process_count=1))
    for i in range(3):
        image, label = render_scene(scene_seed(config.synthetic.seed, "val", i), 24, 48)
        np.testing.assert_array_equal(batch["image"][i], image)
        np.testing.assert_array_equal(batch["label"][i], label)


def test_scenes_rendered_into_memory_are_those_tf_data_decodes_and_batch_the_same():
    config = default_data_config()
    config.synthetic.update(num_train=6, num_val=3, height=24, width=48)
    source = sources.open_source(config)
    for split, start, stop in (("train", 1, 5), ("val", 0, 3), ("train", 2, 2)):
        fast = source.cached_shard(split, start, stop, num_parallel_calls=1)
        generic = sources.cache_shard(source.shard(split, start, stop), num_parallel_calls=2)
        assert fast.size == generic.size == stop - start
        fast_records = list(fast.records.as_numpy_iterator())
        generic_records = list(generic.records.as_numpy_iterator())
        assert [(r["index"], r["file_name"]) for r in fast_records] == [
            (r["index"], r["file_name"]) for r in generic_records]
        fast_examples = list(fast.records.map(fast.load).as_numpy_iterator())
        generic_examples = list(generic.records.map(generic.load).as_numpy_iterator())
        for x, y in zip(fast_examples, generic_examples, strict=True):
            for key in ("image", "label", "file_name"):
                np.testing.assert_array_equal(x[key], y[key])
    plain, cached = config.copy_and_resolve_references(), config.copy_and_resolve_references()
    plain.crop_size, cached.crop_size = (16, 32), (16, 32)
    cached.cache = True
    train = dict(global_batch_size=2, seed=3, process_index=0, process_count=1)
    for a, b in zip(itertools.islice(make_train_iterator(plain, **train), 4),
                    itertools.islice(make_train_iterator(cached, **train), 4)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
