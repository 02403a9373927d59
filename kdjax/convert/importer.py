"""``from_torch``: a PyTorch state dict in, a ready kdjax NNX model out.

Sources (cirkd-models.md for CIRKD's layouts):
- CIRKD segmentors ``{deeplabv3, pspnet}_{resnet18, resnet50, resnet101, mobilenetv2}`` → a
  :class:`~kdjax.models.segmentor.Segmentor`. Head width, class count and the presence of the aux
  head are read from the tensor shapes, so both the current and the paper-era layouts load.
- ImageNet backbones ``torchvision_{resnet18, resnet50, resnet101, mobilenetv2}`` and CIRKD's
  deep-stem ``cirkd_{…}`` (the ``resnet18-imagenet.pth`` kind) → a ResNet / MobileNetV2 backbone. Their
  classifier (``fc.*``, ``classifier.*``) and MobileNetV2's final 1×1 conv to 1280 (``features.18.*``),
  which kdjax's backbone does not have, are ignored.

Conv weights go OIHW → HWIO (a depthwise (C, 1, 3, 3) becomes (3, 3, 1, C)); BN ``weight``, ``bias``,
``running_mean``, ``running_var`` become ``scale``, ``bias``, ``mean``, ``var``. Every key and shape is
checked before anything is loaded; any difference raises one :class:`CheckpointMismatchError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.convert.checkpoint import normalize_state_dict
from kdjax.convert.errors import CheckpointMismatchError, TorchCheckpointError
from kdjax.convert.layouts import Layers, backbone_layers, cirkd_segmentor_layers
from kdjax.models.layers import BatchNorm2d, Conv2d
from kdjax.models.mobilenet import MobileNetV2
from kdjax.models.resnet import ResNet
from kdjax.models.segmentor import build_segmentor
from kdjax.runtime.compilation import compile_unoptimized

BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenetv2")
SEGMENTOR_SOURCES = tuple(f"{head}_{b}" for head in ("deeplabv3", "pspnet") for b in BACKBONES)
BACKBONE_SOURCES = tuple(f"{origin}_{b}" for origin in ("torchvision", "cirkd") for b in BACKBONES)
SOURCES = SEGMENTOR_SOURCES + BACKBONE_SOURCES

# ImageNet checkpoint entries with no counterpart in kdjax's backbones.
IMAGENET_ONLY_PREFIXES = ("fc.", "classifier.", "features.18.")
# Per head: the tensor whose rows are the class count, and the one whose rows are the head width.
CLASSIFIER_KEYS = {"deeplabv3": "head.block.4.weight", "pspnet": "head.classifier.weight"}
WIDTH_KEYS = {"deeplabv3": "head.aspp.b0.0.weight", "pspnet": "head.block.0.weight"}
BN_TENSORS = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


def _oihw_to_hwio(weight: np.ndarray) -> np.ndarray:
    return np.transpose(weight, (2, 3, 1, 0))


def _hwio_shape_as_oihw(shape: tuple[int, ...]) -> tuple[int, ...]:
    kh, kw, i, o = shape
    return (o, i, kh, kw)


def _slots(layers: Layers) -> dict[str, tuple[nnx.Variable, bool]]:
    """PyTorch key → (kdjax variable, whether it is a conv kernel needing OIHW → HWIO)."""
    slots = {}
    for prefix, layer in layers:
        if isinstance(layer, Conv2d):
            slots[f"{prefix}.weight"] = (layer.kernel, True)
            if layer.bias is not None:
                slots[f"{prefix}.bias"] = (layer.bias, False)
        elif isinstance(layer, BatchNorm2d):
            for torch_name, attribute in BN_TENSORS:
                slots[f"{prefix}.{torch_name}"] = (getattr(layer, attribute), False)
        else:
            raise TypeError(f"no PyTorch layout for {type(layer).__name__} at {prefix}")
    return slots


def _abstract_model(build: Callable[[], nnx.Module]) -> nnx.Module:
    """``build()``'s model without allocating or initialising its weights (they stay abstract).

    Random initialisation of a ResNet-101 segmentor takes tens of seconds on a CPU; only the rng
    streams (dropout) need concrete values, and the jitted ``init`` returns nothing else, so XLA
    drops the weight initialisers.
    """
    captured = {}

    def init():
        graphdef, weights, rest = nnx.split(build(), (nnx.Param, nnx.BatchStat), ...)
        leaves, treedef = jax.tree.flatten(weights)
        # Only shapes leave the trace: Variables made inside it could not be updated outside.
        captured.update(graphdef=graphdef, treedef=treedef,
                        shapes=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves])
        return rest

    rest = compile_unoptimized(init)()
    weights = jax.tree.unflatten(captured["treedef"], captured["shapes"])
    return nnx.merge(captured["graphdef"], weights, rest)


def _mismatch_error(name: str, description: str, weights: Mapping[str, np.ndarray],
                    slots: Mapping[str, tuple[nnx.Variable, bool]], ignored: Iterable[str],
                    hints: list[str]) -> CheckpointMismatchError | None:
    expected = {}
    for key, (variable, is_kernel) in slots.items():
        shape = tuple(variable.get_value().shape)
        expected[key] = _hwio_shape_as_oihw(shape) if is_kernel else shape
    ignored = tuple(ignored)
    missing = {k: shape for k, shape in expected.items() if k not in weights}
    unexpected = {k: tuple(v.shape) for k, v in weights.items()
                  if k not in expected and not k.startswith(ignored)}
    mismatched = {k: (tuple(weights[k].shape), shape) for k, shape in expected.items()
                  if k in weights and tuple(weights[k].shape) != shape}
    if not (missing or unexpected or mismatched):
        return None
    if unexpected and missing:
        roots = sorted({k.split(".")[0] for k in unexpected})
        hints.append(f"Is {name} the checkpoint's architecture? Its unexpected keys "
                     f"start with {', '.join(roots)}; the supported sources are {', '.join(SOURCES)}.")
    return CheckpointMismatchError(description, missing, unexpected, mismatched, tuple(hints))


def _segmentor_setup(name: str, weights: Mapping[str, np.ndarray], num_classes: int | None,
                     build_kwargs: dict[str, Any], hints: list[str]) -> int:
    """Reads the class count, head width and aux head from the shapes; returns num_classes."""
    head = name.partition("_")[0]
    classifier = weights.get(CLASSIFIER_KEYS[head])
    if classifier is None and num_classes is None:
        raise TorchCheckpointError(
            f"cannot read the class count of {name!r}: the state dict has no {CLASSIFIER_KEYS[head]}. "
            "Check that the checkpoint is this architecture, or pass num_classes.")
    if num_classes is None:
        num_classes = int(classifier.shape[0])
    elif classifier is not None and classifier.shape[0] != num_classes:
        hints.append(f"num_classes={num_classes}, but the checkpoint's classifier has "
                     f"{classifier.shape[0]} classes; pass num_classes={classifier.shape[0]} or omit it.")
    width = weights.get(WIDTH_KEYS[head])
    if width is not None:
        build_kwargs.setdefault("head_width", int(width.shape[0]))
    build_kwargs.setdefault("aux", any(key.startswith("auxlayer.") for key in weights))
    return num_classes


def _describe(name: str, **options) -> str:
    if not options:
        return name
    return f"{name} ({', '.join(f'{key}={value!r}' for key, value in options.items())})"


def _build_backbone(origin: str, backbone: str, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    if backbone == "mobilenetv2":
        return MobileNetV2(rngs=rngs, **kwargs)
    return ResNet(int(backbone.removeprefix("resnet")), variant=origin, rngs=rngs, **kwargs)


def from_torch(name: str, state_dict: Mapping[str, Any], num_classes: int | None = None, *,
               seed: int = 0, **build_kwargs) -> nnx.Module:
    """Builds kdjax's model for a PyTorch state dict and loads its tensors.

    Args:
      name: a source in ``SOURCES``: a CIRKD segmentor ('deeplabv3_resnet101', 'pspnet_resnet18', …)
        or an ImageNet backbone ('torchvision_resnet50', 'torchvision_mobilenetv2',
        'cirkd_resnet18', …).
      state_dict: {key: tensor} (torch tensors or arrays), e.g. from :func:`load_torch_checkpoint`;
        a ``module.`` prefix, ``num_batches_tracked`` entries and a 'state_dict'/'model' wrapper
        are accepted.
      num_classes: K for segmentors; None reads it from the classifier. Not allowed for backbones.
      seed: seeds the dropout rng stream (the only state not read from the checkpoint).
      **build_kwargs: passed to :func:`~kdjax.models.segmentor.build_segmentor` (e.g.
        ``output_stride``, ``dtype``, ``param_dtype``; ``head_width`` and ``aux`` default to what
        the shapes say) or to the backbone (``output_stride``, ``width_multiplier``, dtypes).

    Returns:
      The model with every parameter and BN statistic from the checkpoint (eval mode reproduces
      the PyTorch model's eval outputs).

    Raises:
      ValueError: unknown ``name``, or ``num_classes`` for a backbone.
      CheckpointMismatchError: missing, unexpected or mis-shaped keys, all listed; nothing loaded.
      TorchCheckpointError: the class count cannot be read.
    """
    if name not in SOURCES:
        raise ValueError(f"name must be one of {', '.join(SOURCES)}; got {name!r}")
    weights = normalize_state_dict(state_dict)
    hints: list[str] = []
    rngs = lambda: nnx.Rngs(seed)  # noqa: E731 - built inside the traced init
    if name in SEGMENTOR_SOURCES:
        num_classes = _segmentor_setup(name, weights, num_classes, build_kwargs, hints)
        build = lambda: build_segmentor(  # noqa: E731
            name, num_classes=num_classes, rngs=rngs(), **build_kwargs)
        layers_of, ignored = cirkd_segmentor_layers, ()
        description = _describe(name, num_classes=num_classes, **build_kwargs)
    else:
        if num_classes is not None:
            raise ValueError(f"num_classes applies to segmentor sources, not the backbone {name!r}; "
                             f"got {num_classes!r}")
        origin, _, backbone = name.partition("_")
        build = lambda: _build_backbone(origin, backbone, rngs(), **build_kwargs)  # noqa: E731
        layers_of = lambda model: backbone_layers(model, origin)  # noqa: E731
        ignored = IMAGENET_ONLY_PREFIXES
        description = _describe(name, **build_kwargs)
    model = _abstract_model(build)
    slots = _slots(layers_of(model))
    error = _mismatch_error(name, description, weights, slots, ignored, hints)
    if error is not None:
        raise error
    for key, (variable, is_kernel) in slots.items():
        value = _oihw_to_hwio(weights[key]) if is_kernel else weights[key]
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))
    unset = [path for path, leaf in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
             if isinstance(leaf.get_value(), jax.ShapeDtypeStruct)]
    if unset:  # a model attribute the layouts do not cover: a bug, not a checkpoint problem
        raise RuntimeError(f"no PyTorch key maps to {unset} of {name}")
    return model
