"""The installed distribution holds every package of the tree, the dataset builders included;
(slow) the core wheel, built from the sdist, installs and runs in an environment of its own."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import setuptools

import kdjax
from tests.python_process import plain_cpu_env, run_python

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


# What the core wheel must do in an environment of its own: the losses with their gradients and
# the models, without TensorFlow, PyTorch or the trainer's dependencies, and the trainer names
# the extra it needs.
CORE_CHECK = r'''
import importlib.metadata, importlib.util, sys
import jax, jax.numpy as jnp
from flax import nnx
import kdjax
from kdjax import losses, models

assert importlib.metadata.version("kdjax") == kdjax.__version__
student = jax.random.normal(jax.random.key(0), (2, 16, 16, 7))
teacher = jax.random.normal(jax.random.key(1), (2, 16, 16, 7))
labels = jax.random.randint(jax.random.key(2), (2, 16, 16), 0, 7)
loss = lambda s: losses.channel_wise_divergence(s, teacher) + losses.cross_entropy(s, labels)
value, grad = jax.value_and_grad(loss)(student)
assert bool(jnp.isfinite(value)) and grad.shape == student.shape
net = models.build_segmentor("deeplabv3_resnet18", num_classes=7, width_multiplier=0.125,
                             head_width=8, rngs=nnx.Rngs(0))
assert net(jnp.zeros((1, 32, 32, 3)), train=False).logits.shape == (1, 4, 4, 7)
assert importlib.util.find_spec("tensorflow") is None and importlib.util.find_spec("torch") is None
assert importlib.util.find_spec("kdjax_datasets") is not None
try:
    import kdjax.training
except ModuleNotFoundError as error:
    assert "pip install 'kdjax[train]'" in str(error), error
else:
    raise AssertionError("kdjax.training imported without the train extra")
print("ok", kdjax.__version__)
'''


@pytest.mark.slow
def test_the_core_wheel_installs_and_runs_alone(tmp_path):
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    # Without options, build makes the sdist and then the wheel from it: a file that the sdist
    # lacks fails here.
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)])
    [sdist], [wheel] = sorted(dist.glob("kdjax-*.tar.gz")), sorted(dist.glob("kdjax-*.whl"))
    assert sdist.name.startswith(f"kdjax-{kdjax.__version__}")
    venv = tmp_path / "core"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "--quiet", str(wheel)])
    installed = {line.split("==")[0].lower().replace("_", "-")
                 for line in run([python, "-m", "pip", "list", "--format=freeze"]).splitlines()}
    assert {"jax", "flax", "optax", "numpy"} <= installed
    assert not installed & {"tensorflow", "tensorflow-cpu", "tensorflow-datasets", "torch",
                            "ml-collections", "matplotlib", "tensorboard", "gcsfs"}
    # Outside the repository, so that the installed package is the one imported.
    assert run([python, "-c", CORE_CHECK], cwd=tmp_path).split() == ["ok", kdjax.__version__]


def run(command, cwd=REPO) -> str:
    env = {k: v for k, v in plain_cpu_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout
