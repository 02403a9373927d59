"""An experiment: everything static about a run, built from a config without running anything,
and its compiled entry points.

    exp = setup(config)                 # checks every term can pair its tensors
    state = exp.init_state()            # born with its sharding
    state, metrics = exp.step(state, batch)
    exp.evaluate(state)                 # mIoU on the config's validation set
    exp.export(state, "runs/x/model")   # a model directory

``setup`` builds the modules abstractly (``nnx.eval_shape``), so the graph definitions, the
abstract state and the metric names are known before anything is traced; ``init_state`` and
``step`` each compile once. The student, the teacher and the optimizer come from the config
unless ``setup`` is given modules or an optax transformation of the caller's own.

Batches follow one contract in :meth:`Experiment.step` and :meth:`Experiment.evaluate`: NumPy
arrays are this process's rows of the global batch (with one process, the whole batch), and
``jax.Array`` values are global arrays, taken as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from kdjax import distill
from kdjax.data.metadata import DatasetInfo, dataset_info
from kdjax.evaluation.validation import validate
from kdjax.io.model_dir import WEIGHTS, save_model
from kdjax.io.networks import (Network, build_model, load_backbone_weights, load_student_weights,
                               load_teacher, model_spec)
from kdjax.models.layers import set_batch_norm_groups
from kdjax.ops.cost import traced_flops
from kdjax.ops.kernels import resolve_loss_scratch
from kdjax.runtime import sharding
from kdjax.runtime.compilation import UNOPTIMIZED
from kdjax.training.optimizer import make_discriminator_optimizer, make_optimizer
from kdjax.training.state import Trainables, Trained, TrainState, check_only_weights
from kdjax.training.step import (ModuleParts, StepParts, check_finite, classifier_kernel,
                                 make_train_step)

Array = jax.Array


def teacher_tensors(network: Network, variables, images: Array) -> dict[str, Array]:
    """The frozen teacher's named tensors (inference mode, no gradient) for (N, H, W, 3) images."""
    out = network.merge(variables)(images.astype(network.dtype), train=False)
    return jax.tree.map(jax.lax.stop_gradient, distill.named_tensors(out))


def _abstract(tree):
    """``tree`` with each array replaced by its ``jax.ShapeDtypeStruct``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _frozen_network(module: nnx.Module, mesh: jax.sharding.Mesh) -> Network:
    """A module of the caller's own as the frozen teacher: its weights replicated over ``mesh``,
    computing in the module's own dtype (images enter as float32)."""
    graphdef, state, extras = nnx.split(module, WEIGHTS, ...)
    repl = sharding.replicated(mesh)
    return Network(graphdef=graphdef, state=jax.device_put(state, repl, may_alias=False),
                   extras=jax.device_put(extras, repl, may_alias=False),
                   dtype=jnp.dtype(jnp.float32))


def _replaced(weights, new, part: str | None = None):
    """A student's weights (``nnx.State``) with ``new`` (same structure and shapes) in place of
    them all or of their ``part``."""
    old = weights if part is None else weights[part]
    old_leaves, new_leaves = jax.tree.leaves(old), jax.tree.leaves(new)
    if [x.shape for x in old_leaves] != [x.shape for x in new_leaves]:
        raise ValueError("the given student weights do not fit the configured student; build "
                         "them for the same model spec (name, widths, classes).")
    placed = jax.tree.unflatten(jax.tree.structure(old), new_leaves)
    if part is None:
        return placed
    weights[part] = placed
    return weights


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The static side of a run and its compiled entry points; build it with :func:`setup`.

    Attributes:
      config: the run's config.
      mesh: the ``('data',)`` device mesh.
      dataset: the dataset's metadata (classes, ignore label, names).
      terms: the parsed distillation terms.
      teacher: the frozen teacher (None without terms).
      student_spec: the student's ``build_segmentor`` arguments, plus its compute ``dtype``
        (for a module given to :func:`setup`, its recorded ``spec`` if it has one, and float32:
        the module casts for itself).
      abstract_state: the :class:`TrainState` as ``jax.ShapeDtypeStruct`` with shardings.
      metric_names: the names of the metrics :meth:`step` returns.
      abstract_batch: the global batch the step takes, as ``jax.ShapeDtypeStruct``.

    :meth:`step` is the one train step; :meth:`compile` gives its executable, ``(state, teacher
    variables, global batch) -> (state, metrics)`` with explicit shardings and ``state``
    donated (:func:`kdjax.training.step.make_train_step`), for a loop of your own.
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    dataset: DatasetInfo
    terms: tuple[distill.Term, ...]
    teacher: Network | None
    student_spec: dict
    abstract_state: TrainState
    metric_names: tuple[str, ...]
    step_parts: StepParts
    abstract_batch: dict
    _init: Any                 # (student weights) -> the initial state
    _compiled_step: Any
    _step_flops: Any
    # () -> the student's weights drawn from the seed; None for a module given to setup().
    _seeded_student: Any = None
    # The student's weights as the init takes them, abstract.
    _abstract_student_weights: Any = None
    # The weights of a student module given to setup(), replicated: init_state's default.
    _student_weights: Any = None

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.dataset.class_names)

    def teacher_inputs(self):
        """The teacher variables the compiled step takes (None without a teacher)."""
        return self.teacher.variables if self.teacher is not None else None

    def global_batch(self, batch: Mapping[str, Any]) -> dict[str, Array]:
        """``batch`` as global arrays sharded over the mesh's ``'data'`` axis.

        NumPy arrays (any value that is not a ``jax.Array``) are this process's rows: every
        process passes its own ``N / process_count`` rows and gets the global batch of N.
        ``jax.Array`` values are global arrays and are taken as they are; one that lives on this
        process's devices with another sharding is moved to the batch sharding.
        """
        local = {k: v for k, v in batch.items() if not isinstance(v, jax.Array)}
        out = {**batch, **(sharding.global_batch(local, self.mesh) if local else {})}
        target = sharding.batch_sharded(self.mesh)
        return {k: v if not v.is_fully_addressable or v.sharding.is_equivalent_to(target, v.ndim)
                else jax.device_put(v, target) for k, v in out.items()}

    def step(self, state: TrainState, batch: Mapping[str, Any], *,
             nonfinite: str = "raise") -> tuple[TrainState, dict[str, Array]]:
        """One train step.

        Args:
          state: the train state; donated: use the returned one.
          batch: ``'image'`` (N, H, W, 3) float32 and ``'label'`` (N, H, W) int32, N the global
            batch size; NumPy arrays are this process's rows (:meth:`global_batch`).
          nonfinite: ``'raise'`` waits for the step and raises :class:`NonFiniteLossError`,
            naming the terms and the step, when its loss or gradient is not finite.
            ``'freeze'`` returns without waiting, so that steps queue up on the devices: a
            non-finite step then leaves the state as it was, as does every later step, and
            :meth:`check_finite` raises the same error when called.

        Returns:
          ``(state, metrics)``: the new state and the step's float32 scalar metrics
          (:attr:`metric_names`).
        """
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}; got {nonfinite!r}.")
        state, metrics = self._compiled_step(state, self.teacher_inputs(), self.global_batch(batch))
        if nonfinite == "raise":
            check_finite(state)
        return state, metrics

    def check_finite(self, state: TrainState) -> None:
        """Raises :class:`NonFiniteLossError`, naming the terms and the step, if any step that
        led to ``state`` went non-finite; waits for the device."""
        check_finite(state)

    def init_state(self, *, student: nnx.Module | None = None) -> TrainState:
        """The initial state, created directly with its (replicated) sharding.

        The student's weights come from ``student`` (a module of the student's structure, e.g.
        from :func:`kdjax.convert.from_torch`) if given, else from the module given to
        :func:`setup`, else from ``student.checkpoint`` (a model dir) or
        ``student.backbone_checkpoint`` when the config names one, else from the seed.
        """
        weights, part = self._given_student_weights(student)
        if weights is None or part is not None:
            # From the seed: the whole student, or what a backbone checkpoint leaves of it.
            weights = (self._seeded_student() if weights is None
                       else _replaced(self._seeded_student(), weights, part))
        state = self._init(weights)
        return state.replace(bad_metrics=jax.device_put(
            {name: np.float32(0.0) for name in self.metric_names}, sharding.replicated(self.mesh)))

    def _given_student_weights(self, student: nnx.Module | None) -> tuple[Any, str | None]:
        """The student's weights that :meth:`init_state` does not draw from the seed, replicated,
        and the part of the student they are (None: all of it); (None, None) when there are
        none."""
        student_config = self.config.student
        part, weights = None, None
        # The init reads them into a state of its own: the step that is donated that state
        # leaves these arrays as they are.
        if student is not None:
            weights = jax.device_put(nnx.state(student, WEIGHTS), sharding.replicated(self.mesh))
        elif self._student_weights is not None:
            weights = self._student_weights
        elif student_config.checkpoint:
            weights = load_student_weights(student_config.checkpoint, self.student_spec, self.mesh)
        elif student_config.backbone_checkpoint:
            part = "backbone"
            weights = load_backbone_weights(student_config.backbone_checkpoint,
                                            student_config.backbone_source, self.student_spec,
                                            self.mesh)
        if weights is not None and part is None:
            weights = _replaced(self._abstract_student_weights, weights)
        return weights, part

    def compile(self) -> jax.stages.Compiled:
        """Compiles the programs of :meth:`init_state` and :meth:`step` without running them, once
        per experiment; returns the step's executable ``(state, teacher variables, global batch)
        -> (state, metrics)``, ``state`` donated. In JAX's persistent compilation cache the programs also
        serve every experiment of the same programs, in this process or a later one (an
        abstract teacher's included: the teacher's weights are an argument of the step). Safe
        to call from several threads."""
        self._init.get()
        if self._seeded_student is not None:
            self._seeded_student.get()
        return self._compiled_step.get()

    def with_trained_teacher(self, teacher: Network | None = None) -> Experiment:
        """This experiment with its teacher's weights, where ``setup(materialize=False)`` left
        them abstract (the teacher was not trained yet); its programs, compiled or not, serve
        both. Itself when the teacher is already concrete.

        Args:
          teacher: the trained teacher, as :func:`trained_teacher` reads it (the runs of one
            teacher can share one); default: read from ``teacher.checkpoint``.

        Raises:
          ValueError: the saved teacher's shapes differ from those the programs were built for.
        """
        if self.teacher is None or not any(isinstance(leaf, jax.ShapeDtypeStruct)
                                           for leaf in jax.tree.leaves(self.teacher.variables)):
            return self
        config = self.config
        if teacher is None:
            teacher = trained_teacher(config, self.mesh)
        built, saved = (jax.tree.map(lambda x: (x.shape, str(x.dtype)), t.variables)
                        for t in (self.teacher, teacher))
        if built != saved or teacher.graphdef != self.teacher.graphdef:
            raise ValueError(f"the teacher in {config.teacher.checkpoint} is not the network "
                             "this experiment was built for; build it again with setup().")
        return dataclasses.replace(self, teacher=teacher)

    def step_flops(self) -> float:
        """The floating-point operations of one train step's matrix products and convolutions
        (:func:`kdjax.ops.cost.traced_flops`), counted once from the trace that the step is
        compiled from: nothing runs."""
        return self._step_flops.get()

    def merge(self, state: TrainState) -> Trainables:
        """The student and its terms' modules of ``state`` as modules."""
        return self.step_parts.student.merge(state.student.params, state.student.batch_stats)

    def eval_logits(self, weights, images: Array) -> Array:
        """Eval-mode student logits; ``weights`` = (params, batch_stats) of a train state's
        ``student``."""
        trainables = self.step_parts.student.merge(*weights)
        return trainables.student(images.astype(self.student_spec["dtype"]), train=False).logits

    def evaluate(self, state: TrainState,
                 batches: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Metrics of ``state``'s student in percent, in the config's eval mode.

        Args:
          state: a train state.
          batches: dicts with ``'image'`` (N, H, W, 3) float32, ``'label'`` (N, H, W) int32 and
            optionally ``'valid'`` (N,) bool (False marks a filler image), under the same
            contract as :meth:`step`: NumPy arrays are this process's rows, ``jax.Array`` values
            global arrays. None evaluates on the config's validation set.

        Returns:
          ``miou``, ``pixel_accuracy``, ``mean_class_accuracy`` (percent), ``per_class_iou``
          (class name → percent, None for a class absent from the labels) and ``eval_mode`` (its
          description).
        """
        if batches is not None:
            batches = map(self.global_batch, batches)
        return validate(self._logits_fn, (state.student.params, state.student.batch_stats),
                        self.config, self.mesh, batches)

    @functools.cached_property
    def _logits_fn(self):
        # One function object for the experiment's lifetime: evaluation compiles per function.
        return lambda weights, images: self.eval_logits(weights, images)

    def export(self, state: TrainState, directory) -> Any:
        """Writes the student of ``state`` as a model dir (a teacher for later runs, or ``eval``);
        returns its path. The student must be a kdjax segmentor (it records the ``spec`` that
        rebuilds it)."""
        student = self.merge(state).student
        if getattr(student, "spec", None) is None:
            raise ValueError(
                "export writes kdjax segmentors (from kdjax.models.build_segmentor or "
                "kdjax.convert.from_torch), and this student records no spec; save a module of "
                "your own with its state instead: nnx.state(exp.merge(state).student).")
        save_model(directory, student, overwrite=True)
        return directory


PRECISIONS = ("float32", "bfloat16")
# What Experiment.step does about a non-finite loss or gradient.
NONFINITE = ("raise", "freeze")


def with_precision(model: ml_collections.ConfigDict, precision: str) -> ml_collections.ConfigDict:
    """``model`` with the compute dtype of ``train.precision``: 'bfloat16' makes it bfloat16,
    'float32' keeps the model's own ``dtype``. Parameters are float32 either way."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}; got {precision!r}.")
    if precision == "float32":
        return model
    return ml_collections.ConfigDict({**model.to_dict(), "dtype": precision})


def trained_teacher(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Network:
    """The teacher of ``config`` read from ``teacher.checkpoint``, replicated over ``mesh``, in
    the compute dtype of ``train.precision``."""
    return load_teacher(with_precision(config.teacher, config.train.precision),
                        num_classes=dataset_info(config.data.name).num_classes, mesh=mesh,
                        seed=config.seed)


def setup(config: ml_collections.ConfigDict, *, student: nnx.Module | None = None,
          teacher: nnx.Module | None = None,
          optimizer: optax.GradientTransformation | None = None,
          mesh: jax.sharding.Mesh | None = None,
          student_config: ml_collections.ConfigDict | None = None,
          terms_config: ml_collections.ConfigDict | None = None,
          seed: int | None = None, materialize: bool = True) -> Experiment:
    """Builds the experiment of ``config`` and checks, without running anything, that every
    distillation term can pair its tensors (a bad pairing fails here, not at step 1,000).

    Args:
      config: the experiment config (:func:`kdjax.config.load_config`).
      student: an NNX module to train in place of ``config.student``, with its current weights
        as the initial ones. Called as ``student(images, train=bool)`` on (N, H, W, 3) float32
        images, it returns a :class:`kdjax.models.SegmentorOutput`: ``logits`` (N, h, w, K),
        ``aux_logits`` or None, and the named ``features`` the terms pair. If its call takes
        ``rngs``, training passes its dropout keys as ``rngs=nnx.Rngs(dropout=key)``, a fresh key
        each step. Its state is ``nnx.Param`` and ``nnx.BatchStat`` variables only, which are
        trained and checkpointed (build its ``nnx.Dropout`` without rngs). It computes in its
        own dtype (``train.precision`` applies to config-built models).
      teacher: an NNX module with the same calling convention to distil from in place of
        ``config.teacher``; frozen, run in inference mode (``train=False``).
      optimizer: an optax transformation for every trainable parameter (the student's and the
        terms' connectors and modules) in place of the config's (``train.optimizer``, its
        schedule, weight decay and clipping, and per-term gradient clips such as Af-DCD's).
      mesh: the ``('data',)`` device mesh; default: every device of every process.
      student_config: overrides ``config.student``.
      terms_config: overrides ``config.distill.terms``.
      seed: overrides ``config.seed``.
      materialize: False leaves the teacher abstract (shapes only): the experiment can then be
        checked and inspected, but not run.

    The student modules that the terms group declares (:mod:`kdjax.distill.terms`) are built
    beside the connectors, and the pairing check sees their outputs.

    Raises:
      ValueError: a term that cannot pair its tensors, a batch size that the devices do not
        divide, a ``teacher`` without distillation terms, and the config's own errors.
    """
    mesh = mesh or sharding.make_mesh()
    seed = config.seed if seed is None else seed
    info = dataset_info(config.data.name)
    student_config = with_precision(student_config or config.student, config.train.precision)
    terms_config = config.distill.terms if terms_config is None else terms_config
    sharding.check_batch_size(config.train.batch_size, mesh)
    terms = distill.parse_terms(terms_config, train_steps=config.train.steps)
    _check_given_modules(terms, student, teacher)
    if teacher is not None:
        teacher = _frozen_network(teacher, mesh)
    elif terms:
        teacher = load_teacher(with_precision(config.teacher, config.train.precision),
                               num_classes=info.num_classes, mesh=mesh, seed=seed,
                               materialize=materialize)
    images = jax.ShapeDtypeStruct((config.train.batch_size, *config.data.crop_size, 3),
                                  jnp.float32)
    given = _GivenStudent.of(student, mesh) if student is not None else None
    student_modules = distill.parse_student_modules(terms_config, terms)
    modules = _module_builder(config, student_config, given, teacher, terms, student_modules,
                              info, mesh, seed, images)
    tx = optimizer if optimizer is not None else make_optimizer(config.train, terms)
    parts, init_jit, abstract_state, abstract_weights = _state_and_step_parts(
        modules, tx, terms, student_modules, teacher, config, info, mesh, seed,
        student_dtype=jnp.dtype(student_config.dtype if student is None else jnp.float32))
    step, abstract_batch = _jitted_step(parts, abstract_state, teacher, images, mesh)
    spec = (model_spec(student_config, info.num_classes) if student is None
            else dict(getattr(student, "spec", None) or {}))
    teacher_variables = teacher.variables if teacher is not None else None
    # One trace of the step serves its compile and its FLOPs count (a trace takes seconds).
    traced = _Once(lambda: step.trace(abstract_state, teacher_variables, abstract_batch))
    return Experiment(
        config=config, mesh=mesh, dataset=info, terms=terms, teacher=teacher,
        student_spec={**spec, "dtype": parts.student_dtype},
        # The step's metric names, sorted, as the abstract state's bad_metrics holds them.
        abstract_state=abstract_state, metric_names=tuple(abstract_state.bad_metrics),
        step_parts=parts, abstract_batch=abstract_batch,
        # Runs once per experiment: compiled without optimisation (kdjax.runtime.compilation).
        _init=_Once(lambda: init_jit.lower(abstract_weights).compile(UNOPTIMIZED)),
        _compiled_step=_Once(lambda: traced.get().lower().compile()),
        _step_flops=_Once(lambda: traced_flops(traced.get())),
        _seeded_student=(None if given is not None
                         else _seeded_student_program(student_config, info, mesh, seed)),
        _abstract_student_weights=abstract_weights,
        _student_weights=given.weights if given is not None else None)


def _check_given_modules(terms: tuple[distill.Term, ...], student: nnx.Module | None,
                         teacher: nnx.Module | None) -> None:
    """What a student or teacher module given to :func:`setup` must have for the terms."""
    if teacher is not None and not terms:
        raise ValueError("a teacher module was given, but config.distill.terms is empty: set the "
                         "terms it should teach (e.g. config.distill.terms = "
                         "config.methods.cwd_logits).")
    if student is not None and classifier_kernel(student) is None:
        for term in terms:
            if term.adapter.reads_classifier:
                raise ValueError(f"{term.describe()} reads the student's 1×1 classifier at "
                                 "student.head.classifier, which the given student module "
                                 "lacks.")


@dataclasses.dataclass(frozen=True)
class _GivenStudent:
    """A student module given to :func:`setup`: its graph, its variables' shapes, and a copy of
    its weights as they are now (whatever the caller does with the module later), replicated."""

    graphdef: Any
    abstract: Any
    weights: Any

    @classmethod
    def of(cls, student: nnx.Module, mesh: jax.sharding.Mesh) -> _GivenStudent:
        check_only_weights(student, "the student module given to setup()")
        graphdef, state = nnx.split(student)
        return cls(graphdef=graphdef, abstract=_abstract(state),
                   weights=jax.device_put(nnx.state(student, WEIGHTS),
                                          sharding.replicated(mesh), may_alias=False))


def _module_builder(config, student_config, given: _GivenStudent | None,
                    teacher: Network | None, terms, student_modules, info: DatasetInfo,
                    mesh, seed: int, images: jax.ShapeDtypeStruct) -> Callable[[], tuple]:
    """``modules() -> (trainables, discriminators, term states, student tensor shapes)``: every
    module the state holds, from the seed; traced abstractly by :func:`setup` and for real by the
    compiled init."""

    def modules():
        rngs = nnx.Rngs(params=seed)
        if given is None:
            net = build_model(student_config, num_classes=info.num_classes, rngs=rngs)
        else:
            # Zeros of the given module's shapes, not its arrays: these would become constants
            # of the compiled init. init_state puts its weights in.
            net = nnx.merge(given.graphdef, jax.tree.map(
                lambda x: jnp.zeros(x.shape, x.dtype), given.abstract))
        if config.train.bn_stats == "per_device":
            set_batch_norm_groups(net, mesh.devices.size)
        student_out = jax.eval_shape(lambda x: distill.named_tensors(net(x, train=False)),
                                     images)
        # The student modules' outputs join the student's tensors that the terms pair on.
        extra, student_out = distill.build_student_modules(student_modules, student_out,
                                                           rngs=rngs)
        if config.train.bn_stats == "per_device":
            set_batch_norm_groups(extra, mesh.devices.size)
        teacher_out = (jax.eval_shape(functools.partial(teacher_tensors, teacher),
                                      teacher.variables, images) if teacher is not None else {})
        term_modules, discs = distill.build_term_modules(terms, student_out, teacher_out,
                                                         rngs=rngs, student_modules=extra)
        states = distill.init_term_states(terms, student_out, teacher_out,
                                          num_classes=info.num_classes,
                                          key=jax.random.key(seed + 2))
        return Trainables(net, term_modules), discs, states, student_out

    return modules


# The seeded students' programs of this process, the latest few: a comparison's methods train the
# same student from the same seed, and the unoptimised program, long straight-line code, takes
# seconds to read back from the persistent cache each time.
_SEEDED_STUDENT_PROGRAMS: dict[tuple, _Once] = {}
_SEEDED_STUDENT_PROGRAMS_KEPT = 4
_SEEDED_STUDENT_PROGRAMS_LOCK = threading.Lock()


def _seeded_student_program(student_config: ml_collections.ConfigDict, info: DatasetInfo, mesh,
                            seed: int) -> _Once:
    """The compiled :func:`_seeded_student` (``UNOPTIMIZED``), one per student config, class
    count, mesh and seed in this process; compiled on its first call."""
    key = (student_config.to_json_best_effort(sort_keys=True), info.num_classes, mesh, seed)
    with _SEEDED_STUDENT_PROGRAMS_LOCK:
        program = _SEEDED_STUDENT_PROGRAMS.pop(key, None) or _Once(
            lambda: _seeded_student(student_config, info, mesh, seed).lower().compile(
                UNOPTIMIZED))
        _SEEDED_STUDENT_PROGRAMS[key] = program          # now the latest
        while len(_SEEDED_STUDENT_PROGRAMS) > _SEEDED_STUDENT_PROGRAMS_KEPT:
            del _SEEDED_STUDENT_PROGRAMS[next(iter(_SEEDED_STUDENT_PROGRAMS))]
    return program


def _seeded_student(student_config: ml_collections.ConfigDict, info: DatasetInfo, mesh,
                    seed: int):
    """The jitted student weights drawn from ``seed`` (replicated): the first draws of the
    experiment's key stream (:func:`_module_builder`), one program for every method that
    trains this student."""

    def weights():
        net = build_model(student_config, num_classes=info.num_classes,
                          rngs=nnx.Rngs(params=seed))
        return nnx.state(net, WEIGHTS)

    return jax.jit(weights, out_shardings=sharding.replicated(mesh))


def _state_and_step_parts(modules: Callable[[], tuple], tx: optax.GradientTransformation,
                          terms, student_modules, teacher: Network | None, config,
                          info: DatasetInfo, mesh, seed: int, *,
                          student_dtype) -> tuple[StepParts, Any, TrainState, Any]:
    """The static parts of the step, the jitted init (replicated; it takes the student's
    weights), the abstract state, with its ``bad_metrics`` named by the step's metrics, and the
    abstract student weights the init takes."""
    abstract_trainables, abstract_discs, _, student_out = nnx.eval_shape(modules)

    def module_parts(abstract: nnx.Module, optimizer, what: str) -> ModuleParts:
        check_only_weights(abstract, what)
        return ModuleParts(graphdef=nnx.graphdef(abstract), tx=optimizer)

    student_parts = module_parts(abstract_trainables, tx, "the student and its terms' modules")
    discriminator_parts = module_parts(abstract_discs, make_discriminator_optimizer(terms),
                                       "the terms' discriminators")

    def trained(modules: nnx.Module, optimizer: optax.GradientTransformation) -> Trained:
        _, params, batch_stats = nnx.split(modules, nnx.Param, nnx.BatchStat)
        return Trained(params=params, batch_stats=batch_stats, opt_state=optimizer.init(params))

    def init(student_weights) -> TrainState:
        trainables, discs, states, _ = modules()
        # The student's weights are an argument, so that the seeded ones come from a program
        # that every method shares (the init compiles once per method): the student drawn above
        # still advances the key stream that the terms' modules draw from after it, and XLA
        # drops the arrays it would make.
        nnx.update(trainables.student, student_weights)
        return TrainState(
            step=jnp.int32(0), rng=jax.random.key_data(jax.random.key(seed + 3)),
            student=trained(trainables, student_parts.tx),
            discriminators=trained(discs, discriminator_parts.tx), term_states=states,
            bad_step=jnp.int32(-1), bad_metrics={})

    repl = sharding.replicated(mesh)
    # One jitted init for the experiment's lifetime: compiling it reuses the trace that
    # eval_shape makes here.
    init_jit = jax.jit(init, out_shardings=repl)
    abstract_weights = sharding.placed(nnx.state(abstract_trainables.student, WEIGHTS), repl)
    has_aux_ce = "aux_logits" in student_out and bool(config.train.aux_weight)
    names = distill.metric_names(terms, aux_ce=has_aux_ce)
    abstract_state = init_jit.eval_shape(abstract_weights).replace(
        bad_metrics=sharding.placed({n: jax.ShapeDtypeStruct((), jnp.float32) for n in names},
                                    repl))
    parts = StepParts(
        student=student_parts, discriminators=discriminator_parts, terms=terms,
        student_modules=student_modules,
        teacher=functools.partial(teacher_tensors, teacher) if teacher is not None else None,
        student_dtype=student_dtype, num_classes=info.num_classes,
        ignore_label=info.ignore_label, aux_weight=config.train.aux_weight,
        total_steps=config.train.steps,
        loss_scratch_bytes=resolve_loss_scratch(config.distill.loss_scratch_mb))
    return parts, init_jit, abstract_state, abstract_weights


def _jitted_step(parts: StepParts, abstract_state: TrainState, teacher: Network | None,
                 images: jax.ShapeDtypeStruct, mesh) -> tuple[Any, dict]:
    """The jitted train step with explicit shardings and a donated state, and its abstract
    global batch. With terms, the step is traced here, abstractly: every term meets its tensors,
    so a pairing that cannot work fails at setup (the step's compilation later reuses the
    trace)."""
    repl = sharding.replicated(mesh)
    state_sh = jax.tree.map(lambda s: s.sharding, abstract_state)
    teacher_sh = jax.tree.map(lambda _: repl, teacher.variables) if teacher is not None else None
    step = jax.jit(make_train_step(parts), donate_argnums=(0,),
                   in_shardings=(state_sh, teacher_sh, sharding.batch_sharded(mesh)),
                   out_shardings=(state_sh, repl))
    abstract_batch = sharding.placed(
        {"image": images, "label": jax.ShapeDtypeStruct(images.shape[:3], jnp.int32)},
        sharding.batch_sharded(mesh))
    if parts.terms:
        step.eval_shape(abstract_state, teacher.variables, abstract_batch)
    return step, abstract_batch


class _Once:
    """A value (a trace, a compiled program, a count) made on the first call of :meth:`get`
    only, whichever thread makes it; calling it calls the value (runs a compiled program)."""

    def __init__(self, make: Callable[[], Any]):
        self._make = make
        self._value = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._value is None:
                self._value = self._make()
        return self._value

    def __call__(self, *args):
        return self.get()(*args)
