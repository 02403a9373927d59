"""The training loop: from the latest checkpoint in a workdir (or from scratch) to
``train.steps``, with logging, validation, checkpoints and the non-finite guard.

The host dispatches steps without waiting for them; it waits on the device only when it logs,
evaluates or saves. Logged train metrics are means over the logging window. SIGTERM and SIGINT
save the current step and stop the run (:mod:`kdjax.runtime.preemption`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax

from kdjax.config.loading import config_to_json
from kdjax.data import import_dataset_readers
from kdjax.io.checkpoints import TrainCheckpointer
from kdjax.io.paths import as_path
from kdjax.runtime import coordination, sharding
from kdjax.runtime.preemption import StopRequested, StopRequests
from kdjax.training.budget import StepTimer
from kdjax.training.experiment import Experiment
from kdjax.training.metrics_log import MetricsLog, MetricWindow, Profile
from kdjax.training.resume import (check_same_recipe, recipe_fingerprint, restore_reported,
                                   train_checkpointer)
from kdjax.training.state import TrainState
from kdjax.training.step import check_finite

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """What a finished training run reports."""

    step: int
    metrics: dict[str, float]        # the last logged train metrics
    eval: dict[str, Any]             # the reported evaluation (Experiment.evaluate's record),
                                     # with its 'checkpoint' rule ('best'/'last') and
                                     # 'checkpoint_step'
    state: TrainState                # the state of the reported checkpoint
    workdir: Any                     # an etils.epath.Path
    step_seconds: float | None = None   # median time of the steps after compilation (None when
                                        # this process trained fewer than two steps)
    stop: StopRequested | None = None   # a stop signal heard by the last step: the run finished,
                                        # and its caller stops before any further run


def _json_spec(spec: dict) -> dict:
    return {k: str(v) if k == "dtype" else v for k, v in spec.items()}


def _in_background(fn: Callable[[], Any]) -> concurrent.futures.Future:
    """``fn()`` started on a thread of its own; the thread ends when ``fn`` returns."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kdjax-compile")
    try:
        return pool.submit(fn)
    finally:
        pool.shutdown(wait=False)


def _due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action runs after ``step``: every ``every`` steps and after the last
    (``total``)."""
    return step % every == 0 or step == total


class _PeriodicActions:
    """What the loop does between steps, each on its own period: log the window's means, evaluate
    and keep the best checkpoint, save, and stop on a signal. Holds what they share: the logs,
    the checkpointer, the checkpoint metadata and the last logged and evaluated values."""

    def __init__(self, exp: Experiment, workdir, checkpointer: TrainCheckpointer, *,
                 start: int, label: str):
        config = exp.config
        self.exp, self.train = exp, config.train
        self.checkpointer = checkpointer
        self.checkpoints = workdir / "checkpoints"
        self.logger = MetricsLog(workdir, total_steps=config.train.steps,
                                 global_batch_size=config.train.batch_size, label=label)
        self.logger.start(start)
        self.window = MetricWindow()
        self.meta = {"config": config_to_json(config), "recipe": recipe_fingerprint(config),
                     "student": _json_spec(exp.student_spec)}
        self.last_metrics: dict[str, float] = {}
        self.evaluated: dict[int, dict] = {}   # step → its evaluation, for the reported checkpoint
        self.input_seconds = 0.0
        self.stop: StopRequested | None = None   # a stop heard by the last step (RunResult.stop)

    def after_step(self, step: int, state: TrainState, metrics, stops: StopRequests) -> None:
        self.window.add(metrics)
        total = self.train.steps
        if _due(step, self.train.log_every, total):
            self.log(step, state)
        if _due(step, self.train.eval_every, total):
            self.evaluate(step, state)
        if _due(step, self.train.checkpoint_every, total):
            self.save(step, state)
        # The last step is asked too (agreeing on every process whatever agree_every says): a
        # signal heard by then would otherwise be lost once the handlers are restored.
        if stops.reached(step, every_step=step == total):
            stop = StopRequested(stops.signal_name, step, str(self.checkpoints / str(step)),
                                 last=step == total)
            if step == total:  # saved above: the run ends as it would have
                self.stop = stop
                return
            self.save(step, state)
            self.checkpointer.wait_until_finished()
            raise stop

    def log(self, step: int, state: TrainState) -> None:
        check_finite(state, self.checkpoints)
        self.last_metrics = self.window.means()
        self.logger.write(step, self.last_metrics, input_seconds=self.input_seconds)
        self.input_seconds = 0.0

    def evaluate(self, step: int, state: TrainState) -> None:
        check_finite(state, self.checkpoints)
        result = self.exp.evaluate(state)
        self.evaluated = {step: result}
        self.logger.write(step, {"miou": result["miou"],
                                 "pixel_accuracy": result["pixel_accuracy"]}, prefix="val")
        self.checkpointer.save_best(step, state, meta={**self.meta, "data_step": step,
                                                       "eval": result},
                                    metric_value=result["miou"])
        self.logger.start(step, compiles=False)  # evaluation is not training throughput

    def save(self, step: int, state: TrainState) -> None:
        check_finite(state, self.checkpoints)
        self.checkpointer.save(step, state, meta={**self.meta, "data_step": step,
                                                  "metrics": self.last_metrics}, force=True)

    def reported(self, state: TrainState) -> tuple[TrainState, str, dict[str, Any]]:
        """The checkpoint the run reports (``eval.checkpoint``), the rule applied and its
        evaluation."""
        rule, steps = self.exp.config.eval.checkpoint, self.train.steps
        if rule == "last" and steps in self.evaluated:
            # This process trained, saved and evaluated the last step: its state is the one a
            # restore would read.
            return state, "last", self.evaluated[steps]
        reported, saved_meta, rule = restore_reported(self.checkpointer, self.exp.abstract_state,
                                                      rule)
        evaluation = (saved_meta["eval"] if rule == "best"
                      else self.evaluated.get(int(jax.device_get(reported.step)))
                      or self.exp.evaluate(reported))
        return reported, rule, evaluation


def _initial_state(exp: Experiment, checkpointer: TrainCheckpointer, workdir) -> TrainState:
    """The latest checkpoint in ``workdir`` (of the same recipe), or the initial state."""
    if checkpointer.latest_step() is None:
        return exp.init_state()
    state, saved_meta = checkpointer.restore(exp.abstract_state)
    check_same_recipe(saved_meta.get("recipe"), exp.config, workdir)
    log.info("resumed %s at step %d", workdir, int(state.step))
    return state


def run_training(exp: Experiment, workdir, *, label: str = "") -> RunResult:
    """Trains from the latest checkpoint in ``workdir`` (or from scratch) to ``train.steps``.

    A run killed at any point and started again with the same arguments resumes from its last
    checkpoint, sees the same batches from there on and ends in the same state.
    """
    config = exp.config
    workdir = as_path(workdir)
    # With one process the step compiles on another thread while this one imports TensorFlow
    # (seconds, the first time), restores or initialises the state and builds the input
    # pipeline, which renders or decodes data in Python: XLA compiles on its own threads,
    # without the GIL. Several processes compile after the pipeline, in which process 0 may
    # prepare the dataset that the others wait for. TFDS is imported before the thread starts: its
    # import is not safe beside another thread's.
    import_dataset_readers(config.data.name)
    compiling = _in_background(exp.compile) if jax.process_count() == 1 else None
    from kdjax.data.pipeline import make_train_iterator  # tf.data: imported when a pipeline is built

    checkpointer = train_checkpointer(workdir, keep_last=config.train.keep_checkpoints,
                                      async_save=config.train.async_checkpoints)
    state = _initial_state(exp, checkpointer, workdir)
    start = int(jax.device_get(state.step))
    teacher_variables = exp.teacher_inputs()
    batches = make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                  seed=config.seed, start_step=start)
    actions = _PeriodicActions(exp, workdir, checkpointer, start=start, label=label)
    if compiling is not None:
        train_step = compiling.result()
    else:
        # Every process compiles the step, then they meet: the CPU collectives give a peer only
        # 30 s to join the first collective, and compiling takes longer than that on a loaded
        # host, or on one whose compilation cache misses.
        train_step = exp.compile()
        coordination.barrier("train_step_compiled")
    profile = Profile(config.train.profile_steps, workdir / "profile")
    device_batches = sharding.device_batches(batches, exp.mesh)
    # The first steps after compilation are waited for and timed: the run's step cost.
    timer = StepTimer()
    try:
        # Without JAX's preemption service the processes agree on a stop when they log, where
        # they wait for the device anyway.
        with StopRequests(agree_every=config.train.log_every) as stops:
            for step in range(start + 1, config.train.steps + 1):
                waited = time.perf_counter()
                batch = next(device_batches)
                actions.input_seconds += time.perf_counter() - waited
                profile.step_started(step)
                timing = not timer.done
                if timing:
                    timer.start()
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = train_step(state, teacher_variables, batch)
                if timing:
                    timer.stop(metrics)
                profile.step_dispatched(step, state)
                actions.after_step(step, state, metrics, stops)
        checkpointer.wait_until_finished()
        reported, rule, evaluation = actions.reported(state)
        reported_step = int(jax.device_get(reported.step))
    finally:
        timer.close()
        profile.close()
        checkpointer.close()
        actions.logger.close()
    return RunResult(step=int(jax.device_get(state.step)), metrics=actions.last_metrics,
                     eval={**evaluation, "checkpoint": rule, "checkpoint_step": reported_step},
                     state=reported, workdir=workdir, step_seconds=timer.seconds,
                     stop=actions.stop)
