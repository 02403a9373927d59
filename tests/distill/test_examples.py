"""Every registered loss kind on the example problem, through the objective a train step uses:
its gradient reaches the student, a step against it lowers the loss, and its autodiff modes are
those its adapter declares (docs/losses.md: the losses with written-out backward passes are reverse-mode
only)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.distill import ADAPTERS
from kdjax.distill.examples import example_problem

# The SKD discriminator's example needs 64×64 maps, and compiles for half a minute; the trainer
# tests run its adversarial step (tests/distill/test_objective.py).
SLOW = {"skd_adversarial"}
KINDS = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
         for name in ADAPTERS]


def _direction(student, seed=2):
    leaves, tree = jax.tree.flatten(student)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [jnp.asarray(rng.normal(0, 1, x.shape), x.dtype)
                                     for x in leaves])


@pytest.mark.parametrize("name", KINDS)
def test_every_loss_kind_trains_its_example_and_takes_its_declared_autodiff_modes(name):
    problem = example_problem(name)
    value_and_grad = jax.jit(jax.value_and_grad(problem.objective))
    value, grads = value_and_grad(problem.student)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # The student's own feature map receives a gradient from every loss kind.
    assert float(jnp.abs(grads["feature"]).max()) > 0

    # A small step against the gradient lowers the loss (the same compiled function).
    norm = float(optax.tree.norm(grads))
    stepped = jax.tree.map(lambda p, g: p - 1e-3 / norm * g, problem.student, grads)
    assert float(value_and_grad(stepped)[0]) < float(value)

    direction = _direction(problem.student)
    jvp = jax.jit(lambda student, tangent: jax.jvp(problem.objective, (student,), (tangent,)))
    if ADAPTERS[name].forward_mode:
        _, tangent = jvp(problem.student, direction)
        expected = sum(float(jnp.vdot(g, d)) for g, d in
                       zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        np.testing.assert_allclose(float(tangent), expected, rtol=2e-3, atol=1e-6)
    else:
        with pytest.raises(Exception, match="forward-mode"):
            jvp(problem.student, direction)
