"""Which losses take forward-mode derivatives: the README's list (section 'Losses'). The losses with
written-out backward passes are reverse-mode only; every other loss takes both modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses as L

K, C = 5, 6
rng = np.random.default_rng(0)
LOGITS_T = jnp.asarray(rng.normal(0, 2, (2, 4, 4, K)), jnp.float32)
FEAT_T = jnp.asarray(rng.normal(0, 1, (2, 4, 4, C)), jnp.float32)
LABELS = jnp.asarray(rng.integers(0, K, (2, 4, 4)), jnp.int32)
KERNEL = jnp.asarray(rng.normal(0, 0.1, (C, K)), jnp.float32)
VARIANCE = jnp.asarray(rng.uniform(0, 1, (K, C)), jnp.float32)
MEMORY = L.init_cirkd_memory(jax.random.PRNGKey(0), K, C, pixel_size=64, region_size=16)


def cirkd_memory(s):
    pixel, region = L.cirkd_memory(s, FEAT_T, LABELS, MEMORY, jax.random.PRNGKey(1),
                                   pixel_contrast=32, region_contrast=8)
    return pixel + region


# name -> (loss of the student input, the student input's kind)
BOTH_MODES = {
    "cross_entropy": (lambda s: L.cross_entropy(s, LABELS), "logits"),
    "pixel_kd": (lambda s: L.pixel_kd(s, LOGITS_T), "logits"),
    "channel_wise_divergence": (lambda s: L.channel_wise_divergence(s, LOGITS_T), "logits"),
    "weighted_pixel_imitation": (lambda s: L.weighted_pixel_imitation(s, LOGITS_T), "logits"),
    "fakd_kd": (lambda s: L.fakd_kd(s, LOGITS_T, KERNEL, VARIANCE, LABELS, strength=0.5), "logits"),
    "attention_transfer": (lambda s: L.attention_transfer(s, FEAT_T), "features"),
    "fitnet": (lambda s: L.fitnet(s, FEAT_T), "features"),
    "ifvd": (lambda s: L.ifvd(s, FEAT_T, LABELS, num_classes=K), "features"),
    "pfs_gram": (lambda s: L.pixel_feature_similarity(s, FEAT_T, form="gram"), "features"),
    "skd_gram": (lambda s: L.skd_pairwise(s, FEAT_T, form="gram"), "features"),
}
REVERSE_ONLY = {
    "normalized_feature_distillation": (lambda s: L.normalized_feature_distillation(s, FEAT_T),
                                        "features"),
    "dist": (lambda s: L.dist(s, LOGITS_T), "logits"),
    "fakd_cwd": (lambda s: L.fakd_cwd(s, LOGITS_T, KERNEL, VARIANCE, LABELS, strength=0.5), "logits"),
    "cirkd_minibatch": (lambda s: L.cirkd_minibatch(s, FEAT_T, group_size=2), "features"),
    "cirkd_memory": (cirkd_memory, "features"),
    "pfs_pairs": (lambda s: L.pixel_feature_similarity(s, FEAT_T, form="pairs"), "features"),
    "skd_pairs": (lambda s: L.skd_pairwise(s, FEAT_T, form="pairs"), "features"),
}


def student(kind):
    teacher = LOGITS_T if kind == "logits" else FEAT_T
    return teacher + jnp.asarray(np.random.default_rng(1).normal(0, 0.5, teacher.shape), jnp.float32)


@pytest.mark.parametrize("name", sorted(BOTH_MODES))
def test_forward_mode_agrees_with_reverse_mode(name):
    loss, kind = BOTH_MODES[name]
    s = student(kind)
    direction = jnp.asarray(np.random.default_rng(2).normal(0, 1, s.shape), jnp.float32)
    _, tangent = jax.jvp(loss, (s,), (direction,))
    np.testing.assert_allclose(float(tangent), float(jnp.vdot(jax.grad(loss)(s), direction)),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", sorted(REVERSE_ONLY))
def test_written_out_backward_passes_are_reverse_mode_only(name):
    loss, kind = REVERSE_ONLY[name]
    s = student(kind)
    assert jnp.all(jnp.isfinite(jax.grad(loss)(s)))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(loss, (s,), (jnp.ones_like(s),))
