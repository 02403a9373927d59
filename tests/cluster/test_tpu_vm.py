"""launch/tpu_pod.sh on a simulated TPU VM slice of two workers (tests/cluster/fake_gcloud): the
launcher runs unchanged, and only the slice's own programs are stand-ins: gcloud, and on the
workers the image's python3 and pip, uv, make, sudo, lsof and kdjax itself (.venv/bin/python)."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
FAKE_GCLOUD = os.path.join(REPO, "tests", "cluster", "fake_gcloud")
WORKERS = 2
WHERE = ["--tpu=pod", "--zone=us-central2-b", "--repo-dir=kd"]
KDJAX_ARGS = ["train", "--config=configs/demo.py", "--workdir=gs://bucket/runs/a b",
              "--config.name=it's"]

# The image's Python 3.10 and its pip, which installs uv (a stand-in from the test's PyPI).
PYTHON3 = """#!/usr/bin/env bash
echo "$*" >>"$HOME/python3.log"
case "$*" in
  --version) echo "Python 3.10.12" ;;
  "-m pip install --user uv") mkdir -p "$HOME/.local/bin" && cp {pypi}/uv "$HOME/.local/bin/uv" ;;
  *) echo "python3 (3.10): $*: not provided here" >&2 && exit 1 ;;
esac
"""
# uv: installs a Python 3.12 of its own and finds it.
UV = """#!/usr/bin/env bash
echo "$*" >>"$HOME/uv.log"
python="$HOME/.local/share/uv/python/cpython-3.12.7-linux-x86_64-gnu/bin/python3.12"
case "$*" in
  "python install 3.12")
    mkdir -p "$(dirname "$python")" && printf '#!/bin/sh\\necho Python 3.12.7\\n' >"$python" &&
      chmod +x "$python" ;;
  "python find 3.12") [ -x "$python" ] && echo "$python" ;;
  *) exit 2 ;;
esac
"""
# An interpreter of the user's own.
PYTHON311 = "#!/bin/sh\necho Python 3.11.9\n"
# make: records its arguments and the version of the interpreter PYTHON= names; `install` makes
# .venv/bin/python, the kdjax stand-in.
MAKE = """#!/usr/bin/env bash
python=
for word in "$@"; do case "$word" in PYTHON=*) python="${{word#PYTHON=}}" ;; esac; done
version=$(if [ -n "$python" ]; then "$python" --version; else echo "python3"; fi)
echo "$* | $version" >>make.log
if [ "$1" = install ]; then mkdir -p .venv/bin && cp {stand_ins}/kdjax .venv/bin/python; fi
"""
# sudo, allowed without a password: records each command, then runs it; but this machine's own
# /tmp/libtpu_lockfile is not the simulated worker's to remove.
SUDO = """#!/usr/bin/env bash
while [ "${1#-}" != "$1" ]; do shift; done
echo "$*" >>"$HOME/sudo.log"
[ "$*" = "rm -f /tmp/libtpu_lockfile" ] || exec "$@"
"""
# lsof -t DEVICE...: the live processes listed in ~/tpu-users (those the test made hold the TPU),
# when it is asked about the TPU's devices.
LSOF = """#!/usr/bin/env bash
echo "$*" >>"$HOME/lsof.log"
devices=false
for word in "$@"; do case "$word" in /dev/accel* | /dev/vfio/*) devices=true ;; esac; done
found=1
if [ "$1" = -t ] && $devices && [ -f "$HOME/tpu-users" ]; then
  while read -r pid; do
    if [ -r "/proc/$pid/stat" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat")" != Z ]; then
      echo "$pid" && found=0
    fi
  done <"$HOME/tpu-users"
fi
exit $found
"""
# kdjax in the worker's .venv: like libtpu, it refuses while another process holds the TPU. It
# prints its arguments and $NOTE, then a step every 0.1 s; at SIGTERM it "saves" and exits 143
# (with STANDIN_IGNORE_TERM set it carries on).
KDJAX = """#!/usr/bin/env bash
if users=$(lsof -t /dev/accel0); then echo "TPU in use by process with pid $users" && exit 1; fi
printf 'arg: %s\\n' "$@"
echo "NOTE=${NOTE-<unset>}"
stop=
trap 'echo "SIGTERM received"; [ -n "${STANDIN_IGNORE_TERM:-}" ] || stop=143' TERM
step=0
while [ -z "$stop" ]; do step=$((step + 1)) && echo "step $step" && sleep 0.1; done
echo "saved step $step; resume with the same command"
exit "$stop"
"""


def write_script(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def state(pid):
    """The process's state letter (Z: a zombie, which has ended), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def alive(pid):
    return state(pid) not in (None, "Z")


def wait_for(condition, timeout=60, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Slice:
    def __init__(self, tmp_path):
        self.root = tmp_path / "slice"
        self.root.mkdir()
        bin_dir, stand_ins, pypi = tmp_path / "bin", tmp_path / "worker-bin", tmp_path / "pypi"
        bin_dir.mkdir()
        (bin_dir / "gcloud").symlink_to(FAKE_GCLOUD)
        write_script(pypi / "uv", UV)
        write_script(stand_ins / "python3", PYTHON3.format(pypi=pypi))
        write_script(stand_ins / "python3.11", PYTHON311)
        write_script(stand_ins / "make", MAKE.format(stand_ins=stand_ins))
        write_script(stand_ins / "sudo", SUDO)
        write_script(stand_ins / "lsof", LSOF)
        write_script(stand_ins / "kdjax", KDJAX)
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    "FAKE_TPU_ROOT": str(self.root), "FAKE_TPU_WORKERS": str(WORKERS),
                    "FAKE_TPU_NAME": "pod", "FAKE_TPU_PATH": str(stand_ins),
                    "TPU_NAME": "", "TPU_ZONE": "", "TPU_PROJECT": ""}
        self.started = []  # processes the test started on the workers

    def home(self, worker):
        return self.root / f"worker-{worker}"

    def launch(self, *args, timeout=120):
        return subprocess.run(["bash", TPU_POD, *args], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def ok(self, *args, **kwargs):
        result = self.launch(*args, **kwargs)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def setup(self, *args):
        return self.ok("setup", *WHERE, *args)

    def calls(self):
        with open(self.root / "gcloud.jsonl") as file:
            return [json.loads(line)["argv"] for line in file]

    def run_file(self, worker, run, suffix):
        return self.home(worker) / "kd" / "logs" / run / f"worker-{worker}.{suffix}"

    def pid(self, worker, run):
        return int(self.run_file(worker, run, "pid").read_text())

    def log(self, worker, run):
        path = self.run_file(worker, run, "log")
        return path.read_text() if path.exists() else ""

    def hold_the_tpu(self, worker):
        """Starts a process that holds worker's TPU, as a crashed run leaves one behind."""
        process = subprocess.Popen(["sleep", "300"], start_new_session=True)
        self.started.append(process)
        with open(self.home(worker) / "tpu-users", "a") as file:
            file.write(f"{process.pid}\n")
        return process

    def end_everything(self):
        for pid_file in self.root.glob("worker-*/kd/logs/*/worker-*.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for process in self.started:
            process.kill()
            process.wait()


@pytest.fixture
def tpu_slice(tmp_path):
    simulated = Slice(tmp_path)
    yield simulated
    simulated.end_everything()


@pytest.mark.parametrize("python,expected", [
    ([], "PYTHON={home}/.local/share/uv/python/cpython-3.12.7-linux-x86_64-gnu/bin/python3.12 | "
         "Python 3.12.7"),
    (["--python=python3.11"], "PYTHON=python3.11 | Python 3.11.9"),
], ids=["uv", "own-python"])
def test_setup_puts_the_code_on_every_worker_with_python_3_12_and_the_tpu_build(
        tpu_slice, python, expected):
    tpu_slice.setup(*python)
    tpu_slice.setup(*python)  # a second setup updates the workers
    head = subprocess.run(["git", "-C", REPO, "ls-tree", "-r", "--name-only", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.split()
    for worker in range(WORKERS):
        home = tpu_slice.home(worker)
        for path in head:
            assert (home / "kd" / path).exists(), (worker, path)
        assert not (home / "kdjax.tar.gz").exists()
        installs = (home / "kd" / "make.log").read_text().splitlines()
        assert installs == [f"install ACCEL=tpu {expected.format(home=home)}"] * 2
        if python:
            assert not (home / ".local" / "bin" / "uv").exists()
        else:
            # uv from PyPI through the image's pip, once; then uv's Python 3.12 at each setup.
            assert (home / "python3.log").read_text() == "-m pip install --user uv\n"
            assert (home / "uv.log").read_text().splitlines() == [
                "python install 3.12", "python find 3.12"] * 2
    assert all("--worker=all" in call for call in tpu_slice.calls())


def test_run_is_detached_with_a_log_per_worker_and_stop_saves_first(tpu_slice):
    tpu_slice.setup()
    started = tpu_slice.launch("run", *WHERE, "--name=r1", "--env", "NOTE=a 'b' $c",
                               *KDJAX_ARGS, timeout=60)
    # The ssh sessions have ended (and hung up) while the runs go on.
    assert started.returncode == 0, started.stderr
    for worker in range(WORKERS):
        assert f"worker-{worker}: started run r1" in started.stdout
        pid = tpu_slice.pid(worker, "r1")
        wait_for(lambda: "step 3\n" in tpu_slice.log(worker, "r1"), what="steps")
        assert alive(pid)
        log = tpu_slice.log(worker, "r1").splitlines()
        assert log[:len(KDJAX_ARGS) + 3] == [
            "arg: -m", "arg: kdjax", *(f"arg: {arg}" for arg in KDJAX_ARGS), "NOTE=a 'b' $c"]
    assert "logs --follow --name=r1" in started.stderr

    status = tpu_slice.ok("status", *WHERE)
    for worker in range(WORKERS):
        pid = tpu_slice.pid(worker, "r1")
        assert f"worker-{worker}: run r1 running (pid {pid})" in status.stdout

    stopped = tpu_slice.ok("stop", *WHERE, timeout=60)
    for worker in range(WORKERS):
        assert f"worker-{worker}: stopped" in stopped.stdout
        assert not alive(tpu_slice.pid(worker, "r1"))
        log = tpu_slice.log(worker, "r1")
        assert "SIGTERM received" in log and "saved step" in log.splitlines()[-1]
    status = tpu_slice.ok("status", *WHERE, "--name=r1")
    assert status.stdout.count("ended; last line: saved step") == WORKERS


def test_stop_kills_a_run_that_does_not_end_after_the_grace_period(tpu_slice):
    tpu_slice.setup()
    tpu_slice.ok("run", *WHERE, "--name=r1", "--env=STANDIN_IGNORE_TERM=1", *KDJAX_ARGS)
    stopped = tpu_slice.ok("stop", *WHERE, "--grace=1", timeout=60)
    for worker in range(WORKERS):
        assert f"worker-{worker}: still running after 1 s: killed" in stopped.stdout
        assert not alive(tpu_slice.pid(worker, "r1"))
        assert "SIGTERM received" in tpu_slice.log(worker, "r1")


def test_logs_gathers_every_workers_log(tpu_slice, tmp_path):
    tpu_slice.setup()
    tpu_slice.ok("run", *WHERE, "--name=r1", *KDJAX_ARGS)
    for worker in range(WORKERS):
        wait_for(lambda: "step 5\n" in tpu_slice.log(worker, "r1"), what="steps")

    tail = tpu_slice.ok("logs", *WHERE, "--lines=3").stdout.splitlines()
    assert len(tail) == 3 * WORKERS
    for worker in range(WORKERS):
        assert len([line for line in tail if line.startswith(f"worker-{worker}: step ")]) == 3

    fetched = tmp_path / "fetched"
    tpu_slice.ok("logs", *WHERE, "--name=r1", f"--fetch={fetched}")
    for worker in range(WORKERS):
        assert (fetched / f"worker-{worker}.log").read_text().startswith("arg: -m\narg: kdjax\n")

    # --follow keeps printing as the logs grow, until it is interrupted; the runs go on.
    follow = subprocess.Popen(["bash", TPU_POD, "logs", *WHERE, "--follow", "--lines=1"],
                              env=tpu_slice.env, stdout=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(follow.stdout), daemon=True)
    reader.start()

    def steps_followed(worker):
        return len([line for line in lines if line.startswith(f"worker-{worker}: step ")])

    wait_for(lambda: min(map(steps_followed, range(WORKERS))) >= 5, what="followed steps")
    follow.send_signal(signal.SIGINT)
    follow.wait(timeout=30)
    reader.join(timeout=30)
    for worker in range(WORKERS):
        assert alive(tpu_slice.pid(worker, "r1"))


def test_run_ends_leftover_tpu_users_first(tpu_slice):
    tpu_slice.setup()
    leftovers = [tpu_slice.hold_the_tpu(worker) for worker in range(WORKERS)]
    started = tpu_slice.ok("run", *WHERE, "--name=r1", *KDJAX_ARGS)
    for worker, leftover in enumerate(leftovers):
        assert leftover.wait(timeout=30) == -signal.SIGKILL
        assert (f"worker-{worker}: ending the processes that hold the TPU: {leftover.pid}"
                in started.stdout)
        wait_for(lambda: "step 1\n" in tpu_slice.log(worker, "r1"), what="the run's first step")
        assert "TPU in use" not in tpu_slice.log(worker, "r1")
        sudo = (tpu_slice.home(worker) / "sudo.log").read_text().splitlines()
        assert f"kill -9 {leftover.pid}" in sudo and "rm -f /tmp/libtpu_lockfile" in sudo

    # A run of its own is not ended that way: a second run is refused while the first is alive.
    again = tpu_slice.launch("run", *WHERE, "--name=r2", *KDJAX_ARGS)
    assert again.returncode != 0
    for worker in range(WORKERS):
        assert f"worker-{worker}: run r1 is still running" in again.stderr
        assert alive(tpu_slice.pid(worker, "r1"))
        assert not tpu_slice.run_file(worker, "r2", "pid").exists()


@pytest.mark.parametrize("connection", [["--internal-ip"], ["--tunnel-through-iap"]])
def test_gcloud_flags_and_environment_reach_every_worker(tpu_slice, tmp_path, connection):
    flags = [*connection, "--project=research", "--gcloud-flag=--strict-host-key-checking=no"]
    tpu_slice.setup(*flags)
    tpu_slice.ok("run", *WHERE, *flags, "--name=r1", "--env", "NOTE=x=1 y", *KDJAX_ARGS)
    for worker in range(WORKERS):
        wait_for(lambda: "NOTE=x=1 y\n" in tpu_slice.log(worker, "r1"), what="the run's output")
    tpu_slice.ok("status", *WHERE, *flags)
    tpu_slice.ok("logs", *WHERE, *flags, f"--fetch={tmp_path / 'fetched'}")
    tpu_slice.ok("stop", *WHERE, *flags, timeout=60)
    calls = tpu_slice.calls()
    assert {call[3] for call in calls} == {"ssh", "scp"}
    for call in calls:
        assert {*flags[:2], "--strict-host-key-checking=no", "--worker=all"} <= set(call), call
