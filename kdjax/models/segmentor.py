"""Segmentor = backbone + head (+ FCN auxiliary head), built by name; `predict` and `summary`.

Names are ``{deeplabv3, deeplabv3plus, pspnet}_{resnet18, resnet50, resnet101, mobilenetv2}`` and
``segformer_mit_b0`` … ``segformer_mit_b5``. The defaults reproduce CIRKD's current ("HEAD")
layouts (cirkd-models.md §3): DeepLabV3 width 512 on ResNets and 128 on MobileNetV2, PSP width 128
on ResNet-18 and MobileNetV2 and 256 on ResNet-50/101, an aux head on ResNets only. The paper-era
layouts differ only in the head width, e.g. ``build_segmentor('deeplabv3_resnet18',
head_width=128, ...)`` or ``('pspnet_resnet101', head_width=512)``.

SegFormer (:mod:`kdjax.models.segformer`) is CIRKD's: a Mix Transformer encoder and the all-MLP
decoder, whose width (``head_width``) is 256 for MiT-B0/B1 and 768 for B2..B5; logits at stride 4,
no aux head, stochastic depth 0.1 in train mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models.heads import DeepLabV3Head, DeepLabV3PlusHead, FCNHead, PSPHead, aspp_rates
from kdjax.models.layers import Dtype, resize_bilinear_align_corners, set_kernels
from kdjax.models.mobilenet import MobileNetV2
from kdjax.models.resnet import VARIANTS, ResNet
from kdjax.models.segformer import (DROP_PATH_RATE, MIT_VARIANTS, SegFormerHead,
                                    build_mix_transformer)
from kdjax.ops.cost import traced_flops

Array = jax.Array

RESNET_DEPTHS = {"resnet18": 18, "resnet50": 50, "resnet101": 101}
BACKBONES = (*RESNET_DEPTHS, "mobilenetv2")
HEADS = ("deeplabv3", "deeplabv3plus", "pspnet")
CNN_MODEL_NAMES = tuple(f"{head}_{backbone}" for head in HEADS for backbone in BACKBONES)
SEGFORMER_NAMES = tuple(f"segformer_{variant}" for variant in MIT_VARIANTS)
MODEL_NAMES = CNN_MODEL_NAMES + SEGFORMER_NAMES
# The build_segmentor arguments that fix a segmentor's structure: what ``Segmentor.spec`` records
# and a model directory stores.
SPEC_KEYS = ("name", "num_classes", "variant", "output_stride", "head_width", "aux",
             "width_multiplier")

# CIRKD HEAD-layout head widths (cirkd-models.md §3.3, §3.4). DeepLabV3+ is not in CIRKD; it takes
# the DeepLabV3 widths since it shares the ASPP.
_DEEPLAB_WIDTHS = {"resnet18": 512, "resnet50": 512, "resnet101": 512, "mobilenetv2": 128}
DEFAULT_HEAD_WIDTHS = {
    "deeplabv3": _DEEPLAB_WIDTHS,
    "deeplabv3plus": _DEEPLAB_WIDTHS,
    "pspnet": {"resnet18": 128, "resnet50": 256, "resnet101": 256, "mobilenetv2": 128},
    # SegFormer's decoder width (CIRKD's decoder_dim).
    "segformer": {mit: v.decoder_dim for mit, v in MIT_VARIANTS.items()},
}


@flax.struct.dataclass
class SegmentorOutput:
    """What a segmentor returns (a pytree).

    Attributes:
      logits: (N, h, w, K) at the head's resolution (1/8 or 1/16 of the input; 1/4 for DeepLabV3+
        and SegFormer).
      aux_logits: (N, h3, w3, K) from the FCN head on c3, or None without an aux head.
      features: ``c1..c4`` (backbone stages), ``head`` (CIRKD's ``outputs[-1]``) and
        ``pre_classifier`` (the final classifier's input; the same tensor as ``head`` here). For
        SegFormer, c1..c4 are the MiT stage outputs (strides 4, 8, 16, 32) and ``head`` is the
        fused decoder feature at stride 4.
    """

    logits: Array
    aux_logits: Array | None
    features: dict[str, Array]


class Segmentor(nnx.Module):
    """Backbone → head, with an optional auxiliary head; the logits are not upsampled to the input
    (cirkd-models §3.1).

    Each head reads the backbone taps listed in its ``taps`` attribute. Call
    ``model(images, train, rngs=None)`` with NHWC images (N, H, W, 3) → :class:`SegmentorOutput`.
    ``train=True`` normalises with batch statistics, updates the BN running statistics and applies
    dropout and stochastic depth, with masks from the call's ``rngs`` (its 'dropout' stream, e.g.
    ``nnx.Rngs(dropout=key)``; the model holds no rng state); ``train=False`` changes nothing.

    ``spec`` holds the :func:`build_segmentor` arguments (``SPEC_KEYS``) that rebuild its
    structure, with the head width and aux head resolved, so paper-era layouts round-trip.
    """

    def __init__(self, backbone: nnx.Module, head: nnx.Module, aux_head: nnx.Module | None = None,
                 *, spec: dict | None = None):
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.spec = spec

    def __call__(self, images: Array, train: bool, *,
                 rngs: nnx.Rngs | None = None) -> SegmentorOutput:
        if images.ndim != 4:
            raise ValueError(
                f"images must be an NHWC array of rank 4, got shape {tuple(images.shape)}.")
        taps = self.backbone(images, train, rngs=rngs)
        out = self.head(*(taps[name] for name in self.head.taps), train, rngs=rngs)
        aux_logits = None
        if self.aux_head is not None:
            aux_out = self.aux_head(*(taps[name] for name in self.aux_head.taps), train,
                                    rngs=rngs)
            aux_logits = aux_out["logits"]
        features = {**taps, "head": out["feature"], "pre_classifier": out["feature"]}
        return SegmentorOutput(logits=out["logits"], aux_logits=aux_logits, features=features)


def build_segmentor(name: str, *, num_classes: int, variant: str = "cirkd", output_stride: int = 8,
                    head_width: int | None = None, aux: bool | None = None,
                    width_multiplier: float = 1.0, kernels: str = "auto",
                    dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                    drop_path_rate: float | None = None, rngs: nnx.Rngs) -> Segmentor:
    """Builds a segmentor by name, e.g. ``'deeplabv3_resnet101'``, ``'pspnet_resnet18'`` or
    ``'segformer_mit_b0'``.

    Args:
      name: ``{deeplabv3, deeplabv3plus, pspnet}_{resnet18, resnet50, resnet101, mobilenetv2}`` or
        ``segformer_mit_b{0..5}``.
      num_classes: K, the number of output channels.
      variant: ResNet layout, ``'cirkd'`` (deep stem 64-64-128) or ``'torchvision'``; ignored for
        MobileNetV2 and SegFormer.
      output_stride: 8 or 16; ASPP rates follow it ((12, 24, 36) or (6, 12, 18)). SegFormer's
        strides are fixed (c1..c4 at 4, 8, 16, 32, logits at 4) and it takes only the default 8.
      head_width: the head's width C (SegFormer: the decoder width); None takes CIRKD's HEAD layout
        (``DEFAULT_HEAD_WIDTHS``; SegFormer 256 for MiT-B0/B1, 768 for B2..B5).
      aux: add the FCN aux head on c3; None means yes for ResNets, no for MobileNetV2 and
        SegFormer (as CIRKD). SegFormer has no aux head.
      width_multiplier: scales the backbone's channel widths (1.0 = the published backbone; for
        SegFormer the width of every attention head, so widths stay multiples of the head counts).
      kernels: 'auto', 'xla', 'cpu' or 'gpu': the convolution and batch-norm forms
        (:mod:`kdjax.ops.kernels`).
      dtype: the compute dtype.
      param_dtype: the parameters' dtype.
      drop_path_rate: SegFormer's stochastic depth, the last block's rate (None: CIRKD's 0.1);
        not part of the structure, so not in ``spec``. The CNN segmentors have none.
      rngs: the parameter initialisation stream.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {', '.join(MODEL_NAMES)}; got {name!r}.")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1; got {num_classes!r}.")
    if head_width is not None and head_width < 1:
        raise ValueError(f"head_width must be at least 1 or None; got {head_width!r}.")
    head_name, _, backbone_name = name.partition("_")
    if head_name == "segformer":
        model = _build_segformer(name, backbone_name, num_classes=num_classes,
                                 output_stride=output_stride, head_width=head_width, aux=aux,
                                 width_multiplier=width_multiplier, dtype=dtype,
                                 param_dtype=param_dtype, drop_path_rate=drop_path_rate,
                                 rngs=rngs)
        set_kernels(model, kernels)
        return model
    if drop_path_rate:
        raise ValueError(f"drop_path_rate applies to SegFormer only, not {name!r}; got "
                         f"{drop_path_rate!r}.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if backbone_name in RESNET_DEPTHS:
        backbone = ResNet(RESNET_DEPTHS[backbone_name], variant=variant,
                          output_stride=output_stride, width_multiplier=width_multiplier, **kw)
    else:
        backbone = MobileNetV2(output_stride=output_stride, width_multiplier=width_multiplier,
                               **kw)
    c1, _, c3, c4 = backbone.channels
    width = DEFAULT_HEAD_WIDTHS[head_name][backbone_name] if head_width is None else head_width
    if head_name == "deeplabv3":
        head = DeepLabV3Head(c4, num_classes, width=width, rates=aspp_rates(output_stride), **kw)
    elif head_name == "deeplabv3plus":
        head = DeepLabV3PlusHead(c4, c1, num_classes, width=width,
                                 rates=aspp_rates(output_stride), **kw)
    else:
        head = PSPHead(c4, num_classes, width=width, **kw)
    if aux is None:
        aux = backbone_name in RESNET_DEPTHS
    aux_head = FCNHead(c3, num_classes, **kw) if aux else None
    spec = dict(name=name, num_classes=num_classes,
                variant=variant if backbone_name in RESNET_DEPTHS else "cirkd",
                output_stride=output_stride, head_width=width, aux=bool(aux),
                width_multiplier=width_multiplier)
    model = Segmentor(backbone, head, aux_head, spec=spec)
    set_kernels(model, kernels)
    return model


def _build_segformer(name: str, mit: str, *, num_classes: int, output_stride: int,
                     head_width: int | None, aux: bool | None, width_multiplier: float,
                     dtype: Dtype, param_dtype: Dtype, drop_path_rate: float | None,
                     rngs: nnx.Rngs) -> Segmentor:
    if output_stride != 8:
        raise ValueError(f"output_stride does not apply to {name}: its strides are fixed (c1..c4 "
                         f"at 4, 8, 16, 32, logits at 4); leave it at 8, got {output_stride!r}.")
    if aux:
        raise ValueError(f"{name} has no auxiliary head; set aux to None or False.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    backbone = build_mix_transformer(
        mit, width_multiplier=width_multiplier,
        drop_path_rate=DROP_PATH_RATE if drop_path_rate is None else drop_path_rate, **kw)
    width = DEFAULT_HEAD_WIDTHS["segformer"][mit] if head_width is None else head_width
    head = SegFormerHead(backbone.channels, num_classes, width=width, **kw)
    spec = dict(name=name, num_classes=num_classes, variant="cirkd", output_stride=output_stride,
                head_width=width, aux=False, width_multiplier=width_multiplier)
    return Segmentor(backbone, head, None, spec=spec)


def predict(model: Segmentor, images: Array) -> Array:
    """Eval-mode logits resized to the input size, bilinear with align_corners=True as CIRKD's
    evaluation does (cirkd-models.md §3.1): (N, H, W, 3) → (N, H, W, K)."""
    logits = model(images, train=False).logits
    return resize_bilinear_align_corners(logits, images.shape[1:3])


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` entries; BN running statistics excluded)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Size and cost of one forward pass.

    ``flops`` counts the matrix products and convolutions, a multiply-add as 2 (XLA's convention;
    halve it for "MACs" / "multi-adds"), the same on every platform
    (:func:`kdjax.ops.cost.traced_flops`).
    """

    name: str
    input_shape: tuple[int, ...]
    params: int
    flops: float

    def __str__(self) -> str:
        cost = f"{self.flops / 1e9:,.1f} GFLOPs per forward pass (eval mode)"
        return f"{self.name} on input {self.input_shape} (NHWC): {self.params:,} parameters, {cost}"


def summary(name: str, input_shape: Sequence[int], num_classes: int = 19,
            **kwargs) -> ModelSummary:
    """Prints and returns the parameter count and the forward FLOPs of a named segmentor.

    The model is built under ``nnx.eval_shape`` (no weights are allocated) and the FLOPs are
    counted from the traced eval-mode forward pass (:func:`kdjax.ops.cost.traced_flops`), e.g.
    234.4 GFLOPs for ``summary('deeplabv3_resnet18', (1, 512, 1024, 3))``.

    Args:
      name: a model name accepted by :func:`build_segmentor`.
      input_shape: (N, H, W, C), e.g. (1, 512, 1024, 3).
      num_classes: K.
      **kwargs: further :func:`build_segmentor` options (variant, output_stride, head_width, aux,
        dtype, param_dtype).
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, H, W, C), got {input_shape!r}.")
    model = nnx.eval_shape(
        lambda: build_segmentor(name, num_classes=num_classes, rngs=nnx.Rngs(0), **kwargs))
    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images, train=False).logits

    images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    result = ModelSummary(name=name, input_shape=input_shape, params=count_params(model),
                          flops=traced_flops(jax.jit(forward).trace(state, images)))
    print(result)
    return result
