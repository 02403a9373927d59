"""Model directories: save_model / load_model round trip, sharded teacher loading, damaged and
mismatched directories."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kdjax.io.checkpoints import CheckpointError
from kdjax.io.model_dir import (SPEC_FILE, WEIGHTS, WEIGHTS_DIR, load_model, load_model_state,
                               read_spec, save_model)
from kdjax.models.segmentor import build_segmentor
from tests.models.random_state import random_module

SPEC = {"name": "pspnet_mobilenetv2", "num_classes": 3, "variant": "cirkd", "output_stride": 8,
        "head_width": 8, "aux": False, "width_multiplier": 1.0}


def weights_of(model):
    flat = nnx.to_flat_state(nnx.state(model, WEIGHTS))
    return {path: np.asarray(variable.get_value()) for path, variable in flat}


@pytest.fixture(scope="module")
def model():
    return random_module(lambda: build_segmentor(**SPEC, rngs=nnx.Rngs(0)), seed=3)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("store") / "teacher"
    save_model(directory, model, spec=SPEC)
    return directory


@pytest.fixture
def copy_dir(model_dir, tmp_path):
    """A private copy of the saved model directory, to damage."""
    return shutil.copytree(model_dir, tmp_path / "copy")


def test_spec_is_read_from_the_model():
    spec = dict(name="deeplabv3plus_resnet18", num_classes=5, variant="torchvision",
                output_stride=16, head_width=16, aux=True, width_multiplier=0.5)
    model = nnx.eval_shape(lambda: build_segmentor(**spec, rngs=nnx.Rngs(0)))
    assert model.spec == spec


def test_round_trip_keeps_every_weight_and_the_spec(model, model_dir):
    assert sorted(os.listdir(model_dir)) == [SPEC_FILE, WEIGHTS_DIR]
    assert read_spec(model_dir) == SPEC
    loaded = load_model(model_dir)
    expected, actual = weights_of(model), weights_of(loaded)
    assert sorted(actual) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(actual[path], value, err_msg=str(path))
    # A model dir holds all of a model's state: dropout keys are arguments of a call.
    assert not jax.tree.leaves(nnx.state(loaded, nnx.RngState))


def test_the_seed_argument_is_deprecated(model_dir):
    with pytest.warns(DeprecationWarning, match="rngs=nnx.Rngs"):
        load_model(model_dir, seed=1)


def test_parameter_dtype_is_cast_on_load(model_dir):
    loaded = load_model(model_dir, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(loaded, WEIGHTS))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_teacher_state_is_restored_into_a_replicated_sharding(model, model_dir):
    replicated = NamedSharding(jax.make_mesh((len(jax.devices()),), ("data",)), PartitionSpec())
    abstract = nnx.eval_shape(lambda: build_segmentor(**SPEC, rngs=nnx.Rngs(0)))
    abstract_weights = nnx.state(abstract, WEIGHTS)
    abstract_weights = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_weights)
    state = load_model_state(model_dir, abstract_weights)
    assert {leaf.sharding for leaf in jax.tree.leaves(state)} == {replicated}
    kernel = state["head"]["classifier"]["kernel"].get_value()
    np.testing.assert_array_equal(kernel, model.head.classifier.kernel.get_value())


def test_a_spec_that_does_not_build_the_model_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="head.classifier.kernel: checkpoint"):
        save_model(tmp_path / "m", model, spec={**SPEC, "num_classes": 4})
    with pytest.raises(ValueError, match="unknown keys"):
        save_model(tmp_path / "m", model, spec={**SPEC, "dropout": 0.1})
    assert not os.path.exists(tmp_path / "m")


def test_existing_directory_needs_overwrite(model, model_dir):
    with pytest.raises(FileExistsError, match="overwrite"):
        save_model(model_dir, model, spec=SPEC)


def test_overwrite_replaces_the_directory(model, copy_dir):
    other = random_module(lambda: build_segmentor(**SPEC, rngs=nnx.Rngs(0)), seed=4)
    save_model(copy_dir, other, spec=SPEC, overwrite=True)
    kernel = load_model(copy_dir).head.classifier.kernel.get_value()
    np.testing.assert_array_equal(kernel, other.head.classifier.kernel.get_value())


def test_missing_and_unfinished_directories(copy_dir, tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found: .*nowhere"):
        load_model(tmp_path / "nowhere")
    os.remove(copy_dir / SPEC_FILE)
    with pytest.raises(CheckpointError, match=f"not a finished kdjax model directory: {SPEC_FILE}"):
        load_model(copy_dir)


# Orbax abandons the other arrays' pending reads when one fails; their coroutines are never awaited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_spec_and_weights_name_the_file(copy_dir):
    spec_path = copy_dir / SPEC_FILE
    text = spec_path.read_text()
    spec_path.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read {spec_path}.*damaged"):
        load_model(copy_dir)
    spec_path.write_text(text)
    weights = copy_dir / WEIGHTS_DIR
    files = [os.path.join(root, name) for root, _, names in os.walk(weights) for name in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as file:
        file.truncate(os.path.getsize(largest) // 2)
    with pytest.raises(CheckpointError, match=f"cannot read the model weights in {weights}.*corrupt"):
        load_model(copy_dir)


def test_spec_that_disagrees_with_the_weights_names_the_keys(copy_dir):
    spec_path = copy_dir / SPEC_FILE
    document = json.loads(spec_path.read_text())
    document["segmentor"]["num_classes"] = 5
    spec_path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError) as caught:
        load_model(copy_dir)
    message = str(caught.value)
    assert "nothing was loaded" in message
    assert "head.classifier.kernel: checkpoint (1, 1, 8, 3), expected (1, 1, 8, 5)" in message
    assert "head.classifier.bias: checkpoint (3,), expected (5,)" in message


def test_missing_tree_metadata_is_damage_not_a_mismatch(copy_dir):
    weights = copy_dir / WEIGHTS_DIR
    os.remove(weights / "_METADATA")  # Orbax then reads the weights' tree as None
    with pytest.raises(CheckpointError, match=f"cannot read the model weights in {weights}: "
                                              "FileNotFoundError.*_METADATA.*corrupt"):
        load_model(copy_dir)


def test_an_error_not_from_the_files_is_raised_as_it_is(copy_dir, monkeypatch):
    def fails(*args, **kwargs):
        raise TypeError("'LazyModule' object is not callable")

    monkeypatch.setattr(ocp.AsyncCheckpointer, "restore", fails)
    with pytest.raises(TypeError, match="LazyModule") as caught:
        load_model(copy_dir)
    assert caught.value.__notes__ == [f"Raised while reading {copy_dir / WEIGHTS_DIR}, whose files "
                                      "were not found damaged: keep them."]
