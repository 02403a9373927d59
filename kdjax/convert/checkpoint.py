"""Reading PyTorch checkpoints into plain NumPy state dicts (torch is an optional dependency)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from kdjax.convert.errors import TorchCheckpointError

# Training scripts often save {'state_dict': ..., 'epoch': ...} or {'model': ...} instead of the
# bare state dict.
WRAPPER_KEYS = ("state_dict", "model")
# What DistributedDataParallel / DataParallel prepend to every key when the wrapper is saved.
DDP_PREFIX = "module."


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError("reading PyTorch checkpoints needs PyTorch: pip install 'kdjax[torch]'"
                          ) from error
    return torch


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def to_numpy(value: Any) -> np.ndarray:
    """A tensor-like (torch tensor, NumPy or JAX array) as a NumPy array, on the host."""
    if hasattr(value, "detach"):  # a torch tensor; NumPy has no bfloat16, so widen floats first
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``torch.save``d state dict (also inside a dict under 'state_dict' or 'model').

    Loads with ``weights_only=True`` (no arbitrary code runs) onto the CPU and returns
    {key: NumPy array}. Raises FileNotFoundError for a missing file and TorchCheckpointError, naming
    the path, for a truncated, corrupt or non-state-dict file.
    """
    torch = _import_torch()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged files
        raise TorchCheckpointError(
            f"cannot read the PyTorch checkpoint {path}: {type(error).__name__}: {error}. The file "
            "may be truncated or corrupt (download or copy it again), or not written by torch.save."
        ) from error
    state_dict = _unwrap(obj)
    if not _is_tensor_dict(state_dict):
        found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise TorchCheckpointError(
            f"{path} holds no state dict (a mapping from names to tensors, possibly under "
            f"{' or '.join(map(repr, WRAPPER_KEYS))}); found {found}.")
    return {key: to_numpy(value) for key, value in state_dict.items()}


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwraps, drops a ``module.`` prefix and the BN ``num_batches_tracked`` counters; NumPy values."""
    out = {}
    for key, value in _unwrap(state_dict).items():
        if key.startswith(DDP_PREFIX):
            key = key[len(DDP_PREFIX):]
        if not key.endswith("num_batches_tracked"):
            out[key] = to_numpy(value)
    return out
