"""The train state: everything a run checkpoints, as one pytree of arrays."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
from flax import nnx

Array = jax.Array


class Trainables(nnx.Module):
    """Everything the student's optimizer moves: the student network and its terms' modules
    (connectors, the modules a loss applies itself, and the student modules the terms share;
    :func:`kdjax.distill.build_term_modules`)."""

    def __init__(self, student: nnx.Module, term_modules: nnx.Dict):
        self.student = student
        self.term_modules = term_modules


def check_only_weights(module: nnx.Module, what: str) -> None:
    """Raises ValueError, naming them, if ``module`` has variables other than ``nnx.Param`` and
    ``nnx.BatchStat``: a :class:`Trained` keeps only those, so any other would be lost between
    steps. Dropout keys in particular are arguments of a call, not state."""
    _, _, other = nnx.split(module, (nnx.Param, nnx.BatchStat), ...)
    found = [f"{'.'.join(map(str, path))} ({type(variable).__name__})"
             for path, variable in nnx.to_flat_state(other)]
    if found:
        listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ValueError(
            f"{what} hold variables other than nnx.Param and nnx.BatchStat, which the train state "
            f"does not keep: {listed}. Rng streams are not state here: build nnx.Dropout without "
            f"rngs and pass the call's rngs on (model(images, train, rngs=...)).")


@flax.struct.dataclass
class Trained:
    """Modules one optimizer trains: their ``nnx.Param`` variables (``params``), their
    ``nnx.BatchStat`` variables (``batch_stats``) and the optimizer's state."""

    params: Any
    batch_stats: Any
    opt_state: Any


@flax.struct.dataclass
class TrainState:
    """The whole checkpointed state of a run (a pytree of arrays; never the teacher).

    ``student`` holds the :class:`Trainables` (the student and its terms' modules),
    ``discriminators`` the adversarial terms' discriminators (empty without), each trained by its
    own optimizer. Dropout keys are not state: each step passes ``fold_in(rng, step)`` to the
    student's call, so a resumed run draws the same masks. ``term_states`` holds CIRKD queues
    and FAKD covariances by term name. ``bad_step`` is the first step whose loss or gradient was
    non-finite (−1 if none) and ``bad_metrics`` that step's metrics; from that step on the state
    stops changing so the last good values survive.
    """

    step: Array
    rng: Array
    student: Trained
    discriminators: Trained
    term_states: Any
    bad_step: Array
    bad_metrics: Any


# The layout before the student's and the discriminators' parts (kdjax 0.1.0's first releases):
# flat fields, batch statistics named ``rest`` and the term modules ``connectors``.
_EARLIER_FIELDS = {"student.params": "params", "student.batch_stats": "rest",
                   "student.opt_state": "opt_state", "discriminators.params": "disc_params",
                   "discriminators.batch_stats": "disc_rest",
                   "discriminators.opt_state": "disc_opt_state"}


def earlier_path(path: str) -> str:
    """Where the earlier layout stored the leaf at dotted ``path`` of a :class:`TrainState`
    (e.g. ``'student.params.term_modules.nfd.conv.kernel'`` →
    ``'params.connectors.nfd.conv.kernel'``), so that checkpoints written before the
    :class:`Trained` parts still resume (:class:`kdjax.io.checkpoints.TrainCheckpointer`)."""
    for field, earlier in _EARLIER_FIELDS.items():
        if path == field or path.startswith(field + "."):
            path = earlier + path[len(field):]
            break
    return ".".join("connectors" if part == "term_modules" else part
                    for part in path.split("."))
