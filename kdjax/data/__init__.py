"""Input pipeline: per-process sharded, seeded and resumable tf.data batches for training and
evaluation, the built-in synthetic street scenes, and dataset metadata.

TensorFlow is imported only when a pipeline is built: ``metadata`` and ``synthetic`` load
without it, and the pipeline's names below are loaded when first used.
"""

import importlib

from kdjax.data.metadata import DatasetInfo, dataset_info
from kdjax.data.synthetic import SYNTHETIC_INFO, render_scene

# Names that need TensorFlow, by the module that defines them.
_WITH_TENSORFLOW = {
    "BatchIterator": "pipeline", "LabelStats": "pipeline", "make_eval_iterator": "pipeline",
    "make_train_iterator": "pipeline", "CorruptExampleError": "errors", "DataError": "errors",
    "EmptySplitError": "errors", "ImageTooLargeError": "errors",
    "LabelOutOfRangeError": "errors", "SizeMismatchError": "errors",
}

__all__ = ["DatasetInfo", "SYNTHETIC_INFO", "dataset_info", "render_scene",
           *sorted(_WITH_TENSORFLOW)]


def __getattr__(name: str):
    if name in _WITH_TENSORFLOW:
        return getattr(importlib.import_module(f"kdjax.data.{_WITH_TENSORFLOW[name]}"), name)
    raise AttributeError(f"module 'kdjax.data' has no attribute {name!r}")
