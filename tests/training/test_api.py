"""The trainer's Python API as a JAX researcher uses it: one batch contract for step and evaluate,
a non-finite loss that raises unless told to freeze, and setup with NNX modules and an optax
transformation of the caller's own."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax import training
from kdjax.config.loading import load_config
from kdjax.config.recipes import method_terms
from kdjax.io.model_dir import WEIGHTS
from kdjax.io.networks import build_model
from kdjax.models import SegmentorOutput, build_segmentor
from kdjax.runtime import sharding

# The trainer tests' tiny run, named here: test_train imports the TensorFlow pipeline, and
# test-newest runs without TensorFlow.
CONFIG = str(Path(__file__).with_name("tiny_config.py"))


def _batch(num_classes, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((8, size, size, 3), np.float32),
            "label": rng.integers(0, num_classes, (8, size, size), np.int32)}


def _config(method=None):
    """The tiny run's config (CWD and NFD terms), or with ``method``'s terms."""
    config = load_config(CONFIG)
    if method is not None:
        config.distill.terms = method_terms(method)
    return config


@pytest.fixture(scope="module")
def exp():
    return training.setup(_config())


def test_evaluate_takes_numpy_rows_and_global_arrays_alike(exp):
    state = exp.init_state()
    batch = _batch(exp.num_classes)
    as_numpy = exp.evaluate(state, [batch])
    # Global arrays, one committed to a single device: taken as they are, resharded on the host.
    on_mesh = sharding.global_batch(batch, exp.mesh)
    on_one_device = {"image": jax.device_put(batch["image"], jax.devices()[3]),
                     "label": on_mesh["label"]}
    for batches in ([on_mesh], [on_one_device]):
        result = exp.evaluate(state, batches)
        assert result["miou"] == pytest.approx(as_numpy["miou"], abs=1e-6)
        assert result["per_class_iou"] == as_numpy["per_class_iou"]


def test_step_takes_numpy_rows_and_global_arrays_alike(exp):
    batch = _batch(exp.num_classes, seed=1)
    _, from_numpy = exp.step(exp.init_state(), batch)
    _, from_global = exp.step(exp.init_state(), {
        "image": jax.device_put(batch["image"], jax.devices()[5]),
        "label": sharding.global_batch({"label": batch["label"]}, exp.mesh)["label"]})
    for name in exp.metric_names:
        assert float(from_global[name]) == pytest.approx(float(from_numpy[name]), rel=1e-5), name


def _poisoned(exp):
    batch = _batch(exp.num_classes, seed=2)
    batch["image"][0, 0, 0, 0] = np.nan
    return batch


def test_a_non_finite_step_raises_naming_the_terms_and_the_step(exp):
    state, _ = exp.step(exp.init_state(), _batch(exp.num_classes))
    with pytest.raises(training.NonFiniteLossError,
                       match=r"non-finite at step 2: .*kd/cwd=nan.*not updated by that step"):
        exp.step(state, _poisoned(exp))


def test_freezing_keeps_the_last_finite_state_and_raises_when_checked(exp):
    state, _ = exp.step(exp.init_state(), _batch(exp.num_classes))
    kept = jax.device_get(state.student.params)
    state, metrics = exp.step(state, _poisoned(exp), nonfinite="freeze")
    state, _ = exp.step(state, _batch(exp.num_classes, seed=3), nonfinite="freeze")
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state.student.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(training.NonFiniteLossError, match="non-finite at step 2: "):
        exp.check_finite(state)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        exp.step(state, _batch(exp.num_classes), nonfinite="ignore")


def _segmentor(width, seed, num_classes=8):
    return build_segmentor("deeplabv3_resnet18", num_classes=num_classes, width_multiplier=width,
                           head_width=8, rngs=nnx.Rngs(seed))


def test_the_seeded_student_comes_from_one_program_for_every_method(exp):
    """init_state draws the student's weights in a program of their own, which every method of
    that student shares; the init of each method takes them as an argument, so its program
    draws nothing for the student (the terms' modules draw after it in the key stream, as
    before)."""
    alone = training.setup(_config("student_alone"))
    drawn = nnx.state(build_model(alone.config.student, num_classes=alone.num_classes,
                                  rngs=nnx.Rngs(params=alone.config.seed)), WEIGHTS)
    students = []
    for experiment in (exp, alone):
        state = experiment.init_state()
        students.append(jax.device_get(nnx.merge_state(state.student.params["student"],
                                                       state.student.batch_stats["student"])))
    jax.tree.map(np.testing.assert_array_equal, *students)
    # Drawn op by op, the normal transform may round differently in the last bit.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                 students[0], jax.device_get(drawn))
    assert "threefry" in alone._seeded_student.get().as_text()
    assert "threefry" not in alone._init.get().as_text()
    # One compiled program in the process for that student and seed, not one read back from the
    # persistent cache per experiment; another seed draws in a program of its own.
    assert alone._seeded_student is exp._seeded_student
    reseeded = _config("student_alone")
    reseeded.seed += 1
    assert training.setup(reseeded)._seeded_student is not exp._seeded_student


def test_setup_takes_a_student_a_teacher_and_an_optimizer():
    config = _config()
    student, teacher = _segmentor(0.125, seed=7), _segmentor(0.25, seed=8)
    # The identity optimizer leaves the parameters as they are: the given one is in use.
    exp = training.setup(config, student=student, teacher=teacher,
                         optimizer=optax.set_to_zero())
    state = exp.init_state()
    given = nnx.state(student, nnx.Param)
    for a, b in zip(jax.tree.leaves(given), jax.tree.leaves(state.student.params["student"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state, metrics = exp.step(state, _batch(exp.num_classes))
    assert int(state.step) == 1 and all(np.isfinite(float(v)) for v in metrics.values())
    for a, b in zip(jax.tree.leaves(given), jax.tree.leaves(state.student.params["student"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The teacher's logits are the given module's.
    images = jnp.asarray(_batch(exp.num_classes)["image"])
    np.testing.assert_allclose(
        np.asarray(exp.teacher.logits(exp.teacher.variables, images)),
        np.asarray(teacher(images, train=False).logits), rtol=1e-5, atol=1e-5)
    # The student is a kdjax segmentor: it exports as a model dir.
    assert exp.student_spec["name"] == "deeplabv3_resnet18"


class TinyNet(nnx.Module):
    """A student of the caller's own: two convolutions, logits at half resolution."""

    def __init__(self, num_classes, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.classifier = nnx.Conv(8, num_classes, (1, 1), rngs=rngs)

    def __call__(self, images, train):
        feature = nnx.relu(self.norm(self.stem(images), use_running_average=not train))
        return SegmentorOutput(logits=self.classifier(feature), aux_logits=None,
                               features={"head": feature})


def test_a_student_of_ones_own_trains_with_a_teacher_of_the_config():
    config = _config("cwd_logits")
    student = TinyNet(8, nnx.Rngs(0))
    # Losses pair equal sizes: the student's logits are at 1/2, the teacher's at 1/8.
    config.distill.terms.cwd_logits.resize = "teacher_to_student"
    exp = training.setup(config, student=student, optimizer=optax.adam(1e-3))
    state = exp.init_state()
    first = None
    for seed in range(3):
        state, metrics = exp.step(state, _batch(exp.num_classes, seed=seed))
        first = first or float(metrics["loss"])
    assert set(metrics) == set(exp.metric_names) >= {"ce", "kd/cwd_logits", "loss"}
    assert int(state.step) == 3
    # BatchNorm's running statistics are kept in the state.
    assert not np.allclose(np.asarray(state.student.batch_stats["student"]["norm"]["mean"][...]), 0.0)
    assert 0.0 <= exp.evaluate(state, [_batch(exp.num_classes)])["miou"] <= 100.0
    with pytest.raises(ValueError, match="records no spec"):
        exp.export(state, "unused")


class DropoutNet(TinyNet):
    """A student of the caller's own with dropout, keyed by the call's ``rngs``."""

    def __init__(self, num_classes, rngs, *, stream=False):
        super().__init__(num_classes, rngs)
        # stream=True: the NNX default of a stream held by the module, which a train state
        # cannot keep.
        self.dropout = nnx.Dropout(0.5, rngs=rngs if stream else None)

    def __call__(self, images, train, rngs=None):
        feature = nnx.relu(self.norm(self.stem(images), use_running_average=not train))
        feature = self.dropout(feature, deterministic=not train, rngs=rngs)
        return SegmentorOutput(logits=self.classifier(feature), aux_logits=None,
                               features={"head": feature})


def test_a_student_with_dropout_gets_fresh_keys_and_one_holding_a_stream_is_refused():
    config = _config("cwd_logits")
    config.distill.terms.cwd_logits.resize = "teacher_to_student"
    exp = training.setup(config, student=DropoutNet(8, nnx.Rngs(0)), optimizer=optax.sgd(0.0))
    state = exp.init_state()
    batch = _batch(exp.num_classes)
    # Same weights, same batch, a new key each step: the masks, and so the losses, differ.
    losses = []
    for _ in range(2):
        state, metrics = exp.step(state, batch)
        losses.append(float(metrics["kd/cwd_logits"]))
    assert losses[0] != losses[1] and all(np.isfinite(losses))
    with pytest.raises(ValueError, match=r"dropout\.rngs.*RngKey.*build nnx\.Dropout without rngs"):
        training.setup(config, student=DropoutNet(8, nnx.Rngs(0), stream=True))


def test_setup_refuses_what_cannot_work():
    config = _config()
    with pytest.raises(ValueError, match=re.escape("config.distill.terms is empty")):
        config.distill.terms = {}
        training.setup(config, teacher=_segmentor(0.25, seed=1))
    config = _config("fakd_kd")
    with pytest.raises(ValueError, match="student.head.classifier"):
        training.setup(config, student=TinyNet(8, nnx.Rngs(0)))
