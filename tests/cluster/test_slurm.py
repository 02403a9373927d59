"""A Slurm job step, simulated on this machine (tests/cluster/slurm.py): ``launch/slurm.sbatch``
unchanged, a fake ``srun`` that starts the tasks with a real step's variables, and JAX's own Slurm
detection joining them. Each task has 4 CPU devices.

- Two tasks train ``configs/demo.py:local`` into one workdir to its end: its last step evaluates
  and saves the latest and the best checkpoint at once, asynchronously.
- SIGTERM to one task stops both at one agreed step, with that step's checkpoint and the resume
  message; the same command then resumes to the end.
- A command in an ``salloc`` shell (the job's variables, no step) runs as one process.
"""

import json
import re
import signal

import pytest

from tests.cluster import slurm

pytestmark = pytest.mark.multiprocess

DEMO = "configs/demo.py:local"
JOB_TIMEOUT = 900  # seconds; two processes compile on two shared cores


def _finished_train_steps(workdir) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if '"split": "train"' in line]


def _committed(folder) -> list[int]:
    """The committed steps in a checkpoint folder, in order."""
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_two_tasks_train_the_demo_to_its_end(tmp_path):
    workdir = tmp_path / "run"
    job = slurm.submit(["train", f"--config={DEMO}", f"--workdir={workdir}",
                        "--config.train.steps=4", "--config.train.eval_every=2",
                        "--config.train.checkpoint_every=2"], tmp_path / "job", ntasks=2)
    code = job.wait(JOB_TIMEOUT)
    assert code == 0, job.output()
    for index in range(2):
        log = job.task_log(index)
        assert "multi-process start-up: Slurm job" in log, job.output()
        assert "process %d of 2, 4 local / 8 global devices" % index in log, job.output()
    # Steps 2 and 4 evaluated and saved in both managers.
    assert _committed(workdir / "checkpoints") == [2, 4], job.output()
    assert _committed(workdir / "best") in ([2], [4]), job.output()
    assert (workdir / "model" / "model_spec.json").exists()


@pytest.mark.slow
def test_sigterm_to_one_task_stops_both_at_one_step_and_the_same_command_resumes(tmp_path):
    workdir = tmp_path / "run"
    args = ["train", f"--config={DEMO}", f"--workdir={workdir}", "--config.train.steps=30",
            "--config.train.log_every=1", "--config.train.eval_every=1000",
            "--config.train.checkpoint_every=1000"]
    job = slurm.submit(args, tmp_path / "job", ntasks=2)
    try:
        slurm.wait_for(lambda: len(_finished_train_steps(workdir)) >= 3, job, JOB_TIMEOUT,
                       "third logged step")
        job.signal_task(1, signal.SIGTERM)
        code = job.wait(JOB_TIMEOUT)
    finally:
        job.kill()
    assert code == 128 + signal.SIGTERM, job.output()
    stops = [re.findall(r"stopped by SIGTERM after step (\d+)", job.task_log(i)) for i in range(2)]
    assert all(len(s) == 1 for s in stops), job.output()
    assert stops[0] == stops[1], job.output()
    step = int(stops[0][0])
    assert step < 30
    assert _committed(workdir / "checkpoints") == [step], job.output()
    for index in range(2):
        assert "Resume with the same command" in job.task_log(index), job.output()

    resumed = slurm.submit(args, tmp_path / "job2", ntasks=2)
    assert resumed.wait(JOB_TIMEOUT) == 0, resumed.output()
    assert f"resumed {workdir} at step {step}" in resumed.task_log(0), resumed.output()
    assert _committed(workdir / "checkpoints")[-1] == 30, resumed.output()


@pytest.mark.end_to_end
def test_an_salloc_shell_runs_one_process(tmp_path):
    """The allocation's variables without a job step: no distributed start-up, one process with
    this machine's devices."""
    from tests.io.gcs import run

    env = slurm.cluster_env(tmp_path, SLURM_JOB_ID="77", SLURM_NTASKS="8",
                            SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost",
                            SLURM_CPUS_PER_TASK="1")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=2")
    proc = run(["-m", "kdjax", "train", f"--config={slurm.REPO}/tests/training/tiny_config.py",
                f"--workdir={tmp_path / 'run'}", "--config.train.steps=2",
                "--config.train.eval_every=2", "--config.train.checkpoint_every=2"],
               env, tmp_path, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Slurm allocation of 8 tasks without a job step" in proc.stderr
    assert "multi-process start-up" not in proc.stderr
    assert "1 process(es)" in proc.stderr


def test_coinciding_async_saves_of_the_latest_and_the_best_checkpoint(tmp_path):
    """Both managers save steps 1–3 asynchronously at once in a two-task step, as a run does at
    a step that evaluates and saves; every save commits and restores."""
    import subprocess
    import sys

    env = slurm.cluster_env(tmp_path, SLURM_JOB_ID=str(slurm.free_job_id()), SLURM_NTASKS="2")
    process = subprocess.Popen([sys.executable, str(slurm.FAKE_SRUN), "--kill-on-bad-exit=1",
                                sys.executable, "-m", "tests.cluster.coinciding_saves",
                                str(tmp_path / "run"), "3"], env=env, cwd=slurm.REPO,
                               start_new_session=True)
    job = slurm.Job(process, tmp_path, 2)
    (tmp_path / "sbatch.out").touch()
    try:
        assert job.wait(300) == 0, job.output()
    finally:
        job.kill()
    for index in range(2):
        assert f"process {index}: saved and restored step 3" in job.task_log(index), job.output()
