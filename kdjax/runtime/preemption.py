"""Stopping at a step boundary when the process is asked to stop.

TPU VMs announce a preemption, and SLURM a time limit, with SIGTERM; a user stops a run with
Ctrl-C (SIGINT). Under :class:`StopRequests` neither kills the loop: the handler only records the
signal, the loop asks :meth:`StopRequests.reached` at every step boundary, saves a checkpoint at
the first step that answers yes and stops. A second signal while that happens exits at once; the
checkpoint being written is then incomplete and ignored, and the previous one is intact.

With several processes every one of them must save the same step. Where JAX's preemption service
runs (``jax.distributed.initialize`` starts it) it hears SIGTERM on any process and agrees on a
step that all of them reach (``multihost_utils.reached_preemption_sync_point``); there a SIGINT is
passed on to it as a SIGTERM of the process. Where it does not run (processes joined without
``initialize``, or with the service disabled), kdjax handles both signals itself and the processes
agree at every ``agree_every``-th step through a collective: the first such step after any process
heard a signal is the stop for all.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from kdjax.runtime import coordination

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Where the signalled process leaves the signal's name for the others (see StopRequests._handle).
SIGNAL_KEY = "kdjax/stop/signal"


class StopRequested(Exception):
    """The loop stopped at ``step`` after a stop signal, with that step's checkpoint committed.
    ``last``: ``step`` was the run's last, so the run finished and what would follow it stops."""

    def __init__(self, signal_name: str, step: int, checkpoint: str, last: bool = False):
        finished = ", the run's last" if last else ""
        super().__init__(f"stopped by {signal_name} after step {step}{finished}; its checkpoint "
                         f"is in {checkpoint}")
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


class StopRequests:
    """Context manager that turns SIGTERM and SIGINT into a stop at the next step boundary.

    Handlers can only be installed from the main thread; elsewhere the signals keep their
    handlers and :meth:`reached` answers no (unless the preemption service does).
    """

    def __init__(self, agree_every: int = 1):
        if agree_every < 1:
            raise ValueError(f"agree_every must be at least 1; got {agree_every!r}.")
        self.signal_name: str | None = None
        self.agree_every = agree_every
        self._previous = {}
        self._mode = "single"

    def __enter__(self) -> StopRequests:
        import jax

        if jax.process_count() == 1:
            self._mode = "single"
        else:
            self._mode = "service" if coordination.preemption_service_running() else "collective"
        if threading.current_thread() is threading.main_thread():
            # JAX's preemption service owns SIGTERM (its notifier is installed at the C level);
            # replacing its handler would keep the other processes from hearing.
            signals = (signal.SIGINT,) if self._mode == "service" else STOP_SIGNALS
            self._previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            print(f"kdjax: second signal ({name}): exiting now. The checkpoint being written is "
                  f"incomplete and will be ignored; the previous one is intact.", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.signal_name = name
        print(f"kdjax: {name} received: saving a checkpoint at the next step, then stopping "
              f"(send it again to exit at once).", file=sys.stderr, flush=True)
        if self._mode == "service":
            # The service carries the notice, not its name: the others read the name here.
            coordination.client().key_value_set(SIGNAL_KEY, name, allow_overwrite=True)
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service

    def reached(self, step: int, every_step: bool = False) -> bool:
        """Whether the loop should save ``step`` and stop. Call it at every step, on every
        process, with the same steps and ``every_step``: the multi-process agreement needs each
        one. ``every_step``: agree at this step even if it is not an ``agree_every``-th one."""
        if self._mode == "service":
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or _shared_signal_name()
                return True
            return False
        if self._mode == "collective":
            if step % self.agree_every and not every_step:
                return False
            return self._agree()
        return self.signal_name is not None

    def _agree(self) -> bool:
        """Every process's signal, or none, gathered from all of them; the first one heard names
        the stop."""
        import numpy as np
        from jax.experimental import multihost_utils

        heard = STOP_SIGNALS.index(signal.Signals[self.signal_name]) + 1 if self.signal_name else 0
        gathered = np.asarray(multihost_utils.process_allgather(np.int32(heard)))
        if not gathered.any():
            return False
        self.signal_name = STOP_SIGNALS[int(gathered[gathered > 0][0]) - 1].name
        return True


def _shared_signal_name() -> str:
    """The signal another process of the run heard, or SIGTERM for a preemption notice that
    reached JAX's service directly."""
    try:
        return coordination.client().key_value_try_get(SIGNAL_KEY)
    except Exception:  # the coordination client raises its own error type for a missing key
        return "SIGTERM"
