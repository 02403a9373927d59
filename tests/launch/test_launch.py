"""launch/: each script's --dry-run prints the commands it would run, arguments intact, and runs
them (against stand-ins for gcloud, make and srun); shellcheck passes."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("local.sh", "tpu_pod.sh", "slurm.sbatch", "common.sh")
# Arguments a shell would mangle if they were not quoted on the way through.
KDJAX_ARGS = ["train", "--config=configs/demo.py", "--workdir=runs/my run",
              "--config.name=it's a test", "--config.note=$HOME *", ""]
PYTHON = os.path.join(REPO, ".venv", "bin", "python")


def launch(script, *args, env=None, cwd=REPO):
    result = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=cwd,
                            env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            check=False)
    return result


def printed_lines(script, *args, **kwargs):
    result = launch(script, "--dry-run", *args, **kwargs)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def printed_command(script, *args, **kwargs):
    lines = printed_lines(script, *args, **kwargs)
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def remote(command):
    """What each worker's shell runs, from a printed `gcloud ... ssh ... --command=...`."""
    assert command[-1].startswith("--command="), command
    return shlex.split(command[-1].removeprefix("--command="))


def test_local():
    assert printed_command("local.sh", *KDJAX_ARGS) == [PYTHON, "-m", "kdjax", *KDJAX_ARGS]
    command = printed_command("local.sh", *KDJAX_ARGS, env={"KDJAX_PYTHON": "python3"})
    assert command[0] == "python3"


TPU_ENV = {"TPU_NAME": "", "TPU_ZONE": "", "TPU_PROJECT": ""}
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
# The repository's default place on the workers: relative to the home directory when inside it.
REMOTE_REPO = (os.path.relpath(REPO, os.environ["HOME"])
               if REPO.startswith(os.environ["HOME"] + os.sep) else REPO)


def remote_lines(*args, **kwargs):
    """The printed gcloud commands, split into words, and what each one's workers run."""
    commands = [shlex.split(line) for line in printed_lines("tpu_pod.sh", *args, **kwargs)]
    for command in commands:
        if command[:5] == SSH:  # what the workers run is shell they can parse
            syntax = subprocess.run(["bash", "-n", "-c", command[-1].removeprefix("--command=")],
                                    capture_output=True, text=True, check=False)
            assert syntax.returncode == 0, syntax.stderr
    return commands, [remote(command) if command[:5] == SSH else None for command in commands]


def contains(words, part):
    return any(words[i:i + len(part)] == part for i in range(len(words) - len(part) + 1))


# `run` may be left out, as in the script's first form.
@pytest.mark.parametrize("action", [[], ["run"]])
def test_tpu_pod_runs_the_command_on_every_worker(action):
    """run ends leftover TPU users, then starts kdjax detached, its output in a log per worker."""
    commands, (prepare, start) = remote_lines(
        *action, "--tpu=pod-32", "--zone=us-central2-b", "--project=research", "--name=r1",
        *KDJAX_ARGS, env=TPU_ENV)
    for command in commands:
        assert command[:-1] == [*SSH, "pod-32", "--zone=us-central2-b", "--project=research",
                                "--worker=all"]
    assert prepare[:3] == start[:3] == ["cd", REMOTE_REPO, "&&"]
    assert contains(prepare, ["lsof", "-t", "/dev/accel*", "/dev/vfio/*"])
    assert contains(prepare, ["rm", "-f", "/tmp/libtpu_lockfile"])
    assert "run=logs/r1;" in start
    assert contains(start, ["setsid", "nohup", "sh", "-c"])
    assert contains(start, [".venv/bin/python", "-m", "kdjax", *KDJAX_ARGS, ">>$log", "2>&1",
                            "</dev/null", "&"])


def test_tpu_pod_names_each_run():
    _, (_, start) = remote_lines("--tpu=v5", "--zone=z", "train", env=TPU_ENV)
    run = next(word for word in start if word.startswith("run="))
    assert re.fullmatch(r"run=logs/\d{8}-\d{6};", run)
    for name in ("latest", "../x", "a b"):
        result = launch("tpu_pod.sh", "--dry-run", "--tpu=v5", "--zone=z", f"--name={name}",
                        "train")
        assert result.returncode == 2 and "a run name is" in result.stderr


def test_tpu_pod_reads_the_environment_and_places_the_repository():
    env = {"TPU_NAME": "v5", "TPU_ZONE": "europe-west4-b", "TPU_PROJECT": ""}
    commands, remotes = remote_lines("--repo-dir=/opt/k d", "eval", "--x=1", env=env)
    for command, on_worker in zip(commands, remotes):
        assert command[5:7] == ["v5", "--zone=europe-west4-b"]
        assert "--project=" not in " ".join(command)
        assert on_worker[:2] == ["cd", "/opt/k d"]


@pytest.mark.parametrize("action,options,run,shows", [
    ("logs", [], "latest", ["tail", "-n", "20", "$log", "|"]),
    ("logs", ["--name=r1", "--lines=5", "--follow"], "r1",
     ["tail", "-n", "5", "-F", "$log", "|"]),
    ("status", ["--name=r1"], "r1", ["pid=$(cat", "$pid_file);"]),
    ("stop", [], "latest", ["kill", "-TERM", "$pid;"]),
    ("stop", ["--grace=7"], "latest", ["[", "$n", "-lt", "7", "];"]),
])
def test_tpu_pod_watches_and_stops_the_run_on_every_worker(action, options, run, shows):
    commands, remotes = remote_lines(action, "--tpu=v5", "--zone=z", *options, env=TPU_ENV)
    assert len(commands) == 1 and commands[0][:-1] == [*SSH, "v5", "--zone=z", "--worker=all"]
    assert remotes[0][:3] == ["cd", REMOTE_REPO, "&&"] and f"run=logs/{run};" in remotes[0]
    assert contains(remotes[0], shows)


def test_tpu_pod_fetches_the_logs():
    commands, _ = remote_lines("logs", "--tpu=v5", "--zone=z", "--repo-dir=kd", "--name=r1",
                               "--fetch=here/logs", env=TPU_ENV)
    assert commands == [["mkdir", "-p", "here/logs"],
                        [*SSH[:-1], "scp", "v5:kd/logs/r1/worker-*.log", "here/logs", "--zone=z",
                         "--worker=all"]]


def test_tpu_pod_passes_gcloud_flags_and_the_environment_on():
    options = ["--tpu=v5", "--zone=z", "--project=p", "--tunnel-through-iap",
               "--gcloud-flag=--ssh-key-file=~/k", "--env", "A=1", "--env=B=x 'y'"]
    for action in (["setup"], ["run", "train"], ["logs"], ["status"], ["stop"]):
        commands, remotes = remote_lines(*action[:1], *options, *action[1:], env=TPU_ENV)
        for command, on_worker in zip(commands, remotes):
            if command[0] == "gcloud":
                flags = command[command.index("--zone=z"):]
                assert flags[:5] == ["--zone=z", "--project=p", "--tunnel-through-iap",
                                     "--ssh-key-file=~/k", "--worker=all"], command
            if on_worker:
                assert on_worker[:6] == ["export", "A=1", "&&", "export", "B=x 'y'", "&&"]
    result = launch("tpu_pod.sh", "--dry-run", "--tpu=v5", "--zone=z", "--env", "A", "train")
    assert result.returncode == 2 and "--env takes KEY=VALUE" in result.stderr


def test_tpu_pod_setup_copies_head_and_installs_the_tpu_build():
    copy, send, unpack, install = map(shlex.split, printed_lines(
        "tpu_pod.sh", "setup", "--tpu=pod-32", "--zone=us-central2-b", "--project=research",
        env=TPU_ENV))
    flags = ["--zone=us-central2-b", "--project=research", "--worker=all"]
    archive = copy[-2].removeprefix("--output=")
    assert copy == ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"]
    assert send == [*SSH[:-1], "scp", archive, "pod-32:kdjax.tar.gz", *flags]
    assert unpack[:-1] == install[:-1] == [*SSH, "pod-32", *flags]
    assert remote(unpack) == ["mkdir", "-p", REMOTE_REPO, "&&", "tar", "-xzf", "kdjax.tar.gz",
                              "-C", REMOTE_REPO, "&&", "rm", "kdjax.tar.gz"]
    # The image's Python is too old: uv from PyPI, and uv's Python 3.12 for .venv.
    install = remote(install)
    assert install[:3] == ["cd", REMOTE_REPO, "&&"]
    assert contains(install, ["python3", "-m", "pip", "install", "--user", "uv;"])
    assert contains(install, ["uv", "python", "install", "3.12", "&&", "python=$(cd", "&&", "uv",
                              "python", "find", "3.12)", "&&"])
    assert install[-4:] == ["make", "install", "ACCEL=tpu", "PYTHON=$python"]


def test_tpu_pod_setup_from_a_repository_url():
    fetch, install = map(shlex.split, printed_lines(
        "tpu_pod.sh", "setup", "--tpu=v5", "--zone=z", "--repo-dir=k d",
        "--repo-url=https://example.org/kd jax.git", "--ref=v1.0", "--python=python3.12",
        env=TPU_ENV))
    assert remote(fetch) == ["git", "init", "-q", "k d", "&&", "cd", "k d", "&&", "git", "fetch",
                             "-q", "--depth=1", "https://example.org/kd jax.git", "v1.0", "&&",
                             "git", "checkout", "-q", "--force", "FETCH_HEAD"]
    assert remote(install) == ["cd", "k d", "&&", "make", "install", "ACCEL=tpu",
                               "PYTHON=python3.12"]


# Stand-ins for a slice of one worker whose home directory is $WORKER_HOME: gcloud's scp copies
# there and its ssh runs the command there; make records what it was asked, where it ran. sudo is
# allowed and does nothing, so that the clean-up before a run touches no process or file of this
# machine (tests/cluster/test_tpu_vm.py simulates it).
FAKE_GCLOUD = """#!/usr/bin/env bash
set -euo pipefail
case "$4" in
  scp) cp "$5" "$WORKER_HOME/${6#*:}" ;;
  ssh) command="${*: -1}" && cd "$WORKER_HOME" && exec bash -c "${command#--command=}" ;;
esac
"""
FAKE_MAKE = """#!/usr/bin/env bash
echo "$*" > make.log
"""
FAKE_SUDO = "#!/usr/bin/env bash\n"
# The worker's .venv/bin/python: prints its arguments, one per line.
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$@"
"""


def write_script(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.mark.parametrize("source", [[], [f"--repo-url=file://{REPO}"]])
def test_tpu_pod_sets_up_the_worker_and_runs_there(source, tmp_path):
    home = tmp_path / "worker"
    home.mkdir()
    write_script(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
    write_script(tmp_path / "bin" / "make", FAKE_MAKE)
    write_script(tmp_path / "bin" / "sudo", FAKE_SUDO)
    env = {**TPU_ENV, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "WORKER_HOME": str(home), "TPU_WORKER_ID": "0"}
    where = ["--tpu=pod", "--zone=z", "--repo-dir=kd"]
    # Twice: a second setup updates the copy in place. An interpreter of one's own: uv's are
    # simulated in tests/cluster/test_tpu_vm.py.
    for _ in range(2):
        result = launch("tpu_pod.sh", "setup", *where, *source, "--python=python3.12", env=env)
        assert result.returncode == 0, result.stderr
    head = subprocess.run(["git", "-C", REPO, "ls-tree", "-r", "--name-only", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert {"Makefile", "launch/tpu_pod.sh"} <= set(head)
    for path in head:
        assert (home / "kd" / path).exists(), path
    assert not (home / "kd" / ".venv").exists() and not (home / "kdjax.tar.gz").exists()
    assert (home / "kd" / "make.log").read_text() == "install ACCEL=tpu PYTHON=python3.12\n"

    write_script(home / "kd" / ".venv" / "bin" / "python", FAKE_PYTHON)
    result = launch("tpu_pod.sh", "run", *where, "--name=r1", *KDJAX_ARGS, env=env)
    assert result.returncode == 0, result.stderr
    log = home / "kd" / "logs" / "r1" / "worker-0.log"
    expected = "\n".join(["-m", "kdjax", *KDJAX_ARGS]) + "\n"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text() == expected):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.1)


@pytest.mark.parametrize("args", [
    ["setup", "train"], ["setup", "--ref=v1"], ["setup", "--name=r1"],
    ["run", "--repo-url=u", "train"], ["--python=python3", "train"], ["run", "--follow", "train"],
    ["logs", "train"], ["logs", "--follow", "--fetch=d"], ["logs", "--grace=1"],
    ["status", "--lines=3"], ["stop", "--fetch=d"], ["stop", "--python=python3"]])
def test_tpu_pod_options_go_with_their_action(args):
    result = launch("tpu_pod.sh", "--dry-run", "--tpu=x", "--zone=y", *args)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_tpu_pod_needs_a_name_and_zone():
    result = launch("tpu_pod.sh", "--dry-run", "train", env={"TPU_NAME": "", "TPU_ZONE": ""})
    assert result.returncode == 2 and "--tpu=NAME --zone=ZONE" in result.stderr


SRUN = ["srun", "--kill-on-bad-exit=1", "--disable-status"]


def test_slurm_starts_one_process_per_gpu_with_srun(tmp_path):
    hint, command = printed_lines("slurm.sbatch", *KDJAX_ARGS,
                                  env={"SLURM_SUBMIT_DIR": REPO, "SLURM_CPUS_PER_TASK": ""})
    assert hint == f"# once, on a login node: cd {REPO} && make install ACCEL=cuda"
    assert shlex.split(command) == [*SRUN, PYTHON, "-m", "kdjax", *KDJAX_ARGS]
    # srun does not take sbatch's --cpus-per-task: it is passed on.
    _, command = printed_lines("slurm.sbatch", "train",
                               env={"SLURM_SUBMIT_DIR": REPO, "SLURM_CPUS_PER_TASK": "6"})
    assert shlex.split(command) == [*SRUN, "--cpus-per-task=6", PYTHON, "-m", "kdjax", "train"]
    with open(os.path.join(LAUNCH, "slurm.sbatch")) as file:
        directives = dict(line.split()[1].lstrip("-").partition("=")[::2]
                          for line in file if line.startswith("#SBATCH"))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert {"nodes", "cpus-per-task", "time", "requeue"} <= set(directives)
    # The time limit's warning goes to the script, which stops the tasks and requeues the job.
    assert directives["signal"] == "B:USR1@300" and directives["open-mode"] == "append"
    # Submitted from elsewhere, it says where it looked for the repository.
    result = launch("slurm.sbatch", "--dry-run", "train", env={"SLURM_SUBMIT_DIR": str(tmp_path)},
                    cwd=tmp_path)
    assert result.returncode == 2 and f"no kdjax repository at {tmp_path}" in result.stderr


def test_slurm_needs_the_cuda_build(tmp_path):
    """Without `make install ACCEL=cuda`'s stamp in the repository's .venv it stops with the
    install line; with it (or with an interpreter of one's own) srun starts."""
    repo = tmp_path / "repo"
    shutil.copytree(LAUNCH, repo / "launch")
    write_script(tmp_path / "srun", "#!/usr/bin/env bash\necho srun \"$@\"\n")
    env = {"KDJAX_REPO": str(repo), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "SLURM_CPUS_PER_TASK": ""}
    missing = launch("slurm.sbatch", "train", env=env)
    assert missing.returncode == 2 and missing.stdout == ""
    assert (f"install it once, on a login node: cd {repo} && make install ACCEL=cuda"
            in missing.stderr)
    own = launch("slurm.sbatch", "train", env={**env, "KDJAX_PYTHON": "python3"})
    assert own.stdout == f"{' '.join(SRUN)} python3 -m kdjax train\n", own.stderr
    (repo / ".venv").mkdir()
    (repo / ".venv" / ".installed-cuda-torch").touch()
    started = launch("slurm.sbatch", "train", env=env)
    assert started.stdout == f"{' '.join(SRUN)} {repo}/.venv/bin/python -m kdjax train\n"


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm.sbatch"])
def test_usage_errors(script):
    env = {"TPU_NAME": "x", "TPU_ZONE": "y", "SLURM_SUBMIT_DIR": REPO}
    missing = launch(script, "--dry-run", env=env)
    assert missing.returncode == 2 and "usage:" in missing.stderr
    unknown = launch(script, "--verbose", "train", env=env)
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
