"""The installed distribution holds every package of the tree, the dataset builders included."""

import tomllib
from pathlib import Path

import setuptools

from tests.python_process import run_python

REPO = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    kdjax = {"kdjax", *(f"kdjax.{p}" for p in setuptools.find_packages(REPO / "kdjax"))}
    datasets = {"kdjax_datasets",
                *(f"kdjax_datasets.{p}" for p in setuptools.find_packages(REPO / "datasets"))}
    assert listed == kdjax | datasets


def test_the_builders_are_found_through_the_installed_package():
    # A fresh process: in this one an earlier test may have loaded the builders already.
    code = ("import importlib.util, os\n"
            "os.environ.pop('KDJAX_DATASETS_DIR', None)\n"
            "spec = importlib.util.find_spec('kdjax_datasets')\n"
            "from kdjax.data import builders\n"
            "print(next(iter(spec.submodule_search_locations)))\n"
            "print(builders.datasets_dir())\n"
            "print(','.join(builders.builder_names()))\n")
    installed, found, names = run_python(code).split()[-3:]
    assert found == installed
    assert names.split(",") == ["ade20k", "camvid", "cityscapes", "pascal_context", "voc_aug"]
