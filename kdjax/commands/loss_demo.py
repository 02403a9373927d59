"""A self-contained tour of the loss library: every registered loss kind distils a random teacher
map into a random student (:mod:`kdjax.distill.examples`).

The "teacher" is a fixed random feature map with a linear classifier, so its logits and features
agree; the "student" is a trainable feature map with its classifier, and the connector or module
of its own that the loss kind trains with it. For every kind the student starts from the same
random values and takes a few dozen Adam steps on that loss alone; the table shows the loss before
and after and how often the student's per-pixel class (argmax of its logits) agrees with the
teacher's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from kdjax.distill import ADAPTERS
from kdjax.distill.examples import (CLASSES, IMAGES, STUDENT_CHANNELS, TEACHER_CHANNELS,
                                    ExampleProblem, example_problem)

Array = jax.Array


def agreement(problem: ExampleProblem, student: dict) -> float:
    """Fraction of pixels where the student's class equals the teacher's."""
    return float(jnp.mean(problem.student_classes(student) == problem.teacher["labels"]))


def distil(objective: Callable[[dict], Array], student: dict, steps: int,
           learning_rate: float = 0.05) -> tuple[dict, float, float]:
    """Adam on one objective; returns the final student and the loss before and after."""
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state):
        value, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    evaluate = jax.jit(objective)
    opt_state = optimizer.init(student)
    first = float(evaluate(student))
    for _ in range(steps):
        student, opt_state, _ = step(student, opt_state)
    return student, first, float(evaluate(student))


def run_loss_demo(steps: int = 60, seed: int = 0) -> list[dict[str, float | str]]:
    """Runs every registered loss kind and prints a table; returns its rows."""
    print(f"kdjax loss demo: {IMAGES} images, {CLASSES} classes, student C={STUDENT_CHANNELS}, "
          f"teacher C={TEACHER_CHANNELS}, {steps} Adam steps per loss kind\n")
    header = (f"{'loss kind':<34}{'before':>11}{'after':>11}{'agreement':>11}{'(start)':>9}"
              f"{'seconds':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in ADAPTERS:
        started = time.perf_counter()
        problem = example_problem(name, seed=seed)
        student, before, after = distil(problem.objective, problem.student, steps)
        row = {"loss": name, "before": before, "after": after,
               "agreement": agreement(problem, student),
               "start_agreement": agreement(problem, problem.student),
               "seconds": time.perf_counter() - started}
        rows.append(row)
        print(f"{name:<34}{before:>11.4g}{after:>11.4g}{row['agreement']:>11.1%}"
              f"{row['start_agreement']:>9.1%}{row['seconds']:>9.2f}")
    print("\nagreement: share of pixels whose student class equals the teacher's class, after "
          "distillation and (start) before. Feature losses train the student's features, not its "
          "classifier, so their agreement may not move.")
    return rows
