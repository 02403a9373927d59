"""kdjax's optional dependency groups ("extras", pyproject.toml) and the import guard that names
them.

``pip install kdjax`` installs the core: the losses, the models and the PyTorch import's
converters. A room that needs more calls :func:`require` before its third-party imports, so that a
core install fails there with one line that says what to install, not with the name of whichever
dependency happened to be imported first.
"""

from __future__ import annotations

import importlib.util

# The top-level modules each extra provides that kdjax imports.
EXTRA_MODULES = {
    "train": ("ml_collections", "orbax", "etils", "matplotlib", "PIL", "tensorboard"),
    "data": ("tensorflow", "tensorflow_datasets", "scipy", "PIL"),
    "torch": ("torch",),
}


def require(extra: str, *, by: str) -> None:
    """Raises ``ModuleNotFoundError`` unless every module of ``extra`` can be imported.

    Args:
      extra: a key of :data:`EXTRA_MODULES`.
      by: what needs the extra (a module name), for the message.

    Raises:
      ModuleNotFoundError: one line naming ``extra``, the missing modules and the install
        command, e.g. ``kdjax.training needs kdjax's 'train' extra (ml_collections is not
        installed): pip install 'kdjax[train]'``.
    """
    missing = [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ModuleNotFoundError(
            f"{by} needs kdjax's '{extra}' extra ({', '.join(missing)} {verb} not installed): "
            f"pip install 'kdjax[{extra}]'", name=missing[0])
