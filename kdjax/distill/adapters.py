"""One adapter per loss kind: how the objective calls a loss of :mod:`kdjax.losses`.

An adapter says which tensors the loss reads (the student and teacher tensors of its term, the
labels, the student's classifier), which state it threads through the train state (CIRKD's
queues, FAKD's class covariance), which options configure that state rather than the call, what
parts it reports as metrics, and whether it trains a discriminator of its own. ``ADAPTERS``
holds every kind by the name a config's ``loss`` field uses.

Adding a loss: write the pure function in ``kdjax/losses/``, register an adapter here (a plain
``pair_adapter(name, options=...)`` when it is called as ``f(student, teacher, **options)``), and
register the method that uses it in :mod:`kdjax.config.methods`. A loss whose student side passes
through a module of its own (Af-DCD's masked generator, CIRKDv2's projection of pooled features)
declares it as the adapter's ``student_module``. Each adapter also says how to call its loss on
the example problem (:class:`Example`), which ``kdjax loss-demo`` and the tests run for every
registered kind.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import losses
from kdjax.models import CirkdProjectionHead, MaskedGenerator, SaganDiscriminator

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class TermInputs:
    """Everything a term may read in one step."""

    student: Mapping[str, Array]   # every named student tensor (before connectors)
    teacher: Mapping[str, Array]   # every named teacher tensor
    labels: Array                  # (N, H, W) int
    step: Array
    key: Array                     # this step's key; each term folds in its index
    classifier_kernel: Array       # the student classifier's (1, 1, C, K) kernel
    num_classes: int
    ignore_label: int
    total_steps: int
    scratch_bytes: int | None = None   # the budget of losses that loop over chunks (FAKD-CWD,
                                       # the contrast): distill.loss_scratch_mb, resolved


@dataclasses.dataclass(frozen=True)
class TermCall:
    """One term's call in one step: its tensors (the student's after its connector), the options
    of the loss call (``mask`` included when the term masks), its state and its key."""

    term: Any                      # kdjax.distill.terms.Term
    student: Array
    teacher: Array
    student_channels: int          # the student tensor's channels before the connector
    options: dict[str, Any]
    inputs: TermInputs
    state: Any
    discriminator: nnx.Module | None
    key: Array
    student_module: nnx.Module | None = None   # the adapter's own module; ``student`` is then
                                               # the raw student tensor (no connector)
    train: bool = True


# (value, {part: value}, new state)
Computed = tuple[Array, dict[str, Array], Any]


@dataclasses.dataclass(frozen=True)
class Example:
    """How a loss kind runs on the example problem (:mod:`kdjax.distill.examples`): one term
    between the student's and the teacher's ``'logits'`` (6 classes) or ``'head'`` feature (8
    student channels, 16 teacher channels) on maps of ``size``, through ``connector`` where the
    loss needs equal channels, with ``options`` that fit the problem's size."""

    student: str = "logits"
    teacher: str = "logits"
    connector: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    size: tuple[int, int] = (12, 16)


FEATURES = dict(student="head", teacher="head")


@dataclasses.dataclass(frozen=True)
class LossAdapter:
    """How the objective calls one loss kind.

    Attributes:
      name: the config's ``loss`` value.
      compute: ``compute(call) -> (value, parts, new_state)``.
      functions: the loss functions of :mod:`kdjax.losses` that ``compute`` calls (those that
        return a loss value).
      options: the keyword arguments of those functions that a term may set (``call.options``);
        the objective supplies the rest (tensors, labels, state, keys, ``mask``).
      state_options: options that configure the state, the parts or the discriminator, with their
        defaults; they are not passed to the loss call.
      parts: names of the parts ``compute`` reports (metrics ``kd/<term>/<part>``).
      init_state: ``init_state(term, student_shapes, teacher_shapes, num_classes, key)``, the
        initial state of a stateful loss; None for a stateless one.
      discriminator: ``discriminator(term, channels, rngs)``, a module trained by its own optimizer
        on ``discriminator_loss``; None when the loss has none.
      discriminator_loss: ``(discriminator(student), discriminator(teacher)) -> loss``.
      student_module: ``student_module(term, student_channels, teacher_channels, rngs)``, a
        module trained with the student that ``compute`` applies to the raw student tensor itself
        (it takes the place of a connector); None when the loss has none. A state option
        ``grad_clip`` clips its gradient alone (:func:`kdjax.training.optimizer.make_optimizer`).
      reads_classifier: whether ``compute`` reads the student's 1×1 classifier
        (``TermInputs.classifier_kernel``); a student module without one is refused at setup.
      example: how the loss runs on the example problem.
      forward_mode: whether ``jax.jvp`` works through ``compute``: False where a loss writes out
        its backward pass (``jax.custom_vjp``; docs/losses.md).
    """

    name: str
    compute: Callable[[TermCall], Computed]
    functions: tuple[Callable, ...]
    options: tuple[str, ...] = ()
    state_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    parts: tuple[str, ...] = ()
    init_state: Callable[..., Any] | None = None
    discriminator: Callable[..., nnx.Module] | None = None
    discriminator_loss: Callable[[Array, Array], Array] | None = None
    student_module: Callable[..., nnx.Module] | None = None
    reads_classifier: bool = False
    example: Example = Example()
    forward_mode: bool = True

    def accepted_options(self) -> set[str]:
        return set(self.options) | set(self.state_options)


ADAPTERS: dict[str, LossAdapter] = {}


def register(adapter: LossAdapter) -> LossAdapter:
    """Adds ``adapter`` to ``ADAPTERS`` under its name."""
    if adapter.name in ADAPTERS:
        raise ValueError(f"a loss adapter named {adapter.name!r} is registered already.")
    ADAPTERS[adapter.name] = adapter
    return adapter


def pair_adapter(name: str, *, function: Callable[..., Array] | None = None,
                 options: tuple[str, ...] = (), example: Example = Example(),
                 forward_mode: bool = True) -> LossAdapter:
    """The adapter of a loss called as ``function(student, teacher, **options)``:
    ``kdjax.losses.<name>`` unless ``function`` is given (a loss of your own)."""
    fn = function or getattr(losses, name)
    return LossAdapter(name=name, functions=(fn,), options=options, example=example,
                       forward_mode=forward_mode,
                       compute=lambda call: (fn(call.student, call.teacher, **call.options), {},
                                             call.state))


RELATIONAL = ("pool", "form", "block_size")
register(pair_adapter("pixel_kd", options=("temperature", "normalize")))
register(pair_adapter("weighted_pixel_imitation", options=("temperature", "gap_weight")))
register(pair_adapter("dist", options=("beta", "gamma", "tau", "group_size")))
register(pair_adapter("normalized_feature_distillation",
                      options=("axes", "normalize_student", "eps", "ddof", "distance"),
                      example=Example(**FEATURES, connector="conv"), forward_mode=False))
register(pair_adapter("fitnet", example=Example(**FEATURES, connector="conv")))
register(pair_adapter("attention_transfer", example=Example(**FEATURES)))
register(pair_adapter("pixel_feature_similarity", options=RELATIONAL,
                      example=Example(**FEATURES)))
register(pair_adapter("skd_pairwise", options=(*RELATIONAL, "norm"),
                      example=Example(**FEATURES)))
register(pair_adapter("cirkd_minibatch", options=("tau", "group_size", "block_size"),
                      example=Example(**FEATURES, connector="conv"), forward_mode=False))


def _channel_wise(call: TermCall) -> Computed:
    # c_norm='student': divide by the student's own channels before its connector, as CIRKD
    # does for feature CWD (docs/methods.md §1.3).
    options = dict(call.options)
    if options.get("c_norm") == "student":
        options["c_norm"] = call.student_channels
    return losses.channel_wise_divergence(call.student, call.teacher, **options), {}, call.state


register(LossAdapter(name="channel_wise_divergence", compute=_channel_wise,
                     functions=(losses.channel_wise_divergence,), options=("tau", "c_norm")))


def _ifvd(call: TermCall) -> Computed:
    value = losses.ifvd(call.student, call.teacher, call.inputs.labels,
                        num_classes=call.inputs.num_classes,
                        ignore_label=call.inputs.ignore_label, **call.options)
    return value, {}, call.state


register(LossAdapter(name="ifvd", compute=_ifvd, functions=(losses.ifvd,),
                     example=Example(**FEATURES)))


def _fakd_adapter(name: str, *, options: tuple[str, ...], forward_mode: bool,
                  chunked: bool = False) -> LossAdapter:
    """FAKD (docs/methods.md §4, §9.4): the class covariance of the student's pre-classifier
    feature is updated first, then the loss reads it with the student's classifier."""
    fn = getattr(losses, name)

    def compute(call: TermCall) -> Computed:
        inputs = call.inputs
        feature = inputs.student["pre_classifier"].astype(jnp.float32)
        state = losses.update_class_covariance(call.state, feature, inputs.labels,
                                               ignore_label=inputs.ignore_label)
        strength = losses.fakd_strength(inputs.step, inputs.total_steps,
                                        call.term.state_options["lam0"])
        budget = {"scratch_bytes": inputs.scratch_bytes} if chunked else {}
        value = fn(call.student, call.teacher, inputs.classifier_kernel, state.var, inputs.labels,
                   strength=strength, ignore_label=inputs.ignore_label, **budget, **call.options)
        return value, {"strength": strength}, state

    def init_state(term, student_shapes, teacher_shapes, num_classes, key):
        del term, teacher_shapes, key
        return losses.init_class_covariance(num_classes, student_shapes["pre_classifier"].shape[-1])

    return LossAdapter(name=name, compute=compute, functions=(fn,), options=options,
                       state_options={"lam0": 7.5}, parts=("strength",), init_state=init_state,
                       reads_classifier=True, forward_mode=forward_mode)


register(_fakd_adapter("fakd_kd", options=("temperature",), forward_mode=True))
register(_fakd_adapter("fakd_cwd", options=("tau", "c_norm", "images_per_chunk"),
                       forward_mode=False, chunked=True))


def _cirkd_memory(call: TermCall) -> Computed:
    """CIRKD's memory term (docs/methods.md §5.4): the queues take this batch's teacher pixels
    and regions, then the student contrasts against them."""
    inputs, state_options = call.inputs, call.term.state_options
    update_key, contrast_key = jax.random.split(call.key)
    state = losses.update_cirkd_memory(
        call.state, call.teacher, inputs.labels, update_key, ignore_label=inputs.ignore_label,
        pixels_per_class=state_options["pixels_per_class"],
        pixel_pool=state_options["pixel_pool"])
    pixel, region = losses.cirkd_memory(call.student, call.teacher, inputs.labels, state,
                                        contrast_key, ignore_label=inputs.ignore_label,
                                        **call.options)
    value = pixel + state_options["region_weight"] * region
    return value, {"pixel": pixel, "region": region}, state


def _init_cirkd_memory(term, student_shapes, teacher_shapes, num_classes, key):
    del student_shapes
    return losses.init_cirkd_memory(key, num_classes, teacher_shapes[term.teacher].shape[-1],
                                    pixel_size=term.state_options["pixel_size"],
                                    region_size=term.state_options["region_size"])


register(LossAdapter(
    name="cirkd_memory", compute=_cirkd_memory,
    functions=(losses.cirkd_memory,),
    options=("tau", "kd_tau", "pixel_contrast", "region_contrast"),
    state_options={"pixel_size": 20000, "region_size": 2000, "pixels_per_class": 16,
                   "pixel_pool": "first_n", "region_weight": 1.0},
    parts=("pixel", "region"), init_state=_init_cirkd_memory, forward_mode=False,
    example=Example(**FEATURES, connector="cirkd_projection", options=dict(
        pixel_size=64, region_size=16, pixel_contrast=32, region_contrast=8))))


def _adversarial(call: TermCall) -> Computed:
    # The generator side. The discriminator's own batch statistics are not updated by the
    # student's pass: they move in the discriminator step.
    generator_loss, _ = losses.skd_adversarial_losses(call.discriminator(call.student, train=False),
                                                      call.discriminator(call.teacher, train=False))
    return generator_loss, {}, call.state


register(LossAdapter(
    name="skd_adversarial", compute=_adversarial, functions=(losses.skd_adversarial_losses,),
    # The discriminator's own optimizer (Adam, as SKD's) and the weight λ_d of its hinge loss.
    state_options={"conv_dim": 64, "learning_rate": 4e-4, "b1": 0.9, "b2": 0.99, "d_weight": 0.1},
    parts=("discriminator",),
    discriminator=lambda term, channels, rngs: SaganDiscriminator(
        channels, conv_dim=term.state_options["conv_dim"], rngs=rngs),
    discriminator_loss=lambda d_student, d_teacher: losses.skd_adversarial_losses(
        d_student, d_teacher)[1],
    # The discriminator's strided convolutions need 64×64 maps.
    example=Example(options=dict(conv_dim=8), size=(64, 64))))


def _bpkd(call: TermCall) -> Computed:
    """BPKD (docs/methods.md §12): distillation on the edge and body regions of the labels, each
    part reported unweighted."""
    options = dict(call.options)
    weights = {name: options.pop(name, default) for name, default in _BPKD_WEIGHTS.items()}
    edge, body = losses.bpkd_parts(call.student, call.teacher, call.inputs.labels,
                                   num_classes=call.inputs.num_classes,
                                   ignore_label=call.inputs.ignore_label, **options)
    value = weights["edge_weight"] * edge + weights["body_weight"] * body
    return value, {"edge": edge, "body": body}, call.state


_BPKD_WEIGHTS = {name: inspect.signature(losses.bpkd).parameters[name].default
                 for name in ("edge_weight", "body_weight")}
register(LossAdapter(name="bpkd", compute=_bpkd, functions=(losses.bpkd,),
                     options=(*_BPKD_WEIGHTS, "edge_tau", "body_tau", "width", "ignore_borders",
                              "edge_source", "edge_reduction", "body_masking"),
                     parts=("edge", "body")))


def _generated(call: TermCall) -> Array:
    """The masked generator's output for this step (docs/methods.md §10): a fresh keep-mask
    (random per image and step, or the fixed centre third), applied to the raw student tensor."""
    state_options = call.term.state_options
    n, h, w, _ = call.student.shape
    if state_options["rand_mask"]:
        keep = losses.random_keep_mask(call.key, (n, h, w), state_options["mask_ratio"])
    else:
        keep = losses.centre_third_keep_mask((n, h, w))
    return call.student_module(call.student, keep, call.train).astype(jnp.float32)


def _masked_generator(term, student_channels: int, teacher_channels: int, rngs) -> nnx.Module:
    return MaskedGenerator(student_channels, teacher_channels,
                           enhanced=term.state_options["enhanced"], rngs=rngs)


# The generator's options: the official defaults (random mask at 0.75, plain projector) and the
# gradient clip its optimizer applies to the generator alone.
_GENERATOR_OPTIONS = {"rand_mask": True, "mask_ratio": 0.75, "enhanced": False,
                      "grad_clip": 15.0}


def _masked_reconstruction(call: TermCall) -> Computed:
    """MGD: the generator's reconstruction of the teacher's feature, alone."""
    value = losses.feature_reconstruction(_generated(call), call.teacher, **call.options)
    return value, {}, call.state


register(LossAdapter(
    name="masked_reconstruction", compute=_masked_reconstruction,
    functions=(losses.feature_reconstruction,), state_options=_GENERATOR_OPTIONS,
    student_module=_masked_generator, example=Example(**FEATURES)))


def _dense_contrast(call: TermCall) -> Computed:
    """Af-DCD (docs/methods.md §10): ``reconstruction_weight·reconstruction +
    contrast_weight·omni-contrast`` on one generated map; the term's own weight multiplies the
    sum. A ``mask`` (mask_ignore) restricts the reconstruction only: the contrast has none."""
    state_options, options = call.term.state_options, dict(call.options)
    mask = options.pop("mask", None)
    generated = _generated(call)
    reconstruction = losses.feature_reconstruction(generated, call.teacher, mask=mask)
    contrast = losses.omni_contrast(generated, call.teacher,
                                    scratch_bytes=call.inputs.scratch_bytes, **options)
    value = (state_options["reconstruction_weight"] * reconstruction
             + state_options["contrast_weight"] * contrast)
    return value, {"reconstruction": reconstruction, "contrast": contrast}, call.state


register(LossAdapter(
    name="dense_contrast", compute=_dense_contrast,
    functions=(losses.feature_reconstruction, losses.omni_contrast),
    options=("groups", "patch", "pool", "crop", "tau", "patches_per_chunk"),
    state_options={**_GENERATOR_OPTIONS, "reconstruction_weight": 2e-6,
                   "contrast_weight": 5e-3},
    parts=("reconstruction", "contrast"), student_module=_masked_generator,
    example=Example(**FEATURES, options=dict(pool=0)), forward_mode=False))


def _cirkd_channel(call: TermCall) -> Computed:
    """CIRKDv2's channel terms (docs/methods.md §11), in one term so that they share one
    projection: both tensors are pooled, the student's is projected (the term's own module), the
    queue takes this batch's teacher channels, then the mini-batch, memory and MSE losses read
    them. The term's weight multiplies ``Σ part_weight · part``."""
    state_options, options = call.term.state_options, dict(call.options)
    mask, tau = options.pop("mask", None), options.pop("tau", 0.1)
    if mask is not None:
        # mask_ignore gives the mask at the head's size: a pooled position is valid when its
        # window holds a valid one (the pooling itself, as the original's, averages them all).
        mask = losses.cirkd_channel_pool(jnp.asarray(mask, jnp.float32)[..., None],
                                         pool=state_options["pool"])[..., 0] > 0
    teacher = losses.cirkd_channel_pool(call.teacher, pool=state_options["pool"])
    student = call.student_module(losses.cirkd_channel_pool(call.student,
                                                            pool=state_options["pool"]),
                                  call.train).astype(jnp.float32)
    update_key, contrast_key = jax.random.split(call.key)
    state = losses.update_cirkd_channel_memory(
        call.state, teacher, update_key, channels_per_step=state_options["channels_per_step"],
        mask=mask)
    minibatch = losses.cirkd_channel_minibatch(
        student, teacher, tau=tau, mask=mask,
        **{k: options[k] for k in ("group_size", "block_size") if k in options})
    memory = losses.cirkd_channel_memory(
        student, teacher, state, contrast_key, tau=tau, mask=mask,
        **{k: options[k] for k in ("kd_tau", "channel_contrast") if k in options})
    mse = losses.cirkd_channel_mse(student, teacher, mask=mask)
    value = (state_options["minibatch_weight"] * minibatch
             + state_options["memory_weight"] * memory + state_options["mse_weight"] * mse)
    return value, {"minibatch": minibatch, "memory": memory, "mse": mse}, state


def _init_cirkd_channel(term, student_shapes, teacher_shapes, num_classes, key):
    del student_shapes, num_classes
    pooled = jax.eval_shape(functools.partial(losses.cirkd_channel_pool,
                                              pool=term.state_options["pool"]),
                            teacher_shapes[term.teacher])
    return losses.init_cirkd_channel_memory(key, pooled.shape[1] * pooled.shape[2],
                                            size=term.state_options["size"])


register(LossAdapter(
    name="cirkd_channel", compute=_cirkd_channel,
    functions=(losses.cirkd_channel_minibatch, losses.cirkd_channel_memory,
               losses.cirkd_channel_mse),
    options=("tau", "group_size", "block_size", "kd_tau", "channel_contrast"),
    # CIRKDv2's scripts: queue of 10000 channels, 256 enqueued per step, 4×4 pooling; the parts'
    # weights 1 (mini-batch), 0.1 (memory) and 100 (MSE).
    state_options={"size": 10000, "channels_per_step": 256, "pool": 4, "minibatch_weight": 1.0,
                   "memory_weight": 0.1, "mse_weight": 100.0},
    parts=("minibatch", "memory", "mse"), init_state=_init_cirkd_channel,
    example=Example(**FEATURES, options=dict(size=256, channels_per_step=16,
                                             channel_contrast=32)), forward_mode=False,
    student_module=lambda term, student_channels, teacher_channels, rngs: CirkdProjectionHead(
        student_channels, teacher_channels, rngs=rngs)))
