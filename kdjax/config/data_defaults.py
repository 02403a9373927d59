"""The ``data`` section of an experiment config, with its defaults."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# tf.data.AUTOTUNE, spelled out so that reading a config does not import TensorFlow.
AUTOTUNE = -1


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults of every input-pipeline setting; experiment configs override what they need."""
    c = ml_collections.ConfigDict()
    c.name = "synthetic"  # 'synthetic' (built in) or a TFDS builder: 'camvid', 'cityscapes', 'voc_aug', 'ade20k', 'pascal_context'
    c.builder_config = config_dict.placeholder(str)  # TFDS builder config name; None = the builder's default
    c.data_dir = config_dict.placeholder(str)  # TFDS data dir; None = TFDS's default (~/tensorflow_datasets)
    c.manual_dir = config_dict.placeholder(str)  # original files; when set, a missing prepared dataset is built from them
    c.train_split = "train"  # split role ('train', 'val') or a TFDS split expression such as 'train[:10%]'
    c.eval_split = "val"  # as train_split, for evaluation
    c.crop_size = (512, 512)  # (height, width) of training crops
    c.scale_range = (0.5, 2.0)  # random scale factor range applied before cropping
    c.scale_step = config_dict.placeholder(float)  # None = continuous scales; 0.1 = CIRKD's 0.5, 0.6, ..., 2.0
    c.base_size = config_dict.placeholder(int)  # None = scale the original size; N = scale so the short side is N·factor
    c.flip = True  # random horizontal flip with probability 1/2
    c.photometric = False  # random brightness, contrast, saturation and hue, each with probability 1/2
    c.normalization = "imagenet"  # 'imagenet' (RGB mean/std), 'cirkd_bgr' (BGR minus Caffe mean, no std) or 'none'
    c.out_of_range_labels = "error"  # label values outside the classes: 'error' (name the file) or 'ignore' (count them)
    c.eval_pad_size = config_dict.placeholder(tuple)  # (H, W) eval batches are padded to; None = largest image of the split
    c.shuffle_buffer = 1000  # examples shuffled together; at least the split size gives a full permutation per epoch
    c.num_parallel_calls = AUTOTUNE  # parallel decode/augment calls (AUTOTUNE = -1, or an int)
    c.prefetch = AUTOTUNE  # batches prepared ahead of the train step (AUTOTUNE = -1, or an int)
    c.cache = False  # keep decoded examples in memory after the first pass (small datasets)

    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.num_train = 256  # scenes in the 'train' split
    c.synthetic.num_val = 64  # scenes in the 'val' split, disjoint from train
    c.synthetic.height = 128  # rendered frame height in pixels
    c.synthetic.width = 256  # rendered frame width in pixels
    c.synthetic.seed = 0  # seed of the scene set (not of the training order)
    return c
