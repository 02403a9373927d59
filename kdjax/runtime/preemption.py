"""Stopping at a step boundary when the process is asked to stop.

TPU VMs announce a preemption, and SLURM a time limit, with SIGTERM; a user stops a run with
Ctrl-C (SIGINT). Under :class:`StopRequests` neither kills the loop: the handler only records the
signal, the loop asks :meth:`StopRequests.reached` at every step boundary, saves a checkpoint at
the first step that answers yes and stops. A second signal while that happens exits at once; the
checkpoint being written is then incomplete and ignored, and the previous one is intact.

With several processes every one of them must save the same step. JAX's preemption service
(started by ``jax.distributed.initialize``) hears SIGTERM on any process and agrees on a step
that all of them reach (``multihost_utils.reached_preemption_sync_point``); there a SIGINT is
passed on to it as a SIGTERM of the process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """The loop stopped at ``step`` after a stop signal, with that step's checkpoint committed."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        super().__init__(f"stopped by {signal_name} after step {step}; its checkpoint is in "
                         f"{checkpoint}")
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


class StopRequests:
    """Context manager that turns SIGTERM and SIGINT into a stop at the next step boundary.

    Handlers can only be installed from the main thread; elsewhere the signals keep their
    handlers and :meth:`reached` answers no (unless the preemption service does).
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        self._multi_process = False

    def __enter__(self) -> StopRequests:
        import jax

        self._multi_process = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            # Several processes: JAX's preemption service owns SIGTERM (its notifier is installed
            # at the C level); replacing its handler would keep the other processes from hearing.
            signals = (signal.SIGINT,) if self._multi_process else STOP_SIGNALS
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
        if self._multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service

    def reached(self, step: int) -> bool:
        """Whether the loop should save ``step`` and stop. Call it at every step, on every
        process, with the same steps: the multi-process agreement needs each one."""
        if self._multi_process:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None
