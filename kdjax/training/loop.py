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
from kdjax.io.checkpoints import TrainCheckpointer
from kdjax.io.paths import as_path
from kdjax.runtime import coordination, sharding
from kdjax.runtime.preemption import StopRequested, StopRequests
from kdjax.training.budget import StepTimer
from kdjax.training.experiment import Experiment
from kdjax.training.metrics_log import MetricsLog, MetricWindow, Profile
from kdjax.training.resume import check_same_recipe, recipe_fingerprint, restore_reported
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


def _json_spec(spec: dict) -> dict:
    return {k: str(v) if k == "dtype" else v for k, v in spec.items()}


def _in_background(fn: Callable[[], Any]) -> concurrent.futures.Future:
    """``fn()`` started on a thread of its own; the thread ends when ``fn`` returns."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kdjax-compile")
    try:
        return pool.submit(fn)
    finally:
        pool.shutdown(wait=False)


def run_training(exp: Experiment, workdir, *, label: str = "") -> RunResult:
    """Trains from the latest checkpoint in ``workdir`` (or from scratch) to ``train.steps``.

    A run killed at any point and started again with the same arguments resumes from its last
    checkpoint, sees the same batches from there on and ends in the same state.
    """
    from kdjax.data.pipeline import make_train_iterator  # tf.data: imported when a pipeline is built

    config = exp.config
    workdir = as_path(workdir)
    steps = config.train.steps
    # With one process the step compiles on another thread while this one restores or
    # initialises the state and builds the input pipeline, which renders or decodes data in
    # Python: XLA compiles on its own threads, without the GIL. Several processes compile after
    # the pipeline, in which process 0 may prepare the dataset that the others wait for.
    compiling = _in_background(exp.compile) if jax.process_count() == 1 else None
    checkpointer = TrainCheckpointer(workdir, keep_last=config.train.keep_checkpoints,
                                     async_save=config.train.async_checkpoints)
    if checkpointer.latest_step() is not None:
        state, saved_meta = checkpointer.restore(exp.abstract_state)
        check_same_recipe(saved_meta.get("recipe"), config, workdir)
        log.info("resumed %s at step %d", workdir, int(state.step))
    else:
        state = exp.init_state()
    start = int(jax.device_get(state.step))
    teacher_variables = exp.teacher_inputs()
    batches = make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                  seed=config.seed, start_step=start)
    logger = MetricsLog(workdir, total_steps=steps, global_batch_size=config.train.batch_size,
                        label=label)
    logger.start(start)
    window = MetricWindow()
    meta = {"config": config_to_json(config), "recipe": recipe_fingerprint(config),
            "student": _json_spec(exp.student_spec)}
    checkpoints = workdir / "checkpoints"
    last_metrics: dict[str, float] = {}
    evaluated: dict[int, dict] = {}   # step → its evaluation, for the reported checkpoint

    def save(step: int) -> None:
        check_finite(state, checkpoints)
        checkpointer.save(step, state, meta={**meta, "data_step": step, "metrics": last_metrics},
                          force=True)

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
    input_seconds = 0.0
    # The first steps after compilation are waited for and timed: the run's step cost.
    timer = StepTimer()
    try:
        # Without JAX's preemption service the processes agree on a stop when they log, where
        # they wait for the device anyway.
        with StopRequests(agree_every=config.train.log_every) as stops:
            for step in range(start + 1, steps + 1):
                waited = time.perf_counter()
                batch = next(device_batches)
                input_seconds += time.perf_counter() - waited
                profile.step_started(step)
                timing = not timer.done
                if timing:
                    timer.start()
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = train_step(state, teacher_variables, batch)
                if timing:
                    timer.stop(metrics)
                profile.step_dispatched(step, state)
                window.add(metrics)
                final = step == steps
                if step % config.train.log_every == 0 or final:
                    check_finite(state, checkpoints)
                    last_metrics = window.means()
                    logger.write(step, last_metrics, input_seconds=input_seconds)
                    input_seconds = 0.0
                if step % config.train.eval_every == 0 or final:
                    check_finite(state, checkpoints)
                    result = exp.evaluate(state)
                    evaluated = {step: result}
                    logger.write(step, {"miou": result["miou"],
                                        "pixel_accuracy": result["pixel_accuracy"]}, prefix="val")
                    checkpointer.save_best(step, state, meta={**meta, "data_step": step,
                                                              "eval": result},
                                           metric_value=result["miou"])
                    logger.start(step, compiles=False)  # evaluation is not training throughput
                if step % config.train.checkpoint_every == 0 or final:
                    save(step)
                if not final and stops.reached(step):
                    save(step)
                    checkpointer.wait_until_finished()
                    raise StopRequested(stops.signal_name, step, str(checkpoints / str(step)))
        checkpointer.wait_until_finished()
        if config.eval.checkpoint == "last" and steps in evaluated:
            # This process trained, saved and evaluated the last step: its state is the one a
            # restore would read.
            reported, rule, evaluation = state, "last", evaluated[steps]
        else:
            reported, saved_meta, rule = restore_reported(checkpointer, exp.abstract_state,
                                                          config.eval.checkpoint)
            evaluation = (saved_meta["eval"] if rule == "best"
                          else evaluated.get(int(jax.device_get(reported.step)))
                          or exp.evaluate(reported))
        reported_step = int(jax.device_get(reported.step))
    finally:
        timer.close()
        profile.close()
        checkpointer.close()
        logger.close()
    return RunResult(step=int(jax.device_get(state.step)), metrics=last_metrics,
                     eval={**evaluation, "checkpoint": rule, "checkpoint_step": reported_step},
                     state=reported, workdir=workdir, step_seconds=timer.seconds)
