"""Networks from config: the student built for training, the frozen teacher loaded for inference."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kdjax import sharding
from kdjax.model_store import load_model_state, read_spec
from kdjax.models import BatchNorm2d, Segmentor, build_segmentor
from kdjax.unoptimized import compile_unoptimized

# What a model dir stores and a frozen network carries as its state.
WEIGHTS = (nnx.Param, nnx.BatchStat)

# The teacher checkpoint value that asks for random weights: smoke tests only.
RANDOM_TEACHER = "random"


class NetworkError(ValueError):
    """A configured network (teacher or student weights) cannot be used; the message says how
    to provide one."""


@dataclasses.dataclass(frozen=True)
class Network:
    """A frozen network as data: graph definition, (replicated) weights, the remaining variables
    (dropout rng state, unused in inference) and the compute dtype.

    ``state`` holds the ``nnx.Param`` and ``nnx.BatchStat`` variables, as a model dir does.
    """

    graphdef: Any
    state: Any
    extras: Any
    dtype: Any

    @property
    def variables(self) -> tuple[Any, Any]:
        """``(state, extras)``: what a jitted function takes to rebuild the network."""
        return self.state, self.extras

    def merge(self, variables: tuple[Any, Any] | None = None) -> nnx.Module:
        return nnx.merge(self.graphdef, *(self.variables if variables is None else variables))


def model_spec(model: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """The ``build_segmentor`` arguments of a model config (what a model dir records)."""
    return {"name": model.name, "num_classes": num_classes, "variant": model.variant,
            "output_stride": model.output_stride, "head_width": model.head_width,
            "aux": model.aux, "width_multiplier": model.width_multiplier}


def build_model(model: ml_collections.ConfigDict, *, num_classes: int,
                rngs: nnx.Rngs) -> Segmentor:
    """The segmentor a model config describes, with fresh weights (float32 parameters)."""
    return build_segmentor(model.name, num_classes=num_classes, variant=model.variant,
                           output_stride=model.output_stride, head_width=model.head_width,
                           aux=model.aux, width_multiplier=model.width_multiplier,
                           dtype=jnp.dtype(model.dtype), rngs=rngs)


def set_batch_norm_groups(module: nnx.Module, groups: int) -> None:
    """Per-device BN statistics: every BatchNorm2d of ``module`` normalises ``groups`` batch
    slices separately (see :class:`kdjax.models.BatchNorm2d`)."""
    for _, sub in module.iter_modules():
        if isinstance(sub, BatchNorm2d):
            sub.batch_groups = groups


def _check_spec(saved: dict, wanted: dict, directory: str) -> None:
    keys = ("name", "num_classes", "variant", "output_stride", "width_multiplier")
    saved = {"width_multiplier": 1.0, **saved}  # model dirs without it hold published widths
    diff = {k: (saved.get(k), wanted[k]) for k in keys if saved.get(k) != wanted[k]}
    # head_width / aux None mean "the default"; a saved explicit value must match an explicit one.
    for k in ("head_width", "aux"):
        if wanted[k] is not None and saved.get(k) != wanted[k]:
            diff[k] = (saved.get(k), wanted[k])
    if diff:
        lines = "; ".join(f"{k}: saved {a!r}, config {b!r}" for k, (a, b) in diff.items())
        raise NetworkError(f"the model in {directory} does not match the config ({lines}). Point "
                           f"the config at the matching model dir or change the model fields.")


def load_student_weights(directory: str, spec: dict[str, Any],
                         mesh: jax.sharding.Mesh) -> nnx.State:
    """The weights (``WEIGHTS`` variables) of a model dir whose spec matches the student's, e.g. a
    model from ``kdjax convert`` or an earlier run, replicated over ``mesh``."""
    wanted = {k: spec[k] for k in ("name", "num_classes", "variant", "output_stride",
                                   "head_width", "aux", "width_multiplier")}
    _check_spec(read_spec(directory), wanted, directory)
    build = {k: v for k, v in wanted.items() if k != "name"}
    abstract = nnx.eval_shape(lambda: build_segmentor(wanted["name"], **build, rngs=nnx.Rngs(0)))
    repl = sharding.replicated(mesh)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                          nnx.state(abstract, WEIGHTS))
    return load_model_state(directory, target)


def load_backbone_weights(path: str, source: str, spec: dict[str, Any],
                          mesh: jax.sharding.Mesh) -> nnx.State:
    """The backbone weights (``WEIGHTS`` variables) of a PyTorch ImageNet state dict, converted
    for the student described by ``spec`` and replicated over ``mesh``.

    ``source`` is the checkpoint's layout: 'cirkd' (CIRKD's deep-stem ``resnet*-imagenet.pth``)
    or 'torchvision'; a ResNet student's ``variant`` must be the same.
    """
    from kdjax.convert import from_torch, load_torch_checkpoint

    backbone = spec["name"].partition("_")[2]
    if backbone != "mobilenetv2" and source != spec["variant"]:
        raise NetworkError(
            f"student.backbone_source is {source!r} but the student's ResNet variant is "
            f"{spec['variant']!r}; their stems differ. Set student.variant={source!r} or use a "
            f"{spec['variant']} checkpoint.")
    module = from_torch(f"{source}_{backbone}", load_torch_checkpoint(path),
                        output_stride=spec["output_stride"],
                        width_multiplier=spec["width_multiplier"])
    return jax.device_put(nnx.state(module, WEIGHTS), sharding.replicated(mesh))


def load_teacher(model: ml_collections.ConfigDict, *, num_classes: int,
                 mesh: jax.sharding.Mesh, seed: int, materialize: bool = True) -> Network:
    """The frozen teacher, replicated over ``mesh``.

    ``model.checkpoint`` is a model dir (from ``kdjax convert`` or a finished run's ``model/``),
    or ``'random'`` for random weights in smoke tests. ``materialize=False`` returns shapes only
    (``jax.ShapeDtypeStruct`` leaves), for checking a config without computing anything.
    """
    if model.checkpoint is None:
        raise NetworkError(
            "distillation needs a trained teacher, but teacher.checkpoint is None. Convert a "
            "PyTorch teacher with `kdjax convert ... --out=DIR` and set "
            "--config.teacher.checkpoint=DIR, or let `kdjax compare` train the teacher first.")
    wanted = model_spec(model, num_classes)
    saved = None
    if model.checkpoint != RANDOM_TEACHER and materialize:
        saved = read_spec(model.checkpoint)
        _check_spec(saved, wanted, model.checkpoint)
        # Explicit widths from the model dir resolve the config's "default" (None) fields.
        model = ml_collections.ConfigDict({**model.to_dict(),
                                           "head_width": saved.get("head_width"),
                                           "aux": saved.get("aux")})
    abstract = nnx.eval_shape(lambda: build_model(model, num_classes=num_classes,
                                                  rngs=nnx.Rngs(seed)))
    graphdef, abstract_state, _ = nnx.split(abstract, WEIGHTS, ...)
    repl = sharding.replicated(mesh)

    def init():
        return nnx.split(build_model(model, num_classes=num_classes, rngs=nnx.Rngs(seed)),
                         WEIGHTS, ...)[1:]
    if not materialize:
        state, extras = jax.eval_shape(init)
    elif saved is None:
        state, extras = compile_unoptimized(init, out_shardings=repl)()
    else:
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                              abstract_state)
        state = load_model_state(model.checkpoint, target)
        extras = compile_unoptimized(lambda: init()[1], out_shardings=repl)()
    return Network(graphdef=graphdef, state=state, extras=extras, dtype=jnp.dtype(model.dtype))
