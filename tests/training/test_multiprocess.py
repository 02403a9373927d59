"""Multi-process training: two ``jax.distributed`` processes on localhost (4 CPU devices each)
take the same three train steps as one process with 8 devices, and stop together on a signal.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from kdjax import training as train
from tests.training.distributed_worker import GLOBAL_DEVICES, STEPS, flat_state
from tests.training.test_train import CONFIG, _config, _run_steps, tie_free_batches

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")
NUM_PROCESSES = 2
TIMEOUT = 300  # seconds for both workers; generous because CI machines' cores may be shared


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(argv, logs: Path, **variables: str) -> list[tuple[subprocess.Popen, Path]]:
    """``argv(i)`` for each process ``i``, started with its share of the simulated devices and
    ``variables`` added to the environment."""
    # The reference's XLA flags but the device count: other flags (the optimisation level, the
    # CPU flags) compile other fusions, whose float32 rounding differs.
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={GLOBAL_DEVICES // NUM_PROCESSES}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": " ".join(flags), **variables}
    procs = []
    for i in range(NUM_PROCESSES):
        log = logs / f"worker{i}.stderr"
        # stderr goes to a file, not a pipe: nobody reads it while the reference runs, and a full
        # pipe would block the worker.
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, *argv(i)], env=env, cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=err)
        procs.append((proc, log))
    return procs


def _launch(port: int, out: Path, logs: Path) -> list[tuple[subprocess.Popen, Path]]:
    return _spawn(lambda i: [str(WORKER), f"--process-id={i}", f"--num-processes={NUM_PROCESSES}",
                             f"--port={port}", f"--out={out}"], logs)


def _stderr(procs) -> str:
    return "\n".join(f"--- worker {i} (exit {p.returncode}) ---\n"
                     f"{log.read_text(errors='replace')[-4000:]}"
                     for i, (p, log) in enumerate(procs))


def _kill(procs) -> None:
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait(procs, deadline: float) -> None:
    """Waits for every worker; stops all of them as soon as one fails, since its peer would
    otherwise block in a collective until the deadline."""
    while any(p.poll() is None for p, _ in procs):
        if any(p.returncode not in (None, 0) for p, _ in procs):
            _kill(procs)
            pytest.fail(f"a worker failed\n{_stderr(procs)}")
        if time.monotonic() > deadline:
            _kill(procs)
            pytest.fail(f"the workers did not finish within {TIMEOUT} s\n{_stderr(procs)}")
        time.sleep(0.5)


# Three processes each compile the distillation step (~3 min on two shared CPU cores).
@pytest.mark.slow
@pytest.mark.skipif(not hasattr(getattr(jax, "distributed", None), "initialize"),
                    reason="jax.distributed is unavailable")
def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "process0.npz"
    procs = _launch(_free_port(), out, tmp_path)
    deadline = time.monotonic() + TIMEOUT
    try:
        # The single-process reference (8 devices in this process) runs while the workers do.
        config = _config()
        exp = train.setup(config)
        assert exp.mesh.devices.size == GLOBAL_DEVICES
        state, history = _run_steps(exp, tie_free_batches(config, STEPS))
        reference = flat_state(state)
        _wait(procs, deadline)
    finally:
        _kill(procs)
    assert all(p.returncode == 0 for p, _ in procs), _stderr(procs)

    with np.load(out) as result:
        metrics = json.loads(str(result["metrics"]))
        step = int(result["step"])
        weights = {k.removeprefix("state/"): result[k] for k in result.files
                   if k.startswith("state/")}
    assert step == int(state.step) == STEPS
    assert len(metrics) == len(history) == STEPS
    # Only the place of the reductions differs (two hosts over gloo instead of one), so the
    # tolerances are those of the 8-device vs 1-device check in test_train.py.
    for got, want in zip(metrics, history):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert history[0]["loss"] != history[-1]["loss"]  # training happened
    assert weights.keys() == reference.keys()
    # Sums with heavy cancellation (e.g. the stem BN bias gradient) keep summation-order noise,
    # so every tensor is compared at its own scale.
    for key, want in reference.items():
        np.testing.assert_allclose(weights[key], want, rtol=1e-4,
                                   atol=5e-3 * np.abs(want).max() + 1e-7, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("signum, service", [
    (signal.SIGTERM, "true"), (signal.SIGINT, "true"),
    # Without JAX's preemption service kdjax's own handlers hear both signals and the processes
    # agree through a collective at their next logging step.
    (signal.SIGTERM, "false")])
def test_a_signal_to_one_process_makes_both_save_the_same_step(tmp_path, signum, service):
    """The process that is not signalled stops at the same step, with that step's checkpoint."""
    port, workdir = _free_port(), tmp_path / "run"
    procs = _spawn(lambda i: [
        "-m", "kdjax", "train", f"--config={CONFIG}", f"--workdir={workdir}",
        "--config.train.steps=200", "--config.train.eval_every=1000",
        "--config.train.checkpoint_every=1000",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        f"--config.distributed.num_processes={NUM_PROCESSES}",
        f"--config.distributed.process_id={i}"], tmp_path,
        JAX_ENABLE_PREEMPTION_SERVICE=service)
    try:
        deadline = time.monotonic() + TIMEOUT
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count('"train"') >= 3):
            assert all(p.poll() is None for p, _ in procs), _stderr(procs)
            assert time.monotonic() < deadline, _stderr(procs)
            time.sleep(0.05)
        procs[1][0].send_signal(signum)
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        _kill(procs)
    assert [p.returncode for p, _ in procs] == [128 + signum] * NUM_PROCESSES, _stderr(procs)
    name = signal.Signals(signum).name
    stopped = [re.search(rf"stopped by {name} after step (\d+)", log.read_text())
               for _, log in procs]
    assert all(stopped), _stderr(procs)
    steps = {int(match.group(1)) for match in stopped}
    assert len(steps) == 1, steps
    step = steps.pop()
    assert step < 200 and sorted(os.listdir(workdir / "checkpoints")) == [str(step)]
