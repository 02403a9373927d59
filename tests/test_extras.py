"""What the core install (no extras) imports and runs, and the one line that names the extra where
a room needs more. Each case runs in a fresh process with the extras' modules hidden
(tests/hidden_modules), as if they were not installed."""

import importlib.metadata
import re
import subprocess
import sys

import pytest

import kdjax
from kdjax._extras import EXTRA_MODULES, require
from tests.python_process import REPO, plain_cpu_env

# What the core install lacks: every extra's modules (scipy comes with jax, Orbax and etils with
# flax).
NOT_IN_CORE = sorted({*EXTRA_MODULES["train"], *EXTRA_MODULES["data"], *EXTRA_MODULES["torch"],
                      "gcsfs"} - {"scipy", "orbax", "etils"})


def run_without(modules, code):
    """Runs ``python -c code`` in the repository root with ``modules`` hidden; returns the
    completed process."""
    env = dict(plain_cpu_env(), PYTHONPATH=str(REPO / "tests" / "hidden_modules"),
               HIDDEN_MODULES=",".join(modules))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


CORE = r'''
import importlib.util, sys
assert importlib.util.find_spec("tensorflow") is None and importlib.util.find_spec("torch") is None
import jax, jax.numpy as jnp
from flax import nnx
from kdjax import convert, losses, models
from kdjax.commands import main

rng = jax.random.key(0)
student, teacher = jax.random.normal(rng, (2, 8, 8, 5)), jax.random.normal(jax.random.key(1), (2, 8, 8, 5))
value, grad = jax.value_and_grad(lambda s: losses.channel_wise_divergence(s, teacher, tau=4.0))(student)
assert value > 0 and grad.shape == student.shape and bool(jnp.isfinite(grad).all())
model = models.build_segmentor("deeplabv3_mobilenetv2", num_classes=3, width_multiplier=0.25,
                               head_width=8, rngs=nnx.Rngs(0))
assert model(jnp.zeros((1, 32, 32, 3)), train=False).logits.shape == (1, 4, 4, 3)
loaded = [m for m in ("tensorflow", "ml_collections", "matplotlib", "torch") if m in sys.modules]
assert not loaded, loaded
main.main(["--version"])
'''


@pytest.mark.end_to_end
def test_the_core_runs_a_loss_and_a_model_without_any_extra():
    proc = run_without(NOT_IN_CORE, CORE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["kdjax", kdjax.__version__]


@pytest.mark.parametrize("module", ["kdjax.training", "kdjax.config", "kdjax.distill",
                                    "kdjax.evaluation", "kdjax.io.networks"])
def test_a_room_of_the_trainer_names_the_train_extra(module):
    proc = run_without(NOT_IN_CORE, f"import {module}")
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[-1] == (
        f"ModuleNotFoundError: {module} needs kdjax's 'train' extra (ml_collections, matplotlib, "
        f"PIL, tensorboard are not installed): pip install 'kdjax[train]'")


def test_reading_a_pytorch_file_names_the_torch_extra(tmp_path):
    code = ("from kdjax.convert import load_torch_checkpoint\n"
            f"load_torch_checkpoint({str(tmp_path / 'teacher.pth')!r})\n")
    proc = run_without(["torch"], code)
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[-1].endswith(
        "reading PyTorch checkpoints needs PyTorch: pip install 'kdjax[torch]'")


def test_the_message_names_each_missing_module(monkeypatch):
    monkeypatch.setitem(EXTRA_MODULES, "demo", ("json", "no_such_module_a", "no_such_module_b"))
    with pytest.raises(ModuleNotFoundError, match=re.escape(
            "x needs kdjax's 'demo' extra (no_such_module_a, no_such_module_b are not "
            "installed): pip install 'kdjax[demo]'")):
        require("demo", by="x")
    monkeypatch.setitem(EXTRA_MODULES, "demo", ("json", "no_such_module_a"))
    with pytest.raises(ModuleNotFoundError, match=re.escape("(no_such_module_a is not installed)")):
        require("demo", by="x")
    monkeypatch.setitem(EXTRA_MODULES, "demo", ("json",))
    require("demo", by="x")


def test_the_version_has_one_source():
    assert importlib.metadata.version("kdjax") == kdjax.__version__
    proc = subprocess.run([sys.executable, "-m", "kdjax", "--version"], cwd=REPO,
                          env=plain_cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == f"kdjax {kdjax.__version__}"
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {kdjax.__version__}" in changelog
