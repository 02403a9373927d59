"""A self-contained tour of the loss library: distil random teacher maps into a random student.

The "teacher" is a fixed random feature map (N, H, W, C_t) with a linear classifier, so its logits and
features agree. The "student" is a trainable feature map (N, H, W, C_s), its classifier and a 1×1
connector to the teacher's channels. For every loss the student starts from the same random values and
takes a few dozen Adam steps on that loss alone; the table shows the loss before and after and how often
the student's per-pixel class (argmax of its logits) agrees with the teacher's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from kdjax import losses

Array = jax.Array
N, H, W = 4, 12, 16
CLASSES, STUDENT_CHANNELS, TEACHER_CHANNELS = 6, 8, 16


def _smooth(key: Array, shape: tuple[int, ...], scale: float) -> Array:
    """Spatially smooth random maps: a coarse grid upsampled, so neighbouring pixels correlate."""
    coarse = jax.random.normal(key, (shape[0], 3, 4, shape[-1])) * scale
    return jax.image.resize(coarse, shape, "linear")


def make_problem(seed: int) -> tuple[dict[str, Array], dict[str, Array]]:
    """Returns (teacher tensors, initial student parameters)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    teacher_feat = _smooth(keys[0], (N, H, W, TEACHER_CHANNELS), 2.0)
    teacher_kernel = jax.random.normal(keys[1], (TEACHER_CHANNELS, CLASSES)) / 2.0
    teacher_logits = teacher_feat @ teacher_kernel
    teacher = {"feat": teacher_feat, "logits": teacher_logits,
               "labels": jnp.argmax(teacher_logits, axis=-1)}
    student = {
        "feat": _smooth(keys[2], (N, H, W, STUDENT_CHANNELS), 1.0),
        "kernel": jax.random.normal(keys[3], (STUDENT_CHANNELS, CLASSES)) / 3.0,
        "connector": jax.random.normal(keys[4], (STUDENT_CHANNELS, TEACHER_CHANNELS)) / 3.0,
    }
    return teacher, student


def loss_terms() -> dict[str, Callable[[dict, dict], Array]]:
    """One objective per loss, each a function of (student parameters, teacher tensors)."""

    def logits(s):
        return s["feat"] @ s["kernel"]

    def adapted(s):
        return s["feat"] @ s["connector"]

    def fakd_variance(s, t):
        state = losses.init_class_covariance(CLASSES, STUDENT_CHANNELS)
        features = jax.lax.stop_gradient(s["feat"])
        return losses.update_class_covariance(state, features, t["labels"]).var

    return {
        "pixel_kd": lambda s, t: losses.pixel_kd(logits(s), t["logits"]),
        "channel_wise_divergence":
            lambda s, t: losses.channel_wise_divergence(logits(s), t["logits"]),
        "weighted_pixel_imitation":
            lambda s, t: losses.weighted_pixel_imitation(logits(s), t["logits"]),
        "dist": lambda s, t: losses.dist(logits(s), t["logits"]),
        "fakd_kd": lambda s, t: losses.fakd_kd(logits(s), t["logits"], s["kernel"],
                                               fakd_variance(s, t), t["labels"], strength=1.0),
        "fakd_cwd": lambda s, t: losses.fakd_cwd(logits(s), t["logits"], s["kernel"],
                                                 fakd_variance(s, t), t["labels"], strength=1.0),
        "fitnet": lambda s, t: losses.fitnet(adapted(s), t["feat"]),
        "normalized_feature_distillation":
            lambda s, t: losses.normalized_feature_distillation(adapted(s), t["feat"]),
        "attention_transfer": lambda s, t: losses.attention_transfer(s["feat"], t["feat"]),
        "pixel_feature_similarity":
            lambda s, t: losses.pixel_feature_similarity(s["feat"], t["feat"]),
        "skd_pairwise": lambda s, t: losses.skd_pairwise(s["feat"], t["feat"]),
        "ifvd": lambda s, t: losses.ifvd(s["feat"], t["feat"], t["labels"], num_classes=CLASSES),
        "cirkd_minibatch": lambda s, t: losses.cirkd_minibatch(s["feat"], t["feat"]),
        "cirkd_memory": lambda s, t: sum(losses.cirkd_memory(
            adapted(s), t["feat"], t["labels"], t["memory"], t["sample_key"])),
    }


def with_cirkd_memory(teacher: dict[str, Array], seed: int) -> dict[str, Array]:
    """Adds CIRKD queues filled with the teacher's embeddings, and a key to sample them."""
    memory_key, sample_key, update_key = jax.random.split(jax.random.key(seed + 1), 3)
    memory = losses.init_cirkd_memory(memory_key, CLASSES, TEACHER_CHANNELS, pixel_size=64,
                                      region_size=16)
    memory = losses.update_cirkd_memory(memory, teacher["feat"], teacher["labels"], update_key)
    return {**teacher, "memory": memory, "sample_key": sample_key}


def agreement(student: dict[str, Array], teacher: dict[str, Array]) -> float:
    """Fraction of pixels where the student's class equals the teacher's."""
    predicted = jnp.argmax(student["feat"] @ student["kernel"], axis=-1)
    return float(jnp.mean(predicted == teacher["labels"]))


def distil(objective: Callable[[dict, dict], Array], student: dict[str, Array],
           teacher: dict[str, Array], steps: int,
           learning_rate: float = 0.05) -> tuple[dict[str, Array], float, float]:
    """Adam on one objective; returns the final student and the loss before and after."""
    optimizer = optax.adam(learning_rate)

    # The teacher is an argument, not a closure: closed-over arrays would be constant-folded by XLA.
    @jax.jit
    def step(params, opt_state, teacher):
        value, grads = jax.value_and_grad(objective)(params, teacher)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    evaluate = jax.jit(objective)
    opt_state = optimizer.init(student)
    first = float(evaluate(student, teacher))
    for _ in range(steps):
        student, opt_state, _ = step(student, opt_state, teacher)
    return student, first, float(evaluate(student, teacher))


def run_loss_demo(steps: int = 60, seed: int = 0) -> list[dict[str, float | str]]:
    """Runs every loss and prints a table; returns its rows."""
    teacher, initial = make_problem(seed)
    teacher = with_cirkd_memory(teacher, seed)
    start_agreement = agreement(initial, teacher)
    print(f"kdjax loss demo: {N} images of {H}x{W}, {CLASSES} classes, student C={STUDENT_CHANNELS}, "
          f"teacher C={TEACHER_CHANNELS}, {steps} Adam steps per loss "
          f"(class agreement before distillation: {start_agreement:.1%})\n")
    header = f"{'loss':<34}{'before':>11}{'after':>11}{'agreement':>11}{'seconds':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, objective in loss_terms().items():
        started = time.perf_counter()
        student, before, after = distil(objective, initial, teacher, steps)
        seconds = time.perf_counter() - started
        row = {"loss": name, "before": before, "after": after,
               "agreement": agreement(student, teacher), "seconds": seconds}
        rows.append(row)
        print(f"{name:<34}{before:>11.4g}{after:>11.4g}{row['agreement']:>11.1%}{seconds:>9.2f}")
    print("\nagreement: share of pixels whose student class equals the teacher's class. Feature "
          "losses train the student's features, not its classifier, so their agreement may not move.")
    return rows
