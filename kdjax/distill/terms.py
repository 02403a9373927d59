"""Distillation terms as the config writes them, parsed and checked before anything runs.

A term is one named entry of ``config.distill.terms``::

    terms.cwd = ConfigDict(dict(
        loss='channel_wise_divergence',   # a loss kind of kdjax.distill.adapters.ADAPTERS
        student='logits', teacher='logits',   # 'logits', 'aux_logits' or a feature name (c1..c4, head,
                                              # pre_classifier)
        weight=3.0, schedule='constant',  # or 'linear' / 'cosine' from weight_start over schedule_steps
        connector=None,                   # None, 'conv', 'conv_bn_relu' or 'cirkd_projection'
        mask_ignore=False,                # pass "label != ignore" (nearest-resized) as the loss mask
        options=ConfigDict(dict(tau=4.0)),   # the loss's keyword options (and its state options)
    ))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from kdjax.distill.adapters import ADAPTERS, LossAdapter

Array = jax.Array

SCHEDULES = ("constant", "linear", "cosine")
CONNECTORS = ("conv", "conv_bn_relu", "cirkd_projection")
TERM_FIELDS = ("loss", "student", "teacher", "weight", "schedule", "weight_start",
               "schedule_steps", "connector", "mask_ignore", "options")


class ObjectiveError(ValueError):
    """A distillation term that cannot work; raised at start-up with the term's name."""


@dataclasses.dataclass(frozen=True)
class Term:
    """One parsed distillation term (see the module docstring for the fields).

    ``options`` are the keyword options of the loss call; ``state_options`` those that configure
    the term's state, discriminator or parts (``LossAdapter.state_options``, defaults filled in).
    """

    name: str
    loss: str
    student: str
    teacher: str
    weight: float
    schedule: str
    weight_start: float
    schedule_steps: int
    connector: str | None
    mask_ignore: bool
    options: dict[str, Any]
    state_options: dict[str, Any]

    @property
    def adapter(self) -> LossAdapter:
        return ADAPTERS[self.loss]

    def weight_at(self, step: Array) -> Array:
        """The term's weight at ``step``: a pure function of the step (float32 scalar)."""
        if self.schedule == "constant":
            return jnp.float32(self.weight)
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(self.schedule_steps, 1), 0.0, 1.0)
        if self.schedule == "cosine":
            progress = 0.5 * (1.0 - jnp.cos(jnp.pi * progress))
        return jnp.float32(self.weight_start) + progress * (self.weight - self.weight_start)

    def metric_names(self) -> list[str]:
        """The metrics the objective reports for this term: ``kd/<term>``, its weight when
        scheduled, and its parts (see :func:`kdjax.distill.objective.distillation_loss`)."""
        names = [f"kd/{self.name}"]
        if self.schedule != "constant":
            names.append(f"kd/{self.name}/weight")
        return names + [f"kd/{self.name}/{part}" for part in self.adapter.parts]

    def describe(self) -> str:
        via = f" via a {self.connector} connector" if self.connector else ""
        return (f"term {self.name!r} ({self.loss} on student {self.student!r}{via} vs teacher "
                f"{self.teacher!r})")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ObjectiveError(f"term {name!r}: {message}")


def parse_terms(terms: ml_collections.ConfigDict | Mapping, *, train_steps: int) -> tuple[Term, ...]:
    """Validates ``config.distill.terms`` and returns the terms sorted by name.

    Raises:
      ObjectiveError: an unknown loss, field, option, schedule or connector, naming the term.
    """
    parsed = []
    for name, raw in sorted(dict(terms).items()):
        raw = dict(raw)
        unknown = set(raw) - set(TERM_FIELDS)
        _check(not unknown, name, f"unknown field(s) {sorted(unknown)}; a term has "
                                  f"{', '.join(TERM_FIELDS)}.")
        loss = raw.get("loss")
        _check(loss in ADAPTERS, name, f"unknown loss {loss!r}; choose one of "
                                       f"{', '.join(ADAPTERS)}.")
        adapter = ADAPTERS[loss]
        options = dict(raw.get("options") or {})
        accepted = adapter.accepted_options()
        bad = set(options) - accepted
        _check(not bad, name, f"{loss} takes no option(s) {sorted(bad)}; it accepts "
                              f"{', '.join(sorted(accepted))}.")
        state_options = {k: options.pop(k, v) for k, v in adapter.state_options.items()}
        schedule = raw.get("schedule", "constant")
        _check(schedule in SCHEDULES, name, f"schedule must be one of {SCHEDULES}; got "
                                            f"{schedule!r}.")
        connector = raw.get("connector")
        _check(connector in (None, *CONNECTORS), name,
               f"connector must be None or one of {CONNECTORS}; got {connector!r}.")
        weight = float(raw.get("weight", 1.0))
        _check(math.isfinite(weight), name, f"weight must be finite; got {weight}.")
        parsed.append(Term(
            name=name, loss=loss, student=raw.get("student", "logits"),
            teacher=raw.get("teacher", "logits"), weight=weight, schedule=schedule,
            weight_start=float(raw.get("weight_start", 0.0)),
            schedule_steps=int(raw.get("schedule_steps") or train_steps),
            connector=connector, mask_ignore=bool(raw.get("mask_ignore", False)),
            options=options, state_options=state_options))
    return tuple(parsed)
