"""Coordination between the processes of a run, outside the devices: the coordination service's
client, whether JAX's preemption service runs, and work that process 0 does for all while the
others wait for its outcome.

Waiting goes through the coordination service that ``jax.distributed.initialize`` starts (its
key-value store, not a device collective), so it may last as long as the work does: preparing a
dataset can take an hour, far beyond the collectives' timeouts. Process 0 publishes either
success or its error; a waiting process re-raises that error instead of waiting out a timeout.
Without ``jax.distributed`` (one process) the work just runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_DONE = "done"
_FAILED = "failed: "
# How long the other processes wait for process 0's work, in seconds.
LEADER_TIMEOUT = 4 * 3600


class LeaderFailedError(RuntimeError):
    """Process 0 failed at work done for every process; the message is its error."""


def client():
    """The coordination service's client (barriers, key-value store), or None without
    ``jax.distributed``. JAX keeps it under no public name; Orbax reaches it the same way."""
    from jax._src import distributed

    return distributed.global_state.client


def preemption_service_running() -> bool:
    """Whether JAX's preemption service runs in this process (``jax.distributed.initialize``
    starts it unless ``jax_enable_preemption_service`` is off)."""
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager is not None


def barrier(name: str, timeout: float = LEADER_TIMEOUT) -> None:
    """Waits until every process has called ``barrier(name)``; returns at once without
    ``jax.distributed``. ``name`` may be reused once every process has passed it."""
    service = client()
    if service is not None:
        service.wait_at_barrier(f"kdjax/{name}", int(timeout * 1000))


def process_index() -> int:
    import jax

    return jax.process_index()


def once_for_all(key: str, work: Callable[[], T], then: Callable[[], T],
                 timeout: float = LEADER_TIMEOUT) -> T:
    """``work()`` on process 0; ``then()`` on every other process once process 0's ``work()``
    has returned. ``key`` names the work and must be the same on every process and unique for the
    run (a dataset's name and directory, say).

    Raises:
      LeaderFailedError: on the other processes, when ``work()`` raised on process 0 (which
        re-raises its own error); the message carries process 0's.
    """
    service = client()
    if service is None:
        return work()
    key = f"kdjax/once/{key}"
    if process_index() == 0:
        try:
            result = work()
        except BaseException as error:
            service.key_value_set(key, f"{_FAILED}{type(error).__name__}: {error}")
            raise
        service.key_value_set(key, _DONE)
        return result
    log.info("waiting for process 0: %s", key)
    outcome = service.blocking_key_value_get(key, int(timeout * 1000))
    if outcome.startswith(_FAILED):
        raise LeaderFailedError(f"process 0 failed at {key}: {outcome[len(_FAILED):]}")
    return then()
