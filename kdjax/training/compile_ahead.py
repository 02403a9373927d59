"""Compiling the runs to come on a background thread, while the current run traces, evaluates
and exports.

``kdjax compare`` trains its runs one after the other, and each compiles its initial state and its
train step before its first step (on 2 CPU cores, 15–35 s for each run of the demo, which then
trains for 8–12 s). Around that, a run spends tens of seconds in Python on one core: tracing,
evaluation, checkpoints, the export. :class:`CompileAhead` builds the later runs' experiments on
one background thread and compiles their programs into JAX's persistent compilation cache, from
which each run reads them back when it starts. A later run's teacher may not be trained yet: it
is built abstractly from its config (its weights are an argument of the step, so the program is
the same).

The background thread gives way while a run trains, from the end of its first step
(:data:`kdjax.runtime.background.GATE`, held by the run's step timer): a compile beside the step
would slow it, and its measured cost would no longer be the step's own. With one process only:
several processes compile at a barrier before their first step
(:func:`kdjax.training.run_training`) and read the persistent cache that process 0 writes.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable

import jax

from kdjax.runtime import background
from kdjax.training.experiment import Experiment

log = logging.getLogger(__name__)


def useful() -> bool:
    """Whether compiling ahead can help this process: one process, with a persistent cache."""
    return bool(jax.config.jax_compilation_cache_dir) and jax.process_count() == 1


class CompileAhead:
    """Compiles the programs of experiments to come, in order, one at a time, on a background
    thread; a context manager that cancels what has not started when it exits.

        with CompileAhead() as ahead:
            ahead.submit("b", lambda: training.setup(config_b, materialize=False))
            run("a")
            ahead.claim("b")    # waits if "b" is compiling; cancels it if not yet started
            run("b")            # its programs come from the persistent cache

    Inactive (every call does nothing) where :func:`useful` is False.
    """

    def __init__(self):
        self.active = useful()
        self._executor = (concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kdjax-compile-ahead") if self.active else None)
        self._jobs: dict[str, concurrent.futures.Future] = {}

    def submit(self, key: str, build: Callable[[], Experiment]) -> None:
        """Queues the experiment that ``build`` makes (abstract teachers suffice) under ``key``."""
        if self.active:
            self._jobs[key] = self._executor.submit(_compile, key, build)

    def claim(self, key: str) -> None:
        """Before the run of ``key`` starts: waits for its compilation if it is under way, and
        drops it if it has not started (the run compiles for itself)."""
        job = self._jobs.pop(key, None)
        if job is not None and not job.cancel():
            job.result()

    def __enter__(self) -> CompileAhead:
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


def _compile(key: str, build: Callable[[], Experiment]) -> None:
    with background.GATE.busy():
        try:
            build().compile()
        except Exception as error:  # the run raises it again when it compiles, with context
            log.info("compiling %s ahead failed; it compiles when it runs: %s", key, error)
        else:
            log.debug("compiled %s ahead", key)
