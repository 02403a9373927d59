"""Train state, the pure train step and the training loop (design.md "Train step").

The student (with the connectors of its distillation terms) is split once into a graph definition
and state; one ``jax.jit``-compiled ``train_step(state, teacher_state, batch)`` with explicit
shardings and a donated state merges, runs and splits again. The teacher is frozen data evaluated
in inference mode outside the gradient and is never checkpointed with the student.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from kdjax import distill, sharding
from kdjax.checkpoint import TrainCheckpointer
from kdjax.config import ConfigError, config_to_json
from kdjax.data import dataset_info, make_eval_iterator, make_train_iterator
from kdjax.evaluate import EvalMode, evaluate
from kdjax.metrics_log import MetricsLog
from kdjax.model_store import save_model
from kdjax.networks import (Network, build_model, load_backbone_weights, load_student_weights,
                            load_teacher, model_spec, set_batch_norm_groups)
from kdjax.unoptimized import compile_unoptimized

Array = jax.Array
log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A train step produced a non-finite loss or gradient; the message names the terms."""


class Trainables(nnx.Module):
    """Everything the student optimizer moves: the student and its terms' connectors."""

    def __init__(self, student: nnx.Module, connectors: nnx.Dict):
        self.student = student
        self.connectors = connectors


@flax.struct.dataclass
class TrainState:
    """The whole checkpointed state of a run (a pytree of arrays).

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


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum, coupled L2 weight decay (as PyTorch's SGD) and the poly schedule, or
    AdamW; optional global-norm clipping first."""
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
    return optax.chain(*parts)


def make_discriminator_optimizer(terms: tuple[distill.Term, ...]) -> optax.GradientTransformation:
    """Adam for the SKD discriminators (the original uses lr 4e-4, betas (0.9, 0.99))."""
    opts = [t.state_options for t in terms if t.loss == distill.ADVERSARIAL]
    if not opts:
        return optax.identity()
    o = opts[0]
    return optax.adam(o["learning_rate"], b1=o["b1"], b2=o["b2"])


def _classifier_kernel(student: nnx.Module) -> Array:
    return student.head.classifier.kernel[...]


def _replace_student(tree, new, part: str | None = None) -> None:
    """Puts ``new`` (same structure and shapes) in place of the student, or of its ``part``."""
    parent, key = (tree, "student") if part is None else (tree["student"], part)
    old_leaves, new_leaves = jax.tree.leaves(parent[key]), jax.tree.leaves(new)
    assert [x.shape for x in old_leaves] == [x.shape for x in new_leaves]
    parent[key] = jax.tree.unflatten(jax.tree.structure(parent[key]), new_leaves)


def _fresh(*trees):
    """Copies of NNX variable trees owned by the current trace.

    NNX only lets a module update (BN statistics, rng counters) variables created in the trace it
    runs in; states that enter through an outer ``jit`` or a closure are rebuilt here first.
    """
    return tuple(jax.tree.map(lambda x: x, tree) for tree in trees)


def _select(keep_new: Array, new, old):
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


@dataclasses.dataclass
class Experiment:
    """The static side of a run: graph definitions, optimizers, terms, mesh and the teacher.

    Build it with :func:`setup`; it owns the compiled step and the initial state.
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    num_classes: int
    ignore_label: int
    class_names: tuple[str, ...]
    terms: tuple[distill.Term, ...]
    graphdef: Any
    disc_graphdef: Any
    rng_vars: Any
    disc_rng_vars: Any
    tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    teacher: Network | None
    student_spec: dict
    student_checkpoint: str | None = None
    backbone_checkpoint: tuple[str, str] | None = None   # (path, source)
    abstract_state: TrainState = None
    _init: Any = None
    _compiled_init: Any = None
    _step: Any = None
    _updated: Any = None
    logits_fn: Any = None

    # --- the pure functions -------------------------------------------------------------------

    def teacher_inputs(self):
        """The teacher argument of :meth:`train_step` (None without a teacher)."""
        return self.teacher.variables if self.teacher is not None else None

    def teacher_tensors(self, teacher_state, images: Array) -> dict[str, Array]:
        if self.teacher is None:
            return {}
        model = self.teacher.merge(teacher_state)
        out = model(images.astype(self.teacher.dtype), train=False)
        return jax.tree.map(jax.lax.stop_gradient, distill.named_tensors(out))

    def _loss(self, params, state: TrainState, teacher: dict, batch: dict, key: Array):
        trainables = nnx.merge(self.graphdef, params, *_fresh(state.rest, self.rng_vars))
        nnx.reseed(trainables, dropout=key)
        discs = nnx.merge(self.disc_graphdef,
                          *_fresh(state.disc_params, state.disc_rest, self.disc_rng_vars))
        images, labels = batch["image"], batch["label"]
        out = trainables.student(images.astype(self.student_spec["dtype"]), train=True)
        total, metrics = distill.task_loss(out, labels, ignore_label=self.ignore_label,
                                           aux_weight=self.config.train.aux_weight)
        student = distill.named_tensors(out)
        if self.terms:
            inputs = distill.TermInputs(
                student=student, teacher=teacher, labels=labels, step=state.step, key=key,
                classifier_kernel=_classifier_kernel(trainables.student),
                num_classes=self.num_classes, ignore_label=self.ignore_label,
                total_steps=self.config.train.steps)
            kd, kd_metrics, term_states = distill.distillation_loss(
                self.terms, inputs, trainables.connectors, discs, state.term_states, train=True)
            total = total + kd
            metrics.update(kd_metrics)
        else:
            term_states = state.term_states
        metrics["loss"] = total
        rest = nnx.state(trainables, nnx.BatchStat)
        return total, (metrics, rest, term_states, student)

    def updated_state(self, state: TrainState, teacher_state,
                      batch: dict) -> tuple[TrainState, dict[str, Array]]:
        """One optimizer step of ``state``, finite or not, and its float32 metrics;
        ``step``, ``bad_step`` and ``bad_metrics`` are left to :meth:`train_step`."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        teacher = self.teacher_tensors(teacher_state, batch["image"])
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        (loss, (metrics, rest, term_states, student)), grads = grad_fn(
            state.params, state, teacher, batch, key)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)

        disc_params, disc_rest, disc_opt_state = state.disc_params, state.disc_rest, state.disc_opt_state
        if any(t.loss == distill.ADVERSARIAL for t in self.terms):
            def disc_loss(dp):
                discs = nnx.merge(self.disc_graphdef, dp,
                                  *_fresh(state.disc_rest, self.disc_rng_vars))
                value, d_metrics = distill.discriminator_loss(self.terms, student, teacher, discs)
                return value, (d_metrics, nnx.state(discs, nnx.BatchStat))
            (_, (d_metrics, disc_rest)), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(
                state.disc_params)
            d_updates, disc_opt_state = self.disc_tx.update(d_grads, state.disc_opt_state,
                                                            state.disc_params)
            disc_params = optax.apply_updates(state.disc_params, d_updates)
            metrics.update(d_metrics)

        new = state.replace(params=params, rest=rest, opt_state=opt_state,
                            disc_params=disc_params, disc_rest=disc_rest,
                            disc_opt_state=disc_opt_state, term_states=term_states)
        return new, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    def train_step(self, state: TrainState, teacher_state, batch: dict) -> tuple[TrainState, dict]:
        """:meth:`updated_state` if its metrics are finite and no earlier step went non-finite;
        else ``state`` unchanged, with the first bad step and its metrics recorded."""
        # The jitted updated_state that setup() traced for the metric names: tracing the step
        # again with the same shapes reuses that trace.
        new, metrics = self._updated(state.replace(bad_metrics={}), teacher_state, batch)
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

    def merge(self, state: TrainState) -> Trainables:
        """The student and connectors of ``state`` as modules."""
        return nnx.merge(self.graphdef, state.params, state.rest, self.rng_vars)

    def eval_logits(self, weights, images: Array) -> Array:
        """Eval-mode student logits; ``weights`` = (params, rest) of a :class:`TrainState`."""
        trainables = nnx.merge(self.graphdef, *weights, self.rng_vars)
        return trainables.student(images.astype(self.student_spec["dtype"]), train=False).logits

    # --- compiled entry points ----------------------------------------------------------------

    def compiled_step(self):
        if self._step is None:
            repl = sharding.replicated(self.mesh)
            state_sh = jax.tree.map(lambda _: repl, self.abstract_state)
            teacher_sh = (jax.tree.map(lambda _: repl, self.teacher.variables)
                          if self.teacher is not None else None)
            data_sh = sharding.batch_sharded(self.mesh)
            self._step = jax.jit(self.train_step, donate_argnums=(0,),
                                 in_shardings=(state_sh, teacher_sh, data_sh),
                                 out_shardings=(state_sh, repl))
        return self._step

    def init_state(self) -> TrainState:
        """The initial state, created directly with its (replicated) sharding; the student's
        weights come from ``student.checkpoint`` (a model dir) when the config names one."""
        if self._compiled_init is None:
            self._compiled_init = compile_unoptimized(self._init)
        state, _ = self._compiled_init()
        state = state.replace(bad_metrics=jax.device_put(
            {name: np.float32(0.0) for name in self.abstract_state.bad_metrics},
            sharding.replicated(self.mesh)))
        if self.student_checkpoint:
            weights = load_student_weights(self.student_checkpoint, self.student_spec, self.mesh)
            params, stats = nnx.split_state(weights, nnx.Param, nnx.BatchStat)
            _replace_student(state.params, params)
            _replace_student(state.rest, stats)
        elif self.backbone_checkpoint:
            weights = load_backbone_weights(*self.backbone_checkpoint, self.student_spec,
                                            self.mesh)
            params, stats = nnx.split_state(weights, nnx.Param, nnx.BatchStat)
            _replace_student(state.params, params, part="backbone")
            _replace_student(state.rest, stats, part="backbone")
        return state


def _metric_names(exp: Experiment, abstract_state, teacher_state, batch_shapes) -> list[str]:
    # With the step's own input shardings, so that compiling the step reuses this trace.
    def placed(tree, spec):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec), tree)

    _, metrics = jax.eval_shape(
        exp._updated, placed(abstract_state, sharding.replicated(exp.mesh)), teacher_state,
        placed(batch_shapes, sharding.batch_sharded(exp.mesh)))
    return sorted(metrics)


def setup(config: ml_collections.ConfigDict, *, mesh: jax.sharding.Mesh | None = None,
          student_config: ml_collections.ConfigDict | None = None,
          terms_config: ml_collections.ConfigDict | None = None,
          seed: int | None = None, materialize: bool = True) -> Experiment:
    """Builds the experiment of ``config`` and checks, without running anything, that every
    distillation term can pair its tensors (a bad pairing fails here, not at step 1,000).

    ``student_config``/``terms_config``/``seed`` override ``config.student``,
    ``config.distill.terms`` and ``config.seed`` (``kdjax compare`` trains several students).
    ``materialize=False`` leaves the teacher abstract (shapes only): the experiment can then be
    checked and inspected, but not run.
    """
    mesh = mesh or sharding.make_mesh()
    seed = config.seed if seed is None else seed
    info = dataset_info(config.data.name)
    num_classes, ignore_label = info.num_classes, info.ignore_label
    student_config = student_config or config.student
    terms_config = config.distill.terms if terms_config is None else terms_config
    sharding.check_batch_size(config.train.batch_size, mesh)
    terms = distill.parse_terms(terms_config, train_steps=config.train.steps)
    teacher = (load_teacher(config.teacher, num_classes=num_classes, mesh=mesh, seed=seed,
                            materialize=materialize) if terms else None)
    tx = make_optimizer(config.train)
    disc_tx = make_discriminator_optimizer(terms)
    exp = Experiment(config=config, mesh=mesh, num_classes=num_classes, ignore_label=ignore_label,
                     class_names=tuple(info.class_names),
                     terms=terms, graphdef=None, disc_graphdef=None, rng_vars=None,
                     disc_rng_vars=None, tx=tx, disc_tx=disc_tx,
                     teacher=teacher, student_spec={**model_spec(student_config, num_classes),
                                                    "dtype": jnp.dtype(student_config.dtype)},
                     student_checkpoint=student_config.checkpoint,
                     backbone_checkpoint=(
                         (student_config.backbone_checkpoint, student_config.backbone_source)
                         if student_config.backbone_checkpoint else None))
    crop = tuple(config.data.crop_size)
    batch_shapes = {
        "image": jax.ShapeDtypeStruct((config.train.batch_size, *crop, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((config.train.batch_size, *crop), jnp.int32)}

    def init():
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        student = build_model(student_config, num_classes=num_classes, rngs=rngs)
        if config.train.bn_stats == "per_device":
            set_batch_norm_groups(student, mesh.devices.size)
        student_out = jax.eval_shape(lambda x: distill.named_tensors(student(x, train=False)),
                                     batch_shapes["image"])
        teacher_out = (jax.eval_shape(exp.teacher_tensors, exp.teacher_inputs(),
                                      batch_shapes["image"]) if teacher is not None else {})
        connectors, discs = distill.build_term_modules(terms, student_out, teacher_out, rngs=rngs)
        graphdef, params, rest, rng_vars = nnx.split(Trainables(student, connectors), nnx.Param,
                                                     nnx.BatchStat, ...)
        disc_graphdef, disc_params, disc_rest, disc_rng_vars = nnx.split(
            discs, nnx.Param, nnx.BatchStat, ...)
        term_states = distill.init_term_states(terms, student_out, teacher_out,
                                               num_classes=num_classes,
                                               key=jax.random.key(seed + 2))
        state = TrainState(
            step=jnp.int32(0), rng=jax.random.key_data(jax.random.key(seed + 3)), params=params,
            rest=rest, opt_state=tx.init(params), disc_params=disc_params, disc_rest=disc_rest,
            disc_opt_state=disc_tx.init(disc_params), term_states=term_states,
            bad_step=jnp.int32(-1), bad_metrics={})
        exp.graphdef, exp.disc_graphdef = graphdef, disc_graphdef
        return state, (rng_vars, disc_rng_vars)

    # One jitted function for the experiment's lifetime: init_state() compiles the trace that
    # eval_shape makes here. Its state has no bad_metrics yet: their names come from the step.
    exp._init = jax.jit(init, out_shardings=sharding.replicated(mesh))
    first, _ = jax.eval_shape(exp._init)
    # The rng variables only seed dropout and are reseeded every step: constants of the step.
    # Only the rng variables survive XLA's dead-code elimination here: a cheap compilation.
    exp.rng_vars, exp.disc_rng_vars = compile_unoptimized(lambda: init()[1])()
    exp._updated = jax.jit(exp.updated_state)
    names = _metric_names(exp, first, exp.teacher_inputs(), batch_shapes)
    exp.abstract_state = first.replace(bad_metrics={
        name: jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
        for name in names})
    # One function object for the experiment's lifetime: evaluate() compiles once per function.
    exp.logits_fn = lambda weights, images: exp.eval_logits(weights, images)
    return exp


def _describe_bad(state: TrainState) -> str:
    metrics = jax.device_get(state.bad_metrics)
    bad = [f"{k}={float(v)}" for k, v in sorted(metrics.items()) if not np.isfinite(v)]
    return ", ".join(bad) or "a gradient"


def check_finite(state: TrainState, checkpoint_dir: Path) -> None:
    """Raises :class:`NonFiniteLossError` if any step so far went non-finite."""
    bad_step = int(jax.device_get(state.bad_step))
    if bad_step >= 0:
        raise NonFiniteLossError(
            f"the loss went non-finite at step {bad_step}: {_describe_bad(state)}. The state was "
            f"not updated from that step on, and the last good checkpoint in {checkpoint_dir} is "
            f"kept. Lower the learning rate or the weight of the named term, or enable "
            f"train.grad_clip, then rerun the same command to resume from that checkpoint.")


@dataclasses.dataclass
class RunResult:
    """What a finished training run reports."""

    step: int
    metrics: dict[str, float]        # last logged train metrics
    eval: dict[str, Any]             # the reported evaluation (see evaluate_state), with its
                                     # 'checkpoint' rule ('best'/'last') and 'checkpoint_step'
    state: TrainState                # the state of the reported checkpoint
    workdir: Path


def eval_mode(config) -> EvalMode:
    e = config.eval
    return EvalMode(mode=e.mode, crop_size=tuple(e.crop_size) if e.crop_size else None,
                    stride=tuple(e.stride) if e.stride else None, scales=tuple(e.scales),
                    flip=bool(e.flip))


def eval_batches(config, mesh) -> Iterator[dict]:
    """This process's eval batches assembled into global arrays."""
    local = make_eval_iterator(config.data, global_batch_size=config.eval.batch_size)
    for index, batch in enumerate(local):
        if config.eval.max_batches is not None and index >= config.eval.max_batches:
            break
        yield sharding.global_batch(batch, mesh)


def evaluate_student(exp: Experiment, state: TrainState):
    """``SegmentationMetrics`` of ``state``'s student on the validation split (config.eval)."""
    metrics, _ = evaluate(exp.logits_fn, eval_batches(exp.config, exp.mesh),
                          num_classes=exp.num_classes, ignore_label=exp.ignore_label,
                          eval_mode=eval_mode(exp.config), state=(state.params, state.rest))
    return metrics


def evaluate_state(exp: Experiment, state: TrainState) -> dict[str, Any]:
    """Validation metrics of ``state``'s student under the configured eval mode, in percent:
    ``miou``, ``pixel_accuracy``, ``mean_class_accuracy``, ``per_class_iou`` (name → IoU or None)
    and ``eval_mode`` (its description)."""
    metrics = evaluate_student(exp, state)
    return {**metrics.to_dict(exp.class_names), "eval_mode": eval_mode(exp.config).describe()}


def evaluate_network(network: Network, config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Validation metrics (percent, as :func:`evaluate_state`) of a frozen network, e.g. a
    converted teacher."""
    info = dataset_info(config.data.name)

    def logits(variables, images):
        return network.merge(variables)(images.astype(network.dtype), train=False).logits

    metrics, _ = evaluate(logits, eval_batches(config, mesh), num_classes=info.num_classes,
                          ignore_label=info.ignore_label, eval_mode=eval_mode(config),
                          state=network.variables)
    return {**metrics.to_dict(info.class_names), "eval_mode": eval_mode(config).describe()}


# Fields that do not change what a run computes; a resumed run may change them.
_RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.checkpoint_every",
                      "train.keep_checkpoints", "train.async_checkpoints", "eval", "distributed",
                      "seeds", "methods", "teacher_steps")


def recipe_fingerprint(config: ml_collections.ConfigDict) -> str:
    """The config as JSON without the fields in ``_RESUMABLE_CHANGES``."""
    values = config.to_dict()
    for dotted in _RESUMABLE_CHANGES:
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return json.dumps(values, sort_keys=True, default=str)


def check_same_recipe(saved: str | None, config: ml_collections.ConfigDict, workdir) -> None:
    """Refuses to resume a run whose recipe (config, minus logging fields) has changed."""
    if saved is None or saved == recipe_fingerprint(config):
        return
    old, new = json.loads(saved), json.loads(recipe_fingerprint(config))
    changed = sorted(_differences(old, new))
    raise ConfigError(
        f"{workdir} holds a run with another recipe (changed: {', '.join(changed[:8])}). Resuming "
        f"would mix two experiments; use a new --workdir, or revert the config.")


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [prefix.rstrip(".")] if old != new else []


def export_model(exp: Experiment, state: TrainState, directory: str | Path) -> Path:
    """Writes the student of ``state`` as a model dir (a teacher for later runs, or ``eval``)."""
    spec = {k: v for k, v in exp.student_spec.items() if k != "dtype"}
    save_model(directory, exp.merge(state).student, spec=spec, overwrite=True)
    return Path(directory)


def run_training(exp: Experiment, workdir: str | Path, *, label: str = "") -> RunResult:
    """Trains from the latest checkpoint in ``workdir`` (or from scratch) to ``train.steps``.

    A run killed at any point and started again with the same arguments resumes from its last
    checkpoint, sees the same batches from there on and ends in the same state.
    """
    config = exp.config
    workdir = Path(workdir)
    steps = config.train.steps
    checkpointer = TrainCheckpointer(workdir, keep_last=config.train.keep_checkpoints,
                                     async_save=config.train.async_checkpoints)
    repl = sharding.replicated(exp.mesh)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                          exp.abstract_state)
    if checkpointer.latest_step() is not None:
        state, saved_meta = checkpointer.restore(target)
        check_same_recipe(saved_meta.get("recipe"), config, workdir)
        log.info("resumed %s at step %d", workdir, int(state.step))
    else:
        state = exp.init_state()
    start = int(jax.device_get(state.step))
    step_fn = exp.compiled_step()
    teacher_state = exp.teacher_inputs()
    batches = make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                  seed=config.seed, start_step=start)
    logger = MetricsLog(workdir, total_steps=steps, global_batch_size=config.train.batch_size,
                        label=label)
    logger.start(start)
    meta = {"config": config_to_json(config), "recipe": recipe_fingerprint(config),
            "student": _json_spec(exp.student_spec)}
    last_metrics: dict[str, float] = {}
    try:
        for step in range(start + 1, steps + 1):
            batch = sharding.global_batch(next(batches), exp.mesh)
            state, metrics = step_fn(state, teacher_state, batch)
            final = step == steps
            if step % config.train.log_every == 0 or final:
                check_finite(state, workdir / "checkpoints")
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                logger.write(step, last_metrics)
            if step % config.train.eval_every == 0 or final:
                check_finite(state, workdir / "checkpoints")
                result = evaluate_state(exp, state)
                logger.write(step, {"miou": result["miou"],
                                    "pixel_accuracy": result["pixel_accuracy"]}, prefix="val")
                checkpointer.save_best(step, state, meta={**meta, "data_step": step,
                                                          "eval": result},
                                       metric_value=result["miou"])
                logger.start(step, compiles=False)  # evaluation time is not training throughput
            if step % config.train.checkpoint_every == 0 or final:
                check_finite(state, workdir / "checkpoints")
                checkpointer.save(step, state, meta={**meta, "data_step": step,
                                                     "metrics": last_metrics}, force=True)
        checkpointer.wait_until_finished()
        reported_state, reported_eval = _reported(exp, checkpointer, target, state)
    finally:
        checkpointer.close()
        logger.close()
    return RunResult(step=int(jax.device_get(state.step)), metrics=last_metrics,
                     eval=reported_eval, state=reported_state, workdir=workdir)


def _json_spec(spec: dict) -> dict:
    return {k: (str(v) if isinstance(v, jnp.dtype) or k == "dtype" else v)
            for k, v in spec.items()}


def _reported(exp: Experiment, checkpointer: TrainCheckpointer, target,
              last_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """The state and evaluation a run reports: the best checkpoint by val mIoU, or the last."""
    rule = exp.config.eval.checkpoint
    if rule == "best" and checkpointer.best_step() is not None:
        state, meta = checkpointer.restore_best(target)
        result = dict(meta["eval"])
    else:
        state, rule = last_state, "last"
        result = evaluate_state(exp, state)
    return state, {**result, "checkpoint": rule,
                   "checkpoint_step": int(jax.device_get(state.step))}
