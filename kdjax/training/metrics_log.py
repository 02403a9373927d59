"""Run logs: a progress line with the loss terms, images/s and ETA; ``metrics.jsonl`` (one JSON
object per logged step); TensorBoard event files. Only process 0 writes.

The files are appended to locally and copied whole to the workdir after each write when the
workdir is in an object store (``gs://``; :class:`kdjax.io.paths.LocalMirror`). The event files are
written by TensorBoard's own writer, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import jax.numpy as jnp

from kdjax.io.paths import LocalMirror, as_path


METRICS_FILE = "metrics.jsonl"


def read_records(workdir, split: str) -> list[dict]:
    """The ``split`` records (``'train'`` or ``'val'``) of ``WORKDIR/metrics.jsonl`` in step order,
    one per step: where a resumed run logged a step again, its latest record. Empty without the
    file."""
    path = as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("split") == split:
                records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricWindow:
    """Train metrics summed on the device over a logging window, as (sum, count) pairs: a logged
    value is the mean over the window's steps, not the last step's value. Adding dispatches a
    small computation and does not wait for the device; :meth:`means` does."""

    def __init__(self):
        self._sums = None
        self._count = 0

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self._sums = metrics if self._sums is None else _add(self._sums, metrics)
        self._count += 1

    def means(self) -> dict[str, float]:
        """The window's means as floats, then starts a new window."""
        sums = jax.device_get(self._sums) if self._sums is not None else {}
        means = {k: float(v) / self._count for k, v in sums.items()}
        self._sums, self._count = None, 0
        return means


_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


class MetricsLog:
    """Writes ``WORKDIR/metrics.jsonl`` and TensorBoard events, and prints progress.

    Each :meth:`write` gets the step and a flat dict of floats; ``images_per_second`` and ``eta``
    are added from the wall time between calls (the first interval includes compilation and is
    marked as such).
    """

    def __init__(self, workdir, *, total_steps: int, global_batch_size: int, label: str = "",
                 tensorboard: bool = True):
        self.total_steps = total_steps
        self.batch = global_batch_size
        self.label = label
        self.active = jax.process_index() == 0
        self._last = None
        self._writer = None
        if self.active:
            self._mirror = LocalMirror(workdir)
            self._mirror.pull(METRICS_FILE)
            self._jsonl = open(self._mirror.local / METRICS_FILE, "a", encoding="utf-8")
            if tensorboard:
                from tensorboard.summary.writer.event_file_writer import EventFileWriter
                self._writer = EventFileWriter(str(self._mirror.local / "tensorboard"))

    def start(self, step: int, *, compiles: bool = True) -> None:
        """Marks the wall-clock origin of the next interval: at the start of a run or after
        resuming (the interval then includes compilation), or after an evaluation
        (``compiles=False``: the step is compiled already)."""
        self._last = (step, time.perf_counter(), compiles)

    def write(self, step: int, metrics: dict[str, float], *, prefix: str = "train",
              input_seconds: float | None = None) -> None:
        """Logs ``metrics`` at ``step``. For train metrics, ``input_seconds`` is the time the loop
        waited for input since the last write; its share of the interval is logged as
        ``input_wait`` and shown in the progress line."""
        now = time.perf_counter()
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        if prefix == "train" and self._last is not None:
            last_step, last_time, includes_compile = self._last
            if step > last_step:
                elapsed = max(now - last_time, 1e-9)
                rate = (step - last_step) * self.batch / elapsed
                record["images_per_second"] = rate
                if input_seconds is not None:
                    record["input_wait"] = min(input_seconds / elapsed, 1.0)
                eta = (self.total_steps - step) * self.batch / rate
                self._print(step, metrics, rate, record.get("input_wait"), eta, includes_compile)
            self._last = (step, now, False)
        if not self.active:
            return
        self._jsonl.write(json.dumps({"split": prefix, **record}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            values = [summary_pb2.Summary.Value(tag=f"{prefix}/{key}", simple_value=value)
                      for key, value in record.items() if key != "step" and math.isfinite(value)]
            self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                                   summary=summary_pb2.Summary(value=values)))
            self._writer.flush()
        self._mirror.push()

    def _print(self, step, metrics, rate, input_wait, eta, includes_compile) -> None:
        if not self.active:
            return
        terms = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("/weight"))
        note = " (incl. compile)" if includes_compile else ""
        width = 20
        done = int(width * step / max(self.total_steps, 1))
        bar = "#" * done + "." * (width - done)
        waited = "" if input_wait is None else f", input {100 * input_wait:.0f}%"
        print(f"{self.label}[{bar}] {step}/{self.total_steps} {terms} | {rate:.2f} img/s{note}"
              f"{waited} | ETA {_format_seconds(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._writer is not None:
                self._writer.close()
            self._mirror.close()


class Profile:
    """A ``jax.profiler`` trace of the steps ``start <= step < stop`` (``train.profile_steps``),
    written to ``directory`` (TensorBoard's profile plugin and Perfetto read it); each step is
    annotated by the loop. Nothing happens when ``steps`` is None."""

    def __init__(self, steps, directory):
        if steps is not None:
            start, stop = (int(s) for s in steps)
            if not 1 <= start < stop:
                raise ValueError(f"train.profile_steps must be (start, stop) with 1 <= start < "
                                 f"stop; got {steps!r}.")
            steps = (start, stop)
        self.steps = steps
        self._directory = directory
        self._mirror = None

    def step_started(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            self._mirror = LocalMirror(self._directory)
            jax.profiler.start_trace(str(self._mirror.local))

    def step_dispatched(self, step: int, state) -> None:
        if self._mirror is not None and step == self.steps[1] - 1:
            jax.block_until_ready(state)  # the trace holds the last step's device work
            self.close()

    def close(self) -> None:
        if self._mirror is not None:
            jax.profiler.stop_trace()
            self._mirror.close()
            self._mirror = None
