"""The autodiff modes of what the loss kinds' examples do not reach (tests/distill/test_examples.py
runs every registered kind with its default options): the task loss, and both forms of the
pair-wise relational losses, whose written-out `form='pairs'` backward pass is reverse-mode only
(docs/losses.md)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses as L

K, C = 5, 6


@functools.cache
def fixed():
    """The inputs besides the student's, made once, when the first test needs them (not at
    collection)."""
    rng = np.random.default_rng(0)
    return {"logits_t": jnp.asarray(rng.normal(0, 2, (2, 4, 4, K)), jnp.float32),
            "feat_t": jnp.asarray(rng.normal(0, 1, (2, 4, 4, C)), jnp.float32),
            "labels": jnp.asarray(rng.integers(0, K, (2, 4, 4)), jnp.int32)}


# name -> (loss of the student input and fixed(), the student input's kind)
BOTH_MODES = {
    "cross_entropy": (lambda s, x: L.cross_entropy(s, x["labels"]), "logits"),
    "pfs_gram": (lambda s, x: L.pixel_feature_similarity(s, x["feat_t"], form="gram"), "features"),
    "skd_gram": (lambda s, x: L.skd_pairwise(s, x["feat_t"], form="gram"), "features"),
}
REVERSE_ONLY = {
    "pfs_pairs": (lambda s, x: L.pixel_feature_similarity(s, x["feat_t"], form="pairs"), "features"),
    "skd_pairs": (lambda s, x: L.skd_pairwise(s, x["feat_t"], form="pairs"), "features"),
}


def student(kind):
    teacher = fixed()["logits_t" if kind == "logits" else "feat_t"]
    return teacher + jnp.asarray(np.random.default_rng(1).normal(0, 0.5, teacher.shape), jnp.float32)


@pytest.mark.parametrize("name", sorted(BOTH_MODES))
def test_forward_mode_agrees_with_reverse_mode(name):
    loss_of, kind = BOTH_MODES[name]
    loss = functools.partial(loss_of, x=fixed())
    s = student(kind)
    direction = jnp.asarray(np.random.default_rng(2).normal(0, 1, s.shape), jnp.float32)
    _, tangent = jax.jvp(loss, (s,), (direction,))
    np.testing.assert_allclose(float(tangent), float(jnp.vdot(jax.grad(loss)(s), direction)),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", sorted(REVERSE_ONLY))
def test_written_out_backward_passes_are_reverse_mode_only(name):
    loss_of, kind = REVERSE_ONLY[name]
    loss = functools.partial(loss_of, x=fixed())
    s = student(kind)
    assert jnp.all(jnp.isfinite(jax.grad(loss)(s)))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(loss, (s,), (jnp.ones_like(s),))
