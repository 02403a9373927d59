"""Mixed precision as one policy, the device fed ahead of the step, and profiler traces."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses, training
from kdjax.config.loading import load_config
from kdjax.runtime import sharding
from tests.training.test_train import CONFIG


def _batch(exp, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((8, 32, 32, 3), np.float32),
            "label": rng.integers(0, exp.num_classes, (8, 32, 32), np.int32)}


def _experiment(precision):
    config = load_config(CONFIG)
    config.train.precision = precision
    return training.setup(config)


def test_a_bfloat16_step_is_close_to_the_float32_step_and_keeps_float32_state(monkeypatch):
    received = []
    for name in ("channel_wise_divergence", "normalized_feature_distillation"):
        original = getattr(losses, name)

        def spy(student, teacher, *args, _original=original, **kwargs):
            received.append((student.dtype, teacher.dtype))
            return _original(student, teacher, *args, **kwargs)
        monkeypatch.setattr(losses, name, spy)

    # setup traces the step (its pairing check), which hands every loss its inputs.
    experiments = {}
    for name in ("float32", "bfloat16"):
        received.clear()
        experiments[name] = _experiment(name)
        # Every loss is handed float32 (docs/methods.md §9.1), also from bfloat16 networks.
        assert received and all(d == (jnp.float32, jnp.float32) for d in received)
    f32, bf16 = experiments["float32"], experiments["bfloat16"]
    assert f32.teacher.dtype == jnp.float32 and bf16.teacher.dtype == jnp.bfloat16
    student_out = jax.eval_shape(lambda x: bf16.merge(bf16.init_state()).student(x, train=False),
                                 jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32))
    assert student_out.logits.dtype == jnp.bfloat16
    metrics = {}
    for name, exp in (("float32", f32), ("bfloat16", bf16)):
        state, step_metrics = exp.step(exp.init_state(), _batch(exp))
        metrics[name] = {k: float(v) for k, v in step_metrics.items()}
        assert {x.dtype for x in jax.tree.leaves((state.student.params, state.student.batch_stats, state.student.opt_state))
                if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    for key in ("ce", "loss", "kd/cwd", "kd/nfd"):
        assert metrics["bfloat16"][key] == pytest.approx(metrics["float32"][key], rel=3e-2), key


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="train.precision must be one of"):
        _experiment("float16")


def test_device_batches_keep_order_and_run_ahead():
    mesh = sharding.make_mesh()
    pulled = []

    def local():
        for k in range(4):
            pulled.append(k)
            yield {"x": np.full((8, 2), k, np.float32)}

    batches = sharding.device_batches(local(), mesh)
    first = next(batches)
    assert pulled == [0, 1]  # the second batch is on its way before the first is used
    assert isinstance(first["x"], jax.Array) and float(first["x"][0, 0]) == 0
    assert [float(b["x"][0, 0]) for b in batches] == [1, 2, 3]


@pytest.mark.end_to_end
def test_profile_steps_write_a_trace_and_the_log_reports_input_wait(tmp_path):
    config = load_config(CONFIG)
    config.train.profile_steps = (3, 4)  # one step, clear of the evaluation after step 2
    exp = training.setup(config)
    training.run_training(exp, tmp_path)
    traces = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "profile") for f in files]
    assert any(t.endswith(".xplane.pb") for t in traces), traces
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    waits = [x["input_wait"] for x in lines if x["split"] == "train" and "input_wait" in x]
    assert waits and all(0.0 <= w <= 1.0 for w in waits)
    with pytest.raises(ValueError, match="profile_steps"):
        config.train.profile_steps = (3, 3)
        training.run_training(training.setup(config), tmp_path / "again")
