"""From stored label values to train ids, with the checks that name bad examples."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kdjax.data import errors, metadata

OUT_OF_RANGE_MODES = ("error", "ignore")


def check_out_of_range_mode(mode: str) -> None:
    if mode not in OUT_OF_RANGE_MODES:
        raise errors.DataError(f"data.out_of_range_labels must be one of {OUT_OF_RANGE_MODES}, got {mode!r}")


def train_id_table(info: metadata.DatasetInfo) -> np.ndarray:
    """(256,) int32: the train id of each stored uint8 value, or -1 for a value that is not allowed.

    Without a label map, stored values are train ids already. Either way a value is allowed when it
    lands on a class (0..K-1) or on the ignore label.
    """
    table = np.arange(256) if info.label_map is None else np.asarray(info.label_map).astype(np.int64)
    if table.shape != (256,):
        raise errors.DataError(f"label_map of {info.name!r} must have shape (256,), got {table.shape}")
    allowed = ((table >= 0) & (table < info.num_classes)) | (table == info.ignore_label)
    return np.where(allowed, table, -1).astype(np.int32)


def to_train_ids(example: dict[str, tf.Tensor], info: metadata.DatasetInfo,
                 out_of_range: str) -> tuple[tf.Tensor, tf.Tensor]:
    """Checks an example's label against its image and maps it to train ids.

    Args:
      example: ``image`` uint8 (H, W, 3), ``label`` uint8 (H, W, C) stored values, ``file_name`` string.
      info: the dataset's classes, ignore label and label map.
      out_of_range: 'error' fails on a value that is neither a class nor ignore (naming the file and
        the values); 'ignore' maps such values to the ignore label.

    Returns:
      label: int32 (H, W) train ids or ``info.ignore_label``.
      num_out_of_range: int32 scalar, pixels that were mapped to ignore for being out of range.
    """
    check_out_of_range_mode(out_of_range)
    image, label, file_name = example["image"], example["label"], example["file_name"]
    image_size, label_shape = tf.shape(image)[:2], tf.shape(label)
    same_size = errors.require(
        tf.reduce_all(image_size == label_shape[:2]), "size_mismatch",
        lambda: errors.about(file_name, ": the image is {} (height, width) but its label is {}",
                             image_size, label_shape[:2]))
    single_channel = errors.require(
        label_shape[2] == 1, "size_mismatch",
        lambda: errors.about(file_name, ": the label has {} channels; labels must be single-channel class ids",
                             label_shape[2]))
    with tf.control_dependencies([same_size, single_channel]):
        stored = tf.cast(label[..., 0], tf.int32)
    mapped = tf.gather(train_id_table(info), stored)
    bad = mapped < 0
    if out_of_range == "error":
        def message():
            values = tf.sort(tf.unique(tf.boolean_mask(stored, bad)).y)
            return errors.about(
                file_name, f": label values {{}} are neither a class (0..{info.num_classes - 1}) nor the ignore "
                f"label ({info.ignore_label}) after label mapping; fix the data or set "
                f"data.out_of_range_labels='ignore'", values)

        in_range = errors.require(tf.logical_not(tf.reduce_any(bad)), "label_out_of_range", message)
        with tf.control_dependencies([in_range]):
            mapped = tf.identity(mapped)
    label = tf.where(bad, info.ignore_label, mapped)
    return label, tf.reduce_sum(tf.cast(bad, tf.int32))
