"""Input pipeline: per-process sharded, seeded and resumable tf.data batches for training and
evaluation, the built-in synthetic street scenes, and dataset metadata.

TensorFlow is imported only when a pipeline is built: ``metadata`` and ``synthetic`` load
without it, and the pipeline's names below are loaded when first used.
"""

import importlib

from kdjax._extras import require
from kdjax.data.metadata import DatasetInfo, dataset_info
from kdjax.data.synthetic import SYNTHETIC_INFO, render_scene

# Names that need TensorFlow, by the module that defines them.
_WITH_TENSORFLOW = {
    "BatchIterator": "pipeline", "LabelStats": "pipeline", "make_eval_iterator": "pipeline",
    "make_train_iterator": "pipeline", "CorruptExampleError": "errors", "DataError": "errors",
    "EmptySplitError": "errors", "ImageTooLargeError": "errors",
    "LabelOutOfRangeError": "errors", "SizeMismatchError": "errors",
}

__all__ = ["DatasetInfo", "SYNTHETIC_INFO", "dataset_info", "import_dataset_readers",
           "render_scene", *sorted(_WITH_TENSORFLOW)]


def import_dataset_readers(data_name: str) -> None:
    """Imports TFDS now if the dataset ``data_name`` is read through it (all but ``synthetic``).

    Call it before starting a thread that may import modules. TFDS's own import replaces
    ``builtins.__import__`` for the whole process while it runs (etils' ``epy.lazy_imports``), so
    a module that another thread imports meanwhile binds placeholders in place of its imports and
    fails when it uses them (``TypeError: 'LazyModule' object is not callable``, seen in a
    checkpoint restore beside the first evaluation's TFDS import). Imported first, on one thread,
    TFDS is then only read.

    Raises:
      ModuleNotFoundError: TFDS is needed and kdjax's ``data`` extra is not installed.
    """
    if data_name != SYNTHETIC_INFO.name:
        require("data", by=f"data.name={data_name!r}")
        importlib.import_module("tensorflow_datasets")


def __getattr__(name: str):
    if name in _WITH_TENSORFLOW:
        return getattr(importlib.import_module(f"kdjax.data.{_WITH_TENSORFLOW[name]}"), name)
    raise AttributeError(f"module 'kdjax.data' has no attribute {name!r}")
