"""Model checkpoints: a segmentor's weights plus what is needed to rebuild it (teachers, exports).

A model directory holds::

    DIR/model_spec.json   {"segmentor": build_segmentor's arguments, "kdjax_version": …}
    DIR/weights/          an Orbax checkpoint of {dotted path: array}: every nnx.Param and
                          nnx.BatchStat (BN running statistics), e.g. 'head.classifier.kernel'

``kdjax convert`` writes one from a PyTorch state dict; a config names the directory as its teacher.
The spec is written last, so a directory without it is an unfinished save; Orbax writes the weights
atomically.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

import kdjax
from kdjax.io.checkpoints import (CheckpointError, check_tree_metadata, describe_mismatch,
                                  error_summary, flat_shapes, pytree_handler, pytree_restore,
                                  reading_files)
from kdjax.io.paths import as_path
from kdjax.models.layers import Dtype
from kdjax.models.segmentor import SPEC_KEYS, Segmentor, build_segmentor

SPEC_FILE = "model_spec.json"
WEIGHTS_DIR = "weights"
# What a model directory stores: all of a segmentor's state (dropout keys are call arguments).
WEIGHTS = (nnx.Param, nnx.BatchStat)


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _flat_arrays(state: nnx.State) -> dict[str, Any]:
    return {_dotted(path): variable.get_value() for path, variable in nnx.to_flat_state(state)}


def _abstract_segmentor(spec: Mapping[str, Any], dtype: Dtype, param_dtype: Dtype) -> Segmentor:
    """The segmentor ``spec`` describes with abstract values (no memory, no initialisers run)."""
    return nnx.eval_shape(lambda: build_segmentor(
        **spec, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def save_model(directory: str | os.PathLike, model: Segmentor, *,
               spec: Mapping[str, Any] | None = None, overwrite: bool = False) -> None:
    """Writes ``model``'s weights and ``spec`` to ``directory``.

    Args:
      directory: a local path or a ``gs://`` URL; created; must not exist unless ``overwrite``.
      model: a segmentor.
      spec: ``build_segmentor``'s keyword arguments (``SPEC_KEYS``); None takes ``model.spec``,
        which ``build_segmentor`` records. It is checked against the model, so the directory
        always loads back.
      overwrite: replace an existing directory.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False.
      ValueError: ``spec`` has unknown keys or does not build the model's structure.
    """
    directory = as_path(directory)
    if spec is None and model.spec is None:
        raise ValueError("the model records no spec; build it with build_segmentor or pass spec.")
    spec = dict(model.spec if spec is None else spec)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"spec has unknown keys {unknown}; allowed: {', '.join(SPEC_KEYS)}.")
    weights = nnx.state(model, WEIGHTS)
    expected = _abstract_segmentor(spec, jnp.float32, jnp.float32)
    differences = describe_mismatch(flat_shapes(_flat_arrays(weights)),
                                    flat_shapes(_flat_arrays(nnx.state(expected, WEIGHTS))))
    if differences:
        raise ValueError("\n".join([f"spec {spec} does not build this model:", *differences]))
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} exists; choose another directory or overwrite it.")
        if jax.process_index() == 0:
            directory.rmtree()
    with ocp.AsyncCheckpointer(pytree_handler()) as checkpointer:
        checkpointer.save(directory / WEIGHTS_DIR, args=ocp.args.PyTreeSave(_flat_arrays(weights)))
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        document = {"segmentor": spec, "kdjax_version": kdjax.__version__}
        partial = directory / (SPEC_FILE + ".partial")
        partial.write_text(json.dumps(document, indent=2))
        partial.replace(directory / SPEC_FILE)


def read_spec(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``build_segmentor`` arguments stored in a model directory.

    Raises CheckpointError (naming the directory) if it is missing, unfinished or unreadable.
    """
    directory = as_path(directory)
    path = directory / SPEC_FILE
    if not directory.is_dir():
        raise CheckpointError(f"model directory not found: {directory}. Write one with "
                              "`kdjax convert` or point the config at an existing one.")
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a finished kdjax model directory: {SPEC_FILE} is missing (a save "
            "that was interrupted, or another kind of directory). Write it again, e.g. with "
            "`kdjax convert --overwrite`.")
    try:
        document = json.loads(path.read_text())
        spec = dict(document["segmentor"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read {path}: {error_summary(error)}. The file is "
                              "damaged: write the model directory again.") from error
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        written_by = document.get("kdjax_version")
        raise CheckpointError(f"{path} has keys this kdjax does not know: {unknown} (written by "
                              f"kdjax {written_by}; this is {kdjax.__version__}).")
    return spec


def load_model_state(directory: str | os.PathLike, abstract_state: nnx.State) -> nnx.State:
    """Reads a model directory's weights into ``abstract_state``'s layout.

    Args:
      directory: a model directory.
      abstract_state: ``nnx.State`` of the model's ``nnx.Param`` and ``nnx.BatchStat`` variables
        (e.g. from ``nnx.split(nnx.eval_shape(build), (nnx.Param, nnx.BatchStat), ...)``) whose
        values are ``jax.ShapeDtypeStruct``, with ``.sharding`` to place each array (e.g.
        replicated over a mesh for a teacher) and a dtype to cast it to.

    Returns:
      The same state with the stored arrays.

    Raises:
      CheckpointError: the directory is missing or damaged, or its keys/shapes differ from
        ``abstract_state``'s (all listed).
    """
    directory = as_path(directory)
    read_spec(directory)
    weights_dir = directory / WEIGHTS_DIR
    target = _flat_arrays(abstract_state)
    with ocp.AsyncCheckpointer(pytree_handler()) as checkpointer:
        damaged = functools.partial(_damaged, weights_dir)
        with reading_files(weights_dir, damaged):
            saved_tree = checkpointer.metadata(weights_dir).item_metadata
            check_tree_metadata(saved_tree, weights_dir)
        saved = flat_shapes(saved_tree)
        differences = describe_mismatch(saved, flat_shapes(target))
        if differences:
            raise CheckpointError("\n".join([
                f"the weights in {directory} do not fit the model; nothing was loaded.",
                *differences, "Check that the config names the right model directory and model."]))
        with reading_files(weights_dir, damaged):
            arrays = checkpointer.restore(weights_dir, args=pytree_restore(target))
    return nnx.from_flat_state([(path, variable.replace(arrays[_dotted(path)]))
                                for path, variable in nnx.to_flat_state(abstract_state)])


def _damaged(path: os.PathLike, error: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read the model weights in {path}: {error_summary(error)}. "
                           "The files may be truncated or corrupt: write the model directory "
                           "again (e.g. `kdjax convert --overwrite`).")


def load_model(directory: str | os.PathLike, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, seed: int | None = None) -> Segmentor:
    """Rebuilds the segmentor stored in ``directory`` with its weights, on the default device.

    Args:
      directory: a model directory (from ``save_model`` or ``kdjax convert``).
      dtype, param_dtype: compute and parameter dtypes (stored weights are cast).
      seed: deprecated and unused: models hold no rng state, their dropout keys are arguments
        of the call (``model(images, train=True, rngs=nnx.Rngs(dropout=key))``).

    Raises:
      CheckpointError: as ``read_spec`` and ``load_model_state``.
    """
    if seed is not None:
        warnings.warn("load_model's seed is unused and deprecated: dropout keys are passed at "
                      "call time (model(images, train=True, rngs=nnx.Rngs(dropout=key))).",
                      DeprecationWarning, stacklevel=2)
    model = _abstract_segmentor(read_spec(directory), dtype, param_dtype)
    graphdef, abstract_weights = nnx.split(model, WEIGHTS)
    return nnx.merge(graphdef, load_model_state(directory, abstract_weights))
