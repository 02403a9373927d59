"""The distillation objective: term parsing, weight schedules, pairing errors and state threading."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kdjax import losses
from kdjax import distill
from kdjax.config.recipes import method_terms, term

K = 4


def _inputs(student, teacher, labels, step=0):
    return distill.TermInputs(student=student, teacher=teacher, labels=labels,
                              step=jnp.int32(step), key=jax.random.key(0),
                              classifier_kernel=jnp.ones((1, 1, 6, K)) * 0.1, num_classes=K,
                              ignore_label=255, total_steps=100)


def _tensors(seed, channels=6):
    rng = np.random.default_rng(seed)
    return {"logits": jnp.asarray(rng.normal(size=(2, 8, 8, K)), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(2, 8, 8, channels)), jnp.float32),
            "pre_classifier": jnp.asarray(rng.normal(size=(2, 8, 8, 6)), jnp.float32)}


def _labels(seed=0):
    labels = np.random.default_rng(seed).integers(0, K, size=(2, 16, 16))
    labels[:, :2] = 255
    return jnp.asarray(labels, jnp.int32)


def _parse(terms, steps=100):
    return distill.parse_terms(ml_collections.ConfigDict(terms), train_steps=steps)


def test_parse_rejects_unknown_loss_field_and_option():
    with pytest.raises(distill.ObjectiveError, match="term 'x': unknown loss 'cwd'"):
        _parse({"x": dict(loss="cwd")})
    with pytest.raises(distill.ObjectiveError, match=r"term 'x': unknown field\(s\) \['wieght'\]"):
        _parse({"x": dict(loss="pixel_kd", wieght=1.0)})
    with pytest.raises(distill.ObjectiveError, match=r"pixel_kd takes no option\(s\) \['tau'\]"):
        _parse({"x": term("pixel_kd", tau=2.0)})
    with pytest.raises(distill.ObjectiveError, match="schedule must be one of"):
        _parse({"x": dict(loss="pixel_kd", schedule="step")})
    with pytest.raises(distill.ObjectiveError, match="connector must be None or one of"):
        _parse({"x": dict(loss="fitnet", connector="mlp")})


@pytest.mark.parametrize("method", ["kd", "cwd", "cwd_logits", "nfd", "pfs_wpi", "fakd_kd",
                                    "fakd_cwd", "skd", "ifvd", "cirkd", "dist", "at", "fitnet"])
def test_every_method_recipe_parses(method):
    terms = _parse(method_terms(method))
    assert terms and all(t.loss in distill.ADAPTERS for t in terms)


def test_cirkdv2_terms_read_the_gcn_output_of_the_head():
    group = method_terms("cirkdv2")
    terms = _parse(group)
    features = {t.name: t.student for t in terms if t.teacher == "head"}
    assert features == dict.fromkeys(("cirkd_channel", "cirkd_memory", "cirkd_minibatch",
                                      "fitnet"), "head_gcn")
    assert distill.parse_student_modules(group, terms) == (
        distill.StudentModule(name="head_gcn", kind="gcn", input="head"),)


def test_the_student_modules_key_is_not_a_term():
    group = ml_collections.ConfigDict({
        "kd": term("pixel_kd"),
        distill.STUDENT_MODULES: ml_collections.ConfigDict(
            {"g": ml_collections.ConfigDict(dict(module="gcn", input="head"))})})
    assert [t.name for t in _parse(group)] == ["kd"]
    # Declared but read by no term: validated, not built.
    assert distill.parse_student_modules(group, _parse(group)) == ()


def test_weight_schedules_are_pure_functions_of_the_step():
    (lin,) = _parse({"a": dict(loss="pixel_kd", weight=2.0, schedule="linear",
                               weight_start=0.0, schedule_steps=10)})
    (cos,) = _parse({"a": dict(loss="pixel_kd", weight=2.0, schedule="cosine",
                               weight_start=1.0, schedule_steps=10)})
    (const,) = _parse({"a": dict(loss="pixel_kd", weight=2.0)})
    np.testing.assert_allclose([float(lin.weight_at(s)) for s in (0, 5, 10, 20)],
                               [0.0, 1.0, 2.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose([float(cos.weight_at(s)) for s in (0, 5, 10)],
                               [1.0, 1.5, 2.0], rtol=1e-6)
    assert float(const.weight_at(1000)) == 2.0
    # Under jit with a traced step as well.
    assert float(jax.jit(lin.weight_at)(jnp.int32(5))) == pytest.approx(1.0)


def test_total_is_the_weighted_sum_of_the_losses():
    terms = _parse({"kd": term("pixel_kd", weight=2.0, temperature=2.0),
                    "cwd": term("channel_wise_divergence", weight=3.0, tau=4.0),
                    "pfs": term("pixel_feature_similarity", weight=0.5, student="head",
                                teacher="head")})
    s, t = _tensors(0), _tensors(1)
    total, metrics, _ = distill.distillation_loss(terms, _inputs(s, t, _labels()), nnx.Dict({}),
                                                  nnx.Dict({}), {}, train=True)
    kd = losses.pixel_kd(s["logits"], t["logits"], temperature=2.0)
    cwd = losses.channel_wise_divergence(s["logits"], t["logits"], tau=4.0)
    pfs = losses.pixel_feature_similarity(s["head"], t["head"])
    np.testing.assert_allclose(float(total), 2 * kd + 3 * cwd + 0.5 * pfs, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["kd/cwd"]), cwd, rtol=1e-6)


def test_mask_ignore_passes_the_resized_valid_label_mask():
    terms = _parse({"kd": dict(term("pixel_kd").to_dict(), mask_ignore=True)})
    s, t, labels = _tensors(0), _tensors(1), _labels()
    total, _, _ = distill.distillation_loss(terms, _inputs(s, t, labels), nnx.Dict({}),
                                            nnx.Dict({}), {}, train=True)
    mask = labels[:, ::2, ::2] != 255
    np.testing.assert_allclose(float(total), losses.pixel_kd(s["logits"], t["logits"], mask=mask),
                               rtol=1e-6)
    assert not np.isclose(float(total), losses.pixel_kd(s["logits"], t["logits"]))


def test_unpairable_tensors_fail_naming_the_term_and_shapes():
    terms = _parse({"feat": term("fitnet", student="head", teacher="head")})
    s, t = _tensors(0, channels=6), _tensors(1, channels=10)
    with pytest.raises(distill.ObjectiveError,
                       match=r"term 'feat' \(fitnet.*\(2, 8, 8, 6\).*\(2, 8, 8, 10\).*connector"):
        distill.distillation_loss(terms, _inputs(s, t, _labels()), nnx.Dict({}), nnx.Dict({}),
                                  {}, train=True)
    missing = _parse({"x": term("fitnet", student="c5", teacher="head")})
    with pytest.raises(distill.ObjectiveError, match="the student has no tensor 'c5'; it has"):
        distill.distillation_loss(missing, _inputs(s, t, _labels()), nnx.Dict({}), nnx.Dict({}),
                                  {}, train=True)


def test_errors_other_than_pairing_keep_their_own_message():
    # NFD's backward is written out (reverse mode only): forward mode fails in JAX, and that
    # error is not dressed as a question of shapes.
    terms = _parse({"nfd": term("normalized_feature_distillation", student="head",
                                teacher="head")})
    s, t = _tensors(0), _tensors(1)

    def total(head):
        inputs = _inputs({**s, "head": head}, t, _labels())
        return distill.distillation_loss(terms, inputs, nnx.Dict({}), nnx.Dict({}), {},
                                         train=True)[0]

    with pytest.raises(TypeError, match="forward-mode") as raised:
        jax.jvp(total, (s["head"],), (jnp.ones_like(s["head"]),))
    assert not isinstance(raised.value, distill.ObjectiveError)
    assert np.isfinite(float(total(s["head"])))


def test_connectors_map_student_to_teacher_channels():
    terms = _parse({"feat": term("fitnet", student="head", teacher="head", connector="conv"),
                    "nfd": term("normalized_feature_distillation", student="head",
                                teacher="head", connector="conv_bn_relu")})
    s, t = _tensors(0, channels=6), _tensors(1, channels=10)
    connectors, discs = distill.build_term_modules(terms, s, t, rngs=nnx.Rngs(0))
    assert set(connectors.keys()) == {"feat", "nfd"} and not len(discs)
    total, metrics, _ = distill.distillation_loss(terms, _inputs(s, t, _labels()), connectors,
                                                  discs, {}, train=True)
    adapted = connectors["feat"](s["head"], False)
    np.testing.assert_allclose(float(metrics["kd/feat"]), losses.fitnet(adapted, t["head"]),
                               rtol=1e-6)


def test_stateful_terms_thread_their_state():
    terms = _parse({"fakd": term("fakd_kd", lam0=5.0),
                    "mem": term("cirkd_memory", student="head", teacher="head",
                                pixel_size=32, region_size=8, pixel_contrast=16,
                                region_contrast=8)})
    s, t, labels = _tensors(0), _tensors(1), _labels()
    states = distill.init_term_states(terms, s, t, num_classes=K, key=jax.random.key(0))
    _, metrics, new = distill.distillation_loss(terms, _inputs(s, t, labels, step=50),
                                                nnx.Dict({}), nnx.Dict({}), states, train=True)
    expected_cov = losses.update_class_covariance(states["fakd"], s["pre_classifier"], labels)
    np.testing.assert_allclose(new["fakd"].var, expected_cov.var, rtol=1e-6)
    assert float(metrics["kd/fakd/strength"]) == pytest.approx(5.0 * 50 / 100)
    assert not np.array_equal(new["mem"].pixel_queue, states["mem"].pixel_queue)
    assert {"kd/mem/pixel", "kd/mem/region"} <= set(metrics)


def test_cwd_can_divide_by_the_students_own_channels_before_its_connector():
    terms = _parse({"cwd": term("channel_wise_divergence", student="head", teacher="head",
                                connector="conv", c_norm="student", tau=4.0)})
    s, t = _tensors(0, channels=6), _tensors(1, channels=10)
    connectors, discs = distill.build_term_modules(terms, s, t, rngs=nnx.Rngs(0))
    _, metrics, _ = distill.distillation_loss(terms, _inputs(s, t, _labels()), connectors, discs,
                                              {}, train=True)
    adapted = connectors["cwd"](s["head"], False)
    expected = losses.channel_wise_divergence(adapted, t["head"], tau=4.0, c_norm=6)
    np.testing.assert_allclose(float(metrics["kd/cwd"]), expected, rtol=1e-6)
    assert not np.isclose(expected, losses.channel_wise_divergence(adapted, t["head"], tau=4.0))
