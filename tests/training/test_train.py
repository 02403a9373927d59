"""The trainer end to end on tiny models: sharded step = single device, train/eval/checkpoint,
kill-and-resume = uninterrupted, non-finite losses stop the run naming the term."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kdjax import training as train
from kdjax.commands import evaluate as evaluate_run
from kdjax.config.loading import load_config
from kdjax.data import pipeline
from kdjax.data.pipeline import make_train_iterator
from kdjax.io.checkpoints import TrainCheckpointer
from kdjax.models import ResNet
from kdjax.runtime import sharding
from kdjax.training import loop

CONFIG = str(Path(__file__).with_name("tiny_config.py"))
REPO = Path(__file__).resolve().parents[2]


def _config(**overrides):
    config = load_config(CONFIG)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def _batches(config, count):
    it = make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                             seed=config.seed, process_index=0, process_count=1)
    return [next(it) for _ in range(count)]


def tie_free(batch: dict, seed: int) -> dict:
    """``batch`` with pixel noise added to its images. The synthetic scenes are flat-coloured, so
    max-pool windows hold exactly equal maxima and the gradient goes to whichever of them rounding
    makes largest: a 1e-7 relative change of the weights then moves the next gradient norm by
    3e-4. Without ties only summation-order differences remain."""
    noise = np.random.default_rng(seed).normal(0.0, 0.1, batch["image"].shape)
    return dict(batch, image=batch["image"] + noise.astype(np.float32))


def tie_free_batches(config, count):
    """The first ``count`` training batches, each through :func:`tie_free` (seeded by its index)."""
    return [tie_free(b, seed) for seed, b in enumerate(_batches(config, count))]


def _run_steps(exp, batches):
    state = exp.init_state()
    step = exp.compile()
    teacher = exp.teacher_inputs()
    history = []
    for batch in batches:
        state, metrics = step(state, teacher, sharding.global_batch(batch, exp.mesh))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return jax.device_get(state), history


@pytest.fixture(scope="module")
def tiny():
    """One experiment (8 devices) shared by the tests, so its step compiles once."""
    return train.setup(_config())


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """(workdir, result) of one whole run of the tiny experiment, shared by the tests that check
    a finished run and the one that compares a resumed run with it."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train.run_training(tiny, workdir)


def _leaves(tree):
    if isinstance(tree, train.TrainState):
        tree = (tree.student.params, tree.student.batch_stats)
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.end_to_end
def test_eight_devices_match_one_device(tiny):
    config = _config()
    batches = tie_free_batches(config, 3)
    one = train.setup(config, mesh=sharding.make_mesh(jax.devices()[:1]))
    assert tiny.mesh.devices.size == 8
    step1, step8 = one.compile(), tiny.compile()
    teacher1, teacher8 = one.teacher_inputs(), tiny.teacher_inputs()
    # Each step starts both meshes from the same state (the single-device trajectory's), so
    # differences cannot compound over steps.
    state = jax.device_get(one.init_state())
    losses = []
    for batch in batches:
        new1, metrics1 = step1(state, teacher1, sharding.global_batch(batch, one.mesh))
        new8, metrics8 = step8(state, teacher8, sharding.global_batch(batch, tiny.mesh))
        metrics1, metrics8 = jax.device_get((metrics1, metrics8))
        assert set(metrics1) >= {"loss", "ce", "aux_ce", "kd/cwd", "kd/nfd", "grad_norm"}
        assert metrics8.keys() == metrics1.keys()
        # Per-device partial sums change the float32 summation order (~1e-6 relative).
        for key in metrics1:
            np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5, atol=1e-6,
                                       err_msg=key)
        new1, new8 = jax.device_get((new1, new8))
        assert int(new1.step) == int(new8.step) == int(state.step) + 1
        # Gradients that are sums with heavy cancellation (e.g. the stem BN bias, summed over
        # every pixel) keep the summation-order noise, so every tensor is compared at its scale.
        for a, b in zip(_leaves(new1) + _leaves(new1.student.opt_state),
                        _leaves(new8) + _leaves(new8.student.opt_state)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-3 * np.abs(a).max() + 1e-7)
        losses.append(float(metrics1["loss"]))
        state = new1
    # The loss moved: training happened.
    assert losses[0] != losses[-1]


def test_run_trains_evaluates_checkpoints_and_logs(tiny, uninterrupted):
    tmp_path, result = uninterrupted
    assert result.step == 4
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x["step"] for x in lines if x["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    assert all("images_per_second" in x for x in lines if x["split"] == "train" and x["step"] > 1)
    assert {x["step"] for x in lines if x["split"] == "val"} == {2, 4}
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert len(os.listdir(tmp_path / "best")) == 1
    assert list((tmp_path / "tensorboard").iterdir())
    assert 0.0 <= result.eval["miou"] <= 100.0
    assert result.eval["checkpoint"] == "best" and result.eval["eval_mode"].startswith("whole")
    # The reported state is the best checkpoint's.
    assert int(result.state.step) == result.eval["checkpoint_step"]
    # Running the finished command again resumes at the end and trains nothing more.
    again = train.run_training(tiny, tmp_path)
    assert again.step == 4
    # `kdjax eval` re-evaluates the reported checkpoint and draws overlays with the teacher.
    record = evaluate_run.run_eval(tiny.config, tmp_path)
    assert record["checkpoint"] == "best"
    assert record["miou"] == pytest.approx(result.eval["miou"], abs=1e-6)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["eval_mode"] == result.eval["eval_mode"]
    overlays = sorted((tmp_path / "eval").glob("overlay_*.png"))
    assert len(overlays) == tiny.config.eval.overlays
    assert "| **mIoU** |" in (tmp_path / "eval" / "metrics.md").read_text()


def _wait_for(path: Path, timeout: float = 300.0) -> None:
    start = time.monotonic()
    while not path.exists():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{path} did not appear")
        # Steps 3-4 of the tiny run take about a second: poll often enough to kill inside them.
        time.sleep(0.01)


@pytest.mark.end_to_end
def test_sigkill_and_rerun_ends_like_an_uninterrupted_run(tiny, uninterrupted, tmp_path):
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "kdjax", "train", f"--config={CONFIG}", f"--workdir={killed}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(killed / "checkpoints" / "2" / "_CHECKPOINT_METADATA")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / "4").exists(), (
        "the run finished before the kill reached it, so nothing was resumed")
    resumed = train.run_training(tiny, killed)
    _, reference = uninterrupted
    assert resumed.step == reference.step == 4
    assert resumed.metrics == pytest.approx(reference.metrics, rel=1e-5, abs=1e-6)
    assert resumed.eval["miou"] == pytest.approx(reference.eval["miou"], abs=1e-6)
    for a, b in zip(_leaves(jax.device_get(resumed.state)),
                    _leaves(jax.device_get(reference.state))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_non_finite_loss_stops_naming_the_terms_and_keeps_the_good_checkpoint(
        tiny, tmp_path, monkeypatch):
    real_iterator = pipeline.make_train_iterator

    def poisoned(*args, **kwargs):
        for index, batch in enumerate(real_iterator(*args, **kwargs)):
            if index == 2:  # the third step sees a corrupt (NaN) image
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(pipeline, "make_train_iterator", poisoned)
    with pytest.raises(train.NonFiniteLossError,
                       match=r"non-finite at step 3: .*kd/cwd=nan.*last good checkpoint"):
        train.run_training(tiny, tmp_path)
    # Step 2 was checkpointed; nothing after the bad step was.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    with TrainCheckpointer(tmp_path, async_save=False) as checkpointer:
        good, _ = checkpointer.restore(tiny.abstract_state)
    assert int(good.step) == 2 and int(good.bad_step) == -1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good.student.params))


def _student_only(**overrides):
    """The tiny config without distillation terms (no teacher): enough to check initialisation."""
    return _config(**{"distill.terms": ml_collections.ConfigDict(), **overrides})


def test_student_starts_from_a_model_dir(tiny, tmp_path):
    from kdjax.io.networks import NetworkError
    source = tiny.init_state()
    source = source.replace(student=source.student.replace(
        params=jax.tree.map(lambda x: x + 1.0, source.student.params)))
    model_dir = tiny.export(source, tmp_path / "model")
    config = _student_only(**{"student.checkpoint": str(model_dir)})
    exp = train.setup(config)
    state = exp.init_state()
    for a, b in zip(jax.tree.leaves(state.student.params["student"]),
                    jax.tree.leaves(source.student.params["student"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wrong = _student_only(**{"student.checkpoint": str(model_dir), "student.head_width": 16})
    with pytest.raises(NetworkError, match=r"head_width: saved 8, config 16"):
        train.setup(wrong).init_state()


def test_student_backbone_starts_from_an_imagenet_state_dict(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    from kdjax.convert.importer import _slots
    from kdjax.convert.layouts import backbone_layers
    from kdjax.io.networks import NetworkError
    from tests.models.random_state import random_module

    spec = tiny.student_spec
    backbone = random_module(lambda: ResNet(18, variant="cirkd", width_multiplier=0.125,
                                            rngs=nnx.Rngs(0)), seed=3)
    # The backbone written out in the PyTorch layout, with an ImageNet classifier that is ignored.
    state_dict = {key: torch.tensor(np.asarray(
        np.transpose(var.get_value(), (3, 2, 0, 1)) if kernel else var.get_value()))
        for key, (var, kernel) in _slots(backbone_layers(backbone, "cirkd")).items()}
    state_dict["fc.weight"] = torch.zeros(1000, 64)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state_dict, path)

    exp = train.setup(_student_only(**{"student.backbone_checkpoint": str(path)}))
    state = exp.init_state()
    loaded = jax.tree.leaves(nnx.state(backbone, (nnx.Param, nnx.BatchStat)))
    student = jax.tree.leaves((state.student.params["student"]["backbone"],
                               state.student.batch_stats["student"]["backbone"]))
    assert sorted(np.asarray(x).tobytes() for x in loaded) == sorted(
        np.asarray(x).tobytes() for x in student)
    # The head keeps its fresh initialisation.
    fresh = tiny.init_state()
    np.testing.assert_array_equal(state.student.params["student"]["head"]["classifier"]["kernel"],
                                  fresh.student.params["student"]["head"]["classifier"]["kernel"])
    assert spec["variant"] == "cirkd"
    wrong = _student_only(**{"student.backbone_checkpoint": str(path),
                             "student.backbone_source": "torchvision"})
    with pytest.raises(NetworkError, match="backbone_source is 'torchvision'"):
        train.setup(wrong).init_state()


def _wait_for_train_lines(proc: subprocess.Popen, path: Path, count: int,
                          timeout: float = 300.0) -> None:
    start = time.monotonic()
    while not (path.exists() and path.read_text().count('"split": "train"') >= count):
        assert proc.poll() is None, f"the run ended early:\n{proc.stderr.read()[-3000:]}"
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{path} did not reach {count} train lines")
        time.sleep(0.01)


def _train_process(workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "kdjax", "train", f"--config={CONFIG}", f"--workdir={workdir}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


# SIGTERM is what schedulers send; Ctrl-C's SIGINT takes the same path, and runs with -m slow.
@pytest.mark.end_to_end
@pytest.mark.parametrize("signum, after_step", [
    (signal.SIGTERM, 1), pytest.param(signal.SIGINT, 2, marks=pytest.mark.slow)])
def test_a_stop_signal_saves_the_next_step_and_a_rerun_ends_like_an_uninterrupted_run(
        tiny, uninterrupted, tmp_path, signum, after_step):
    stopped = tmp_path / "stopped"
    proc = _train_process(stopped)
    try:
        _wait_for_train_lines(proc, stopped / "metrics.jsonl", after_step)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    saved = sorted(int(s) for s in os.listdir(stopped / "checkpoints") if s.isdigit())
    assert saved and after_step <= saved[-1] < 4, (saved, stderr)
    assert f"stopped by {signal.Signals(signum).name} after step {saved[-1]}" in stderr
    assert "Resume with the same command" in stderr and f"--workdir={stopped}" in stderr
    resumed = train.run_training(tiny, stopped)
    _, reference = uninterrupted
    assert resumed.step == reference.step == 4
    assert resumed.metrics == pytest.approx(reference.metrics, rel=1e-5, abs=1e-6)
    for a, b in zip(_leaves(jax.device_get(resumed.state)),
                    _leaves(jax.device_get(reference.state))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _signal_twice(stopped: Path) -> tuple[int, str]:
    """SIGTERM once checkpoint 2 is written, then SIGINT as soon as the first is acknowledged;
    returns the exit status and the stderr."""
    proc = _train_process(stopped)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        _wait_for(stopped / "checkpoints" / "2" / "_CHECKPOINT_METADATA")
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        while not any("SIGTERM received" in line for line in lines):
            assert time.monotonic() - start < 60 and proc.poll() is None, "".join(lines)
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
        reader.join(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, "".join(lines)


@pytest.mark.end_to_end
def test_a_second_signal_exits_at_once_and_keeps_the_previous_checkpoint(tiny, tmp_path):
    # The tiny run's stop can finish before the second signal lands: then it exits as after one
    # signal, or, when the signal meets the process after its stop handler is gone, as after a
    # plain Ctrl-C. The scenario is tried again in a fresh workdir until the second signal meets
    # the stop.
    for attempt in range(4):
        stopped = tmp_path / f"stopped_{attempt}"
        returncode, stderr = _signal_twice(stopped)
        if "second signal" in stderr or returncode not in (128 + signal.SIGTERM,
                                                           128 + signal.SIGINT):
            break
    assert returncode == 128 + signal.SIGINT, stderr
    assert "second signal (SIGINT): exiting now" in stderr
    with TrainCheckpointer(stopped, async_save=False) as checkpointer:
        state, meta = checkpointer.restore(tiny.abstract_state)
    assert int(state.step) == meta["step"] >= 2


def signal_at_last_save(monkeypatch, signum, where: str = "") -> None:
    """Sends this process ``signum`` as a run whose checkpoints lie under a path containing
    ``where`` saves its last step, after which the loop asks whether to stop."""
    save = loop._PeriodicActions.save

    def save_then_signal(actions, step, state):
        save(actions, step, state)
        if step == actions.train.steps and where in str(actions.checkpoints):
            signal.raise_signal(signum)

    monkeypatch.setattr(loop._PeriodicActions, "save", save_then_signal)


def test_a_signal_at_the_last_step_finishes_the_run_and_is_reported(
        tiny, uninterrupted, tmp_path, monkeypatch):
    """Heard by the last step, a stop is not lost when the run's handlers go: the run ends as
    uninterrupted ones do, and its result carries the stop for what would follow it."""
    signal_at_last_save(monkeypatch, signal.SIGINT)
    result = train.run_training(tiny, tmp_path)
    assert result.step == 4 and result.eval["checkpoint_step"] == 4
    assert result.stop is not None and result.stop.signal_name == "SIGINT"
    assert "after step 4, the run's last" in str(result.stop)
    # The handlers are the previous ones again.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _, reference = uninterrupted
    assert reference.stop is None
    for a, b in zip(_leaves(jax.device_get(result.state)),
                    _leaves(jax.device_get(reference.state))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


class _ThreadStarted(Exception):
    """Stops a run where it would start its first thread."""


def test_tfds_is_imported_before_the_compile_thread_starts(tiny, tmp_path, monkeypatch):
    events = []

    def in_background(fn):
        events.append("thread")
        raise _ThreadStarted

    monkeypatch.setattr(loop, "import_dataset_readers", lambda name: events.append(f"import {name}"))
    monkeypatch.setattr(loop, "_in_background", in_background)
    with pytest.raises(_ThreadStarted):
        train.run_training(tiny, tmp_path)
    assert events == ["import synthetic", "thread"]
