"""Hides installed top-level modules from this interpreter and every Python process it starts, as
if they were not installed: with this folder on ``PYTHONPATH``, Python runs this file at start-up,
and ``HIDDEN_MODULES`` (comma-separated, e.g. ``torch``) names the modules.

``import torch`` then raises ``ModuleNotFoundError`` and ``importlib.util.find_spec('torch')``
returns None, while ``sys.modules`` stays as it would be (libraries that look there for loaded
modules see nothing). ``make test-without-torch`` runs the tests whose expectations change
without PyTorch this way, and the packaging tests hide an extra's modules to see kdjax's core
install.
"""

import os
import sys

HIDDEN = frozenset(filter(None, os.environ.get("HIDDEN_MODULES", "").split(",")))


class _HidingFinder:
    """A path entry finder that finds nothing of the hidden modules and defers the rest."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, fullname, target=None):
        if fullname.partition(".")[0] in HIDDEN:
            return None
        return self._finder.find_spec(fullname, target)

    def __getattr__(self, name):
        return getattr(self._finder, name)


def _hiding(hook):
    def path_hook(path):
        return _HidingFinder(hook(path))
    return path_hook


if HIDDEN:
    # The site-packages folders are searched through these hooks; their finders were cached
    # while Python started.
    sys.path_hooks[:] = [_hiding(hook) for hook in sys.path_hooks]
    sys.path_importer_cache.clear()
