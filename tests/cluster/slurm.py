"""A simulated Slurm cluster of one node: ``launch/slurm.sbatch`` run as sbatch runs it, with the
fake ``srun`` of this folder on ``PATH``, and the outcome of each task.

The batch script gets what sbatch gives it (``SLURM_SUBMIT_DIR``, the job's id, task count, node
list and cores per task); the fake srun starts the tasks of a job step with a real step's
variables, and JAX's own Slurm detection does the rest. Each task writes its output to
``task-I.log`` and its process id to ``task-I.pid`` in the job's folder.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAKE_SRUN = Path(__file__).with_name("fake_srun")
SBATCH = REPO / "launch" / "slurm.sbatch"
# JAX's Slurm coordinator port is SLURM_JOB_ID % 4096 + 61440.
PORTS = range(61440, 65536)


def free_job_id() -> int:
    """A job id whose coordinator port is free on this machine now."""
    for port in PORTS[os.getpid() % 2000::7]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port - 61440 + 4096 * 3
    raise RuntimeError("no free port for the job's coordinator")


def cluster_env(job_dir: Path, **variables: str) -> dict[str, str]:
    """The test process's environment with the fake srun first on PATH, the repository importable
    and the tasks' output in ``job_dir``; ``variables`` are added."""
    bin_dir = job_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    if not (bin_dir / "srun").exists():
        (bin_dir / "srun").symlink_to(FAKE_SRUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(REPO),
                "FAKE_SRUN_TASK_LOGS": str(job_dir), "JAX_PLATFORMS": "cpu",
                # The repository's .venv is the CPU build: the script's CUDA check is for clusters.
                "KDJAX_PYTHON": sys.executable})
    env.update(variables)
    return env


@dataclasses.dataclass
class Job:
    """A submitted batch script and its folder."""

    process: subprocess.Popen
    job_dir: Path
    ntasks: int

    def task_log(self, index: int) -> str:
        path = self.job_dir / f"task-{index}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def task_pid(self, index: int) -> int | None:
        path = self.job_dir / f"task-{index}.pid"
        text = path.read_text() if path.exists() else ""
        return int(text) if text else None

    def output(self) -> str:
        """The batch script's output and every task's, for failure messages (their ends)."""
        parts = [f"--- batch script (exit {self.process.returncode}) ---\n"
                 f"{(self.job_dir / 'sbatch.out').read_text(errors='replace')[-3000:]}"]
        parts += [f"--- task {i} ---\n{_quiet(self.task_log(i))[-4000:]}"
                  for i in range(self.ntasks)]
        return "\n".join(parts)

    def signal_task(self, index: int, signum: int) -> None:
        os.kill(self.task_pid(index), signum)

    def wait(self, timeout: float) -> int:
        """The batch script's exit code; every process of the job is killed after ``timeout``."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the job did not end within {timeout} s\n{self.output()}")

    def kill(self) -> None:
        """Ends the batch script and its tasks (JAX's preemption service would keep a task alive
        through SIGTERM)."""
        for index in range(self.ntasks):
            pid = self.task_pid(index)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _quiet(text: str) -> str:
    """A task's output without the C++ runtimes' info lines."""
    return "\n".join(line for line in text.splitlines()
                     if not re.match(r"[IW]\d{4} |\[Gloo\] ", line))


def submit(args: list[str], job_dir: Path, *, ntasks: int, cwd: Path = REPO,
           env: dict[str, str] | None = None) -> Job:
    """Runs ``launch/slurm.sbatch ARGS`` as sbatch would for a job of ``ntasks`` tasks on one
    node, in the background."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for old in job_dir.glob("task-*"):
        old.unlink()
    job_id = free_job_id()
    variables = {"SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id),
                 "SLURM_SUBMIT_DIR": str(REPO), "SLURM_NTASKS": str(ntasks),
                 "SLURM_NPROCS": str(ntasks), "SLURM_JOB_NODELIST": "localhost",
                 "SLURM_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
                 "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_NAME": "kdjax"}
    with open(job_dir / "sbatch.out", "wb") as out:
        process = subprocess.Popen(["bash", str(SBATCH), *args], cwd=cwd,
                                   env=cluster_env(job_dir, **variables, **(env or {})),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Job(process, job_dir, ntasks)


def wait_for(condition, job: Job, timeout: float, what: str) -> None:
    """Polls ``condition()`` until true; fails with the job's output if the job ends first or
    ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if job.process.poll() is not None:
            raise AssertionError(f"the job ended before {what}\n{job.output()}")
        if time.monotonic() > deadline:
            job.kill()
            raise AssertionError(f"no {what} within {timeout} s\n{job.output()}")
        time.sleep(0.1)
