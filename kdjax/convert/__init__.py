"""Import PyTorch checkpoints (CIRKD segmentors, torchvision / CIRKD ImageNet backbones) into kdjax.

``from_torch(name, state_dict, num_classes=...)`` returns a ready NNX model;
``load_torch_checkpoint(path)`` reads a ``torch.save`` file (torch is needed only for that).
"""

from kdjax.convert.checkpoint import load_torch_checkpoint
from kdjax.convert.errors import CheckpointMismatchError, TorchCheckpointError
from kdjax.convert.importer import BACKBONE_SOURCES, SEGMENTOR_SOURCES, SOURCES, from_torch

__all__ = [
    "BACKBONE_SOURCES",
    "CheckpointMismatchError",
    "SEGMENTOR_SOURCES",
    "SOURCES",
    "TorchCheckpointError",
    "from_torch",
    "load_torch_checkpoint",
]
