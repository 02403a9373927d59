"""The distillation objective that the train step minimises::

    CE(logits↑) + aux_weight·CE(aux_logits↑) + Σ_term w_term(step)·L_term

Task logits are upsampled to the label size (bilinear, align_corners=True) as in CIRKD;
distillation losses see the tensors at the network's own resolution. Each term pairs a student
tensor (through its connector, if any) with a teacher tensor and calls its loss through the
loss kind's adapter (:mod:`kdjax.distill.adapters`); stateful terms thread their state through
the train state, and adversarial terms train a discriminator of their own
(:func:`discriminator_loss`).

Student modules (the ``student_modules`` of a terms group, :mod:`kdjax.distill.terms`) extend
the student's named tensors before any term reads them: :func:`build_student_modules` builds each
on its input tensor and adds its output's shape, :func:`apply_student_modules` adds its output to
the tensors of a train step. They are kept in the term modules' ``nnx.Dict`` under the reserved key
``student_modules`` (no term can have that name), so they are part of the trainables, train with
the student's optimizer and are saved with the term modules; ``term_modules[<term>]`` stays the module
of that term alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import losses
from kdjax.distill.adapters import TermCall, TermInputs
from kdjax.distill.terms import (STUDENT_MODULE_KINDS, STUDENT_MODULES, ObjectiveError,
                                 StudentModule, Term)
from kdjax.models import CirkdProjectionHead, Connector
from kdjax.models.layers import resize_bilinear_align_corners

Array = jax.Array


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


def build_student_modules(modules: tuple[StudentModule, ...], student_shapes: Mapping[str, Any],
                          *, rngs: nnx.Rngs) -> tuple[nnx.Dict, dict[str, Any]]:
    """The student modules, keyed by name, and ``student_shapes`` with their outputs' shapes
    added (what :func:`build_term_modules` and :func:`init_term_states` then pair the terms on).

    ``student_shapes`` maps the student network's tensor names to shapes (e.g. from
    ``jax.eval_shape``); a module's input must be one of them.

    Raises:
      ObjectiveError: an input the student network lacks, or a name it has already.
    """
    built, shapes = {}, dict(student_shapes)
    for spec in modules:
        if spec.name in student_shapes:
            raise ObjectiveError(f"{spec.describe()}: the student network has a tensor "
                                 f"{spec.name!r} already; give the module another name.")
        if spec.input not in student_shapes:
            raise ObjectiveError(f"{spec.describe()}: the student network has no tensor "
                                 f"{spec.input!r}; its input must be one of "
                                 f"{', '.join(sorted(student_shapes))}.")
        module = STUDENT_MODULE_KINDS[spec.kind](student_shapes[spec.input].shape[-1], rngs=rngs)
        shapes[spec.name] = jax.eval_shape(lambda x, m=module: m(x, False),
                                           student_shapes[spec.input])
        built[spec.name] = module
    return nnx.Dict(built), shapes


def apply_student_modules(modules: tuple[StudentModule, ...], term_modules: nnx.Dict,
                          tensors: Mapping[str, Array], *, train: bool) -> dict[str, Array]:
    """``tensors`` (the student's named tensors) with each module's output added under its name;
    the modules are those :func:`build_term_modules` placed in ``term_modules``."""
    tensors = dict(tensors)
    for spec in modules:
        tensors[spec.name] = term_modules[STUDENT_MODULES][spec.name](tensors[spec.input], train)
    return tensors


def build_term_modules(terms: tuple[Term, ...], student_shapes: Mapping[str, Any],
                       teacher_shapes: Mapping[str, Any], *, rngs: nnx.Rngs,
                       student_modules: nnx.Dict | None = None) -> tuple[nnx.Dict, nnx.Dict]:
    """The trainable pieces the terms need: ``(term_modules, discriminators)``, keyed by term
    name.

    Connectors map the student tensor's channels to the teacher tensor's (they train with the
    student), as do the modules a loss applies itself (``LossAdapter.student_module``, kept with
    the connectors in ``term_modules``); discriminators train with their own optimizer. ``*_shapes`` map tensor names to
    shapes (e.g. from ``jax.eval_shape``); ``student_shapes`` includes the student modules'
    outputs. ``student_modules`` (from :func:`build_student_modules`), if any, are kept in the
    term modules under the key ``student_modules``.
    """
    term_modules, discriminators = {}, {}
    if student_modules is not None and len(student_modules):
        term_modules[STUDENT_MODULES] = student_modules
    for term in terms:
        s_ch = _tensor(student_shapes, term.student, "student", term).shape[-1]
        t_ch = _tensor(teacher_shapes, term.teacher, "teacher", term).shape[-1]
        if term.adapter.student_module is not None:
            if term.connector is not None:
                raise ObjectiveError(f"{term.describe()}: {term.loss} trains a module of its own on "
                                     f"the student tensor; set connector=None.")
            term_modules[term.name] = term.adapter.student_module(term, s_ch, t_ch, rngs)
        elif term.connector == "cirkd_projection":
            term_modules[term.name] = CirkdProjectionHead(s_ch, t_ch, rngs=rngs)
        elif term.connector is not None:
            term_modules[term.name] = Connector(s_ch, t_ch,
                                                bn_relu=term.connector == "conv_bn_relu", rngs=rngs)
        if term.adapter.discriminator is not None:
            discriminators[term.name] = term.adapter.discriminator(term, t_ch, rngs)
    return nnx.Dict(term_modules), nnx.Dict(discriminators)


def init_term_states(terms: tuple[Term, ...], student_shapes: Mapping[str, Any],
                     teacher_shapes: Mapping[str, Any], *, num_classes: int,
                     key: Array) -> dict[str, Any]:
    """Initial state of the stateful terms, keyed by term name (CIRKD queues, FAKD covariance)."""
    states = {}
    for term in terms:
        if term.adapter.init_state is not None:
            states[term.name] = term.adapter.init_state(
                term, student_shapes, teacher_shapes, num_classes,
                jax.random.fold_in(key, len(states)))
    return states


def _upsampled(logits: Array, size) -> Array:
    # float32 before the resize: bfloat16 logits would round again after interpolation.
    return resize_bilinear_align_corners(logits.astype(jnp.float32), size)


def task_loss(output, labels: Array, *, ignore_label: int, aux_weight: float,
              class_weights: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """``CE(logits↑) + aux_weight·CE(aux_logits↑)``, logits upsampled in float32 to the label size
    (N, H, W)."""
    size = labels.shape[1:3]
    ce = losses.cross_entropy(_upsampled(output.logits, size), labels,
                              ignore_label=ignore_label, class_weights=class_weights)
    metrics = {"ce": ce}
    total = ce
    if output.aux_logits is not None and aux_weight:
        aux = losses.cross_entropy(_upsampled(output.aux_logits, size), labels,
                                   ignore_label=ignore_label, class_weights=class_weights)
        metrics["aux_ce"] = aux
        total = total + aux_weight * aux
    return total, metrics


def metric_names(terms: tuple[Term, ...], *, aux_ce: bool) -> list[str]:
    """The names of every metric a train step reports, sorted: ``ce``, ``aux_ce`` (when the
    student's aux head is trained), each term's (``Term.metric_names``), ``loss`` and
    ``grad_norm``."""
    names = ["ce", "loss", "grad_norm", *(["aux_ce"] if aux_ce else [])]
    for term in terms:
        names += term.metric_names()
    return sorted(names)


def _label_mask(labels: Array, spatial_of: Array, num_classes: int, ignore_label: int) -> Array:
    resized = losses.nearest_resize_labels(labels, spatial_of.shape[1], spatial_of.shape[2])
    return (resized != ignore_label) & (resized >= 0) & (resized < num_classes)


def distillation_loss(terms: tuple[Term, ...], inputs: TermInputs, term_modules: nnx.Dict,
                      discriminators: nnx.Dict, states: Mapping[str, Any], *,
                      train: bool) -> tuple[Array, dict[str, Array], dict[str, Any]]:
    """``Σ w_term(step)·L_term`` with per-term metrics and the new term states.

    Metrics are named ``kd/<term>`` (the unweighted loss), ``kd/<term>/weight`` for scheduled
    weights and ``kd/<term>/<part>`` for a term's parts (CIRKD pixel/region, FAKD strength).

    Every loss receives float32 tensors (docs/methods.md §9.1), whatever precision the networks
    compute in.
    """
    total = jnp.float32(0.0)
    metrics, new_states = {}, dict(states)
    for index, term in enumerate(terms):
        s = _tensor(inputs.student, term.student, "student", term)
        t = jax.lax.stop_gradient(_tensor(inputs.teacher, term.teacher, "teacher", term))
        t = t.astype(jnp.float32)
        student_channels = s.shape[-1]
        own_module = term.adapter.student_module is not None
        if term.name in term_modules and not own_module:
            s = term_modules[term.name](s, train)
        s = s.astype(jnp.float32)
        if term.resize == "teacher_to_student":
            t = resize_bilinear_align_corners(t, s.shape[1:3])
        elif term.resize == "student_to_teacher":
            s = resize_bilinear_align_corners(s, t.shape[1:3])
        options = dict(term.options)
        if term.mask_ignore:
            options["mask"] = _label_mask(inputs.labels, s, inputs.num_classes,
                                          inputs.ignore_label)
        call = TermCall(term=term, student=s, teacher=t, student_channels=student_channels,
                        options=options, inputs=inputs, state=states.get(term.name),
                        discriminator=discriminators[term.name] if term.name in discriminators
                        else None, key=jax.random.fold_in(inputs.key, index),
                        student_module=term_modules[term.name] if own_module else None,
                        train=train)
        # The losses reject tensors they cannot pair with a ValueError; anything else (e.g. JAX's
        # TypeError for forward mode through a written-out backward) keeps its own message.
        try:
            value, parts, new_state = term.adapter.compute(call)
        except ValueError as err:
            raise ObjectiveError(
                f"{term.describe()} cannot be computed: {err} Choose tensors of matching shape "
                f"(student {term.student!r}: {tuple(s.shape)}, teacher {term.teacher!r}: "
                f"{tuple(t.shape)}), add a connector for the channels, or set the term's "
                f"resize ('teacher_to_student' or 'student_to_teacher') for the sizes.") from err
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
    """``Σ λ_d · discriminator loss`` over the terms that train a discriminator (train mode).

    Both inputs are constants here: the discriminator step never moves the student.
    """
    total = jnp.float32(0.0)
    metrics = {}
    for term in terms:
        if term.name not in discriminators:
            continue
        disc = discriminators[term.name]
        s = jax.lax.stop_gradient(student[term.student])
        t = jax.lax.stop_gradient(teacher[term.teacher])
        d_loss = term.adapter.discriminator_loss(disc(s, train=True), disc(t, train=True))
        metrics[f"kd/{term.name}/discriminator"] = d_loss
        total = total + term.state_options["d_weight"] * d_loss
    return total, metrics
