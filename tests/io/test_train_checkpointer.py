"""TrainCheckpointer: keep-last-k, best by metric, sharded restore, resume after SIGKILL, damaged and
mismatched checkpoints."""

import os
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import kdjax
from kdjax.io.checkpoints import CheckpointError, TrainCheckpointer
from tests.io.save_until_killed import abstract_train_state, train_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TMP_MARKER = "orbax-checkpoint-tmp"


def small_state(step):
    """A train state with nested dicts, an nnx.State, an optax state (NamedTuples), a typed PRNG
    key and a step."""
    rng = np.random.default_rng(step)
    params = {"w": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    connector = nnx.state(nnx.Conv(4, 8, (1, 1), rngs=nnx.Rngs(step)), nnx.Param)
    opt_state = optax.sgd(0.1, momentum=0.9).init(params)
    return {"params": params, "connector": connector, "opt_state": opt_state,
            "rng": jax.random.key(step), "step": jnp.int32(step)}


def abstract_of(state, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def raw(leaf):
    """An array's values; a typed PRNG key's key data."""
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(leaf)
    return leaf


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(raw(a), raw(b))


def save_steps(workdir, steps, **options):
    with TrainCheckpointer(workdir, **options) as checkpointer:
        for step in steps:
            checkpointer.save(step, small_state(step), meta={"metrics": {"loss": 1.0 / step}})


def test_keeps_the_last_k_and_restores_state_and_meta(tmp_path):
    save_steps(tmp_path, range(1, 6), keep_last=2)
    with TrainCheckpointer(tmp_path) as checkpointer:
        assert checkpointer.all_steps() == [4, 5] and checkpointer.latest_step() == 5
        state, meta = checkpointer.restore(abstract_of(small_state(0)))
        assert_trees_equal(state, small_state(5))
        assert meta == {"step": 5, "data_step": 5, "metrics": {"loss": 0.2},
                        "kdjax_version": kdjax.__version__}
        _, meta = checkpointer.restore(abstract_of(small_state(0)), step=4)
        assert meta["step"] == 4
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]


def test_interval_and_forced_saves(tmp_path):
    with TrainCheckpointer(tmp_path, save_interval_steps=3) as checkpointer:
        saved = [checkpointer.save(step, small_state(step), meta={}) for step in range(1, 8)]
        assert saved == [False, False, True, False, False, True, False]
        assert checkpointer.save(7, small_state(7), meta={}, force=True)
        # The final save may fall on a periodic one: not written twice, no error.
        assert not checkpointer.save(7, small_state(7), meta={}, force=True)
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [3, 6, 7]


def test_meta_must_be_json(tmp_path):
    with TrainCheckpointer(tmp_path) as checkpointer, pytest.raises(TypeError):
        checkpointer.save(1, small_state(1), meta={"metrics": np.float32(1.0)})


def test_best_is_kept_by_metric_across_restarts(tmp_path):
    with TrainCheckpointer(tmp_path) as checkpointer:
        written = [checkpointer.save_best(step, small_state(step), meta={}, metric_value=miou)
                   for step, miou in ((1, 0.3), (2, 0.5), (3, 0.4))]
        assert written == [True, True, False]
    with TrainCheckpointer(tmp_path) as checkpointer:
        assert checkpointer.best_step() == 2 and checkpointer.best_value == 0.5
        assert not checkpointer.save_best(4, small_state(4), meta={}, metric_value=0.45)
        assert checkpointer.save_best(5, small_state(5), meta={}, metric_value=0.6)
        checkpointer.wait_until_finished()
        state, meta = checkpointer.restore_best(abstract_of(small_state(0)))
        assert_trees_equal(state, small_state(5))
        assert meta["best"] == {"metric": "miou", "value": 0.6}
        assert checkpointer.latest_step() is None  # best saves are separate from the last k
    assert os.listdir(tmp_path / "best") == ["5"]


def test_restore_places_arrays_in_the_requested_shardings(tmp_path):
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    by_rows = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4), replicated), "b": jnp.ones(3)}
    with TrainCheckpointer(tmp_path) as checkpointer:
        checkpointer.save(1, state, meta={})
        checkpointer.wait_until_finished()
        abstract = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=by_rows),
                    "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16, sharding=replicated)}
        restored, _ = checkpointer.restore(abstract)
    assert restored["w"].sharding == by_rows and restored["b"].sharding == replicated
    assert restored["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["w"], state["w"])


def test_saving_replicated_arrays_on_cpu_compiles_nothing(tmp_path):
    # Orbax's replica-parallel save would compile one slice program per array shape and replica.
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {f"w{rows}": jax.device_put(jnp.ones((rows, 24)), replicated) for rows in (40, 56, 72)}
    compiles = []

    def listener(event, _duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with TrainCheckpointer(tmp_path) as checkpointer:
            checkpointer.save(1, state, meta={})
            checkpointer.wait_until_finished()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(jax.devices()) > 1 and compiles == []
    with TrainCheckpointer(tmp_path) as checkpointer:
        restored, _ = checkpointer.restore(abstract_of(state, replicated))
    assert_trees_equal(restored, state)


def test_changed_structure_names_keys_and_shapes(tmp_path):
    save_steps(tmp_path, [1, 2])
    abstract = abstract_of(small_state(0))
    abstract["params"]["w"] = jax.ShapeDtypeStruct((16, 8), jnp.float32)
    abstract["discriminator"] = {"kernel": jax.ShapeDtypeStruct((3, 3, 8, 1), jnp.float32)}
    del abstract["rng"]
    with TrainCheckpointer(tmp_path) as checkpointer, pytest.raises(CheckpointError) as caught:
        checkpointer.restore(abstract, fallback=True)  # a mismatch never falls back
    message = str(caught.value)
    assert f"{tmp_path / 'checkpoints' / '2'} does not fit" in message
    assert "discriminator.kernel: expected (3, 3, 8, 1)" in message
    assert "rng: (2,)" in message
    assert "params.w: checkpoint (16, 4), expected (16, 8)" in message
    assert "opt_state.0.trace.w" not in message
    assert "use a fresh --workdir, or revert the config" in message


def largest_file(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


def test_damaged_step_names_its_directory_and_falls_back_on_request(tmp_path):
    save_steps(tmp_path, [1, 2])
    step_dir = tmp_path / "checkpoints" / "2"
    data_file = largest_file(step_dir / "state")
    with open(data_file, "r+b") as file:
        file.truncate(os.path.getsize(data_file) // 2)
    abstract = abstract_of(small_state(0))
    with TrainCheckpointer(tmp_path) as checkpointer:
        with pytest.raises(CheckpointError) as caught:
            checkpointer.restore(abstract)
        message = str(caught.value)
        assert f"cannot read the checkpoint {step_dir}" in message
        assert f"delete the directory {step_dir} to resume from step 1, or pass step=1" in message
        with pytest.warns(UserWarning, match="Falling back to step 1"):
            state, meta = checkpointer.restore(abstract, fallback=True)
    assert meta["step"] == 1
    assert_trees_equal(state, small_state(1))


def test_missing_checkpoints_are_reported(tmp_path):
    with TrainCheckpointer(tmp_path) as checkpointer:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            checkpointer.restore(abstract_of(small_state(0)))
        with pytest.raises(CheckpointError, match="no best checkpoint"):
            checkpointer.restore_best(abstract_of(small_state(0)))
    save_steps(tmp_path, [1])
    with TrainCheckpointer(tmp_path) as checkpointer:
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 7 .*saved steps: \[1\]"):
            checkpointer.restore(abstract_of(small_state(0)), step=7)


def partial_saves(directory):
    return [name for name in os.listdir(directory) if TMP_MARKER in name]


def test_save_killed_midway_leaves_the_last_committed_step(tmp_path):
    workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    process = subprocess.Popen([sys.executable, "-m", "tests.io.save_until_killed",
                                str(workdir)], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        # Kill while a save is being written, once at least one has been committed.
        while not (checkpoints.is_dir() and any(n.isdigit() for n in os.listdir(checkpoints))
                   and partial_saves(checkpoints)):
            assert process.poll() is None, "the saving process died"
            assert time.monotonic() < deadline, "no save was caught in progress"
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    interrupted = partial_saves(checkpoints)
    assert interrupted, "the save finished before the kill; nothing was tested"
    interrupted_step = int(interrupted[0].split(".")[0])
    with TrainCheckpointer(workdir, keep_last=2) as checkpointer:
        step = checkpointer.latest_step()
        assert step == interrupted_step - 1
        state, meta = checkpointer.restore(abstract_train_state())
    assert meta["step"] == meta["data_step"] == step
    assert_trees_equal(state, train_state(step))


def test_missing_tree_metadata_is_damage_and_falls_back(tmp_path):
    save_steps(tmp_path, [1, 2])
    step_dir = tmp_path / "checkpoints" / "2"
    os.remove(step_dir / "state" / "_METADATA")  # Orbax then reads the state's tree as None
    abstract = abstract_of(small_state(0))
    with TrainCheckpointer(tmp_path) as checkpointer:
        with pytest.raises(CheckpointError, match=f"cannot read the checkpoint {step_dir}: "
                                                  "FileNotFoundError.*_METADATA"):
            checkpointer.restore(abstract)
        with pytest.warns(UserWarning, match="Falling back to step 1"):
            _, meta = checkpointer.restore(abstract, fallback=True)
    assert meta["step"] == 1


def test_an_error_not_from_the_files_is_raised_as_it_is_and_never_falls_back(tmp_path,
                                                                             monkeypatch):
    """A fault of the process (here the error a thread race once raised mid-restore) says nothing
    about the files: the step is not called damaged, and no older step is read in its place."""
    save_steps(tmp_path, [1, 2])
    restore = ocp.CheckpointManager.restore

    def fails_on_state(manager, step, args=None, **kwargs):
        if "state" in args.keys():
            raise TypeError("'LazyModule' object is not callable")
        return restore(manager, step, args=args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", fails_on_state)
    with TrainCheckpointer(tmp_path) as checkpointer, warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        with pytest.raises(TypeError, match="LazyModule") as caught:
            checkpointer.restore(abstract_of(small_state(0)), fallback=True)
    assert caught.value.__notes__ == [
        f"Raised while reading {tmp_path / 'checkpoints' / '2'}, whose files were not found "
        "damaged: keep them."]
