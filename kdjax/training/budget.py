"""Compute budgets: how many steps a run may train when methods are compared at equal cost.

Under the equal-steps protocol a method whose step costs twice the student's alone gets twice the
compute. ``config.budget`` makes the comparison compute-matched instead:

- ``'steps'`` (the default): every run trains ``train.steps``;
- ``'seconds:S'``: every student run trains as many steps as S seconds of its measured step time
  buy;
- ``'flops:F'``: as many steps as F floating-point operations buy, at one step's FLOPs as
  :func:`kdjax.ops.cost.traced_flops` counts them, the same on every platform (e.g.
  ``'flops:2.5e15'``);
- ``'seconds:student_alone'`` / ``'flops:student_alone'``: the budget is what the student alone
  spends on ``train.steps`` (of the same seed), so the baseline trains its usual schedule and
  every method is held to its cost.

A run's schedule (learning-rate decay, weight ramps) is stretched or shrunk to the steps it can
afford. Step time is the median of a few steps after compilation, each waited for: under a
matched budget on one batch of the run's own data before it trains, under equal steps on the
run's first steps. It holds the teacher's forward pass and every term, and not the input
pipeline, which every method shares. Under ``'seconds:student_alone'`` the student alone's step is
timed in turns with each method's, and their ratio sets the method's steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from kdjax.runtime import background

KINDS = ("steps", "seconds", "flops")
RELATIVE = "student_alone"
TIMED_STEPS = 3


class BudgetError(ValueError):
    """A ``config.budget`` that cannot be read."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """A parsed ``config.budget``: ``kind`` is one of :data:`KINDS`; ``amount`` is the seconds or
    FLOPs of a run, or None for 'steps' and for a budget relative to the student alone."""

    kind: str
    amount: float | None = None

    @property
    def matched(self) -> bool:
        """Whether runs are held to equal cost rather than to equal steps."""
        return self.kind != "steps"

    @property
    def relative(self) -> bool:
        return self.matched and self.amount is None

    @property
    def in_turns(self) -> bool:
        """Whether each method's step is timed in turns with the student alone's."""
        return self.relative and self.kind == "seconds"

    def describe(self) -> str:
        if not self.matched:
            return "equal steps"
        unit = "s" if self.kind == "seconds" else " FLOPs"
        amount = "the student alone's cost" if self.relative else f"{self.amount:.4g}{unit}"
        return f"{self.kind} budget: {amount} per run"


def parse_budget(spec: str) -> Budget:
    """``'steps'``, ``'seconds:600'``, ``'flops:1e15'`` or ``'<kind>:student_alone'``."""
    text = str(spec).strip()
    usage = ("use 'steps', 'seconds:<seconds>', 'flops:<FLOPs>', 'seconds:student_alone' or "
             "'flops:student_alone'")
    if text == "steps":
        return Budget("steps")
    kind, sep, amount = text.partition(":")
    if not sep or kind not in ("seconds", "flops"):
        raise BudgetError(f"config.budget {spec!r} is not a budget: {usage}.")
    if amount == RELATIVE:
        return Budget(kind)
    try:
        value = float(amount)
    except ValueError:
        raise BudgetError(f"config.budget {spec!r}: {amount!r} is not a number; {usage}.") from None
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"config.budget {spec!r}: the amount must be positive and finite.")
    return Budget(kind, value)


@dataclasses.dataclass(frozen=True)
class StepCost:
    """The measured cost of one train step: wall-clock seconds (after compilation) and its
    floating-point operations (:meth:`kdjax.training.Experiment.step_flops`).

    ``reference_seconds``: under ``'seconds:student_alone'``, the student alone's step timed in
    turns with this one, on the same batch (:func:`measure_step_costs`). The budget then uses the
    ratio of the two, which a machine that is slower or busier at the time moves far less than
    either time; None where the student alone's own run gives the reference."""

    seconds: float
    flops: float
    reference_seconds: float | None = None

    def of(self, kind: str) -> float:
        return self.seconds if kind == "seconds" else self.flops

    def seconds_on_clock_of(self, alone: StepCost | None) -> float:
        """This step's seconds on the clock of the student alone's own run (``alone``: its cost,
        measured alone), where this step was timed in turns with the student alone's: the ratio
        of the two times the student alone's step. The machine's speed moves between timings,
        so ``seconds`` and ``alone.seconds`` were not taken at the same speed; the ratio was.
        Under ``'seconds:student_alone'`` the steps × this is the student alone's cost, up to the
        step that did not fit. ``seconds`` where there was no timing in turns."""
        if alone is None or self.reference_seconds is None:
            return self.seconds
        return self.seconds * alone.seconds / self.reference_seconds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class StepTimer:
    """Times train steps after the first (which compiles): each step it is given a finished step
    of, up to ``timed_steps``. ``seconds`` is their median, or None before any.

    From the end of the first step until the timed steps are done (or :meth:`close`), no
    background work runs (:data:`kdjax.runtime.background.GATE`): with XLA's intra-op threads, a
    step runs at the pace of its most contended core, so a compile beside a timed step would be
    measured with it. The later steps share the cores with background work again: compiling the
    runs to come beside them costs them less than the cores left idle while a single-threaded
    compile runs alone (``benchmarks/NOTES.md`` item 54)."""

    def __init__(self, timed_steps: int = TIMED_STEPS):
        self.timed_steps = timed_steps
        self.times: list[float] = []
        self._started: float | None = None
        self._skipped = False
        self._quiet = contextlib.ExitStack()

    @property
    def done(self) -> bool:
        return len(self.times) >= self.timed_steps

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, outputs) -> None:
        """Waits for the step's ``outputs`` and records it (the first one only compiles)."""
        jax.block_until_ready(outputs)
        if self._skipped:
            self.times.append(time.perf_counter() - self._started)
            if self.done:
                self.close()
        else:
            self._skipped = True
            self._quiet.enter_context(background.GATE.quiet())

    def close(self) -> None:
        """Lets background work run again (idempotent)."""
        self._quiet.close()

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def agreed_cost(seconds: float, flops: float,
                reference_seconds: float | None = None) -> StepCost:
    """The cost every process uses: process 0's, so that all agree on the steps to train."""
    values = [seconds, flops, np.nan if reference_seconds is None else reference_seconds]
    seconds, flops, reference = multihost_utils.broadcast_one_to_all(np.array(values, np.float64))
    return StepCost(seconds=float(seconds), flops=float(flops),
                    reference_seconds=None if np.isnan(reference) else float(reference))


def measure_step_costs(runs, *, timed_steps: int = TIMED_STEPS) -> list[float]:
    """The median seconds of each ``step(state, teacher_variables, batch)`` of ``runs`` (tuples of
    those four), jitted or compiled train steps that donate their state, timed in turns: each run
    once first (compiling a jitted one), then a step of each in turn, ``timed_steps`` times.
    Timed in turns, their ratio holds while the machine's speed drifts.
    Each ``state`` is consumed: pass one that is not needed afterwards (e.g. a fresh one)."""
    runs = [list(run) for run in runs]
    timers = [StepTimer(timed_steps) for _ in runs]
    try:
        while not all(timer.done for timer in timers):
            for run, timer in zip(runs, timers):
                step, state, teacher_variables, batch = run
                timer.start()
                run[1], metrics = step(state, teacher_variables, batch)
                timer.stop(metrics)
    finally:
        for timer in timers:
            timer.close()
    return [timer.seconds for timer in timers]


def measure_step_cost(step, state, teacher_variables, batch, *, flops: float,
                      timed_steps: int = TIMED_STEPS, reference=None) -> StepCost:
    """The cost of ``step(state, teacher_variables, batch)``, a jitted or compiled train step that
    donates its state: run once first (compiling a jitted one), then timed over ``timed_steps``
    steps (the median).
    ``state`` is consumed: pass one that is not needed afterwards (e.g. a fresh initial state).
    ``flops``: the step's FLOPs (:meth:`kdjax.training.Experiment.step_flops`). ``reference``:
    the student alone's ``(step, state, teacher_variables, batch)``, timed in turns with this
    step into ``reference_seconds``."""
    runs = [(step, state, teacher_variables, batch)] + ([reference] if reference else [])
    seconds = measure_step_costs(runs, timed_steps=timed_steps)
    return agreed_cost(seconds[0], flops, seconds[1] if reference else None)


def affordable_steps(budget: Budget, cost: StepCost, steps: int,
                     reference: StepCost | None = None) -> int:
    """The steps a run of ``cost`` per step trains under ``budget``; ``steps`` is the config's
    ``train.steps``, and ``reference`` the student alone's cost for a relative budget (in seconds,
    the student alone's step timed beside this one, ``cost.reference_seconds``, where there is
    one)."""
    if not budget.matched:
        return steps
    per_step = cost.of(budget.kind)
    if budget.in_turns and cost.reference_seconds is not None:
        amount = cost.reference_seconds * steps
    elif budget.relative:
        if reference is None:
            raise BudgetError(f"config.budget '{budget.kind}:{RELATIVE}' needs the student alone: "
                              "list 'student_alone' in config.methods.")
        amount = reference.of(budget.kind) * steps
    else:
        amount = budget.amount
    return max(1, int(amount // per_step))


def read_cost(path) -> StepCost | None:
    """The step cost saved at ``path`` (an etils path), or None when there is none."""
    if not path.exists():
        return None
    return StepCost(**json.loads(path.read_text()))  # files without reference_seconds too


def write_cost(path, cost: StepCost) -> None:
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cost.to_dict()))
