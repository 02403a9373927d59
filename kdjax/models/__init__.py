"""Segmentation models in Flax NNX (NHWC): layers with PyTorch semantics, backbones (ResNet,
MobileNetV2, the SegFormer MiT encoder), heads, segmentors and the trainable distillation modules
that live beside a student."""

from kdjax.models.distill_modules import (CirkdGcn, CirkdProjectionHead, Connector, MaskedGenerator,
                                          SaganDiscriminator, SelfAttention, SpectralNormConv2d)
from kdjax.models.heads import DeepLabV3Head, DeepLabV3PlusHead, FCNHead, PSPHead, aspp_rates
from kdjax.models.layers import (BatchNorm2d, Conv2d, ConvBNReLU, adaptive_avg_pool,
                                 max_pool_torch, resize_bilinear_align_corners)
from kdjax.models.mobilenet import InvertedResidual, MobileNetV2
from kdjax.models.resnet import BasicBlock, Bottleneck, ResNet
from kdjax.models.segformer import (MIT_VARIANTS, MixTransformer, SegFormerHead,
                                    build_mix_transformer)
from kdjax.models.segmentor import (DEFAULT_HEAD_WIDTHS, MODEL_NAMES, ModelSummary, Segmentor,
                                    SegmentorOutput, build_segmentor, count_params, predict,
                                    summary)

__all__ = [
    "DEFAULT_HEAD_WIDTHS",
    "MODEL_NAMES",
    "BasicBlock",
    "BatchNorm2d",
    "Bottleneck",
    "CirkdGcn",
    "CirkdProjectionHead",
    "Connector",
    "MaskedGenerator",
    "Conv2d",
    "ConvBNReLU",
    "DeepLabV3Head",
    "DeepLabV3PlusHead",
    "FCNHead",
    "InvertedResidual",
    "MIT_VARIANTS",
    "MixTransformer",
    "MobileNetV2",
    "ModelSummary",
    "PSPHead",
    "ResNet",
    "SaganDiscriminator",
    "SegFormerHead",
    "Segmentor",
    "SegmentorOutput",
    "SelfAttention",
    "SpectralNormConv2d",
    "adaptive_avg_pool",
    "aspp_rates",
    "build_mix_transformer",
    "build_segmentor",
    "count_params",
    "max_pool_torch",
    "predict",
    "resize_bilinear_align_corners",
    "summary",
]
