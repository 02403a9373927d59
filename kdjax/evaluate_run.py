"""``kdjax eval``: evaluates a run's reported checkpoint under the configured eval mode and writes
``WORKDIR/eval/``: ``metrics.json``, ``metrics.md`` (per-class IoU, headed by the eval mode and
checkpoint) and PNG overlays (image | label | teacher | student)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import ml_collections
import numpy as np

from kdjax import report, train
from kdjax.checkpoint import CheckpointError, TrainCheckpointer
from kdjax.data import dataset_info, make_eval_iterator
from kdjax.data.augment import denormalize
from kdjax.evaluate import predict_classes, write_overlays
from kdjax.networks import Network


def restore_reported(exp: train.Experiment, workdir: Path) -> tuple[train.TrainState, str]:
    """The state a run reports (``config.eval.checkpoint``: 'best' or 'last') and its rule."""
    repl = train.sharding.replicated(exp.mesh)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                          exp.abstract_state)
    with TrainCheckpointer(workdir, async_save=False) as checkpointer:
        rule = exp.config.eval.checkpoint
        if rule == "best" and checkpointer.best_step() is not None:
            state, _ = checkpointer.restore_best(target)
            return state, "best"
        if checkpointer.latest_step() is None:
            raise CheckpointError(f"{workdir} holds no checkpoint; train first with "
                                  f"`kdjax train --config=... --workdir={workdir}`.")
        state, _ = checkpointer.restore(target)
        return state, "last"


Predictor = Callable[[jax.Array], jax.Array]


def network_predictor(network: Network, config: ml_collections.ConfigDict,
                      num_classes: int) -> Predictor:
    """Jitted (N, H, W, 3) images → (N, H, W) classes of a frozen network, in the eval mode."""
    def logits(images):
        return network.merge()(images.astype(network.dtype), train=False).logits
    return jax.jit(functools.partial(predict_classes, logits, eval_mode=train.eval_mode(config),
                                     num_classes=num_classes))


def write_prediction_overlays(config: ml_collections.ConfigDict,
                              predictors: Mapping[str, Predictor], out_dir: Path, count: int, *,
                              prediction_only_copies: bool = False) -> list[Path]:
    """``overlay_<k>.png`` (image | label | each predictor's classes) for the first ``count``
    validation images; with ``prediction_only_copies`` also ``predictions_<k>.png``, the
    prediction panels alone. Runs on one process."""
    info = dataset_info(config.data.name)
    paths = []
    for batch in make_eval_iterator(config.data, global_batch_size=config.eval.batch_size,
                                    process_index=0, process_count=1):
        predictions = {name: np.asarray(predict(batch["image"]))
                       for name, predict in predictors.items()}
        images = denormalize(batch["image"], config.data.normalization)
        for i in np.flatnonzero(batch["valid"]):
            if len(paths) == count:
                return paths
            h, w = int(batch["height"][i]), int(batch["width"][i])
            row = dict(image_uint8=images[i, :h, :w], label=batch["label"][i, :h, :w],
                       predictions={name: p[i, :h, :w] for name, p in predictions.items()},
                       palette=info.palette, ignore_label=info.ignore_label)
            if prediction_only_copies:
                write_overlays(out_dir / f"predictions_{len(paths):03d}.png", **row,
                               show_inputs=False)
            paths.append(write_overlays(out_dir / f"overlay_{len(paths):03d}.png", **row))
    return paths


def run_eval(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Evaluates ``workdir``'s reported checkpoint; returns the metrics record (percent)."""
    workdir = Path(workdir)
    exp = train.setup(config)
    state, rule = restore_reported(exp, workdir)
    metrics = train.evaluate_student(exp, state)
    mode = train.eval_mode(config)
    record = {**metrics.to_dict(exp.class_names), "eval_mode": mode.describe(),
              "checkpoint": rule, "checkpoint_step": int(jax.device_get(state.step))}
    out_dir = workdir / "eval"
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(record, indent=1))
        table = report.metrics_table(metrics, exp.class_names, eval_mode=mode, checkpoint=rule)
        (out_dir / "metrics.md").write_text(table)
        print(table)
        predictors = {"student": jax.jit(functools.partial(predict_classes, functools.partial(
            exp.eval_logits, (state.params, state.rest)), eval_mode=mode,
            num_classes=exp.num_classes))}
        if exp.teacher is not None:
            predictors = {"teacher": network_predictor(exp.teacher, config, exp.num_classes),
                          **predictors}
        overlays = write_prediction_overlays(config, predictors, out_dir, config.eval.overlays)
        print(f"wrote {out_dir / 'metrics.md'} and {len(overlays)} overlays in {out_dir}")
    return record
