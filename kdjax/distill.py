"""The distillation objective: which student tensor pairs with which teacher tensor, through which
loss, connector and weight schedule; built from ``config.distill.terms`` and checked at start-up.

A term is one named entry of ``config.distill.terms``::

    terms.cwd = ConfigDict(dict(
        loss='channel_wise_divergence',   # a function of kdjax.losses (or 'skd_adversarial')
        student='logits', teacher='logits',   # 'logits', 'aux_logits' or a feature name (c1..c4, head,
                                              # pre_classifier)
        weight=3.0, schedule='constant',  # or 'linear' / 'cosine' from weight_start over schedule_steps
        connector=None,                   # None, 'conv', 'conv_bn_relu' or 'cirkd_projection'
        mask_ignore=False,                # pass "label != ignore" (nearest-resized) as the loss mask
        options=ConfigDict(dict(tau=4.0)),   # c_norm='student': divide by the student's
    ))                                    # channels before its connector, as CIRKD does

The objective is ``CE(logits) + aux_weight·CE(aux_logits) + Σ_term w_term(step)·L_term``. Task
logits are upsampled to the label size (bilinear, align_corners=True) as in CIRKD; distillation
losses see the tensors at the network's own resolution. Stateful terms thread their state
(``cirkd_memory``: the queues; ``fakd_kd``/``fakd_cwd``: the class covariance of the student's
pre-classifier feature) through the train state, and ``skd_adversarial`` trains a discriminator of
its own (``discriminator_loss``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kdjax import losses
from kdjax.losses._common import nearest_resize_labels
from kdjax.models import CirkdProjectionHead, Connector, SaganDiscriminator
from kdjax.models.layers import resize_bilinear_align_corners

Array = jax.Array

SCHEDULES = ("constant", "linear", "cosine")
CONNECTORS = ("conv", "conv_bn_relu", "cirkd_projection")
TERM_FIELDS = ("loss", "student", "teacher", "weight", "schedule", "weight_start",
               "schedule_steps", "connector", "mask_ignore", "options")

# Losses called as f(student, teacher, **options).
PAIR_LOSSES = ("pixel_kd", "channel_wise_divergence", "normalized_feature_distillation",
               "pixel_feature_similarity", "weighted_pixel_imitation", "skd_pairwise",
               "cirkd_minibatch", "dist", "attention_transfer", "fitnet")
# Losses that also read the labels; fakd_* also the student's classifier and a class covariance.
LABEL_LOSSES = ("ifvd", "fakd_kd", "fakd_cwd", "cirkd_memory")
ADVERSARIAL = "skd_adversarial"
LOSS_NAMES = PAIR_LOSSES + LABEL_LOSSES + (ADVERSARIAL,)

# Arguments the objective supplies itself; a term's options may not set them.
_SUPPLIED = {"student", "teacher", "student_logits", "teacher_logits", "student_feat",
             "teacher_feat", "adapted_student_feat", "student_embed", "teacher_embed", "labels",
             "mask", "num_classes", "ignore_label", "classifier_kernel", "variance", "strength",
             "memory", "key", "d_student", "d_teacher"}
# Options of a stateful term that configure its state or its schedule, not the loss call.
_STATE_OPTIONS = {
    "fakd_kd": {"lam0": 7.5},
    "fakd_cwd": {"lam0": 7.5},
    "cirkd_memory": {"pixel_size": 20000, "region_size": 2000, "pixels_per_class": 16,
                     "pixel_pool": "first_n", "region_weight": 1.0},
    # The discriminator's own optimizer (Adam) and the weight λ_d of its hinge loss.
    ADVERSARIAL: {"conv_dim": 64, "learning_rate": 4e-4, "b1": 0.9, "b2": 0.99, "d_weight": 0.1},
}


class ObjectiveError(ValueError):
    """A distillation term that cannot work; raised at start-up with the term's name."""


@dataclasses.dataclass(frozen=True)
class Term:
    """One parsed distillation term (see the module docstring for the fields)."""

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

    def weight_at(self, step: Array) -> Array:
        """The term's weight at ``step``: a pure function of the step (float32 scalar)."""
        if self.schedule == "constant":
            return jnp.float32(self.weight)
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(self.schedule_steps, 1), 0.0, 1.0)
        if self.schedule == "cosine":
            progress = 0.5 * (1.0 - jnp.cos(jnp.pi * progress))
        return jnp.float32(self.weight_start) + progress * (self.weight - self.weight_start)

    def describe(self) -> str:
        via = f" via a {self.connector} connector" if self.connector else ""
        return (f"term {self.name!r} ({self.loss} on student {self.student!r}{via} vs teacher "
                f"{self.teacher!r})")


def _loss_function(name: str) -> Callable:
    return getattr(losses, name) if name != ADVERSARIAL else losses.skd_adversarial_losses


def _accepted_options(loss: str) -> set[str]:
    params = set(inspect.signature(_loss_function(loss)).parameters)
    if loss == "cirkd_memory":
        params |= set(inspect.signature(losses.update_cirkd_memory).parameters)
    return (params - _SUPPLIED) | set(_STATE_OPTIONS.get(loss, {}))


def parse_terms(terms: ml_collections.ConfigDict | Mapping, *, train_steps: int) -> tuple[Term, ...]:
    """Validates ``config.distill.terms`` and returns the terms sorted by name.

    Raises:
      ObjectiveError: an unknown loss, field, option, schedule or connector, naming the term.
    """
    parsed = []
    for name, raw in sorted(dict(terms).items()):
        raw = dict(raw)
        unknown = set(raw) - set(TERM_FIELDS)
        if unknown:
            raise ObjectiveError(f"term {name!r}: unknown field(s) {sorted(unknown)}; a term has "
                                 f"{', '.join(TERM_FIELDS)}.")
        loss = raw.get("loss")
        if loss not in LOSS_NAMES:
            raise ObjectiveError(f"term {name!r}: unknown loss {loss!r}; choose one of "
                                 f"{', '.join(LOSS_NAMES)}.")
        options = dict(raw.get("options") or {})
        bad = set(options) - _accepted_options(loss)
        if bad:
            raise ObjectiveError(
                f"term {name!r}: {loss} takes no option(s) {sorted(bad)}; it accepts "
                f"{', '.join(sorted(_accepted_options(loss)))}.")
        defaults = _STATE_OPTIONS.get(loss, {})
        state_options = {k: options.pop(k, v) for k, v in defaults.items()}
        schedule = raw.get("schedule", "constant")
        if schedule not in SCHEDULES:
            raise ObjectiveError(f"term {name!r}: schedule must be one of {SCHEDULES}; got "
                                 f"{schedule!r}.")
        connector = raw.get("connector")
        if connector not in (None, *CONNECTORS):
            raise ObjectiveError(f"term {name!r}: connector must be None or one of {CONNECTORS}; "
                                 f"got {connector!r}.")
        weight = float(raw.get("weight", 1.0))
        if not math.isfinite(weight):
            raise ObjectiveError(f"term {name!r}: weight must be finite; got {weight}.")
        parsed.append(Term(
            name=name, loss=loss, student=raw.get("student", "logits"),
            teacher=raw.get("teacher", "logits"), weight=weight, schedule=schedule,
            weight_start=float(raw.get("weight_start", 0.0)),
            schedule_steps=int(raw.get("schedule_steps") or train_steps),
            connector=connector, mask_ignore=bool(raw.get("mask_ignore", False)),
            options=options, state_options=state_options))
    return tuple(parsed)


def named_tensors(output) -> dict[str, Array]:
    """A segmentor output as a flat dict: 'logits', 'aux_logits' (if any) and every feature."""
    tensors = {"logits": output.logits, **output.features}
    if output.aux_logits is not None:
        tensors["aux_logits"] = output.aux_logits
    return tensors


def _tensor(tensors: Mapping[str, Array], name: str, side: str, term: Term) -> Array:
    if name not in tensors:
        raise ObjectiveError(f"{term.describe()}: the {side} has no tensor {name!r}; it has "
                             f"{', '.join(sorted(tensors))}.")
    return tensors[name]


def build_term_modules(terms: tuple[Term, ...], student_shapes: Mapping[str, Any],
                       teacher_shapes: Mapping[str, Any], *, rngs: nnx.Rngs,
                       param_dtype=jnp.float32) -> tuple[nnx.Dict, nnx.Dict]:
    """The trainable pieces the terms need: ``(connectors, discriminators)``, keyed by term name.

    Connectors map the student tensor's channels to the teacher tensor's (they train with the
    student); discriminators belong to ``skd_adversarial`` terms (they train with their own
    optimizer). ``*_shapes`` map tensor names to shapes (e.g. from ``jax.eval_shape``).
    """
    connectors, discriminators = {}, {}
    for term in terms:
        s_ch = _tensor(student_shapes, term.student, "student", term).shape[-1]
        t_ch = _tensor(teacher_shapes, term.teacher, "teacher", term).shape[-1]
        if term.connector == "cirkd_projection":
            connectors[term.name] = CirkdProjectionHead(s_ch, t_ch, param_dtype=param_dtype,
                                                        rngs=rngs)
        elif term.connector is not None:
            connectors[term.name] = Connector(s_ch, t_ch, bn_relu=term.connector == "conv_bn_relu",
                                              param_dtype=param_dtype, rngs=rngs)
        if term.loss == ADVERSARIAL:
            discriminators[term.name] = SaganDiscriminator(
                t_ch, conv_dim=term.state_options["conv_dim"], param_dtype=param_dtype, rngs=rngs)
    return nnx.Dict(connectors), nnx.Dict(discriminators)


def init_term_states(terms: tuple[Term, ...], student_shapes: Mapping[str, Any],
                     teacher_shapes: Mapping[str, Any], *, num_classes: int,
                     key: Array) -> dict[str, Any]:
    """Initial state of the stateful terms, keyed by term name (CIRKD queues, FAKD covariance)."""
    states = {}
    for term in terms:
        if term.loss == "cirkd_memory":
            dim = teacher_shapes[term.teacher].shape[-1]
            states[term.name] = losses.init_cirkd_memory(
                jax.random.fold_in(key, len(states)), num_classes, dim,
                pixel_size=term.state_options["pixel_size"],
                region_size=term.state_options["region_size"])
        elif term.loss in ("fakd_kd", "fakd_cwd"):
            dim = student_shapes["pre_classifier"].shape[-1]
            states[term.name] = losses.init_class_covariance(num_classes, dim)
    return states


def task_loss(output, labels: Array, *, ignore_label: int, aux_weight: float,
              class_weights: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """``CE(logits↑) + aux_weight·CE(aux_logits↑)``, logits upsampled to the label size (N, H, W)."""
    size = labels.shape[1:3]
    ce = losses.cross_entropy(resize_bilinear_align_corners(output.logits, size), labels,
                              ignore_label=ignore_label, class_weights=class_weights)
    metrics = {"ce": ce}
    total = ce
    if output.aux_logits is not None and aux_weight:
        aux = losses.cross_entropy(resize_bilinear_align_corners(output.aux_logits, size), labels,
                                   ignore_label=ignore_label, class_weights=class_weights)
        metrics["aux_ce"] = aux
        total = total + aux_weight * aux
    return total, metrics


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """Everything a term may read in one step."""

    student: Mapping[str, Array]
    teacher: Mapping[str, Array]
    labels: Array
    step: Array
    key: Array
    classifier_kernel: Array
    num_classes: int
    ignore_label: int
    total_steps: int


def _label_mask(labels: Array, spatial_of: Array, num_classes: int, ignore_label: int) -> Array:
    resized = nearest_resize_labels(labels, spatial_of.shape[1], spatial_of.shape[2])
    return (resized != ignore_label) & (resized >= 0) & (resized < num_classes)


def _term_value(term: Term, s: Array, t: Array, inputs: TermInputs, state: Any,
                discriminator: nnx.Module | None, key: Array,
                student_channels: int) -> tuple[Array, dict, Any]:
    """Loss value, extra metrics and new state of one term."""
    fn = _loss_function(term.loss)
    kw = dict(term.options)
    if kw.get("c_norm") == "student":  # CIRKD divides feature CWD by the student's own channels
        kw["c_norm"] = student_channels
    if term.mask_ignore:
        kw["mask"] = _label_mask(inputs.labels, s, inputs.num_classes, inputs.ignore_label)
    if term.loss in PAIR_LOSSES:
        return fn(s, t, **kw), {}, state
    if term.loss == "ifvd":
        return fn(s, t, inputs.labels, num_classes=inputs.num_classes,
                  ignore_label=inputs.ignore_label, **kw), {}, state
    if term.loss in ("fakd_kd", "fakd_cwd"):
        state = losses.update_class_covariance(state, inputs.student["pre_classifier"],
                                               inputs.labels, ignore_label=inputs.ignore_label)
        strength = losses.fakd_strength(inputs.step, inputs.total_steps,
                                        term.state_options["lam0"])
        value = fn(s, t, inputs.classifier_kernel, state.var, inputs.labels, strength=strength,
                   ignore_label=inputs.ignore_label, **kw)
        return value, {"strength": strength}, state
    if term.loss == "cirkd_memory":
        update_keys = set(inspect.signature(losses.update_cirkd_memory).parameters)
        update_kw = {k: v for k, v in term.options.items() if k in update_keys}
        loss_kw = {k: v for k, v in kw.items() if k not in update_keys}
        update_key, contrast_key = jax.random.split(key)
        state = losses.update_cirkd_memory(
            state, t, inputs.labels, update_key, ignore_label=inputs.ignore_label,
            pixels_per_class=term.state_options["pixels_per_class"],
            pixel_pool=term.state_options["pixel_pool"], **update_kw)
        pixel, region = fn(s, t, inputs.labels, state, contrast_key,
                           ignore_label=inputs.ignore_label, **loss_kw)
        value = pixel + term.state_options["region_weight"] * region
        return value, {"pixel": pixel, "region": region}, state
    # skd_adversarial: the generator side; the discriminator's own batch statistics are not
    # updated by the student's pass (they move in the discriminator step).
    d_student = discriminator(s, train=False)
    d_teacher = discriminator(t, train=False)
    generator_loss, _ = fn(d_student, d_teacher)
    return generator_loss, {}, state


def distillation_loss(terms: tuple[Term, ...], inputs: TermInputs, connectors: nnx.Dict,
                      discriminators: nnx.Dict, states: Mapping[str, Any], *,
                      train: bool) -> tuple[Array, dict[str, Array], dict[str, Any]]:
    """``Σ w_term(step)·L_term`` with per-term metrics and the new term states.

    Metrics are named ``kd/<term>`` (the unweighted loss), ``kd/<term>/weight`` for scheduled
    weights and ``kd/<term>/<part>`` for a term's parts (CIRKD pixel/region, FAKD strength).
    """
    total = jnp.float32(0.0)
    metrics, new_states = {}, dict(states)
    for index, term in enumerate(terms):
        s = _tensor(inputs.student, term.student, "student", term)
        t = jax.lax.stop_gradient(_tensor(inputs.teacher, term.teacher, "teacher", term))
        student_channels = s.shape[-1]
        if term.name in connectors:
            s = connectors[term.name](s, train)
        discriminator = discriminators[term.name] if term.name in discriminators else None
        try:
            value, parts, new_state = _term_value(
                term, s, t, inputs, states.get(term.name), discriminator,
                jax.random.fold_in(inputs.key, index), student_channels)
        except (ValueError, TypeError) as err:
            raise ObjectiveError(
                f"{term.describe()} cannot be computed: {err} Choose tensors of matching shape "
                f"(student {term.student!r}: {tuple(s.shape)}, teacher {term.teacher!r}: "
                f"{tuple(t.shape)}), or add a connector.") from err
        weight = term.weight_at(inputs.step)
        total = total + weight * value
        metrics[f"kd/{term.name}"] = value
        if term.schedule != "constant":
            metrics[f"kd/{term.name}/weight"] = weight
        metrics.update({f"kd/{term.name}/{k}": v for k, v in parts.items()})
        if term.name in new_states:
            new_states[term.name] = new_state
    return total, metrics, new_states


def discriminator_loss(terms: tuple[Term, ...], student: Mapping[str, Array],
                       teacher: Mapping[str, Array], discriminators: nnx.Dict) -> tuple[Array, dict]:
    """``Σ λ_d · hinge loss`` over the ``skd_adversarial`` discriminators (train mode).

    Both inputs are constants here: the discriminator step never moves the student.
    """
    total = jnp.float32(0.0)
    metrics = {}
    for term in terms:
        if term.loss != ADVERSARIAL:
            continue
        disc = discriminators[term.name]
        s = jax.lax.stop_gradient(student[term.student])
        t = jax.lax.stop_gradient(teacher[term.teacher])
        _, d_loss = losses.skd_adversarial_losses(disc(s, train=True), disc(t, train=True))
        metrics[f"kd/{term.name}/discriminator"] = d_loss
        total = total + term.state_options["d_weight"] * d_loss
    return total, metrics
