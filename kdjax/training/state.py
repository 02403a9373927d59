"""The train state: everything a run checkpoints, as one pytree of arrays."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
from flax import nnx

Array = jax.Array


class Trainables(nnx.Module):
    """Everything the student optimizer moves: the student and its terms' connectors."""

    def __init__(self, student: nnx.Module, connectors: nnx.Dict):
        self.student = student
        self.connectors = connectors


@flax.struct.dataclass
class TrainState:
    """The whole checkpointed state of a run (a pytree of arrays; never the teacher).

    ``params``/``rest`` are the student's (and connectors') ``nnx.Param`` and ``nnx.BatchStat``
    variables; ``disc_*`` the same for adversarial discriminators. Dropout keys are not state:
    each step reseeds them from ``fold_in(rng, step)``, so a resumed run draws the same masks.
    ``term_states`` holds CIRKD queues and FAKD covariances by term name. ``bad_step`` is the first
    step whose loss or gradient was non-finite (−1 if none) and ``bad_metrics`` that step's
    metrics; from that step on the state stops changing so the last good values survive.
    """

    step: Array
    rng: Array
    params: Any
    rest: Any
    opt_state: Any
    disc_params: Any
    disc_rest: Any
    disc_opt_state: Any
    term_states: Any
    bad_step: Array
    bad_metrics: Any
