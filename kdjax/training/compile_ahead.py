"""Building and compiling the runs to come on a background thread, while the current run traces,
trains, evaluates and exports, and handing each its compiled experiment when it starts.

``kdjax compare`` trains its runs one after the other, and each builds its experiment (tracing
its modules and its train step) and compiles its initial state and its train step before its
first step, which on a small CPU takes longer than the demo's runs train.
Around that, a run spends seconds to tens of seconds in single-threaded Python: tracing,
evaluation, checkpoints, the export. :class:`CompileAhead` builds the later runs' experiments on
one background thread, a few runs ahead, and compiles their programs; each run then takes its
experiment as it is, with its teacher's weights read in
(:meth:`kdjax.training.Experiment.with_trained_teacher`): a later run's teacher may not be
trained yet, so it is built abstractly from its config (its weights are an argument of the step,
so the programs are the same).

The background thread gives way while a run's step is timed, from the end of its first step
until its timed steps are done (:data:`kdjax.runtime.background.GATE`, held by the run's step
timer): a compile beside the step would slow it, and its measured cost would no longer be the
step's own. With one process only: several processes compile at a barrier before their first
step (:func:`kdjax.training.run_training`).
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Mapping

import jax

from kdjax.runtime import background
from kdjax.training.experiment import Experiment

log = logging.getLogger(__name__)

# How many runs beyond the current one are built ahead: each holds its compiled programs (and, on
# CPU, their memory mappings) until its run takes it. Enough to keep the builder busy through a
# teacher's training, when nothing else is waiting for it (benchmarks/NOTES.md item 54).
LOOKAHEAD = 4


def useful() -> bool:
    """Whether compiling ahead can help this process: it is the only one."""
    return jax.process_count() == 1


class CompileAhead:
    """Builds and compiles the experiments of the runs to come (``builds``, in the order the runs
    start), one at a time and at most ``lookahead`` runs ahead of the last one claimed, on a
    background thread; a context manager that cancels what has not started when it exits.

        builds = {"a": lambda: setup(config_a), "b": lambda: setup(config_b, materialize=False)}
        with CompileAhead(builds) as ahead:
            exp = ahead.claim("a") or setup(config_a)
            run(exp)
            exp = ahead.claim("b")                  # waits if "b" is being built
            run(exp.with_trained_teacher() if exp else setup(config_b))

    ``then``: work for the same thread once every build has started (compiling the programs
    that follow the runs, such as the comparison's overlays); it also gives way to quiet spans.
    Inactive (nothing is built, :meth:`claim` returns None) where :func:`useful` is False.
    """

    def __init__(self, builds: Mapping[str, Callable[[], Experiment]], *,
                 lookahead: int = LOOKAHEAD, then: Callable[[], None] | None = None):
        self.active = useful()
        self._pending = list(builds.items())
        self._then = then
        self._lookahead = lookahead
        # One builder: XLA compiles a program on one thread, and a second builder beside the
        # foreground's own compile delays the teacher, which every later run waits for
        # (benchmarks/NOTES.md item 54).
        self._executor = (concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kdjax-compile-ahead") if self.active else None)
        self._jobs: dict[str, concurrent.futures.Future] = {}
        self._top_up()

    def claim(self, key: str) -> Experiment | None:
        """Before the run of ``key`` starts: its compiled experiment, waiting if it is being
        built; None if it was not started (then it is dropped), if it failed (logged; the run
        raises the error again when it builds for itself) or if ``key`` was never planned.
        Then the next runs start building."""
        job = self._jobs.pop(key, None)
        self._pending = [(k, build) for k, build in self._pending if k != key]
        experiment = None if job is None or job.cancel() else job.result()
        self._top_up()
        return experiment

    def _top_up(self) -> None:
        while self.active and self._pending and len(self._jobs) < self._lookahead:
            key, build = self._pending.pop(0)
            self._jobs[key] = self._executor.submit(_compile, key, build)
        if self.active and not self._pending and self._then is not None:
            self._executor.submit(_compile, "what follows the runs", self._then)
            self._then = None

    def __enter__(self) -> CompileAhead:
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


def _compile(key: str, build: Callable[[], Experiment | None]) -> Experiment | None:
    with background.GATE.busy():
        try:
            experiment = build()
            if experiment is not None:
                experiment.compile()
        except Exception as error:  # the run raises it again when it builds, with context
            log.info("compiling %s ahead failed; it compiles when it runs: %s", key, error)
            return None
        log.debug("compiled %s ahead", key)
        return experiment
