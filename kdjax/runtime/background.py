"""Background work that gives way to measurements: the process's one :data:`GATE`.

Work on a background thread (compiling later runs' programs, :mod:`kdjax.training.compile_ahead`)
competes with the foreground for the same cores. That is what it is for while the foreground
compiles, evaluates or exports, but a training step runs at the pace of its most contended core,
and a step whose time is measured (the cost columns of ``kdjax compare``, compute-matched
budgets) must run alone. The foreground marks such a span with
:meth:`Gate.quiet`: it waits for background work in progress to finish, and no new background
work starts until the span ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class Gate:
    """Admits background work only outside the foreground's quiet spans; quiet spans come
    first (a waiting span holds back work that has not started)."""

    def __init__(self):
        self._condition = threading.Condition()
        self._quiet = 0
        self._busy = 0

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """A span with no background work: waits for the work in progress to finish."""
        with self._condition:
            self._quiet += 1
            self._condition.wait_for(lambda: self._busy == 0)
        try:
            yield
        finally:
            with self._condition:
                self._quiet -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """A piece of background work: starts once no quiet span is open or waiting."""
        with self._condition:
            self._condition.wait_for(lambda: self._quiet == 0)
            self._busy += 1
        try:
            yield
        finally:
            with self._condition:
                self._busy -= 1
                self._condition.notify_all()


GATE = Gate()
