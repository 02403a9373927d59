"""PyTorch (NCHW) reference definitions of every architecture kdjax imports, with the original key names.

Written from ``cirkd-models.md`` (CIRKD's DeepLabV3 / PSPNet on a deep-stem ResNet or a dilated
MobileNetV2) and from torchvision's published ResNet / MobileNetV2 layouts; torchvision itself is not a
dependency. Their ``state_dict()`` keys and shapes equal the originals', so the parity tests can feed a
randomized state dict to ``kdjax.convert`` and compare the outputs. Importing this package needs torch.
"""

from tests.torch_reference.heads import AsppHead, FcnHead, PspHead
from tests.torch_reference.mobilenet import MobileNetV2
from tests.torch_reference.randomize import randomize
from tests.torch_reference.resnet import ResNet
from tests.torch_reference.segmentors import (
    CirkdSegmentor,
    build_cirkd,
    cirkd_head_channels,
    torchvision_mobilenet_v2,
    torchvision_resnet,
)

__all__ = [
    "AsppHead",
    "CirkdSegmentor",
    "FcnHead",
    "MobileNetV2",
    "PspHead",
    "ResNet",
    "build_cirkd",
    "cirkd_head_channels",
    "randomize",
    "torchvision_mobilenet_v2",
    "torchvision_resnet",
]
