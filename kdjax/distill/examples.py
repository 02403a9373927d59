"""Every registered loss kind on one small example problem, through the objective itself.

The teacher is a fixed random feature map (N, H, W, 16) with a linear classifier, so its logits
(6 classes) and its feature agree; the student is a trainable feature map (N, H, W, 8) with its
own classifier. A loss kind runs as a one-term objective (:func:`kdjax.distill.distillation_loss`)
on the tensors, connector and options its adapter's :class:`~kdjax.distill.adapters.Example`
names, with its state, discriminator or own module built as a train step builds them. So
``kdjax loss-demo`` and the tests iterate :data:`~kdjax.distill.adapters.ADAPTERS` instead of
keeping lists of losses, and a loss registered from outside the package takes part as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.config.methods import term
from kdjax.distill.adapters import ADAPTERS, TermInputs
from kdjax.distill.objective import build_term_modules, distillation_loss, init_term_states
from kdjax.distill.terms import parse_terms

Array = jax.Array

IMAGES, CLASSES, STUDENT_CHANNELS, TEACHER_CHANNELS = 4, 6, 8, 16
IGNORE_LABEL = 255
# The example is taken halfway through a run of STEPS: a scheduled loss (FAKD's augmentation
# strength) is neither at its start nor at its end.
STEPS = 100


@dataclasses.dataclass(frozen=True)
class ExampleProblem:
    """One loss kind's example: ``objective(student) -> loss value`` (float32 scalar), and the
    student's initial values ``student = {'feature': (N, H, W, 8), 'kernel': (8, 6),
    'modules': its connector's or own module's parameters}``."""

    loss: str
    objective: Callable[[dict[str, Any]], Array]
    student: dict[str, Any]
    teacher: dict[str, Array]    # 'logits' (N, H, W, 6), 'head' (N, H, W, 16), 'labels' (N, H, W)

    def student_classes(self, student: dict[str, Any]) -> Array:
        """The student's per-pixel class (N, H, W)."""
        return jnp.argmax(student["feature"] @ student["kernel"], axis=-1)


def _smooth(key: Array, shape: tuple[int, ...], scale: float) -> Array:
    """Spatially smooth random maps: a coarse grid upsampled, so neighbouring pixels correlate."""
    coarse = jax.random.normal(key, (shape[0], 3, 4, shape[-1])) * scale
    return jax.image.resize(coarse, shape, "linear")


def example_problem(loss: str, *, seed: int = 0) -> ExampleProblem:
    """The example problem of the registered loss kind ``loss`` (a key of ``ADAPTERS``)."""
    adapter = ADAPTERS[loss]
    example = adapter.example
    height, width = example.size
    keys = jax.random.split(jax.random.key(seed), 6)
    teacher_feature = _smooth(keys[0], (IMAGES, height, width, TEACHER_CHANNELS), 2.0)
    teacher_logits = teacher_feature @ (jax.random.normal(keys[1], (TEACHER_CHANNELS, CLASSES))
                                        / 2.0)
    teacher = {"logits": teacher_logits, "head": teacher_feature,
               "labels": jnp.argmax(teacher_logits, axis=-1)}
    feature = _smooth(keys[2], (IMAGES, height, width, STUDENT_CHANNELS), 1.0)
    kernel = jax.random.normal(keys[3], (STUDENT_CHANNELS, CLASSES)) / 3.0

    (parsed,) = parse_terms({loss: term(loss, student=example.student, teacher=example.teacher,
                                        connector=example.connector, **example.options)},
                            train_steps=STEPS)
    student_shapes = jax.eval_shape(_student_tensors, feature, kernel)
    teacher_shapes = jax.eval_shape(lambda: {k: teacher[k] for k in ("logits", "head")})
    modules, discriminators = build_term_modules((parsed,), student_shapes, teacher_shapes,
                                                 rngs=nnx.Rngs(seed))
    graph, params, rest = nnx.split(modules, nnx.Param, ...)
    # A discriminator is the adversary's, not the student's: it stays as built.
    disc_graph, disc_state = nnx.split(discriminators)
    states = init_term_states((parsed,), student_shapes, teacher_shapes, num_classes=CLASSES,
                              key=keys[4])

    def objective(student: dict[str, Any]) -> Array:
        # The modules are merged from the parameters inside the traced function: nothing outside
        # it changes, and the student's connector trains with it.
        term_modules = nnx.merge(graph, student["modules"], rest)
        discs = nnx.merge(disc_graph, disc_state)
        inputs = TermInputs(
            student=_student_tensors(student["feature"], student["kernel"]),
            teacher={"logits": teacher["logits"], "head": teacher["head"]},
            labels=teacher["labels"], step=jnp.int32(STEPS // 2), key=keys[5],
            classifier_kernel=student["kernel"][None, None], num_classes=CLASSES,
            ignore_label=IGNORE_LABEL, total_steps=STEPS)
        value, _, _ = distillation_loss((parsed,), inputs, term_modules, discs, states,
                                        train=False)
        return value

    return ExampleProblem(loss=loss, objective=objective, teacher=teacher,
                          student={"feature": feature, "kernel": kernel, "modules": params})


def _student_tensors(feature: Array, kernel: Array) -> dict[str, Array]:
    return {"logits": feature @ kernel, "head": feature, "pre_classifier": feature}
