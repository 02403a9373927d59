"""Compiling later runs ahead: a run takes the experiment built and compiled before its teacher
was trained, and its steps are those of an experiment built afresh."""

import functools
import logging
import threading

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import training
from kdjax.config.loading import load_config
from kdjax.config.recipes import method_terms
from kdjax.data.metadata import dataset_info
from kdjax.io.model_dir import save_model
from kdjax.io.networks import build_model
from kdjax.training import compile_ahead
from kdjax.training.compile_ahead import CompileAhead
from tests.training.test_train import CONFIG


def _save_teacher(config, seed: int) -> None:
    num_classes = dataset_info(config.data.name).num_classes
    save_model(config.teacher.checkpoint,
               build_model(config.teacher, num_classes=num_classes, rngs=nnx.Rngs(seed)))


def _batch():
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 19, size=(8, 32, 32)).astype(np.int32)}


@pytest.mark.end_to_end
def test_a_run_takes_the_experiment_compiled_before_its_teacher_was_trained(tmp_path, caplog):
    config = load_config(CONFIG)
    config.distill.terms = method_terms("kd")
    config.teacher.checkpoint = str(tmp_path / "teacher")     # not trained yet
    with CompileAhead({"run": lambda: training.setup(config, materialize=False)}) as ahead:
        prepared = ahead.claim("run")
    assert prepared is not None
    _save_teacher(config, seed=7)    # the teacher is trained (here: made) afterwards
    with caplog.at_level(logging.DEBUG, logger="jax._src.dispatch"):
        exp = prepared.with_trained_teacher()
        state, metrics = exp.step(exp.init_state(), _batch())
        flops = exp.step_flops()
    assert exp.compile() is prepared.compile()
    compiled = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("Finished XLA compilation of jit(")]
    assert not [m for m in compiled if "train_step" in m or "jit(init)" in m], compiled
    # The FLOPs are counted from the trace the step was compiled from: no second trace.
    traced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Finished tracing")]
    assert not [m for m in traced if "train_step" in m], traced
    assert flops == prepared.step_flops() > 0
    # The same step as an experiment built with the trained teacher from the start.
    fresh = training.setup(config)
    fresh_state, fresh_metrics = fresh.step(fresh.init_state(), _batch())
    np.testing.assert_allclose(metrics["loss"], fresh_metrics["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state.student.params), jax.tree.leaves(fresh_state.student.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_teacher_of_other_shapes_is_refused(tmp_path):
    config = load_config(CONFIG)
    config.distill.terms = method_terms("kd")
    config.teacher.checkpoint = str(tmp_path / "teacher")
    config.teacher.aux = None     # the default: a ResNet has the aux head
    prepared = training.setup(config, materialize=False)
    # A teacher trained without it also fits the config, which leaves the aux head open.
    other = load_config(CONFIG)
    other.teacher.checkpoint = config.teacher.checkpoint
    other.teacher.aux = False
    _save_teacher(other, seed=0)
    with pytest.raises(ValueError, match="not the network this experiment was built for"):
        prepared.with_trained_teacher()
    with pytest.raises(ValueError, match="not the network this experiment was built for"):
        prepared.with_trained_teacher(training.trained_teacher(config, prepared.mesh))


def test_runs_of_one_teacher_can_share_it_once_read(tmp_path):
    config = load_config(CONFIG)
    config.distill.terms = method_terms("kd")
    config.teacher.checkpoint = str(tmp_path / "teacher")
    prepared = training.setup(config, materialize=False)
    _save_teacher(config, seed=3)
    teacher = training.trained_teacher(config, prepared.mesh)
    first, second = (prepared.with_trained_teacher(teacher) for _ in range(2))
    assert first.teacher is teacher and second.teacher is teacher
    read = prepared.with_trained_teacher()     # read from the checkpoint: the same weights
    for a, b in zip(jax.tree.leaves(read.teacher.variables), jax.tree.leaves(teacher.variables)):
        np.testing.assert_array_equal(a, b)


class _Experiment:
    def __init__(self, log, name, error=None):
        self.log, self.name, self.error = log, name, error

    def compile(self):
        self.log.append(self.name)
        if self.error:
            raise self.error


def test_claiming_drops_a_run_not_started_and_waits_for_one_under_way(caplog):
    caplog.set_level(logging.INFO, logger=compile_ahead.__name__)
    compiled, started, release = [], threading.Event(), threading.Event()

    def first():
        started.set()
        release.wait(10)
        return _Experiment(compiled, "a", ValueError("a bad config"))

    b = _Experiment(compiled, "b")
    with CompileAhead({"a": first, "b": lambda: b}) as ahead:
        assert ahead.active
        assert started.wait(10)
        assert ahead.claim("b") is None   # queued behind "a": dropped, the run builds for itself
        release.set()
        assert ahead.claim("a") is None   # under way: waited for; its error is logged, not raised
        assert ahead.claim("c") is None   # never planned
        assert compiled == ["a"]
    assert compiled == ["a"]
    assert any("a bad config" in record.getMessage() for record in caplog.records)


def _signalling_builds(names: str, compiled: list) -> tuple[dict, dict]:
    """Builds of fake experiments named ``names`` that log their compiles to ``compiled``, and
    the events they set when they start."""
    started = {name: threading.Event() for name in names}

    def build(name):
        started[name].set()
        return _Experiment(compiled, name)

    return {name: functools.partial(build, name) for name in names}, started


def test_builds_at_most_lookahead_runs_beyond_the_last_claimed():
    compiled = []
    builds, started = _signalling_builds("abcde", compiled)
    with CompileAhead(builds, lookahead=2) as ahead:
        assert set(ahead._jobs) == {"a", "b"}
        for name in "abcde":
            assert started[name].wait(10)   # claimed once under way: waited for, not dropped
            assert ahead.claim(name).name == name
            # "a" taken: "b" and "c" are planned, "d" and "e" wait for later claims.
            assert set(ahead._jobs) == set("abcde"[1 + "abcde".index(name):][:2])
    assert compiled == list("abcde")


def test_what_follows_the_runs_is_built_once_every_run_has_started():
    compiled = []
    builds, started = _signalling_builds("abc", compiled)
    with CompileAhead(builds, lookahead=2, then=lambda: compiled.append("then")) as ahead:
        for name in "abc":
            assert started[name].wait(10)
            assert ahead.claim(name).name == name
        assert "then" not in compiled[:3]
    assert compiled == ["a", "b", "c", "then"]


def test_inactive_with_several_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not compile_ahead.useful()
    with CompileAhead({"a": lambda: pytest.fail("built with several processes")}) as ahead:
        assert not ahead.active
        assert ahead.claim("a") is None
