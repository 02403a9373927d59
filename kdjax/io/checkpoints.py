"""Training checkpoints with Orbax: periodic async saves, the last k kept, the best by val mIoU, resume.

Layout under the workdir::

    WORKDIR/checkpoints/<step>/{state,meta}   the last ``keep_last`` saves
    WORKDIR/best/<step>/{state,meta}          the single best save by ``best_metric``

``state`` is the train-state pytree (student, term modules, discriminator, optimizer, step, rng,
distillation state; never the teacher). ``meta`` is JSON: the caller's fields (metrics, the config as
a JSON string, …) plus ``step``, ``data_step`` (the input pipeline's position; its batches are a
pure function of the step, so it equals ``step`` unless the caller says otherwise) and
``kdjax_version``.

Atomicity: Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when every item is
complete, so a save killed midway (even by SIGKILL) leaves only a temporary directory, which is
invisible to ``latest_step`` and deleted when the workdir is opened again; older steps are removed
only after a newer one is committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import kdjax
from kdjax.io.paths import as_path
from kdjax.runtime.platform import devices_in_host_memory

Shape = tuple[int, ...]
# Entries listed per section of a mismatch message; a changed backbone can differ in hundreds.
MAX_LISTED = 12
# What reading a step raises when its files are missing, truncated or corrupt: tensorstore's errors
# and the JSON decoder's are ValueErrors, a missing file an OSError, a missing item a KeyError.
# Anything else (a TypeError, an event loop's RuntimeError) comes from the process, not the
# files, which may well be sound: it is raised as it is, never with advice to delete them.
DAMAGED_FILE_ERRORS = (OSError, ValueError, KeyError)


class CheckpointError(ValueError):
    """A kdjax checkpoint that is missing, unreadable or does not fit what the caller expects."""


def error_summary(error: Exception, limit: int = 240) -> str:
    """``Type: first line`` of an exception, shortened: tensorstore errors run to a page."""
    lines = str(error).strip().splitlines() or [""]
    text = lines[0] if len(lines[0]) <= limit else lines[0][:limit] + " …"
    return f"{type(error).__name__}: {text}"


def pytree_handler() -> ocp.PyTreeCheckpointHandler:
    """The Orbax handler of every pytree kdjax writes (train states, model weights).

    Orbax's standard handlers, except that on CPU a replicated array is written from one replica.
    Orbax's replica-parallel saving splits a replicated array into one slice per replica, so that
    the accelerators' device-to-host copies share the work. On CPU every replica already lives in
    host memory, and each slice is a compiled program: the tests' data-parallel runs over eight
    simulated devices compiled 264 of them per three short trainings. Other platforms keep Orbax's
    choice. The layout on disk is Orbax's either way: each restores what the other wrote.
    """
    handlers = ocp.type_handlers
    scalar = handlers.ScalarHandler()
    array = handlers.get_type_handler(jax.Array)  # Orbax's registered default
    if devices_in_host_memory():
        # The same handler without replica-parallel saving, keeping the per-array metadata store
        # of the default (a typed PRNG key's implementation is written there), which Orbax
        # exposes under no public name.
        array = handlers.ArrayHandler(use_replica_parallel=False,
                                      array_metadata_store=array._array_metadata_store)
    registry = handlers.create_type_handler_registry(
        (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
        (np.ndarray, handlers.NumpyHandler()), (jax.Array, array), (str, handlers.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def pytree_restore(abstract: Any) -> ocp.args.PyTreeRestore:
    """Restore arguments that read a saved pytree into ``abstract``'s structure, shapes, dtypes
    and shardings (leaves ``jax.ShapeDtypeStruct`` with ``.sharding``)."""
    return ocp.args.PyTreeRestore(abstract,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _stored_shape(leaf: Any) -> Shape:
    """The shape an array leaf has on disk: typed PRNG keys are stored as their raw key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(getattr(leaf, "shape", ()))


def _dotted(path: Any) -> str:
    return ".".join(_key_name(k) for k in path)


def flat_shapes(tree: Any) -> dict[str, Shape]:
    """{dotted path: shape} of a pytree's leaves, e.g. ``'opt.0.trace.w': (3,)``.

    Paths ignore the node types (a NamedTuple field and a dict entry of the same name match), because
    Orbax's metadata tree holds dicts where the saved state held other containers.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_dotted(path): _stored_shape(leaf) for path, leaf in leaves}


def _listing(title: str, entries: dict[str, str]) -> list[str]:
    if not entries:
        return []
    lines = [f"{len(entries)} {title}{'s' if len(entries) > 1 else ''}:"]
    lines += [f"  {key}: {text}" for key, text in list(entries.items())[:MAX_LISTED]]
    if len(entries) > MAX_LISTED:
        lines.append(f"  … and {len(entries) - MAX_LISTED} more")
    return lines


def describe_mismatch(saved: Mapping[str, Shape], expected: Mapping[str, Shape]) -> list[str]:
    """Lines naming the keys and shapes that differ between a checkpoint and the expected tree;
    empty when they match."""
    missing = {k: f"expected {shape}" for k, shape in expected.items() if k not in saved}
    unexpected = {k: f"{shape}" for k, shape in saved.items() if k not in expected}
    mismatched = {k: f"checkpoint {saved[k]}, expected {shape}"
                  for k, shape in expected.items() if k in saved and saved[k] != shape}
    return (_listing("key missing from the checkpoint", missing)
            + _listing("unexpected key in the checkpoint", unexpected)
            + _listing("mis-shaped key", mismatched))


@contextlib.contextmanager
def reading_files(path: os.PathLike, damaged: Callable[[Exception], Exception]) -> Iterator[None]:
    """A read of the checkpoint files under ``path``: an error that says they are damaged
    (:data:`DAMAGED_FILE_ERRORS`) is raised as ``damaged(error)``, whose message says what to
    delete or write again; any other error is raised as it is, with a note that the files were not
    found damaged."""
    try:
        yield
    except DAMAGED_FILE_ERRORS as error:
        raise damaged(error) from error
    except Exception as error:
        error.add_note(f"Raised while reading {path}, whose files were not found damaged: keep "
                       "them.")
        raise


def check_tree_metadata(tree: Any, directory: os.PathLike) -> None:
    """Raises FileNotFoundError if ``tree``, Orbax's metadata of the pytree in ``directory``, is
    None: how Orbax reads a pytree whose metadata file is gone (not as an error)."""
    if tree is None:
        raise FileNotFoundError(f"{directory} has no tree metadata file (_METADATA)")


def _step_directory(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(manager.directory) / str(step)


class _UnreadableStep(CheckpointError):
    """A step whose files cannot be read (truncated, corrupt, deleted); an older step may still be
    good, unlike a structure mismatch, which every step of the run shares."""


class TrainCheckpointer:
    """Saves and restores train states in a workdir; use as a context manager or call ``close()``.

    Args:
      workdir: the run's directory (a local path or a ``gs://`` URL); created if missing.
      keep_last: how many of the most recent saves to keep.
      keep_best: keep the best save by ``best_metric`` in ``WORKDIR/best`` (see ``save_best``).
      best_metric: the metric ``save_best`` ranks by (higher is better), recorded in its meta.
      async_save: write in a background thread; ``save`` returns once the arrays are copied off
        the devices. ``wait_until_finished`` (also called by ``close``) blocks until committed.
      save_interval_steps: ``save`` writes only when ``step`` is a multiple of this, when forced,
        or at the first step after a preemption notice.
      earlier_paths: maps a leaf's dotted path in the state's current layout (as
        :func:`flat_shapes` writes it) to the path an earlier layout stored it at; a checkpoint
        in that layout is then read into the current one.

    Every process of a multi-process run must make the same calls (Orbax coordinates the writes).
    """

    def __init__(self, workdir: str | os.PathLike, *, keep_last: int = 3, keep_best: bool = True,
                 best_metric: str = "miou", async_save: bool = True, save_interval_steps: int = 1,
                 earlier_paths: Callable[[str], str] | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1; got {keep_last!r}.")
        self.workdir = as_path(workdir)
        self.best_metric = best_metric
        self._earlier_paths = earlier_paths
        self._latest = self._manager("checkpoints", keep_last, async_save, save_interval_steps)
        self._best = self._manager("best", 1, async_save, 1) if keep_best else None
        self._best_value: float | None = None
        if self._best is not None and self._best.latest_step() is not None:
            try:
                meta = self._read_meta(self._best, self._best.latest_step())
                self._best_value = meta["best"]["value"]
            except _UnreadableStep as error:  # the next evaluation's save replaces it
                warnings.warn(str(error), stacklevel=2)

    def _manager(self, subdir: str, keep: int, async_save: bool,
                 interval: int) -> ocp.CheckpointManager:
        policies = ocp.checkpoint_managers
        # Orbax's default policy also writes the first step of every run; the interval is exact here.
        # A preemption notice (SIGTERM on TPU VMs, synchronised across hosts) forces a save.
        decision = policies.AnySavePolicy([policies.FixedIntervalPolicy(interval),
                                           policies.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_decision_policy=decision, enable_async_checkpointing=async_save,
            # Leftovers of a save that was killed midway; never a committed step.
            cleanup_tmp_directories=True,
            # Orbax names its cross-process barriers after the step, so the latest and the best
            # manager saving one step at once would meet in one barrier; a prefix per manager
            # keeps them apart.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=f"kdjax_{subdir}"))
        # Handlers named up front, so that metadata can be read before anything is restored.
        handlers = {"state": pytree_handler(), "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.workdir / subdir, options=options,
                                     item_handlers=handlers)

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads."""
        for manager in self._managers():
            manager.close()

    def wait_until_finished(self) -> None:
        """Blocks until every pending save is committed; raises if a background save failed."""
        for manager in self._managers():
            manager.wait_until_finished()

    def _managers(self) -> list[ocp.CheckpointManager]:
        return [m for m in (self._latest, self._best) if m is not None]

    def latest_step(self) -> int | None:
        """The newest committed (or pending) step in ``WORKDIR/checkpoints``, or None."""
        return self._latest.latest_step()

    def all_steps(self) -> list[int]:
        """The steps kept in ``WORKDIR/checkpoints``, oldest first."""
        return sorted(self._latest.all_steps())

    def best_step(self) -> int | None:
        """The step of the best save, or None if ``save_best`` never wrote one."""
        return None if self._best is None else self._best.latest_step()

    @property
    def best_value(self) -> float | None:
        """``best_metric`` of the best save, or None."""
        return self._best_value

    def _meta(self, step: int, meta: Mapping[str, Any]) -> dict[str, Any]:
        full = {"data_step": step, **meta, "step": step, "kdjax_version": kdjax.__version__}
        json.dumps(full)  # fail here, not in the background thread, on a non-JSON value
        return full

    @staticmethod
    def _args(state: Any, meta: dict[str, Any]) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state: Any, *, meta: Mapping[str, Any], force: bool = False) -> bool:
        """Starts saving ``state`` at ``step`` if the interval says so (or ``force``).

        Returns whether a save started. A step that is already saved is not written again (False),
        so a final forced save that falls on a periodic one is harmless.
        """
        if step in self._latest.all_steps():
            return False
        return self._latest.save(step, args=self._args(state, self._meta(step, meta)), force=force)

    def save_best(self, step: int, state: Any, *, meta: Mapping[str, Any],
                  metric_value: float) -> bool:
        """Saves ``state`` to ``WORKDIR/best`` if ``metric_value`` beats the best so far (the old
        best is removed once the new one is committed). Returns whether it saved."""
        if self._best is None:
            return False
        metric_value = float(metric_value)
        if self._best_value is not None and metric_value <= self._best_value:
            return False
        full = self._meta(step, meta)
        full["best"] = {"metric": self.best_metric, "value": metric_value}
        saved = self._best.save(step, args=self._args(state, full), force=True)
        if saved:
            self._best_value = metric_value
        return saved

    def restore(self, abstract_state: Any, step: int | None = None, *,
                fallback: bool = False) -> tuple[Any, dict[str, Any]]:
        """Restores a step (default: the latest) into the layout of ``abstract_state``.

        Args:
          abstract_state: a pytree like the saved state whose leaves are ``jax.ShapeDtypeStruct``
            with ``.sharding`` (or arrays): each array is read straight into that sharding and cast
            to that dtype.
          step: the step to restore; None takes the latest.
          fallback: if the step's files are unreadable (truncated, corrupt), warn and try the next
            older step, and so on. A structure mismatch never falls back.

        Returns:
          (state, meta). ``meta['step']`` says which step was restored.

        Raises:
          CheckpointError: no checkpoint; the step's files are damaged (naming its directory);
            or its structure differs from ``abstract_state`` (naming the keys and shapes). An
            error that does not come from the files (:data:`DAMAGED_FILE_ERRORS`) is raised as
            it is, and never falls back.
        """
        steps = sorted(self._latest.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self._latest.directory}.")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {self._latest.directory}; "
                                      f"saved steps: {sorted(steps)}.")
            steps = steps[steps.index(step):]
        if not fallback:
            steps = steps[:1]
        for candidate, older in zip(steps, steps[1:]):
            try:
                return self._restore(self._latest, candidate, abstract_state)
            except _UnreadableStep as error:
                warnings.warn(f"{error}\nFalling back to step {older}.", stacklevel=2)
        return self._restore(self._latest, steps[-1], abstract_state)

    def restore_best(self, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the best save (see ``restore``); CheckpointError if there is none."""
        step = self.best_step()
        if step is None:
            raise CheckpointError(f"no best checkpoint in {self.workdir / 'best'}.")
        return self._restore(self._best, step, abstract_state)

    def _unreadable(self, manager: ocp.CheckpointManager, step: int,
                    error: Exception) -> _UnreadableStep:
        path = _step_directory(manager, step)
        older = [s for s in manager.all_steps() if s < step]
        if manager is self._best:
            advice = "the next evaluation saves a new best"
        elif older:
            previous = max(older)
            advice = f"to resume from step {previous}, or pass step={previous} (or fallback=True)"
        else:
            advice = "to start the run afresh"
        return _UnreadableStep(
            f"cannot read the checkpoint {path}: {error_summary(error)}. Its files may be "
            f"truncated or corrupt: delete the directory {path} {advice}.")

    def _reading(self, manager: ocp.CheckpointManager,
                 step: int) -> contextlib.AbstractContextManager[None]:
        return reading_files(_step_directory(manager, step),
                             lambda error: self._unreadable(manager, step, error))

    def _read_meta(self, manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        with self._reading(manager, step):
            return manager.restore(step, args=args)["meta"]

    def _restore(self, manager: ocp.CheckpointManager, step: int,
                 abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        with self._reading(manager, step):
            saved_tree = manager.item_metadata(step)["state"]
            check_tree_metadata(saved_tree, _step_directory(manager, step) / "state")
        saved = flat_shapes(saved_tree)
        expected = flat_shapes(abstract_state)
        differences = describe_mismatch(saved, expected)
        if differences and self._earlier_paths is not None and not describe_mismatch(
                saved, {self._earlier_paths(path): shape for path, shape in expected.items()}):
            return self._restore_earlier(manager, step, abstract_state, saved_tree)
        if differences:
            raise CheckpointError("\n".join([
                f"the checkpoint {_step_directory(manager, step)} does not fit the state this run "
                "builds; nothing was restored.", *differences,
                "The configuration changed since the checkpoint was written: use a fresh --workdir, "
                "or revert the config (the checkpoint's meta holds the one it was written with)."]))
        args = ocp.args.Composite(state=pytree_restore(abstract_state), meta=ocp.args.JsonRestore())
        with self._reading(manager, step):
            restored = manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def _restore_earlier(self, manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                         saved_tree: Any) -> tuple[Any, dict[str, Any]]:
        """Reads a step written in an earlier layout (``earlier_paths``) into
        ``abstract_state``'s: into the saved structure first, each leaf with the shape, dtype and
        sharding of the leaf it becomes, then moved to its current place."""
        current = {_dotted(path): leaf for path, leaf in
                   jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        by_earlier = {self._earlier_paths(path): leaf for path, leaf in current.items()}
        target = jax.tree_util.tree_map_with_path(lambda path, _: by_earlier[_dotted(path)],
                                                  saved_tree)
        restored, meta = self._restore(manager, step, target)
        read = {_dotted(path): leaf for path, leaf in
                jax.tree_util.tree_flatten_with_path(restored)[0]}
        return jax.tree_util.tree_map_with_path(
            lambda path, _: read[self._earlier_paths(_dotted(path))], abstract_state), meta
