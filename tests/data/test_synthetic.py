"""The built-in synthetic street scenes."""

import numpy as np

from kdjax.config.data_defaults import default_data_config
from kdjax.data import dataset_info, make_eval_iterator
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
