"""Networks from config: the student built for training, the frozen teacher loaded for inference."""

from __future__ import annotations

import dataclasses
from typing import Any

from kdjax._extras import require

# Model configs are ml_collections: the trainer's 'train' extra.
require("train", by=__name__)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from kdjax.io.model_dir import WEIGHTS, load_model_state, read_spec  # noqa: E402
from kdjax.models import Segmentor, build_segmentor  # noqa: E402
from kdjax.models.segmentor import SPEC_KEYS  # noqa: E402
from kdjax.runtime import sharding  # noqa: E402
from kdjax.runtime.compilation import compile_unoptimized  # noqa: E402

# The teacher checkpoint value that asks for random weights: smoke tests only.
RANDOM_TEACHER = "random"


class NetworkError(ValueError):
    """A configured network (teacher or student weights) cannot be used; the message says how
    to provide one."""


@dataclasses.dataclass(frozen=True)
class Network:
    """A frozen network as data: graph definition, (replicated) weights, its other variables
    (none for kdjax's segmentors; a teacher module of the caller's own may have some) and the
    compute dtype.

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

    def logits(self, variables: tuple[Any, Any], images: jax.Array) -> jax.Array:
        """Eval-mode logits (N, h, w, K) of (N, H, W, 3) images, computed in ``dtype``."""
        return self.merge(variables)(images.astype(self.dtype), train=False).logits


def model_spec(model: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """The ``build_segmentor`` arguments (``SPEC_KEYS``) of a model config."""
    return {key: num_classes if key == "num_classes" else model[key] for key in SPEC_KEYS}


def build_model(model: ml_collections.ConfigDict, *, num_classes: int,
                rngs: nnx.Rngs) -> Segmentor:
    """The segmentor a model config describes, with fresh weights (float32 parameters)."""
    return build_segmentor(**model_spec(model, num_classes), kernels=model.kernels,
                           dtype=jnp.dtype(model.dtype), rngs=rngs)


def _check_spec(saved: dict, wanted: dict, directory: str) -> None:
    """Raises :class:`NetworkError` unless a model dir's spec builds the configured model.
    ``head_width`` / ``aux`` None in the config mean "the default" and match any saved value."""
    saved = {"width_multiplier": 1.0, **saved}  # model dirs without it hold published widths
    diff = {k: (saved.get(k), wanted[k]) for k in SPEC_KEYS if saved.get(k) != wanted[k]
            and not (k in ("head_width", "aux") and wanted[k] is None)}
    if diff:
        lines = "; ".join(f"{k}: saved {a!r}, config {b!r}" for k, (a, b) in diff.items())
        raise NetworkError(f"the model in {directory} does not match the config ({lines}). Point "
                           f"the config at the matching model dir or change the model fields.")


def load_student_weights(directory: str, spec: dict[str, Any],
                         mesh: jax.sharding.Mesh) -> nnx.State:
    """The weights (``WEIGHTS`` variables) of a model dir whose spec matches the student's, e.g. a
    model from ``kdjax convert`` or an earlier run, replicated over ``mesh``."""
    wanted = {k: spec[k] for k in SPEC_KEYS}
    _check_spec(read_spec(directory), wanted, directory)
    abstract = nnx.eval_shape(lambda: build_segmentor(**wanted, rngs=nnx.Rngs(0)))
    target = sharding.placed(nnx.state(abstract, WEIGHTS), sharding.replicated(mesh))
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
    (``jax.ShapeDtypeStruct`` leaves, replicated over ``mesh`` as the weights would be), for
    checking a config or compiling its programs without computing anything.
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
        state, extras = sharding.placed(jax.eval_shape(init), repl)
    elif saved is None:
        state, extras = compile_unoptimized(init, out_shardings=repl)()
    else:
        state = load_model_state(model.checkpoint, sharding.placed(abstract_state, repl))
        extras = compile_unoptimized(lambda: init()[1], out_shardings=repl)()
    return Network(graphdef=graphdef, state=state, extras=extras, dtype=jnp.dtype(model.dtype))
