"""launch/slurm.sbatch as sbatch runs it, with stand-ins for srun (tests/cluster/fake_srun) and
scontrol that act as Slurm's do on signals: the time limit's warning stops the tasks with a checkpoint and requeues the job, a
stop asked of the job stops them the same way without a requeue, and a run that ends is left be."""

import json
import os
import signal
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(REPO, "launch", "slurm.sbatch")
FAKE_SRUN = os.path.join(REPO, "tests", "cluster", "fake_srun")
TASKS = 2
KDJAX_ARGS = ["train", "--config=configs/demo.py", "--workdir=runs/a b"]

SCONTROL = """#!/usr/bin/env bash
echo "$*" >>"$SCONTROL_RECORD"
"""
# A task of kdjax: a step every 0.1 s (TASK_STEPS of them, then it ends); at SIGINT or SIGTERM it
# saves at the next step (in TASK_SAVE_SECONDS) and exits with 128 + the signal, at a second signal
# at once. As kdjax's checkpoint save, the task's ends at a barrier of all tasks: srun's
# --kill-on-bad-exit ends the others when the first exits with 130, and by then all have saved.
# In Python, whose handlers run as soon as the signal arrives, whatever the task is doing.
TASK = """#!/usr/bin/env python3
import glob, os, signal, sys, time

log_path = os.path.join(os.environ["TASK_LOGS"], f"task-{os.environ['SLURM_PROCID']}.log")


def log(line):
    with open(log_path, "a") as file:
        file.write(line + "\\n")


for arg in sys.argv[1:]:
    log(f"arg: {arg}")
stop = None


def on_signal(code):
    def handler(signum, frame):
        global stop
        if stop is not None:
            log("second signal: exiting now")
            os._exit(code)
        log(f"signal {code}")
        stop = code
    return handler


signal.signal(signal.SIGINT, on_signal(130))
signal.signal(signal.SIGTERM, on_signal(143))
step = 0
while stop is None and step < int(os.environ.get("TASK_STEPS", "100000")):
    step += 1
    log(f"step {step}")
    time.sleep(0.1)
if stop is None:
    sys.exit(0)
time.sleep(float(os.environ.get("TASK_SAVE_SECONDS", "0")))
log(f"saved step {step}")
ntasks = int(os.environ["SLURM_NTASKS"])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    saved = 0
    for path in glob.glob(os.path.join(os.environ["TASK_LOGS"], "task-*.log")):
        with open(path) as file:
            saved += sum(line.startswith("saved step") for line in file)
    if saved >= ntasks:
        break
    time.sleep(0.05)
sys.exit(stop)
"""


def write_script(path, text):
    path.write_text(text)
    path.chmod(0o755)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Job:
    """launch/slurm.sbatch started as sbatch starts a job's script."""

    def __init__(self, tmp_path, **env):
        bin_dir, self.logs = tmp_path / "bin", tmp_path / "tasks"
        bin_dir.mkdir()
        self.logs.mkdir()
        (bin_dir / "srun").symlink_to(FAKE_SRUN)
        write_script(bin_dir / "scontrol", SCONTROL)
        write_script(tmp_path / "task", TASK)
        self.srun_record, self.scontrol_record = tmp_path / "srun.jsonl", tmp_path / "scontrol.log"
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               "SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(TASKS),
               "SLURM_CPUS_PER_TASK": "6", "KDJAX_PYTHON": str(tmp_path / "task"),
               "TASK_LOGS": str(self.logs), "FAKE_SRUN_RECORD": str(self.srun_record),
               "SCONTROL_RECORD": str(self.scontrol_record), **env}
        # A session of its own, as the job's script has: its process group is the script's alone.
        # And SIGINT's default action, as sbatch starts it, whatever the test runner was started
        # with (a runner in a shell's background ignores SIGINT, and bash cannot trap a signal
        # ignored when it starts).
        self.script = subprocess.Popen(["bash", SBATCH, *KDJAX_ARGS], env=env, cwd=tmp_path,
                                       start_new_session=True, preexec_fn=_default_sigint)

    def log(self, task):
        path = self.logs / f"task-{task}.log"
        return path.read_text() if path.exists() else ""

    def wait_for_steps(self):
        deadline = time.monotonic() + 60
        while not all("step 3\n" in self.log(task) for task in range(TASKS)):
            assert time.monotonic() < deadline, [self.log(task) for task in range(TASKS)]
            assert self.script.poll() is None, "the job ended early"
            time.sleep(0.1)

    def end(self):
        try:
            return self.script.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(("the job did not end", [self.log(task) for task in range(TASKS)],
                                  self.srun_calls())) from None

    def srun_calls(self):
        """srun's argument lists and pids, and "SIGINT" for each SIGINT it got."""
        if not self.srun_record.exists():
            return []
        return [json.loads(line) for line in self.srun_record.read_text().splitlines()]

    def requeues(self):
        path = self.scontrol_record
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def start_job(tmp_path):
    jobs = []

    def start(**env):
        jobs.append(Job(tmp_path, **env))
        return jobs[-1]

    yield start
    # Whatever still runs: the script's process group, and srun's with its tasks.
    for job in jobs:
        groups = [job.script.pid] + [call["pid"] for call in job.srun_calls() if call != "SIGINT"]
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.script.wait()


def wait_for_logs(job, text):
    deadline = time.monotonic() + 60
    while not all(text in job.log(task) for task in range(TASKS)):
        assert time.monotonic() < deadline, [job.log(task) for task in range(TASKS)]
        time.sleep(0.1)


def assert_saved_once(job):
    """Each task got one SIGINT, saved and exited."""
    for task in range(TASKS):
        lines = job.log(task).splitlines()
        arguments = ["-m", "kdjax", *KDJAX_ARGS]
        assert lines[:len(arguments)] == [f"arg: {arg}" for arg in arguments]
        assert [line for line in lines if "signal" in line] == ["signal 130"], lines
        assert lines[-1].startswith("saved step"), lines


def test_the_time_limit_warning_ends_in_a_checkpoint_and_a_requeue(start_job):
    job = start_job()
    job.wait_for_steps()
    job.script.send_signal(signal.SIGUSR1)  # sbatch's --signal=B:USR1@300
    assert job.end() == 130
    assert_saved_once(job)
    assert job.requeues() == ["requeue 4242"]
    srun = job.srun_calls()[0]["argv"]
    assert srun[:3] == ["--kill-on-bad-exit=1", "--disable-status", "--cpus-per-task=6"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_asked_of_the_job_ends_in_a_checkpoint_without_a_requeue(start_job, signum):
    job = start_job()
    job.wait_for_steps()
    job.script.send_signal(signum)
    assert job.end() == 130
    assert_saved_once(job)
    assert job.requeues() == []


def test_a_stop_asked_after_the_time_limit_warning_is_not_undone_by_a_requeue(start_job):
    job = start_job(TASK_SAVE_SECONDS="10")
    job.wait_for_steps()
    job.script.send_signal(signal.SIGUSR1)
    wait_for_logs(job, "signal 130\n")
    time.sleep(1.5)  # srun kills the tasks at a second SIGINT within a second
    job.script.send_signal(signal.SIGTERM)  # e.g. scancel: the tasks exit at once
    assert job.end() == 130
    wait_for_logs(job, "second signal: exiting now\n")
    assert job.requeues() == []


def test_ctrl_c_at_a_terminal_reaches_srun_once(start_job):
    """A terminal sends SIGINT to its foreground process group: the script's, not srun's."""
    job = start_job()
    job.wait_for_steps()
    os.killpg(job.script.pid, signal.SIGINT)
    assert job.end() == 130
    assert_saved_once(job)
    assert job.srun_calls()[1:] == ["SIGINT"]


def test_a_run_that_ends_is_not_started_again(start_job):
    job = start_job(TASK_STEPS="3")
    assert job.end() == 0
    assert job.requeues() == []
    for task in range(TASKS):
        assert job.log(task).endswith("step 3\n")
