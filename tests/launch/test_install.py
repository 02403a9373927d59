"""`make install ACCEL=cpu|cuda|tpu`: which requirement set each installs, and (slow) that the CUDA
and TPU sets resolve to the same jax release as the CPU one, with JAX's plugin for it."""

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# What a calling make passes down (`make test WITH_TORCH=1` runs the tests): the dry runs must see
# only their own arguments.
MAKE_SETTINGS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ACCEL", "WITH_TORCH")


def make_dry_run(*args, venv):
    # A .venv of its own, so that no install stamp of this repository's hides the install steps.
    env = {k: v for k, v in os.environ.items() if k not in MAKE_SETTINGS}
    return subprocess.run(["make", "-n", "-C", REPO, "--no-print-directory", *args,
                           f"VENV={venv}"], env=env, capture_output=True, text=True, check=False)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", ["install", "demo", "test"])
# Each build has its own install stamp, so asking for another one installs it.
@pytest.mark.parametrize("accel,requirements,stamp", [
    ([], ["requirements.txt"], ".installed-cpu"),
    (["ACCEL=cpu"], ["requirements.txt"], ".installed-cpu"),
    (["ACCEL=cuda"], ["requirements-cuda.txt"], ".installed-cuda"),
    (["ACCEL=tpu"], ["requirements-tpu.txt"], ".installed-tpu"),
    (["ACCEL=cuda", "WITH_TORCH=1"], ["requirements-cuda.txt", "requirements-torch.txt"],
     ".installed-cuda-torch"),
])
def test_make_installs_the_requirement_set_accel_names(target, accel, requirements, stamp,
                                                       tmp_path):
    venv = tmp_path / "venv"
    result = make_dry_run(target, *accel, venv=venv)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pip = [shlex.split(line) for line in lines if " -m pip install -r " in line]
    assert len(pip) == 1, result.stdout
    assert [word for before, word in zip(pip[0], pip[0][1:]) if before == "-r"] == requirements
    assert f"touch {venv}/{stamp}" in lines


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_refuses_an_unknown_accel(tmp_path):
    result = make_dry_run("install", "ACCEL=rocm", venv=tmp_path / "venv")
    assert result.returncode != 0 and result.stdout == ""
    assert "ACCEL=rocm is not one of cpu, cuda, tpu" in result.stderr


def resolve(requirements, report):
    """The packages a fresh install of `requirements` would get (pip resolves, installs nothing):
    name -> version."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), "-r", requirements], cwd=REPO, capture_output=True, text=True,
        check=False)
    assert result.returncode == 0, result.stderr
    with open(report) as file:
        return {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.load(file)["install"]}


@pytest.fixture(scope="module")
def cpu_jax(tmp_path_factory):
    return resolve("requirements.txt", tmp_path_factory.mktemp("cpu") / "report.json")["jax"]


@pytest.mark.slow
# Both builds' wheels exist for Linux on x86-64 (libtpu's only for it).
@pytest.mark.skipif((platform.system(), platform.machine()) != ("Linux", "x86_64"),
                    reason="resolves the accelerator wheels for Linux x86-64")
@pytest.mark.parametrize("requirements,plugins", [
    ("requirements-cuda.txt", ["jax-cuda12-plugin", "jax-cuda12-pjrt"]),
    ("requirements-tpu.txt", ["libtpu"]),
])
def test_accelerator_sets_resolve_to_the_cpu_sets_jax(requirements, plugins, cpu_jax, tmp_path):
    versions = resolve(requirements, tmp_path / "report.json")
    assert versions["jax"] == versions["jaxlib"] == cpu_jax
    for plugin in plugins:
        assert plugin in versions, sorted(versions)
    # JAX's CUDA plugins carry jax's own version number (libtpu has a numbering of its own).
    assert all(versions[plugin] == cpu_jax for plugin in plugins if plugin.startswith("jax-"))
