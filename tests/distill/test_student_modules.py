"""Student modules: trainable modules on a student tensor whose output is a new named student
tensor that several terms share (CIRKDv2's GCN on the head feature). Declared under the reserved
key ``student_modules`` of a terms group; built beside the connectors, trained with the student,
checkpointed with the state, and absent from evaluation and export."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kdjax import distill, losses, training
from kdjax.config.recipes import term
from kdjax.io.checkpoints import TrainCheckpointer
from kdjax.io.model_dir import load_model
from kdjax.models import CirkdGcn
from kdjax.training.optimizer import term_module_mask
from tests.training import tiny_config

ConfigDict = ml_collections.ConfigDict
K = 4


def _gcn(input_="head", **extra):
    return ConfigDict(dict(module="gcn", input=input_, **extra))


def _group(modules, **terms):
    return ConfigDict({**terms, "student_modules": ConfigDict(modules)})


def _tensors(seed, channels=6):
    rng = np.random.default_rng(seed)
    return {"logits": jnp.asarray(rng.normal(size=(2, 8, 8, K)), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(2, 8, 8, channels)), jnp.float32)}


def _inputs(student, teacher):
    labels = jnp.asarray(np.random.default_rng(9).integers(0, K, size=(2, 16, 16)), jnp.int32)
    return distill.TermInputs(student=student, teacher=teacher, labels=labels, step=jnp.int32(0),
                              key=jax.random.key(0), classifier_kernel=None, num_classes=K,
                              ignore_label=255, total_steps=10)


def _shapes(tensors):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tensors.items()}


# --------------------------------------------------------------------------------------------------
# Parsing.

def test_parse_keeps_the_modules_a_term_reads():
    group = _group({"head_gcn": _gcn(), "spare": _gcn()},
                   fitnet=term("fitnet", student="head_gcn", teacher="head", connector="conv"),
                   kd=term("pixel_kd"))
    terms = distill.parse_terms(group, train_steps=10)
    assert [t.name for t in terms] == ["fitnet", "kd"]      # the reserved key is not a term
    assert distill.parse_student_modules(group, terms) == (
        distill.StudentModule(name="head_gcn", kind="gcn", input="head"),)
    assert distill.parse_student_modules(ConfigDict(), ()) == ()


@pytest.mark.parametrize("modules, message", [
    ({"g": _gcn(), "h": ConfigDict(dict(module="mlp", input="head"))},
     r"student module 'h': unknown module 'mlp'; choose one of gcn"),
    ({"g": _gcn(width=4)}, r"student module 'g': unknown field\(s\) \['width'\]; a student module "
                           r"has module, input"),
    ({"g": ConfigDict(dict(module="gcn"))}, r"student module 'g': input must name a tensor"),
    ({"g": "gcn"}, r"student module 'g': declare it as ConfigDict\(module=..., input=...\)"),
])
def test_bad_declarations_fail_naming_the_module(modules, message):
    group = _group(modules, fitnet=term("fitnet", student="g", teacher="head"))
    with pytest.raises(distill.ObjectiveError, match=message):
        distill.parse_terms(group, train_steps=10)


def test_the_section_must_be_a_group():
    group = ConfigDict({"kd": term("pixel_kd"), "student_modules": "head_gcn"})
    with pytest.raises(distill.ObjectiveError, match="student_modules must map module names"):
        distill.parse_terms(group, train_steps=10)


# --------------------------------------------------------------------------------------------------
# Building and applying.

def test_inputs_must_be_student_tensors_and_names_new():
    s = _shapes(_tensors(0))
    missing = (distill.StudentModule("g", "gcn", "c9"),)
    with pytest.raises(distill.ObjectiveError,
                       match=r"'g' \(gcn on student 'c9'\): the student network has no tensor "
                             r"'c9'; its input must be one of head, logits"):
        distill.build_student_modules(missing, s, rngs=nnx.Rngs(0))
    clash = (distill.StudentModule("head", "gcn", "head"),)
    with pytest.raises(distill.ObjectiveError, match="has a tensor 'head' already"):
        distill.build_student_modules(clash, s, rngs=nnx.Rngs(0))


def test_terms_share_one_module_and_pair_on_its_output_shape():
    group = _group({"head_gcn": _gcn()},
                   feat=term("fitnet", student="head_gcn", teacher="head", connector="conv"),
                   pfs=term("pixel_feature_similarity", student="head_gcn", teacher="head"))
    terms = distill.parse_terms(group, train_steps=10)
    specs = distill.parse_student_modules(group, terms)
    s, t = _tensors(0, channels=6), _tensors(1, channels=10)
    built, shapes = distill.build_student_modules(specs, _shapes(s), rngs=nnx.Rngs(0))
    assert shapes["head_gcn"].shape == (2, 8, 8, 6) and isinstance(built["head_gcn"], CirkdGcn)
    connectors, _ = distill.build_term_modules(terms, shapes, _shapes(t), rngs=nnx.Rngs(1),
                                               student_modules=built)
    assert set(connectors.keys()) == {"feat", distill.STUDENT_MODULES}
    assert connectors["feat"].conv.kernel.shape == (1, 1, 6, 10)

    tensors = distill.apply_student_modules(specs, connectors, s, train=False)
    assert set(tensors) == {"logits", "head", "head_gcn"}
    shared = built["head_gcn"](s["head"], False)
    np.testing.assert_array_equal(tensors["head_gcn"], shared)
    _, metrics, _ = distill.distillation_loss(terms, _inputs(tensors, t), connectors, nnx.Dict({}),
                                              {}, train=False)
    np.testing.assert_allclose(float(metrics["kd/feat"]),
                               losses.fitnet(connectors["feat"](shared, False), t["head"]),
                               rtol=1e-6)
    np.testing.assert_allclose(float(metrics["kd/pfs"]),
                               losses.pixel_feature_similarity(shared, t["head"]), rtol=1e-6)

    # Both terms' gradients reach the one module.
    def total(module):
        derived = {**s, "head_gcn": module(s["head"], True)}
        value, _, _ = distill.distillation_loss(terms, _inputs(derived, t), connectors,
                                                nnx.Dict({}), {}, train=True)
        return value

    grads = nnx.grad(total)(built["head_gcn"])
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------------------
# In the experiment.

GROUP = _group({"head_gcn": _gcn()},
               fitnet=term("fitnet", student="head_gcn", teacher="head", connector="conv"),
               pfs=term("pixel_feature_similarity", student="head_gcn", teacher="head"),
               kd=term("pixel_kd"))


@pytest.fixture(scope="module")
def exp():
    # The module comes with the terms group passed to setup, as `kdjax compare` passes each
    # method's group; the config's own terms (tiny_config's) are not used.
    return training.setup(tiny_config.get_config(), terms_config=GROUP)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 19, size=(8, 32, 32)).astype(np.int32)}


def test_the_module_lives_beside_the_connectors_and_the_pairing_sees_it(exp):
    params = exp.abstract_state.student.params["term_modules"]
    gcn = params["student_modules"]["head_gcn"]
    head = exp.abstract_state.student.params["term_modules"]["fitnet"]["conv"]["kernel"].shape[2]
    assert gcn["node_q"]["kernel"].shape == (1, 1, head, head // 2)
    assert "out_bn" in exp.abstract_state.student.batch_stats["term_modules"]["student_modules"]["head_gcn"]
    assert {x.dtype for x in jax.tree.leaves(gcn)} == {jnp.dtype("float32")}
    # A term's mask still selects that term's module alone.
    selected = jax.tree.leaves(term_module_mask("fitnet")(exp.abstract_state.student.params))
    assert sum(selected) == len(jax.tree.leaves(params["fitnet"]))
    assert set(exp.metric_names) >= {"kd/fitnet", "kd/pfs", "kd/kd"}


def test_it_trains_with_the_student_is_saved_and_stays_out_of_eval_and_export(exp, tmp_path):
    state = exp.init_state()
    before = jax.device_get((state.student.params, state.student.batch_stats))
    for seed in range(2):
        state, metrics = exp.step(state, _batch(seed))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    after = jax.device_get((state.student.params, state.student.batch_stats))
    for tree_before, tree_after in zip(before, after):
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                             tree_before["term_modules"]["student_modules"],
                             tree_after["term_modules"]["student_modules"])
        assert all(jax.tree.leaves(moved)), "every GCN parameter and BN statistic moves"

    with TrainCheckpointer(tmp_path / "run", async_save=False) as checkpointer:
        checkpointer.save(2, state, meta={}, force=True)
        restored, _ = checkpointer.restore(exp.abstract_state)
    for a, b in zip(jax.tree.leaves(after[0]["term_modules"]["student_modules"]),
                    jax.tree.leaves(restored.student.params["term_modules"]["student_modules"])):
        np.testing.assert_array_equal(a, np.asarray(b))

    images = jnp.asarray(_batch(5)["image"])
    model = load_model(exp.export(state, tmp_path / "model"))
    assert not any("node_q" in str(path) for path, _ in
                   jax.tree_util.tree_leaves_with_path(nnx.state(model)))
    np.testing.assert_allclose(np.asarray(model(images, train=False).logits),
                               np.asarray(exp.eval_logits((state.student.params, state.student.batch_stats), images)),
                               rtol=1e-5, atol=1e-5)


def test_setup_fails_on_a_module_input_the_student_lacks():
    group = _group({"head_gcn": _gcn("c9")},
                   fitnet=term("fitnet", student="head_gcn", teacher="head", connector="conv"))
    with pytest.raises(distill.ObjectiveError, match="the student network has no tensor 'c9'"):
        training.setup(tiny_config.get_config(), terms_config=group, materialize=False)


def test_a_term_on_an_undeclared_module_fails_at_setup():
    group = ConfigDict({"fitnet": term("fitnet", student="head_gcn", teacher="head")})
    with pytest.raises(distill.ObjectiveError, match="the student has no tensor 'head_gcn'"):
        training.setup(tiny_config.get_config(), terms_config=group, materialize=False)


def test_bfloat16_precision_keeps_the_module_parameters_float32():
    config = tiny_config.get_config()
    config.train.precision = "bfloat16"
    exp = training.setup(config, terms_config=GROUP, materialize=False)
    leaves = jax.tree.leaves(exp.abstract_state.student.params["term_modules"]["student_modules"])
    assert leaves and {x.dtype for x in leaves} == {jnp.dtype("float32")}
