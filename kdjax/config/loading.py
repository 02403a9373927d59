"""Loading experiment configs: ``get_config()`` files, the ``:local`` small-run switch, and
``--config.key=value`` overrides that refuse unknown keys."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


# The one-row config files that the family files replaced → the argument that now selects the same
# experiment (docs/configs.md, "Replaced paths").
_CIRKD_TABLE_METHODS = ("kd", "cwd", "nfd", "pfs_wpi", "fakd_kd", "fakd_cwd", "skd", "ifvd",
                        "cirkd", "dist", "at", "fitnet")
REPLACED_CONFIGS = {
    **{f"configs/cityscapes/deeplabv3_r101_{student}_{method}.py":
       f"configs/cityscapes.py:student={student},method={method}"
       for student in ("r18", "mbv2") for method in _CIRKD_TABLE_METHODS},
    "configs/cityscapes/pspnet_r101_r18_cwd.py":
        "configs/cityscapes_pspnet.py:student=r18,method=cwd_logits",
    "configs/ade20k/deeplabv3_r101_r18_cirkd.py": "configs/ade20k.py:student=r18,method=cirkd",
    "configs/voc_aug/deeplabv3_r101_r18_cirkd.py": "configs/voc_aug.py:student=r18,method=cirkd",
}


def _replacement(path: Path, arg: str) -> str | None:
    """``--config=`` for a replaced file given as ``path`` (from the project root, or absolute),
    keeping the directory it was given in and its argument (``:local``)."""
    text = path.as_posix()
    for old, new in REPLACED_CONFIGS.items():
        if text == old or text.endswith("/" + old):
            return text.removesuffix(old) + new + (f",{arg}" if arg else "")
    return None


def _load_module(path: Path, arg: str):
    if not path.is_file():
        new = _replacement(path, arg)
        if new:
            raise ConfigError(f"{path} was replaced: use --config={new}")
        raise ConfigError(f"config file {str(path)!r} does not exist; pass --config=PATH to a "
                          f"Python file with a get_config() function (see configs/).")
    spec = importlib.util.spec_from_file_location(f"kdjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} defines no get_config() function.")
    return module


def load_config(spec: str) -> ConfigDict:
    """Loads ``FILE`` or ``FILE:ARG`` (e.g. ``configs/cityscapes.py:student=r18,method=cwd``) and
    returns its config.

    ``ARG`` is passed to ``get_config(arg)``; every file in ``configs/`` accepts ``local`` in it,
    which shrinks the run to a CPU smoke test. A file that a family file replaced is an error that
    names the argument to use instead.
    """
    path_text, _, arg = spec.partition(":")
    module = _load_module(Path(path_text), arg)
    takes_arg = bool(inspect.signature(module.get_config).parameters)
    if arg and not takes_arg:
        raise ConfigError(f"{path_text}: get_config() takes no argument, so ':{arg}' cannot be "
                          f"used.")
    config = module.get_config(arg or None) if takes_arg else module.get_config()
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path_text}: get_config() must return an ml_collections.ConfigDict.")
    return config


def _all_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, ConfigDict):
            keys.extend(_all_keys(value, name + "."))
    return keys


def _parse_value(text: str, current):
    if isinstance(current, str) or (current is None and not _looks_literal(text)):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"cannot parse {text!r} as a Python literal for a field holding "
                          f"{current!r}.") from None
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def _looks_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return False
    return True


def apply_overrides(config: ConfigDict, overrides: Iterable[str]) -> ConfigDict:
    """Applies ``key.sub=value`` overrides in place; values are Python literals (or plain strings).

    An unknown key raises :class:`ConfigError` listing the nearest existing keys, so a typo stops
    the run before any work starts. New keys can be added under a dict-valued field only where the
    field is empty by design (e.g. ``distill.terms``), with a full ``ConfigDict`` in the file.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value.")
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in parent.split(".") if parent else []:
            node = node.get(part) if isinstance(node, ConfigDict) else None
            if not isinstance(node, ConfigDict):
                break
        if not isinstance(node, ConfigDict) or leaf not in node:
            near = difflib.get_close_matches(key, _all_keys(config), n=5, cutoff=0.6)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise ConfigError(f"unknown config key {key!r}.{hint}")
        current = node[leaf]
        if isinstance(current, ConfigDict):
            raise ConfigError(f"{key!r} is a group of settings; override one of its fields, e.g. "
                              f"{key}.{next(iter(current.keys()), 'field')}=...")
        with node.unlocked():
            node[leaf] = _parse_value(text, current)
    return config


def check_known_keys(config: ConfigDict, reference: ConfigDict, *, where: str = "config") -> None:
    """Raises :class:`ConfigError` if ``config`` has a key that ``reference`` (the defaults) lacks.

    Groups whose keys are free-form (named loss terms, method lists, loss options) are skipped by
    giving them an empty ``ConfigDict`` in the reference.
    """
    for key, value in config.items():
        if key not in reference:
            near = difflib.get_close_matches(key, list(reference.keys()), n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise ConfigError(f"unknown config key {where}.{key}.{hint}")
        ref = reference[key]
        if isinstance(ref, ConfigDict) and len(ref) and isinstance(value, ConfigDict):
            check_known_keys(value, ref, where=f"{where}.{key}")


def parse_config_spec(argv_config: str, overrides: Sequence[str]) -> ConfigDict:
    """``--config=FILE[:ARG]`` plus ``--config.key=value`` items → the final config."""
    return apply_overrides(load_config(argv_config), overrides)


def config_to_json(config: ConfigDict) -> str:
    """The config as JSON, for checkpoints and logs (tuples become lists)."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str)
