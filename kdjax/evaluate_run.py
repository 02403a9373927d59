"""``kdjax eval``: evaluates a run's reported checkpoint under the configured eval mode and writes
``WORKDIR/eval/``: ``metrics.json``, ``metrics.md`` (per-class IoU, headed by the eval mode and
checkpoint) and PNG overlays (image | label | teacher | student)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np

from kdjax import report, train
from kdjax.checkpoint import CheckpointError, TrainCheckpointer
from kdjax.data import dataset_info, make_eval_iterator
from kdjax.data.augment import denormalize
from kdjax.evaluate import predict_classes, write_overlays


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


def write_prediction_overlays(exp: train.Experiment, state: train.TrainState, out_dir: Path,
                              count: int) -> list[Path]:
    """Overlays of the first ``count`` validation images (this process's share)."""
    config = exp.config
    info = dataset_info(config.data.name)
    mode = train.eval_mode(config)
    student = jax.jit(functools.partial(predict_classes, functools.partial(
        exp.eval_logits, (state.params, state.rest)), eval_mode=mode,
        num_classes=exp.num_classes))
    teacher = None
    if exp.teacher is not None:
        def teacher_logits(images):
            return exp.teacher.merge()(images.astype(exp.teacher.dtype), train=False).logits
        teacher = jax.jit(functools.partial(predict_classes, teacher_logits, eval_mode=mode,
                                            num_classes=exp.num_classes))
    paths = []
    for batch in make_eval_iterator(config.data, global_batch_size=config.eval.batch_size,
                                    process_index=0, process_count=1):
        predictions = {"student": np.asarray(student(batch["image"]))}
        if teacher is not None:
            predictions = {"teacher": np.asarray(teacher(batch["image"])), **predictions}
        images = denormalize(batch["image"], config.data.normalization)
        for i in np.flatnonzero(batch["valid"]):
            if len(paths) == count:
                return paths
            h, w = int(batch["height"][i]), int(batch["width"][i])
            path = out_dir / f"overlay_{len(paths):03d}.png"
            write_overlays(path, images[i, :h, :w], batch["label"][i, :h, :w],
                           {name: p[i, :h, :w] for name, p in predictions.items()},
                           info.palette, info.ignore_label)
            paths.append(path)
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
        overlays = write_prediction_overlays(exp, state, out_dir, config.eval.overlays)
        print(f"wrote {out_dir / 'metrics.md'} and {len(overlays)} overlays in {out_dir}")
    return record
