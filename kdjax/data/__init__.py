"""Input pipeline: per-process sharded, seeded and resumable tf.data batches for training and
evaluation, the built-in synthetic street scenes, and dataset metadata."""

from kdjax.data.config import default_data_config
from kdjax.data.errors import (CorruptExampleError, DataError, EmptySplitError, ImageTooLargeError,
                               LabelOutOfRangeError, SizeMismatchError)
from kdjax.data.metadata import DatasetInfo, dataset_info
from kdjax.data.pipeline import BatchIterator, LabelStats, make_eval_iterator, make_train_iterator
from kdjax.data.synthetic import SYNTHETIC_INFO, render_scene

__all__ = [
    "BatchIterator", "CorruptExampleError", "DataError", "DatasetInfo", "EmptySplitError", "ImageTooLargeError",
    "LabelOutOfRangeError", "LabelStats", "SYNTHETIC_INFO", "SizeMismatchError", "dataset_info",
    "default_data_config", "make_eval_iterator", "make_train_iterator", "render_scene",
]
