"""The optimizers of a run: the student's (with its terms' modules) and the discriminators'."""

from __future__ import annotations

import jax
import ml_collections
import optax


def term_module_mask(name: str):
    """The optax mask of the parameters of term ``name``'s module
    (``params['term_modules'][name]``)."""
    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: [getattr(k, "key", None) for k in path[:2]] == ["term_modules", name],
            params)
    return mask


def make_optimizer(train: ml_collections.ConfigDict, terms=()) -> optax.GradientTransformation:
    """SGD with momentum, coupled L2 weight decay on every parameter (as PyTorch's SGD) and the
    poly schedule ``lr·(1 − step/steps)^power`` after an optional linear warm-up, or AdamW;
    optional global-norm clipping first (docs/methods.md §6.1).

    A term whose loss trains a module of its own (``LossAdapter.student_module``) with a
    ``grad_clip`` state option has that module's gradient clipped to that global norm, alone and
    before anything else: Af-DCD clips its generator at 15 (docs/methods.md §10)."""
    decay = optax.polynomial_schedule(train.learning_rate, 0.0, train.poly_power,
                                      max(train.steps - train.warmup_steps, 1))
    schedule = decay
    if train.warmup_steps:
        warmup = optax.linear_schedule(0.0, train.learning_rate, train.warmup_steps)
        schedule = optax.join_schedules([warmup, decay], [train.warmup_steps])
    if train.optimizer == "sgd":
        parts = [optax.add_decayed_weights(train.weight_decay),
                 optax.sgd(schedule, momentum=train.momentum)]
    elif train.optimizer == "adamw":
        parts = [optax.adamw(schedule, weight_decay=train.weight_decay)]
    else:
        raise ValueError(f"train.optimizer must be 'sgd' or 'adamw'; got {train.optimizer!r}.")
    if train.grad_clip:
        parts.insert(0, optax.clip_by_global_norm(train.grad_clip))
    for term in terms:
        if term.adapter.student_module is not None and term.state_options.get("grad_clip"):
            parts.insert(0, optax.masked(optax.clip_by_global_norm(term.state_options["grad_clip"]),
                                         term_module_mask(term.name)))
    return optax.chain(*parts)


def make_discriminator_optimizer(terms) -> optax.GradientTransformation:
    """Adam for the terms' discriminators, with the first such term's settings (SKD's original
    uses lr 4e-4, betas (0.9, 0.99)); the identity when no term has a discriminator."""
    opts = [t.state_options for t in terms if t.adapter.discriminator is not None]
    if not opts:
        return optax.identity()
    o = opts[0]
    return optax.adam(o["learning_rate"], b1=o["b1"], b2=o["b2"])
