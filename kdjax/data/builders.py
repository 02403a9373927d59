"""The repository's TFDS segmentation builders (``datasets/<name>/``).

``datasets/`` is installed with kdjax as the package ``kdjax_datasets`` (not as ``datasets``, which
is Hugging Face's), and :func:`load_builder` imports ``<name>/<name>_dataset_builder.py`` from it
as ``kdjax_datasets.<name>.<name>_dataset_builder``. A dataset that is already prepared in
``data_dir`` is opened from its files alone, without the builder sources.

Typical use::

    builder = prepare("camvid", data_dir="~/tensorflow_datasets", manual_dir="~/downloads/camvid")
    ds = builder.as_dataset(split="train")
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from kdjax.data.errors import DataError

log = logging.getLogger(__name__)

DATASETS_DIR_ENV = "KDJAX_DATASETS_DIR"
_PACKAGE = "kdjax_datasets"
_BUILDER_SUFFIX = "_dataset_builder.py"


class DatasetFilesError(FileNotFoundError):
    """Files a builder needs are missing from ``manual_dir``, or a split has no examples.

    Attributes:
      missing: the expected files or folders that were not found, one entry each.
    """

    def __init__(self, message: str, missing: Sequence[str] = ()):
        super().__init__(message)
        self.missing = tuple(missing)


def datasets_dir() -> Path:
    """The folder holding one sub-folder per builder: ``$KDJAX_DATASETS_DIR`` if set, else where
    the installed ``kdjax_datasets`` package lies (``datasets/`` itself in an editable install)."""
    override = os.environ.get(DATASETS_DIR_ENV)
    if override:
        return Path(override).expanduser().resolve()
    if _PACKAGE in sys.modules:
        return Path(sys.modules[_PACKAGE].__path__[0])
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None:
        raise DataError(f"the dataset builders ({_PACKAGE}) are not installed: reinstall kdjax "
                        f"(`make install`) or set {DATASETS_DIR_ENV} to a datasets/ folder.")
    return Path(next(iter(spec.submodule_search_locations)))


def builder_names() -> tuple[str, ...]:
    """Names of the builders found in :func:`datasets_dir`, sorted."""
    root = datasets_dir()
    if not root.is_dir():
        return ()
    return tuple(sorted(p.name for p in root.iterdir() if (p / f"{p.name}{_BUILDER_SUFFIX}").is_file()))


def _datasets_package() -> types.ModuleType:
    """The package ``kdjax_datasets`` whose path is :func:`datasets_dir`, created on first use.

    Builder modules import ``datasets/_common.py`` relative to it (``from .. import _common``).
    """
    package = sys.modules.get(_PACKAGE)
    if package is None:
        root = datasets_dir()
        package = types.ModuleType(_PACKAGE, "The repository's datasets/ folder.")
        package.__path__ = [str(root)]
        # TFDS finds a builder's README.md from the top package's __file__ (its parent folder).
        # datasets/ deliberately has no __init__.py: it would shadow Hugging Face's `datasets`.
        package.__file__ = str(root / "__init__.py")
        sys.modules[_PACKAGE] = package
    return package


def builder_module(name: str) -> types.ModuleType:
    """Imports ``datasets/<name>/<name>_dataset_builder.py`` as
    ``kdjax_datasets.<name>.<name>_dataset_builder``.

    The module is imported once per process, from the datasets folder that :func:`datasets_dir`
    gives at the first import. Like ``tfds build``, it does not enter TFDS's registry of builder
    names: TFDS has its own, different ``cityscapes``.

    Raises:
      ValueError: if there is no such builder; the message lists the available ones.
    """
    package = _datasets_package()
    module_file = Path(package.__path__[0]) / name / f"{name}{_BUILDER_SUFFIX}"
    if not module_file.is_file():
        raise ValueError(
            f"no dataset builder {name!r}: {module_file} does not exist; "
            f"available builders: {', '.join(builder_names()) or 'none'}"
        )
    with tfds.core.registered.skip_registration():
        return importlib.import_module(f"{_PACKAGE}.{name}.{name}_dataset_builder")


def builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
    """The ``Builder`` class of :func:`builder_module` ``(name)``."""
    return builder_module(name).Builder


def as_data_path(location: str | os.PathLike) -> epath.Path:
    """A data or manual directory: a URL such as ``gs://bucket/tfds`` as it is (TFDS reads and
    writes it through its own file systems), a local path with ``~`` expanded."""
    text = os.fspath(location)
    return epath.Path(text if "://" in text else os.path.expanduser(text))


def _prepared_dir(data_dir: epath.Path, name: str, config: str | None) -> epath.Path | None:
    """``<data_dir>/<name>/[<config>/]<version>`` of the newest prepared version, or None.

    Without ``config``, the default config recorded at preparation time is used (if any).
    """
    dataset_dir = data_dir / name
    config = config or tfds.core.dataset_builder.load_default_config_name(dataset_dir)
    config_dir = dataset_dir / config if config else dataset_dir
    versions = [
        tfds.core.Version(d.name)
        for d in (config_dir.iterdir() if config_dir.is_dir() else ())
        if tfds.core.Version.is_valid(d.name) and (d / "dataset_info.json").is_file()
    ]
    return config_dir / str(max(versions)) if versions else None


def load_builder(
    name: str, *, data_dir: str | os.PathLike | None = None, config: str | None = None
) -> tfds.core.DatasetBuilder:
    """The TFDS builder ``name`` (with builder config ``config``), reading and writing ``data_dir``.

    If the dataset is already prepared in ``data_dir`` it is opened from its files, so neither the
    builder sources nor the original downloads are needed.
    """
    if data_dir is not None:
        data_dir = as_data_path(data_dir)
        prepared = _prepared_dir(data_dir, name, config)
        if prepared is not None:
            return tfds.builder_from_directory(prepared)
        data_dir = os.fspath(data_dir)
    return builder_class(name)(data_dir=data_dir, config=config)


def prepare(
    name: str,
    *,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike,
    config: str | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds ``name`` into ``data_dir`` from the user's files in ``manual_dir`` (once).

    Returns:
      the prepared builder; call ``as_dataset(split=...)`` on it.

    Raises:
      DatasetFilesError: if ``manual_dir`` lacks files the builder needs (the message names every
        expected file or folder and where to download it), or a split has no examples.
      kdjax.data.errors.CorruptExampleError: for an image or label file that cannot be decoded.
      kdjax.data.errors.SizeMismatchError: for an image/label size mismatch or a label that is not
        single-channel.
    """
    builder = load_builder(name, data_dir=data_dir, config=config)
    manual_dir = os.fspath(as_data_path(manual_dir))
    log.info("preparing %s in %s from %s", builder.info.full_name, builder.data_dir, manual_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m kdjax.data.builders NAME --manual_dir DIR --data_dir DIR [--config CONFIG]``."""
    parser = argparse.ArgumentParser(
        prog="python -m kdjax.data.builders",
        description="Build a segmentation dataset from the files in manual_dir into data_dir.",
    )
    parser.add_argument("name", choices=builder_names())
    parser.add_argument("--manual_dir", required=True, help="the downloaded archives or folders")
    parser.add_argument("--data_dir", required=True, help="the TFDS data directory to write")
    parser.add_argument("--config", default=None, help="builder config, e.g. plain or 60")
    args = parser.parse_args(argv)
    try:
        builder = prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir, config=args.config)
    except (FileNotFoundError, DataError) as error:  # missing or bad input: the message says which
        parser.exit(1, f"error: {error}\n")
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
    print(f"{builder.info.full_name} in {builder.data_dir}: {splits}")


if __name__ == "__main__":
    main()
