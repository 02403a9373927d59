"""Segmentation models in Flax NNX (NHWC): layers with PyTorch semantics, backbones, heads."""

from kdjax.models.layers import (BatchNorm2d, Conv2d, ConvBNReLU, adaptive_avg_pool,
                                 max_pool_torch, resize_bilinear_align_corners)
from kdjax.models.mobilenet import InvertedResidual, MobileNetV2
from kdjax.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "BasicBlock",
    "BatchNorm2d",
    "Bottleneck",
    "Conv2d",
    "ConvBNReLU",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "adaptive_avg_pool",
    "max_pool_torch",
    "resize_bilinear_align_corners",
]
