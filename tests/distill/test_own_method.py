"""Adding your own method from outside the package (docs/architecture.md, "Adding your own
method"): a loss function, its adapter and a method that uses it, registered through the public
API, then trained for two steps and shown by `kdjax loss-demo` like the built-in ones."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import training
from kdjax.commands import loss_demo
from kdjax.config import methods
from kdjax.config.loading import load_config
from kdjax.config.methods import Method, method_terms, register_method, term
from kdjax.distill import ADAPTERS, register
from kdjax.distill.adapters import Example, pair_adapter

TINY = str(Path(__file__).parents[1] / "training" / "tiny_config.py")


def smooth_l1_kd(student, teacher, *, beta=1.0, mask=None):
    """A loss of the user's own: the Huber distance between student and teacher logits, mean
    over the valid pixels. (N, H, W, K) each; ``mask`` (N, H, W)."""
    diff = jnp.abs(student.astype(jnp.float32) - teacher.astype(jnp.float32))
    per_pixel = jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).sum(-1)
    valid = jnp.ones(per_pixel.shape, bool) if mask is None else mask
    return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


@pytest.fixture
def own_method():
    adapter = register(pair_adapter("smooth_l1_kd", function=smooth_l1_kd, options=("beta",),
                                    example=Example()))
    method = register_method(Method(
        name="smooth_l1", source="this test",
        build=lambda dataset, aux_logits: {"smooth_l1": term("smooth_l1_kd", weight=0.5,
                                                             beta=2.0)}))
    yield adapter, method
    ADAPTERS.pop(adapter.name)
    methods.METHODS.pop(method.name)


def test_a_method_of_your_own_trains_two_steps(own_method):
    config = load_config(TINY)
    config.distill.terms = method_terms("smooth_l1")
    config.train.steps = 2
    exp = training.setup(config)
    state = exp.init_state()
    before = jax.tree.map(np.asarray, state.student.params)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, 32, 32, 3), np.float32),
             "label": rng.integers(0, exp.num_classes, (8, 32, 32), np.int32)}
    for _ in range(2):
        state, metrics = exp.step(state, batch)
    assert int(state.step) == 2
    value = float(metrics["kd/smooth_l1"])
    assert np.isfinite(value) and value > 0
    assert float(metrics["loss"]) == pytest.approx(float(metrics["ce"]) + 0.5 * value + float(
        metrics.get("aux_ce", 0.0)) * config.train.aux_weight, rel=1e-5)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                           state.student.params)
    assert any(jax.tree.leaves(changed))


def test_an_option_your_adapter_does_not_declare_is_refused(own_method):
    config = load_config(TINY)
    config.distill.terms = method_terms("smooth_l1")
    config.distill.terms.smooth_l1.options.temperature = 2.0
    with pytest.raises(ValueError, match=r"smooth_l1_kd takes no option\(s\) \['temperature'\]"):
        training.setup(config, materialize=False)


def test_the_loss_demo_shows_a_loss_kind_of_your_own(own_method, monkeypatch, capsys):
    monkeypatch.setattr(loss_demo, "ADAPTERS", {k: ADAPTERS[k] for k in ("pixel_kd",
                                                                          "smooth_l1_kd")})
    rows = loss_demo.run_loss_demo(steps=3)
    assert [row["loss"] for row in rows] == ["pixel_kd", "smooth_l1_kd"]
    assert rows[1]["after"] < rows[1]["before"]
    assert "smooth_l1_kd" in capsys.readouterr().out
