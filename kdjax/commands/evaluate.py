"""``kdjax eval``: evaluates a run's reported checkpoint under the configured eval mode and writes
``WORKDIR/eval/``: ``metrics.json``, ``metrics.md`` (per-class IoU, headed by the eval mode and
checkpoint) and PNG overlays (image | label | teacher | student)."""

from __future__ import annotations

import functools
import json

import jax
import ml_collections

from kdjax import training
from kdjax.evaluation import predict_classes, report
from kdjax.evaluation.predictions import network_predictor, write_prediction_overlays
from kdjax.evaluation.validation import eval_mode
from kdjax.io.paths import as_path
from kdjax.training.resume import restore_reported, train_checkpointer


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates ``workdir``'s reported checkpoint; returns the metrics record (percent)."""
    workdir = as_path(workdir)
    exp = training.setup(config)
    with train_checkpointer(workdir, async_save=False) as checkpointer:
        state, _, rule = restore_reported(checkpointer, exp.abstract_state, config.eval.checkpoint)
    record = {**exp.evaluate(state), "checkpoint": rule,
              "checkpoint_step": int(jax.device_get(state.step))}
    out_dir = workdir / "eval"
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(record, indent=1))
        mode = eval_mode(config)
        table = report.metrics_table(record, eval_mode=mode, checkpoint=rule)
        (out_dir / "metrics.md").write_text(table)
        print(table)
        predictors = {"student": jax.jit(functools.partial(predict_classes, functools.partial(
            exp.eval_logits, (state.student.params, state.student.batch_stats)), eval_mode=mode,
            num_classes=exp.num_classes))}
        if exp.teacher is not None:
            predictors = {"teacher": network_predictor(exp.teacher, config, exp.num_classes),
                          **predictors}
        overlays = write_prediction_overlays(config, predictors, out_dir, config.eval.overlays)
        print(f"wrote {out_dir / 'metrics.md'} and {len(overlays)} overlays in {out_dir}")
    return record
