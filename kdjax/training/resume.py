"""Resuming and reporting: the recipe fingerprint a resumed run must match, and the checkpoint a
finished run reports (its best by validation mIoU, else its last)."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from kdjax.config.loading import ConfigError
from kdjax.io.checkpoints import CheckpointError, TrainCheckpointer
from kdjax.training.state import earlier_path

# Fields that do not change what a run computes; a resumed run may change them.
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.async_checkpoints", "eval", "distributed",
                     "seeds", "methods", "teacher_steps", "student.kernels", "teacher.kernels",
                     "train.profile_steps", "budget", "distill.loss_scratch_mb")


def recipe_fingerprint(config: ml_collections.ConfigDict) -> str:
    """The config as JSON without the fields in ``RESUMABLE_CHANGES``."""
    values = config.to_dict()
    for dotted in RESUMABLE_CHANGES:
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return json.dumps(values, sort_keys=True, default=str)


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [prefix.rstrip(".")] if old != new else []


def check_same_recipe(saved: str | None, config: ml_collections.ConfigDict, workdir) -> None:
    """Refuses to resume a run whose recipe (config, minus logging fields) has changed."""
    if saved is None or saved == recipe_fingerprint(config):
        return
    changed = _differences(json.loads(saved), json.loads(recipe_fingerprint(config)))
    raise ConfigError(
        f"{workdir} holds a run with another recipe (changed: {', '.join(changed[:8])}). Resuming "
        f"would mix two experiments; use a new --workdir, or revert the config.")


def train_checkpointer(workdir, **options) -> TrainCheckpointer:
    """The checkpointer of a run's train states in ``workdir`` (``options``: those of
    :class:`TrainCheckpointer`); it also reads checkpoints of the earlier state layout
    (:func:`kdjax.training.state.earlier_path`)."""
    return TrainCheckpointer(workdir, earlier_paths=earlier_path, **options)


def restore_reported(checkpointer: TrainCheckpointer, target: Any, rule: str
                     ) -> tuple[Any, dict[str, Any], str]:
    """The state a run reports under ``rule`` (``eval.checkpoint``): the best save when the rule
    is 'best' and there is one, else the latest. Returns (state, meta, the rule applied).

    Raises:
      CheckpointError: the run has no checkpoint at all.
    """
    if rule == "best" and checkpointer.best_step() is not None:
        state, meta = checkpointer.restore_best(target)
        return state, meta, "best"
    if checkpointer.latest_step() is None:
        raise CheckpointError(f"{checkpointer.workdir} holds no checkpoint; train first with "
                              f"`kdjax train --config=... --workdir={checkpointer.workdir}`.")
    state, meta = checkpointer.restore(target)
    return state, meta, "last"
