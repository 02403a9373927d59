"""Af-DCD, MGD, CIRKDv2 and BPKD in the trainer: their recipes train, their own modules see the raw
student tensor, their parts are reported, and the Af-DCD generator's gradient is clipped alone."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kdjax import distill, losses, training
from kdjax.config.recipes import method_terms, term
from kdjax.training.optimizer import term_module_mask, make_optimizer
from tests.training import tiny_config

K = 4


def _tiny_options(method: str, terms: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The recipe's terms with queue and pooling sizes that fit 32×32 crops (c4 is 4×4)."""
    if "af_dcd" in terms:
        terms.af_dcd.options.update(dict(pool=0, groups=8))
    if "cirkd_memory" in terms:
        terms.cirkd_memory.options.update(dict(pixel_size=32, region_size=8, pixel_contrast=16,
                                               region_contrast=8))
    if "cirkd_channel" in terms:
        terms.cirkd_channel.options.update(dict(size=64, channels_per_step=16,
                                                channel_contrast=32))
    return terms


@pytest.mark.parametrize("method, parts", [
    ("af_dcd", {"kd/af_dcd/reconstruction", "kd/af_dcd/contrast", "kd/kd"}),
    ("mgd", {"kd/mgd", "kd/cwd_logits"}),
    ("cirkdv2", {"kd/cirkd_channel/minibatch", "kd/cirkd_channel/memory",
                 "kd/cirkd_channel/mse", "kd/fitnet", "kd/cirkd_memory/pixel"}),
    ("bpkd", {"kd/bpkd/edge", "kd/bpkd/body"}),
])
def test_recipe_trains_and_reports_its_parts(method, parts):
    config = tiny_config.get_config()
    config.distill.terms = _tiny_options(method, method_terms(method))
    exp = training.setup(config)
    assert parts <= set(exp.metric_names)
    state = exp.init_state()
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 19, size=(8, 32, 32)).astype(np.int32)}
    before = jax.tree.map(np.asarray, state.student.params)
    for _ in range(2):
        state, metrics = exp.step(state, batch)
    assert set(metrics) == set(exp.metric_names)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, state.student.params)
    if "term_modules" in moved:
        assert all(jax.tree.leaves(moved["term_modules"])), "every term module trains"


def test_the_clip_mask_selects_the_generator_in_a_train_state():
    config = tiny_config.get_config()
    config.distill.terms = _tiny_options("af_dcd", method_terms("af_dcd"))
    exp = training.setup(config)
    selected = term_module_mask("af_dcd")(exp.abstract_state.student.params)
    flags = jax.tree.leaves(selected)
    generator = jax.tree.leaves(exp.abstract_state.student.params["term_modules"]["af_dcd"])
    assert sum(flags) == len(generator) > 0


def _tensors(seed, channels):
    rng = np.random.default_rng(seed)
    return {"logits": jnp.asarray(rng.normal(size=(2, 8, 8, K)), jnp.float32),
            "c4": jnp.asarray(rng.normal(size=(2, 8, 8, channels)), jnp.float32)}


def _inputs(student, teacher, step=0):
    labels = jnp.asarray(np.random.default_rng(3).integers(0, K, size=(2, 16, 16)), jnp.int32)
    return distill.TermInputs(student=student, teacher=teacher, labels=labels,
                              step=jnp.int32(step), key=jax.random.key(step), classifier_kernel=None,
                              num_classes=K, ignore_label=255, total_steps=10)


def _parse(terms):
    return distill.parse_terms(ml_collections.ConfigDict(terms), train_steps=10)


def test_the_generator_reads_the_raw_student_tensor_with_a_fresh_mask_each_step():
    terms = _parse({"g": term("dense_contrast", student="c4", teacher="c4", pool=0, groups=4,
                              patch=(4, 4), reconstruction_weight=1.0, contrast_weight=0.0)})
    s, t = _tensors(0, 6), _tensors(1, 8)
    modules, discs = distill.build_term_modules(terms, s, t, rngs=nnx.Rngs(0))
    values = []
    for step in (0, 1):
        key = jax.random.fold_in(jax.random.key(step), 0)
        keep = losses.random_keep_mask(key, (2, 8, 8), 0.75)
        expected = losses.feature_reconstruction(modules["g"](s["c4"], keep, True), t["c4"])
        _, metrics, _ = distill.distillation_loss(terms, _inputs(s, t, step), modules, discs, {},
                                                  train=True)
        np.testing.assert_allclose(float(metrics["kd/g/reconstruction"]), float(expected),
                                   rtol=1e-5)
        values.append(float(expected))
    assert values[0] != values[1]


def test_a_term_with_its_own_module_rejects_a_connector():
    terms = _parse({"g": term("masked_reconstruction", student="c4", teacher="c4",
                              connector="conv")})
    with pytest.raises(distill.ObjectiveError, match="set connector=None"):
        distill.build_term_modules(terms, _tensors(0, 6), _tensors(1, 8), rngs=nnx.Rngs(0))


def test_only_the_generator_gradient_is_clipped():
    terms = _parse({"g": term("masked_reconstruction", student="c4", teacher="c4",
                              grad_clip=1.0)})
    train = ml_collections.ConfigDict(dict(learning_rate=1.0, poly_power=0.9, steps=10,
                                           warmup_steps=0, optimizer="sgd", weight_decay=0.0,
                                           momentum=0.0, grad_clip=None))
    tx = make_optimizer(train, terms)
    params = {"student": {"w": jnp.zeros(3)}, "term_modules": {"g": {"w": jnp.zeros(4)}}}
    grads = {"student": {"w": jnp.full(3, 10.0)}, "term_modules": {"g": {"w": jnp.full(4, 10.0)}}}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["student"]["w"]), -10.0)
    assert np.linalg.norm(updates["term_modules"]["g"]["w"]) == pytest.approx(1.0, rel=1e-6)


def test_the_channel_terms_take_the_label_mask_at_the_pooled_size():
    terms = _parse({"ch": dict(term("cirkd_channel", student="c4", teacher="c4", size=16,
                                    channels_per_step=4, channel_contrast=8),
                               mask_ignore=True)})
    s, t = _tensors(0, 6), _tensors(1, 8)
    modules, discs = distill.build_term_modules(terms, s, t, rngs=nnx.Rngs(0))
    states = distill.init_term_states(terms, s, t, num_classes=K, key=jax.random.key(0))
    _, metrics, _ = distill.distillation_loss(terms, _inputs(s, t), modules, discs, states,
                                              train=True)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_a_segformer_student_pairs_with_a_cnn_teacher_only_where_the_sizes_agree():
    # The SegFormer's logits are at stride 4, the DeepLabV3 teacher's at stride 8: the term
    # check says so at setup, and the term's resize pairs them.
    config = tiny_config.get_config()
    config.student.name = "segformer_mit_b0"
    config.student.aux = False
    config.student.width_multiplier = 0.25
    config.student.head_width = 16
    config.distill.terms = method_terms("fakd_kd")
    with pytest.raises(distill.ObjectiveError, match="resize"):
        training.setup(config)
    config.distill.terms.fakd_kd.resize = "teacher_to_student"
    exp = training.setup(config)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 19, size=(8, 32, 32)).astype(np.int32)}
    state, metrics = exp.step(exp.init_state(), batch)
    assert np.isfinite(float(metrics["kd/fakd_kd"]))
