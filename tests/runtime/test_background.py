"""The gate between background work and the foreground's quiet spans."""

import threading

import jax.numpy as jnp

from kdjax.runtime.background import Gate
from kdjax.training.budget import StepTimer

WAIT = 0.2      # long enough for a thread that is not held back to get in
TIMEOUT = 10.0


def _in_thread(enter, entered: threading.Event, leave: threading.Event) -> threading.Thread:
    """Starts a thread that enters the context ``enter()``, sets ``entered`` and stays in until
    ``leave`` is set."""
    def run():
        with enter():
            entered.set()
            leave.wait(TIMEOUT)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _quiet_span_behind_work(gate: Gate):
    """Work in progress, and a quiet span asked for behind it: (worker, finish work, span thread,
    span entered, end span)."""
    working, finish = threading.Event(), threading.Event()
    worker = _in_thread(gate.busy, working, finish)
    assert working.wait(TIMEOUT)
    quiet, end = threading.Event(), threading.Event()
    foreground = _in_thread(gate.quiet, quiet, end)
    assert not quiet.wait(WAIT)
    return worker, finish, foreground, quiet, end


def test_a_quiet_span_waits_for_the_work_in_progress():
    gate = Gate()
    worker, finish, foreground, quiet, end = _quiet_span_behind_work(gate)
    finish.set()
    assert quiet.wait(TIMEOUT)
    end.set()
    for thread in (worker, foreground):
        thread.join(TIMEOUT)


def test_work_waits_for_a_quiet_span_and_a_waiting_span_goes_first():
    gate = Gate()
    worker, finish, foreground, quiet, end = _quiet_span_behind_work(gate)
    # Work asked for after the waiting span waits for its end.
    later, later_done = threading.Event(), threading.Event()
    second = _in_thread(gate.busy, later, later_done)
    finish.set()
    assert quiet.wait(TIMEOUT)
    assert not later.wait(WAIT)
    end.set()
    assert later.wait(TIMEOUT)
    later_done.set()
    for thread in (worker, foreground, second):
        thread.join(TIMEOUT)


def test_the_step_timer_holds_background_work_from_its_first_step_to_its_last_timed_one(
        monkeypatch):
    gate = Gate()
    monkeypatch.setattr("kdjax.runtime.background.GATE", gate)
    timer = StepTimer(timed_steps=2)
    working, finish = threading.Event(), threading.Event()
    timer.start()
    timer.stop(jnp.zeros(()))      # the first step, which compiles: work may run beside it
    worker = _in_thread(gate.busy, working, finish)
    assert not working.wait(WAIT)
    timer.start()
    timer.stop(jnp.zeros(()))      # one timed step of two: still held
    assert not timer.done and not working.wait(WAIT)
    timer.start()
    timer.stop(jnp.zeros(()))      # the last timed step: later steps share the cores
    assert timer.done and working.wait(TIMEOUT)
    finish.set()
    timer.close()                   # closing after the release changes nothing
    worker.join(TIMEOUT)


def test_a_step_timer_closed_before_its_timed_steps_lets_work_run(monkeypatch):
    gate = Gate()
    monkeypatch.setattr("kdjax.runtime.background.GATE", gate)
    timer = StepTimer(timed_steps=3)
    for _ in range(2):              # a run that ends before its timed steps are done
        timer.start()
        timer.stop(jnp.zeros(()))
    working, finish = threading.Event(), threading.Event()
    worker = _in_thread(gate.busy, working, finish)
    assert not working.wait(WAIT)
    timer.close()
    assert working.wait(TIMEOUT)
    finish.set()
    timer.close()                   # a second close changes nothing
    worker.join(TIMEOUT)
