"""Distillation terms as the config writes them, parsed and checked before anything runs.

A term is one named entry of ``config.distill.terms``::

    terms.cwd = ConfigDict(dict(
        loss='channel_wise_divergence',   # a loss kind of kdjax.distill.adapters.ADAPTERS
        student='logits', teacher='logits',   # 'logits', 'aux_logits' or a feature name (c1..c4, head,
                                              # pre_classifier)
        weight=3.0, schedule='constant',  # or 'linear' / 'cosine' from weight_start over schedule_steps
        connector=None,                   # None, 'conv', 'conv_bn_relu' or 'cirkd_projection'
        mask_ignore=False,                # pass "label != ignore" (nearest-resized) as the loss mask
        resize=None,                      # None, 'teacher_to_student' or 'student_to_teacher':
                                          # bilinear resize of one side's H×W to the other's, for
                                          # networks of different strides (a SegFormer's /4
                                          # logits against a DeepLabV3's /8)
        options=ConfigDict(dict(tau=4.0)),   # the loss's keyword options (and its state options)
    ))

Student modules. The reserved key ``student_modules`` of the same group declares trainable modules
applied to a tensor of the student network; each one's output is a new named student tensor (the
entry's name) that any number of terms can read, so they share the module::

    terms.student_modules = ConfigDict(dict(
        head_gcn=ConfigDict(dict(module='gcn', input='head')),   # a kind of STUDENT_MODULE_KINDS
    ))
    terms.fitnet.student = 'head_gcn'

They train with the student (the same optimizer), run in the train step only (evaluation and
export see the student alone), and a module that no term reads is not built. Declaring them with
the terms keeps a method's terms self-contained: ``kdjax compare`` runs each method with its own
group (``config.methods.<name>``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

# The key of a terms group that declares its student modules rather than a term: part of the
# config's format, which the config room writes.
from kdjax.config.methods import STUDENT_MODULES
from kdjax.distill.adapters import ADAPTERS, LossAdapter
from kdjax.models import CirkdGcn

Array = jax.Array

SCHEDULES = ("constant", "linear", "cosine")
CONNECTORS = ("conv", "conv_bn_relu", "cirkd_projection")
RESIZES = ("teacher_to_student", "student_to_teacher")
TERM_FIELDS = ("loss", "student", "teacher", "weight", "schedule", "weight_start",
               "schedule_steps", "connector", "mask_ignore", "resize", "options")

STUDENT_MODULE_FIELDS = ("module", "input")
# Student module kinds: ``module`` value → ``build(channels, rngs=rngs)``, a module called as
# ``module(x, train)`` on the (N, H, W, channels) input tensor. A new kind is one entry here.
STUDENT_MODULE_KINDS: dict[str, Callable[..., nnx.Module]] = {
    "gcn": CirkdGcn,   # CIRKDv2's GCN block (docs/methods.md §11); keeps the channels
}


class ObjectiveError(ValueError):
    """A distillation term or student module that cannot work; raised at start-up, naming it."""


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
    resize: str | None = None

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


@dataclasses.dataclass(frozen=True)
class StudentModule:
    """One declared student module: ``kind`` (a key of ``STUDENT_MODULE_KINDS``) applied to the
    student tensor ``input``; its output is the student tensor ``name``."""

    name: str
    kind: str
    input: str

    def describe(self) -> str:
        return f"student module {self.name!r} ({self.kind} on student {self.input!r})"


_GROUPS = (Mapping, ml_collections.ConfigDict)


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ObjectiveError(f"term {name!r}: {message}")


def parse_terms(terms: ml_collections.ConfigDict | Mapping, *, train_steps: int) -> tuple[Term, ...]:
    """Validates ``config.distill.terms`` (its ``student_modules`` too) and returns the terms
    sorted by name.

    Raises:
      ObjectiveError: an unknown loss, field, option, schedule or connector, naming the term; or a
        bad student module (:func:`parse_student_modules`).
    """
    parsed = []
    for name, raw in sorted(dict(terms).items()):
        if name == STUDENT_MODULES:
            continue
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
        resize = raw.get("resize")
        _check(resize in (None, *RESIZES), name,
               f"resize must be None or one of {RESIZES}; got {resize!r}.")
        weight = float(raw.get("weight", 1.0))
        _check(math.isfinite(weight), name, f"weight must be finite; got {weight}.")
        parsed.append(Term(
            name=name, loss=loss, student=raw.get("student", "logits"),
            teacher=raw.get("teacher", "logits"), weight=weight, schedule=schedule,
            weight_start=float(raw.get("weight_start", 0.0)),
            schedule_steps=int(raw.get("schedule_steps") or train_steps),
            connector=connector, mask_ignore=bool(raw.get("mask_ignore", False)),
            options=options, state_options=state_options, resize=resize))
    parsed = tuple(parsed)
    parse_student_modules(terms, parsed)
    return parsed


def parse_student_modules(terms: ml_collections.ConfigDict | Mapping,
                          read_by: tuple[Term, ...]) -> tuple[StudentModule, ...]:
    """The student modules that the terms group ``terms`` declares (its ``student_modules``) and
    that a term of ``read_by`` reads, sorted by name; every declared one is validated.

    Whether ``input`` is a tensor of the student network is checked when the modules are built
    (:func:`kdjax.distill.objective.build_student_modules`), where the tensors are known.

    Raises:
      ObjectiveError: the section or an entry is not a group of fields, an unknown field or
        module kind, or a missing input, naming the module.
    """
    section = dict(terms).get(STUDENT_MODULES) or {}
    if not isinstance(section, _GROUPS):
        raise ObjectiveError(f"{STUDENT_MODULES} must map module names to ConfigDict(module=..., "
                             f"input=...); got {section!r}.")
    read = {term.student for term in read_by}
    modules = []
    for name, raw in sorted(dict(section).items()):
        where = f"student module {name!r}"
        if not isinstance(raw, _GROUPS):
            raise ObjectiveError(f"{where}: declare it as ConfigDict(module=..., input=...); got "
                                 f"{raw!r}.")
        raw = dict(raw)
        unknown = set(raw) - set(STUDENT_MODULE_FIELDS)
        if unknown:
            raise ObjectiveError(f"{where}: unknown field(s) {sorted(unknown)}; a student module "
                                 f"has {', '.join(STUDENT_MODULE_FIELDS)}.")
        kind = raw.get("module")
        if kind not in STUDENT_MODULE_KINDS:
            raise ObjectiveError(f"{where}: unknown module {kind!r}; choose one of "
                                 f"{', '.join(STUDENT_MODULE_KINDS)}.")
        tensor = raw.get("input")
        if not isinstance(tensor, str) or not tensor:
            raise ObjectiveError(f"{where}: input must name a tensor of the student network "
                                 f"(e.g. 'head'); got {tensor!r}.")
        if name in read:
            modules.append(StudentModule(name=name, kind=kind, input=tensor))
    return tuple(modules)
