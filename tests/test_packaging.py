"""The installed distribution holds every package of the tree, the dataset builders included."""

import importlib.util
import tomllib
from pathlib import Path

import setuptools

from kdjax.data import builders

REPO = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    kdjax = {"kdjax", *(f"kdjax.{p}" for p in setuptools.find_packages(REPO / "kdjax"))}
    datasets = {"kdjax_datasets",
                *(f"kdjax_datasets.{p}" for p in setuptools.find_packages(REPO / "datasets"))}
    assert listed == kdjax | datasets


def test_the_builders_are_found_through_the_installed_package(monkeypatch):
    monkeypatch.delenv(builders.DATASETS_DIR_ENV, raising=False)
    spec = importlib.util.find_spec("kdjax_datasets")
    assert spec is not None, "kdjax_datasets is not installed"
    assert builders.datasets_dir() == Path(next(iter(spec.submodule_search_locations)))
    assert set(builders.builder_names()) == {"ade20k", "camvid", "cityscapes", "pascal_context",
                                             "voc_aug"}
