"""Errors of the input pipeline, and how checks inside tf.data graphs become them.

A check that fails inside a tf.data function can only raise a TensorFlow ``InvalidArgumentError``. The
checks here put a tag and a complete message (file name, offending values) into that error, and
``from_op_error`` turns it back into the matching ``DataError`` subclass at the Python boundary.
"""

from __future__ import annotations

import re
from typing import Callable

import tensorflow as tf


class DataError(ValueError):
    """Bad input data or an unusable data configuration; the message says which file and what to do."""


class CorruptExampleError(DataError):
    """An image or label file that cannot be decoded."""


class SizeMismatchError(DataError):
    """An image and its label differ in size, or a label is not single-channel."""


class LabelOutOfRangeError(DataError):
    """A label value that is neither a class nor the ignore label after label mapping."""


class EmptySplitError(DataError):
    """A split (or one process's share of it) with no examples."""


class ImageTooLargeError(DataError):
    """An evaluation image larger than the configured ``eval_pad_size``."""


_KINDS: dict[str, type[DataError]] = {
    "corrupt": CorruptExampleError,
    "size_mismatch": SizeMismatchError,
    "label_out_of_range": LabelOutOfRangeError,
    "too_large": ImageTooLargeError,
}
# The tag and message travel as one string "kdjax:<kind>|<message>|" inside the TF error text.
_TAGGED = re.compile(r"kdjax:(\w+)\|(.*?)\|", re.DOTALL)


def require(ok: tf.Tensor, kind: str, message: Callable[[], tf.Tensor]) -> tf.Tensor:
    """Fails with a tagged error of ``kind`` unless the boolean scalar ``ok`` holds.

    ``message`` builds a string tensor and runs only on failure, so it may be expensive (listing the
    offending label values, say). Returns the check (a boolean scalar) for callers to use as a control dependency.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown check kind {kind!r}; expected one of {sorted(_KINDS)}")

    def fail():
        text = tf.strings.join([f"kdjax:{kind}|", message(), "|"])
        with tf.control_dependencies([tf.debugging.Assert(False, [text])]):
            return tf.constant(True)

    return tf.cond(ok, lambda: tf.constant(True), fail)


def about(file_name: tf.Tensor, template: str, *values: tf.Tensor) -> tf.Tensor:
    """String tensor ``"<file_name>: <template with values>"``; values print in full."""
    return tf.strings.join([file_name, tf.strings.format(template, values, summarize=-1)])


def from_op_error(error: tf.errors.OpError) -> DataError | None:
    """The ``DataError`` carried by a failed ``require`` check, or None for any other TF error."""
    match = _TAGGED.search(error.message)
    if match is None:
        return None
    kind, message = match.groups()
    return _KINDS[kind](message)


def explain_failure(records: tf.data.Dataset, per_example: Callable[[dict], object],
                    error: tf.errors.OpError) -> DataError:
    """Names the example behind a failed pipeline by re-running ``per_example`` eagerly on ``records``.

    Decoding errors inside tf.data do not say which file failed. Run eagerly, one record at a time,
    the same per-example function fails on the culprit, whose ``file_name`` is then at hand. Callers
    pass the records of the batch that failed (the pipeline is deterministic, so they are known).
    """
    for record in records:
        try:
            per_example(record)
        except DataError as found:
            return found
        except tf.errors.OpError as op_error:
            name = record["file_name"].numpy().decode(errors="replace")
            return from_op_error(op_error) or CorruptExampleError(f"{name}: {op_error.message}")
    return from_op_error(error) or DataError(f"the input pipeline failed: {error.message}")
