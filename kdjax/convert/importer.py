"""``from_torch``: a PyTorch state dict in, a ready kdjax NNX model out.

Sources (cirkd-models.md for CIRKD's layouts):
- CIRKD segmentors ``{deeplabv3, pspnet}_{resnet18, resnet50, resnet101, mobilenetv2}`` → a
  :class:`~kdjax.models.segmentor.Segmentor`. Head width, class count and the presence of the aux
  head are read from the tensor shapes, so both the current and the paper-era layouts load.
- CIRKD SegFormers ``segformer_mit_b{0..5}`` (``models/segformer.py``, e.g. its
  ``segformer_MiT_B4_citys_best_model.pth``) → a Segmentor; the class count and the decoder width
  are read from ``linear_pred.weight`` and ``linear_fuse.0.weight``.
- ImageNet backbones ``torchvision_{resnet18, resnet50, resnet101, mobilenetv2}`` and CIRKD's
  deep-stem ``cirkd_{…}`` (the ``resnet18-imagenet.pth`` kind) → a ResNet / MobileNetV2 backbone. Their
  classifier (``fc.*``, ``classifier.*``) and MobileNetV2's final 1×1 conv to 1280 (``features.18.*``),
  which kdjax's backbone does not have, are ignored.
- ``cirkd_mit_b{0..5}``: the ImageNet MiT encoders CIRKD's SegFormer students start from
  (``mit_b0.pth``; keys as in the SegFormer, classifier ``head.*`` ignored) → a
  :class:`~kdjax.models.segformer.MixTransformer`.

Conv weights go OIHW → HWIO (a depthwise (C, 1, 3, 3) becomes (3, 3, 1, C)); linear weights
(out, in) → (in, out); BN ``weight``, ``bias``, ``running_mean``, ``running_var`` become
``scale``, ``bias``, ``mean``, ``var``; LayerNorm ``weight``, ``bias`` become ``scale``, ``bias``.
Every key and shape is checked before anything is loaded; any difference raises one
:class:`CheckpointMismatchError`.
"""

from __future__ import annotations

import warnings
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
from kdjax.models.segformer import (MIT_VARIANTS, LayerNorm, Linear, build_mix_transformer,
                                    mit_widths)
from kdjax.models.segmentor import build_segmentor

BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenetv2")
MIT_BACKBONES = tuple(MIT_VARIANTS)
SEGMENTOR_SOURCES = (tuple(f"{head}_{b}" for head in ("deeplabv3", "pspnet") for b in BACKBONES)
                     + tuple(f"segformer_{b}" for b in MIT_BACKBONES))
BACKBONE_SOURCES = (tuple(f"{origin}_{b}" for origin in ("torchvision", "cirkd") for b in BACKBONES)
                    + tuple(f"cirkd_{b}" for b in MIT_BACKBONES))
SOURCES = SEGMENTOR_SOURCES + BACKBONE_SOURCES

# ImageNet checkpoint entries with no counterpart in kdjax's backbones.
IMAGENET_ONLY_PREFIXES = ("fc.", "classifier.", "features.18.")
# The same for the ImageNet MiT encoders: their classifier.
MIT_IMAGENET_ONLY_PREFIXES = ("head.",)
# Per head: the tensor whose rows are the class count, and the one whose rows are the head width.
CLASSIFIER_KEYS = {"deeplabv3": "head.block.4.weight", "pspnet": "head.classifier.weight",
                   "segformer": "linear_pred.weight"}
WIDTH_KEYS = {"deeplabv3": "head.aspp.b0.0.weight", "pspnet": "head.block.0.weight",
              "segformer": "linear_fuse.0.weight"}
BN_TENSORS = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))
LAYER_NORM_TENSORS = (("weight", "scale"), ("bias", "bias"))
# How a PyTorch tensor maps onto its kdjax variable (the second entry of a slot): a conv kernel
# OIHW → HWIO, a linear kernel (out, in) → (in, out), or None: as it is.
CONV_KERNEL = "oihw"
LINEAR_KERNEL = "linear"


def _oihw_to_hwio(weight: np.ndarray) -> np.ndarray:
    return np.transpose(weight, (2, 3, 1, 0))


def _hwio_shape_as_oihw(shape: tuple[int, ...]) -> tuple[int, ...]:
    kh, kw, i, o = shape
    return (o, i, kh, kw)


def _to_kdjax(value: np.ndarray, layout: str | None) -> np.ndarray:
    if layout == CONV_KERNEL:
        return _oihw_to_hwio(value)
    if layout == LINEAR_KERNEL:
        return np.transpose(value)
    return value


def _torch_shape(shape: tuple[int, ...], layout: str | None) -> tuple[int, ...]:
    if layout == CONV_KERNEL:
        return _hwio_shape_as_oihw(shape)
    if layout == LINEAR_KERNEL:
        return shape[::-1]
    return shape


def _slots(layers: Layers) -> dict[str, tuple[nnx.Variable, str | None]]:
    """PyTorch key → (kdjax variable, its layout: ``CONV_KERNEL``, ``LINEAR_KERNEL`` or None)."""
    slots = {}
    for prefix, layer in layers:
        if isinstance(layer, (Conv2d, Linear)):
            layout = CONV_KERNEL if isinstance(layer, Conv2d) else LINEAR_KERNEL
            slots[f"{prefix}.weight"] = (layer.kernel, layout)
            if layer.bias is not None:
                slots[f"{prefix}.bias"] = (layer.bias, None)
        elif isinstance(layer, BatchNorm2d):
            for torch_name, attribute in BN_TENSORS:
                slots[f"{prefix}.{torch_name}"] = (getattr(layer, attribute), None)
        elif isinstance(layer, LayerNorm):
            for torch_name, attribute in LAYER_NORM_TENSORS:
                slots[f"{prefix}.{torch_name}"] = (getattr(layer, attribute), None)
        else:
            raise TypeError(f"no PyTorch layout for {type(layer).__name__} at {prefix}")
    return slots


def _mismatch_error(name: str, description: str, weights: Mapping[str, np.ndarray],
                    slots: Mapping[str, tuple[nnx.Variable, str | None]], ignored: Iterable[str],
                    hints: list[str]) -> CheckpointMismatchError | None:
    expected = {key: _torch_shape(tuple(variable.get_value().shape), layout)
                for key, (variable, layout) in slots.items()}
    ignored = tuple(ignored)
    missing = {k: shape for k, shape in expected.items() if k not in weights}
    unexpected = {k: tuple(v.shape) for k, v in weights.items()
                  if k not in expected and not k.startswith(ignored)}
    mismatched = {k: (tuple(weights[k].shape), shape) for k, shape in expected.items()
                  if k in weights and tuple(weights[k].shape) != shape}
    if not (missing or unexpected or mismatched):
        return None
    if "_mit_" in name:
        hints += _mit_variant_hints(name, weights)
    if unexpected and missing:
        roots = sorted({k.split(".")[0] for k in unexpected})
        hints.append(f"Is {name} the checkpoint's architecture? Its unexpected keys "
                     f"start with {', '.join(roots)}; the supported sources are {', '.join(SOURCES)}.")
    return CheckpointMismatchError(description, missing, unexpected, mismatched, tuple(hints))


def _mit_variant_hints(name: str, weights: Mapping[str, np.ndarray]) -> list[str]:
    """Names the MiT variant whose block counts and widths the state dict has, if not ``name``'s."""
    depths = []
    for stage in range(1, 5):
        prefix = f"block{stage}."
        indices = {int(k[len(prefix):].split(".")[0]) for k in weights
                   if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        depths.append(max(indices) + 1 if indices else 0)
    widths = tuple(int(weights[f"norm{i}.weight"].shape[0]) if f"norm{i}.weight" in weights else 0
                   for i in range(1, 5))
    found = [mit for mit, variant in MIT_VARIANTS.items()
             if tuple(depths) == variant.depths and widths == mit_widths(mit)]
    origin = name.rpartition("_mit_")[0]
    if not found or name.endswith(found[0]):
        return []
    return [f"The checkpoint's encoder has blocks {tuple(depths)} and widths {widths}: it is "
            f"{origin}_{found[0]}, not {name}."]


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
    if head != "segformer":  # SegFormer has no aux head
        build_kwargs.setdefault("aux", any(key.startswith("auxlayer.") for key in weights))
    return num_classes


def _describe(name: str, **options) -> str:
    if not options:
        return name
    return f"{name} ({', '.join(f'{key}={value!r}' for key, value in options.items())})"


def _build_backbone(origin: str, backbone: str, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    if backbone in MIT_BACKBONES:
        output_stride = kwargs.pop("output_stride", 8)
        if output_stride != 8:
            raise ValueError(f"output_stride does not apply to the MiT encoder {backbone}: its "
                             f"strides are fixed (4, 8, 16, 32); leave it at 8, got "
                             f"{output_stride!r}.")
        return build_mix_transformer(backbone, rngs=rngs, **kwargs)
    if backbone == "mobilenetv2":
        return MobileNetV2(rngs=rngs, **kwargs)
    return ResNet(int(backbone.removeprefix("resnet")), variant=origin, rngs=rngs, **kwargs)


def from_torch(name: str, state_dict: Mapping[str, Any], num_classes: int | None = None, *,
               seed: int | None = None, **build_kwargs) -> nnx.Module:
    """Builds kdjax's model for a PyTorch state dict and loads its tensors.

    Args:
      name: a source in ``SOURCES``: a CIRKD segmentor ('deeplabv3_resnet101', 'pspnet_resnet18',
        'segformer_mit_b4', …) or an ImageNet backbone ('torchvision_resnet50',
        'torchvision_mobilenetv2', 'cirkd_resnet18', 'cirkd_mit_b0', …).
      state_dict: {key: tensor} (torch tensors or arrays), e.g. from :func:`load_torch_checkpoint`;
        a ``module.`` prefix, ``num_batches_tracked`` entries and a 'state_dict'/'model' wrapper
        are accepted.
      num_classes: K for segmentors; None reads it from the classifier. Not allowed for backbones.
      seed: deprecated and unused: models hold no rng state, their dropout keys are arguments
        of the call (``model(images, train=True, rngs=nnx.Rngs(dropout=key))``).
      **build_kwargs: passed to :func:`~kdjax.models.segmentor.build_segmentor` (e.g.
        ``output_stride``, ``dtype``, ``param_dtype``, SegFormer's ``drop_path_rate``;
        ``head_width`` and ``aux`` default to what the shapes say) or to the backbone
        (``output_stride``, ``width_multiplier``, dtypes; for MiT also ``drop_path_rate``).

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
    if seed is not None:
        warnings.warn("from_torch's seed is unused and deprecated: dropout keys are passed at "
                      "call time (model(images, train=True, rngs=nnx.Rngs(dropout=key))).",
                      DeprecationWarning, stacklevel=2)
    rngs = lambda: nnx.Rngs(0)  # noqa: E731 - built inside the traced shapes
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
        ignored = (MIT_IMAGENET_ONLY_PREFIXES if backbone in MIT_BACKBONES
                   else IMAGENET_ONLY_PREFIXES)
        description = _describe(name, **build_kwargs)
    # Abstract weights: nothing is initialised, every one is set from the checkpoint below.
    model = nnx.eval_shape(build)
    slots = _slots(layers_of(model))
    error = _mismatch_error(name, description, weights, slots, ignored, hints)
    if error is not None:
        raise error
    for key, (variable, layout) in slots.items():
        value = _to_kdjax(weights[key], layout)
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))
    unset = [path for path, leaf in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
             if isinstance(leaf.get_value(), jax.ShapeDtypeStruct)]
    if unset:  # a model attribute the layouts do not cover: a bug, not a checkpoint problem
        raise RuntimeError(f"no PyTorch key maps to {unset} of {name}")
    return model
