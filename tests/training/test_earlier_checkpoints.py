"""A checkpoint written in the train state's earlier layout (flat fields, batch statistics named
`rest`, the term modules `connectors`) is read into the current one; one that fits neither
layout still names what differs."""

import jax
import numpy as np
import pytest

from kdjax import training
from kdjax.io.checkpoints import CheckpointError, TrainCheckpointer
from kdjax.training.resume import train_checkpointer
from kdjax.training.state import earlier_path
from tests.training import tiny_config


def _dotted(path):
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def _earlier_layout(state):
    """``state`` as the earlier layout held it, as nested dicts (what Orbax's metadata shows)."""
    tree = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        *parents, name = earlier_path(_dotted(path)).split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return tree


def test_the_earlier_paths():
    assert earlier_path("student.params.term_modules.nfd.conv.kernel") == (
        "params.connectors.nfd.conv.kernel")
    assert earlier_path("student.batch_stats.student.backbone.bn1.mean") == (
        "rest.student.backbone.bn1.mean")
    assert earlier_path("student.opt_state.1.0.trace.term_modules.nfd.conv.kernel") == (
        "opt_state.1.0.trace.connectors.nfd.conv.kernel")
    assert earlier_path("discriminators.opt_state.0.mu.adv.w") == "disc_opt_state.0.mu.adv.w"
    assert earlier_path("term_states.fakd_kd.var") == "term_states.fakd_kd.var"
    assert earlier_path("step") == "step"


@pytest.fixture(scope="module")
def trained():
    exp = training.setup(tiny_config.get_config())
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, 32, 32, 3), np.float32),
             "label": rng.integers(0, exp.num_classes, (8, 32, 32), np.int32)}
    state, _ = exp.step(exp.init_state(), batch)
    return exp, jax.device_get(state)


def test_a_checkpoint_of_the_earlier_layout_resumes(trained, tmp_path):
    exp, state = trained
    earlier = _earlier_layout(state)
    assert set(earlier["params"]) == {"student", "connectors"}
    with TrainCheckpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, earlier, meta={"note": "earlier layout"}, force=True)
    with train_checkpointer(tmp_path, async_save=False) as checkpointer:
        restored, meta = checkpointer.restore(exp.abstract_state)
    assert meta["note"] == "earlier layout"
    assert jax.tree.structure(restored) == jax.tree.structure(exp.abstract_state)
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The restored state trains on.
    rng = np.random.default_rng(1)
    batch = {"image": rng.standard_normal((8, 32, 32, 3), np.float32),
             "label": rng.integers(0, exp.num_classes, (8, 32, 32), np.int32)}
    after, _ = exp.step(restored, batch)
    assert int(after.step) == int(state.step) + 1


def test_a_checkpoint_that_fits_neither_layout_names_what_differs(trained, tmp_path):
    exp, state = trained
    earlier = _earlier_layout(state)
    del earlier["params"]["connectors"]
    with TrainCheckpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, earlier, meta={}, force=True)
    with train_checkpointer(tmp_path, async_save=False) as checkpointer:
        with pytest.raises(CheckpointError, match="does not fit the state this run builds"):
            checkpointer.restore(exp.abstract_state)
