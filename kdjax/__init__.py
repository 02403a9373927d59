"""kdjax: knowledge distillation for semantic segmentation in JAX/Flax.

Rooms: ``kdjax.losses`` (the distillation losses, pure functions) and ``kdjax.models`` (Flax NNX
segmentors and the modules distillation trains) need only the core install; ``kdjax.convert``
imports PyTorch state dicts (reading ``.pth`` files needs the ``torch`` extra); ``kdjax.training``
(the trainer's Python API), ``kdjax.config`` and the ``kdjax`` command need the ``train`` extra,
and input pipelines over real datasets the ``data`` extra.
"""

# The release, in one place: the package metadata (pyproject.toml) and `kdjax --version` read it.
__version__ = "0.1.0"
