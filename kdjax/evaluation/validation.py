"""Validation of a run's model under the config's eval settings: the eval mode, the validation
batches as global arrays, and the metrics record (percent) that runs report."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections

from kdjax.data.metadata import dataset_info
from kdjax.evaluation.inference import EvalMode
from kdjax.evaluation.loop import evaluate
from kdjax.runtime import sharding


def eval_mode(config: ml_collections.ConfigDict) -> EvalMode:
    """The :class:`EvalMode` of ``config.eval``."""
    e = config.eval
    return EvalMode(mode=e.mode, crop_size=tuple(e.crop_size) if e.crop_size else None,
                    stride=tuple(e.stride) if e.stride else None, scales=tuple(e.scales),
                    flip=bool(e.flip))


def eval_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Iterator[dict]:
    """This process's validation batches (``config.eval``) assembled into global arrays."""
    from kdjax.data.pipeline import make_eval_iterator  # tf.data: imported when a pipeline is built

    local = make_eval_iterator(config.data, global_batch_size=config.eval.batch_size)
    for index, batch in enumerate(local):
        if config.eval.max_batches is not None and index >= config.eval.max_batches:
            break
        yield sharding.global_batch(batch, mesh)


def validate(logits_fn: Callable, state: Any, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh, batches=None) -> dict[str, Any]:
    """Validation metrics of ``logits_fn(state, images)`` in percent: ``miou``,
    ``pixel_accuracy``, ``mean_class_accuracy``, ``per_class_iou`` (name → IoU or None) and
    ``eval_mode`` (its description).

    ``batches`` default to the config's validation set (:func:`eval_batches`); ``logits_fn`` keys
    the compilation cache, so pass the same function object every time.
    """
    info = dataset_info(config.data.name)
    mode = eval_mode(config)
    metrics, _ = evaluate(logits_fn, eval_batches(config, mesh) if batches is None else batches,
                          num_classes=info.num_classes, ignore_label=info.ignore_label,
                          eval_mode=mode, state=state)
    return {**metrics.to_dict(info.class_names), "eval_mode": mode.describe()}
