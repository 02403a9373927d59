"""The pure train step: one optimizer step of the student (and of the discriminators), guarded
against non-finite values.

``make_train_step`` closes over the static side of a run (graph definitions, optimizers, terms)
and returns ``train_step(state, teacher_variables, batch) -> (state, metrics)``, a pure function
for ``jax.jit``. The teacher runs in inference mode outside the gradient; its outputs are
constants of the loss.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdjax import distill
from kdjax.training.state import Trained, TrainState

Array = jax.Array


class NonFiniteLossError(FloatingPointError):
    """A train step produced a non-finite loss or gradient; the message names the terms and the
    step."""


def classifier_kernel(student: nnx.Module) -> Array | None:
    """The (1, 1, C, K) kernel of the student's final classifier, which FAKD's terms read; None
    for a student module without kdjax's ``head.classifier`` (setup rejects FAKD for it)."""
    classifier = getattr(getattr(student, "head", None), "classifier", None)
    return classifier.kernel[...] if hasattr(classifier, "kernel") else None


def _train_forward(student: nnx.Module, images: Array, key: Array):
    """``student(images, train=True)``, with its dropout keys ``rngs=nnx.Rngs(dropout=key)``
    where its call takes ``rngs`` (a module of the caller's own without dropout need not)."""
    parameters = inspect.signature(type(student).__call__).parameters.values()
    if any(p.name == "rngs" or p.kind is p.VAR_KEYWORD for p in parameters):
        return student(images, train=True, rngs=nnx.Rngs(dropout=key))
    return student(images, train=True)


def _select(keep_new: Array, new, old):
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


@dataclasses.dataclass(frozen=True)
class ModuleParts:
    """What rebuilds trained modules from a :class:`Trained` and moves them: the graph
    definition and the optimizer."""

    graphdef: Any
    tx: optax.GradientTransformation

    def merge(self, params, batch_stats) -> nnx.Module:
        """The modules, their variables made in the current trace (``copy``): NNX lets a module
        update variables (BN statistics) only in the trace that made them, and states that enter
        through an outer ``jit`` belong to that trace."""
        return nnx.merge(self.graphdef, params, batch_stats, copy=True)


@dataclasses.dataclass(frozen=True)
class StepParts:
    """The static pieces a train step closes over.

    ``student`` rebuilds the :class:`~kdjax.training.state.Trainables` (the student and its
    terms' modules), ``discriminators`` the adversarial terms' discriminators. ``teacher`` maps
    (teacher variables, images) to the teacher's named tensors, or is None. ``student_modules``
    add their outputs to the student's named tensors (in the train step only). The rest is what
    the terms read besides their tensors (:class:`kdjax.distill.TermInputs`).
    """

    student: ModuleParts
    discriminators: ModuleParts
    terms: tuple[distill.Term, ...]
    student_modules: tuple[distill.StudentModule, ...]
    teacher: Any
    student_dtype: Any
    num_classes: int
    ignore_label: int
    aux_weight: float
    total_steps: int
    loss_scratch_bytes: int | None = None


def _update(trained: Trained, parts: ModuleParts, loss: Callable) -> tuple[Trained, Any, Any]:
    """One optimizer step of ``trained`` on ``loss(params) -> (value, (batch_stats, aux))``:
    the new :class:`Trained`, the gradient and ``aux``."""
    (_, (batch_stats, aux)), grads = jax.value_and_grad(loss, has_aux=True)(trained.params)
    updates, opt_state = parts.tx.update(grads, trained.opt_state, trained.params)
    return Trained(optax.apply_updates(trained.params, updates), batch_stats, opt_state), grads, aux


def updated_state(parts: StepParts, state: TrainState, teacher_variables,
                  batch: dict) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step of ``state``, finite or not, and its float32 metrics; ``step``,
    ``bad_step`` and ``bad_metrics`` are left to the guard of :func:`make_train_step`."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    images, labels = batch["image"], batch["label"]
    teacher = parts.teacher(teacher_variables, images) if parts.teacher else {}

    def student_loss(params):
        trainables = parts.student.merge(params, state.student.batch_stats)
        discs = parts.discriminators.merge(state.discriminators.params,
                                           state.discriminators.batch_stats)
        out = _train_forward(trainables.student, images.astype(parts.student_dtype), key)
        total, metrics = distill.task_loss(out, labels, ignore_label=parts.ignore_label,
                                           aux_weight=parts.aux_weight)
        tensors = distill.apply_student_modules(parts.student_modules, trainables.term_modules,
                                                distill.named_tensors(out), train=True)
        term_states = state.term_states
        if parts.terms:
            inputs = distill.TermInputs(
                student=tensors, teacher=teacher, labels=labels, step=state.step, key=key,
                classifier_kernel=classifier_kernel(trainables.student),
                num_classes=parts.num_classes, ignore_label=parts.ignore_label,
                total_steps=parts.total_steps, scratch_bytes=parts.loss_scratch_bytes)
            kd, kd_metrics, term_states = distill.distillation_loss(
                parts.terms, inputs, trainables.term_modules, discs, term_states, train=True)
            total = total + kd
            metrics.update(kd_metrics)
        metrics["loss"] = total
        return total, (nnx.state(trainables, nnx.BatchStat), (metrics, term_states, tensors))

    student, grads, (metrics, term_states, tensors) = _update(state.student, parts.student,
                                                               student_loss)
    metrics["grad_norm"] = optax.tree.norm(grads)

    def discriminator_loss(params):
        # The student's tensors are constants here: this step never moves the student.
        modules = parts.discriminators.merge(params, state.discriminators.batch_stats)
        value, d_metrics = distill.discriminator_loss(parts.terms, tensors, teacher, modules)
        return value, (nnx.state(modules, nnx.BatchStat), d_metrics)

    discriminators = state.discriminators
    if jax.tree.leaves(discriminators.params):
        discriminators, _, d_metrics = _update(discriminators, parts.discriminators,
                                               discriminator_loss)
        metrics.update(d_metrics)
    new = state.replace(student=student, discriminators=discriminators, term_states=term_states)
    return new, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def make_train_step(parts: StepParts):
    """``train_step(state, teacher_variables, batch) -> (state, metrics)``, pure.

    The step is :func:`updated_state` if its metrics are finite and no earlier step went
    non-finite; otherwise ``state`` is returned unchanged, with the first bad step and its metrics
    recorded (``bad_step``, ``bad_metrics``), so that the host need not wait for every step: the
    training loop checks ``bad_step`` when it logs, evaluates or saves, and
    :meth:`~kdjax.training.Experiment.step` after each step unless told to freeze
    (:func:`check_finite`).

    ``batch``: ``'image'`` (N, H, W, 3) float32 and ``'label'`` (N, H, W) int32.
    """
    def train_step(state: TrainState, teacher_variables, batch: dict):
        new, metrics = updated_state(parts, state, teacher_variables, batch)
        finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
        healthy = state.bad_step < 0
        advance = finite & healthy
        first_bad = healthy & ~finite
        new = _select(advance, new.replace(bad_metrics=state.bad_metrics), state)
        new = new.replace(
            step=jnp.where(advance, state.step + 1, state.step),
            bad_step=jnp.where(first_bad, state.step + 1, state.bad_step),
            bad_metrics=_select(first_bad, metrics, state.bad_metrics))
        return new, metrics

    return train_step


def check_finite(state: TrainState, checkpoint_dir=None) -> None:
    """Raises :class:`NonFiniteLossError` if any step so far went non-finite (this waits for
    the device). The message names the step and the non-finite metrics (the terms), and, given
    the run's ``checkpoint_dir``, says that its last good checkpoint is kept."""
    bad_step = int(jax.device_get(state.bad_step))
    if bad_step < 0:
        return
    metrics = jax.device_get(state.bad_metrics)
    bad = ", ".join(f"{k}={float(v)}" for k, v in sorted(metrics.items())
                    if not jnp.isfinite(v)) or "a gradient"
    if checkpoint_dir is None:
        raise NonFiniteLossError(
            f"the loss went non-finite at step {bad_step}: {bad}. The state was not updated by "
            f"that step or any later one. Lower the learning rate or the weight of the named "
            f"term, or enable train.grad_clip.")
    raise NonFiniteLossError(
        f"the loss went non-finite at step {bad_step}: {bad}. The state was not updated from "
        f"that step on, and the last good checkpoint in {checkpoint_dir} is kept. Lower the "
        f"learning rate or the weight of the named term, or enable train.grad_clip, then rerun "
        f"the same command to resume from that checkpoint.")
