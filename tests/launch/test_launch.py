"""launch/: each script's --dry-run prints the command it would run, arguments intact; shellcheck passes."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("local.sh", "tpu_pod.sh", "slurm.sbatch", "common.sh")
# Arguments a shell would mangle if they were not quoted on the way through.
KDJAX_ARGS = ["train", "--config=configs/demo.py", "--workdir=runs/my run",
              "--config.name=it's a test", "--config.note=$HOME *", ""]
PYTHON = os.path.join(REPO, ".venv", "bin", "python")


def dry_run(script, *args, env=None, cwd=REPO):
    result = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=cwd,
                            env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            check=False)
    return result


def printed_command(script, *args, **kwargs):
    result = dry_run(script, "--dry-run", *args, **kwargs)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0])


def test_local():
    assert printed_command("local.sh", *KDJAX_ARGS) == [PYTHON, "-m", "kdjax", *KDJAX_ARGS]
    command = printed_command("local.sh", *KDJAX_ARGS, env={"KDJAX_PYTHON": "python3"})
    assert command[0] == "python3"


def test_tpu_pod_runs_the_command_on_every_worker():
    env = {"TPU_NAME": "", "TPU_ZONE": "", "TPU_PROJECT": ""}
    command = printed_command("tpu_pod.sh", "--tpu=pod-32", "--zone=us-central2-b",
                              "--project=research", *KDJAX_ARGS, env=env)
    remote = command.pop()
    assert command == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-32",
                       "--zone=us-central2-b", "--project=research", "--worker=all"]
    assert remote.startswith("--command=")
    # What each worker's shell runs; the repository path is relative to the home directory when
    # it lies inside it.
    repo_dir = os.path.relpath(REPO, os.environ["HOME"]) if REPO.startswith(
        os.environ["HOME"] + os.sep) else REPO
    assert shlex.split(remote.removeprefix("--command=")) == [
        "cd", repo_dir, "&&", ".venv/bin/python", "-m", "kdjax", *KDJAX_ARGS]


def test_tpu_pod_reads_the_environment_and_places_the_repository():
    env = {"TPU_NAME": "v5", "TPU_ZONE": "europe-west4-b", "TPU_PROJECT": ""}
    command = printed_command("tpu_pod.sh", "--repo-dir=/opt/k d", "eval", "--x=1", env=env)
    assert command[5:7] == ["v5", "--zone=europe-west4-b"] and "--project=" not in " ".join(command)
    assert shlex.split(command[-1].removeprefix("--command="))[:2] == ["cd", "/opt/k d"]


def test_tpu_pod_needs_a_name_and_zone():
    result = dry_run("tpu_pod.sh", "--dry-run", "train", env={"TPU_NAME": "", "TPU_ZONE": ""})
    assert result.returncode == 2 and "--tpu=NAME --zone=ZONE" in result.stderr


def test_slurm_starts_one_process_per_gpu_with_srun(tmp_path):
    command = printed_command("slurm.sbatch", *KDJAX_ARGS, env={"SLURM_SUBMIT_DIR": REPO})
    assert command == ["srun", "--kill-on-bad-exit=1", PYTHON, "-m", "kdjax", *KDJAX_ARGS]
    with open(os.path.join(LAUNCH, "slurm.sbatch")) as file:
        directives = dict(line.split()[1].lstrip("-").split("=", 1)
                          for line in file if line.startswith("#SBATCH"))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert {"nodes", "cpus-per-task", "time"} <= set(directives)
    # Submitted from elsewhere, it says where it looked for the repository.
    result = dry_run("slurm.sbatch", "--dry-run", "train", env={"SLURM_SUBMIT_DIR": str(tmp_path)},
                     cwd=tmp_path)
    assert result.returncode == 2 and f"no kdjax repository at {tmp_path}" in result.stderr


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm.sbatch"])
def test_usage_errors(script):
    env = {"TPU_NAME": "x", "TPU_ZONE": "y", "SLURM_SUBMIT_DIR": REPO}
    missing = dry_run(script, "--dry-run", env=env)
    assert missing.returncode == 2 and "usage:" in missing.stderr
    unknown = dry_run(script, "--verbose", "train", env=env)
    assert unknown.returncode == 2 and "unknown option --verbose" in unknown.stderr


def shellcheck():
    found = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return found if os.path.exists(found) else shutil.which("shellcheck")


@pytest.mark.skipif(shellcheck() is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script, tmp_path):
    # From another directory, so the scripts' .shellcheckrc (not the cwd) must resolve common.sh.
    result = subprocess.run([shellcheck(), os.path.join(LAUNCH, script)], cwd=tmp_path,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
