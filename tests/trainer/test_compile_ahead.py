"""Compiling a later run ahead: its programs, compiled before its teacher exists, are the ones the
run reads back from the persistent cache."""

import logging
import threading

import jax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from kdjax import training
from kdjax.config.loading import load_config
from kdjax.config.recipes import method_terms
from kdjax.data.metadata import dataset_info
from kdjax.io.model_dir import save_model
from kdjax.io.networks import build_model
from kdjax.training import compile_ahead
from kdjax.training.compile_ahead import CompileAhead
from tests.trainer.test_train import CONFIG


@pytest.fixture
def empty_cache(tmp_path):
    """JAX's persistent cache in an empty directory, keeping programs of any compile time."""
    saved = (jax.config.jax_compilation_cache_dir,
             jax.config.jax_persistent_cache_min_compile_time_secs)
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.clear_caches()
    yield
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def _cache_hits(caplog) -> set[str]:
    return {record.args[0] for record in caplog.records
            if record.getMessage().startswith("Persistent compilation cache hit")}


def test_a_run_reads_the_programs_compiled_before_its_teacher_was_trained(
        tmp_path, caplog, empty_cache):
    config = load_config(CONFIG)
    config.distill.terms = method_terms("kd")
    config.teacher.checkpoint = str(tmp_path / "teacher")     # not trained yet
    assert compile_ahead.useful()
    with CompileAhead() as ahead:
        ahead.submit("run", lambda: training.setup(config, materialize=False))
        ahead.claim("run")
    # The teacher is trained (here: made) afterwards, and the run starts.
    num_classes = dataset_info(config.data.name).num_classes
    save_model(config.teacher.checkpoint,
               build_model(config.teacher, num_classes=num_classes, rngs=nnx.Rngs(7)))
    jax.clear_caches()   # as compare does between runs: only the persistent cache carries over
    with caplog.at_level(logging.DEBUG, logger="jax._src.compiler"):
        exp = training.setup(config)
        state = exp.init_state()
        exp.step(state, {"image": jax.numpy.zeros((8, 32, 32, 3)),
                         "label": jax.numpy.zeros((8, 32, 32), jax.numpy.int32)})
    assert {"jit_init", "jit_train_step"} <= _cache_hits(caplog)


class _Program:
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
        return _Program(compiled, "a", ValueError("a bad config"))

    with CompileAhead() as ahead:
        assert ahead.active
        ahead.submit("a", first)
        ahead.submit("b", lambda: _Program(compiled, "b"))
        assert started.wait(10)
        ahead.claim("b")        # queued behind "a": dropped, the run compiles for itself
        release.set()
        ahead.claim("a")        # under way: waited for; its error is logged, not raised
        assert compiled == ["a"]
    assert compiled == ["a"]
    assert any("a bad config" in record.getMessage() for record in caplog.records)


def test_inactive_without_a_persistent_cache():
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert not compile_ahead.useful()
        with CompileAhead() as ahead:
            assert not ahead.active
            ahead.submit("a", lambda: pytest.fail("built without a cache to compile into"))
            ahead.claim("a")
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)
