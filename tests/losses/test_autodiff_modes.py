"""Which losses take forward-mode derivatives: the list of docs/losses.md. The losses with
written-out backward passes are reverse-mode only; every other loss takes both modes."""

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
            "labels": jnp.asarray(rng.integers(0, K, (2, 4, 4)), jnp.int32),
            "kernel": jnp.asarray(rng.normal(0, 0.1, (C, K)), jnp.float32),
            "variance": jnp.asarray(rng.uniform(0, 1, (K, C)), jnp.float32),
            "memory": L.init_cirkd_memory(jax.random.PRNGKey(0), K, C, pixel_size=64,
                                          region_size=16)}


def cirkd_memory(s, x):
    pixel, region = L.cirkd_memory(s, x["feat_t"], x["labels"], x["memory"], jax.random.PRNGKey(1),
                                   pixel_contrast=32, region_contrast=8)
    return pixel + region


# name -> (loss of the student input and fixed(), the student input's kind)
BOTH_MODES = {
    "cross_entropy": (lambda s, x: L.cross_entropy(s, x["labels"]), "logits"),
    "pixel_kd": (lambda s, x: L.pixel_kd(s, x["logits_t"]), "logits"),
    "channel_wise_divergence": (lambda s, x: L.channel_wise_divergence(s, x["logits_t"]), "logits"),
    "weighted_pixel_imitation": (lambda s, x: L.weighted_pixel_imitation(s, x["logits_t"]), "logits"),
    "fakd_kd": (lambda s, x: L.fakd_kd(s, x["logits_t"], x["kernel"], x["variance"], x["labels"],
                                       strength=0.5), "logits"),
    "attention_transfer": (lambda s, x: L.attention_transfer(s, x["feat_t"]), "features"),
    "fitnet": (lambda s, x: L.fitnet(s, x["feat_t"]), "features"),
    "ifvd": (lambda s, x: L.ifvd(s, x["feat_t"], x["labels"], num_classes=K), "features"),
    "pfs_gram": (lambda s, x: L.pixel_feature_similarity(s, x["feat_t"], form="gram"), "features"),
    "skd_gram": (lambda s, x: L.skd_pairwise(s, x["feat_t"], form="gram"), "features"),
}
REVERSE_ONLY = {
    "normalized_feature_distillation": (lambda s, x: L.normalized_feature_distillation(s, x["feat_t"]),
                                        "features"),
    "dist": (lambda s, x: L.dist(s, x["logits_t"]), "logits"),
    "fakd_cwd": (lambda s, x: L.fakd_cwd(s, x["logits_t"], x["kernel"], x["variance"], x["labels"],
                                         strength=0.5), "logits"),
    "cirkd_minibatch": (lambda s, x: L.cirkd_minibatch(s, x["feat_t"], group_size=2), "features"),
    "cirkd_memory": (cirkd_memory, "features"),
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
