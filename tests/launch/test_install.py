"""`make install ACCEL=cpu|cuda12|cuda13|tpu [WITH_TORCH=1]`: which extras each installs, the
checks that run before (Python version, a half-made .venv, the NVIDIA driver), the two pytest runs
of `make test`, and (slow) that the accelerator and PyTorch extras resolve together."""

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

# What a calling make passes down (`make test WITH_TORCH=1` runs the tests): the runs here must
# see only their own arguments.
MAKE_SETTINGS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ACCEL", "WITH_TORCH",
                 "TORCH_INDEX", "PYTHON")


def make(*args, venv, dry_run=True, path=None):
    # A .venv of its own, so that no install stamp of this repository's hides the install steps.
    env = {k: v for k, v in os.environ.items() if k not in MAKE_SETTINGS}
    if path is not None:
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    return subprocess.run(["make", *(["-n"] if dry_run else []), "-C", REPO,
                           "--no-print-directory", *args, f"VENV={venv}"],
                          env=env, capture_output=True, text=True, check=False)


def installed_extras(stdout):
    """The extras of each `pip install -e '.[...]'` line, in order."""
    extras = []
    for line in stdout.splitlines():
        if " -m pip install " not in line:
            continue
        words = shlex.split(line)
        if words[1:4] == ["-m", "pip", "install"]:
            target = words[words.index("-e") + 1]
            assert target.startswith(".[") and target.endswith("]"), line
            extras.append(target[2:-1].split(","))
    return extras


@needs_make
@pytest.mark.parametrize("target", ["install", "demo", "test"])
# Each build has its own install stamp, so asking for another one installs it. The test tools
# come with the CPU install only: TPU workers and GPU nodes get them from `make test`.
@pytest.mark.parametrize("accel,extras,stamp", [
    ([], ["all", "test"], ".installed-cpu"),
    (["ACCEL=cpu"], ["all", "test"], ".installed-cpu"),
    (["ACCEL=cuda"], ["all", "cuda12"], ".installed-cuda12"),
    (["ACCEL=cuda12"], ["all", "cuda12"], ".installed-cuda12"),
    (["ACCEL=cuda13"], ["all", "cuda13"], ".installed-cuda13"),
    (["ACCEL=tpu"], ["all", "tpu"], ".installed-tpu"),
    (["ACCEL=cuda", "WITH_TORCH=1"], ["all", "cuda12", "torch"], ".installed-cuda12-torch"),
    (["WITH_TORCH=1"], ["all", "test", "torch"], ".installed-cpu-torch"),
])
def test_make_installs_the_extras_accel_names(target, accel, extras, stamp, tmp_path):
    venv = tmp_path / "venv"
    result = make(target, *accel, venv=venv)
    assert result.returncode == 0, result.stderr
    installs = installed_extras(result.stdout)
    needs_tests = target == "test" and "test" not in extras
    assert installs == [extras, *([["test"]] if needs_tests else [])], result.stdout
    assert f"touch {venv}/{stamp}" in "\n".join(result.stdout.splitlines())
    # launch/slurm.sbatch recognises a CUDA build by this stamp.
    assert ("cuda" in stamp) == any(a.startswith("ACCEL=cuda") for a in accel)


@needs_make
def test_the_torch_index_applies_to_the_install(tmp_path):
    index = "https://download.pytorch.org/whl/cpu"
    result = make("install", "WITH_TORCH=1", f"TORCH_INDEX={index}", venv=tmp_path / "venv")
    pip = [line for line in result.stdout.splitlines() if " -m pip install " in line]
    assert len(pip) == 1 and f"--extra-index-url {index}" in pip[0]


@needs_make
def test_make_refuses_an_unknown_accel(tmp_path):
    result = make("install", "ACCEL=rocm", venv=tmp_path / "venv")
    assert result.returncode != 0 and result.stdout == ""
    assert "ACCEL=rocm is not one of cpu, cuda12, cuda13, cuda (= cuda12), tpu" in result.stderr


def fake_python(tmp_path, version, *, ensurepip=True):
    """An interpreter that answers the Makefile's checks as Python ``version`` would."""
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n"
                      f'case "$*" in *ensurepip*) exit {0 if ensurepip else 1};; esac\n'
                      f"echo {version}\n")
    script.chmod(0o755)
    return script


@needs_make
def test_an_old_python_is_named_with_what_to_install(tmp_path):
    venv = tmp_path / "venv"
    result = make("install", f"PYTHON={fake_python(tmp_path, '3.10')}", venv=venv,
                  dry_run=False)
    assert result.returncode != 0
    assert "kdjax needs Python 3.11 or newer" in result.stderr
    assert "is 3.10" in result.stderr and "make install PYTHON=python3.11" in result.stderr
    assert not venv.exists()


@needs_make
def test_a_python_without_venv_support_names_the_package(tmp_path):
    python = fake_python(tmp_path, "3.12", ensurepip=False)
    result = make("install", f"PYTHON={python}", venv=tmp_path / "venv", dry_run=False)
    assert result.returncode != 0
    assert "sudo apt install python3.12-venv" in result.stderr


@needs_make
def test_a_half_made_venv_is_made_again(tmp_path):
    # What `python3 -m venv` leaves where ensurepip is missing: bin/python without pip.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    result = make("venv", f"PYTHON={sys.executable}", venv=venv, dry_run=False)
    assert result.returncode == 0, result.stderr
    check = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"],
                           capture_output=True, check=False)
    assert check.returncode == 0 and (venv / ".created").is_file()


@needs_make
@pytest.mark.parametrize("driver,accel,ok,message", [
    ("535.104.05", "cuda12", True, "CUDA 12 (ACCEL=cuda12) fits"),
    ("535.104.05", "cuda13", False, "runs CUDA 12, not 13: use ACCEL=cuda12"),
    ("580.82.07", "cuda13", True, "both CUDA 12 and CUDA 13 fit"),
    ("470.256.02", "cuda", False, "too old for JAX's CUDA builds"),
    ("", "cuda13", True, "no NVIDIA driver found here"),
])
def test_the_driver_check_says_which_cuda_build_fits(driver, accel, ok, message, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {driver}\n" if driver else "#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    # An environment that exists already; `true` stands in for pip.
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".created").touch()
    result = make("install", f"ACCEL={accel}", "PIP_INSTALL=true", venv=venv, dry_run=False,
                  path=bin_dir)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    assert message in result.stdout + result.stderr


@needs_make
@pytest.mark.parametrize("target,marker", [("test", "not slow and not end_to_end"),
                                           ("test-end-to-end", "end_to_end and not slow"),
                                           ("test-slow", "slow")])
@pytest.mark.parametrize("parallel_exit,serial_exit,ok", [
    (0, 0, True), (0, 5, True), (5, 5, True), (1, 0, False), (0, 1, False)])
def test_the_multiprocess_tests_run_alone_after_the_rest(target, marker, parallel_exit,
                                                         serial_exit, ok, tmp_path):
    # A stand-in for the environment's python that exits as pytest would, and logs its calls.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                      f'case "$*" in *"and multiprocess"*) exit {serial_exit};; esac\n'
                      f"exit {parallel_exit}\n")
    python.chmod(0o755)
    for stamp in (".created", ".installed-cpu", ".installed-test"):
        (venv / stamp).touch()
    result = make(target, venv=venv, dry_run=False)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == f"-m pytest -q -n auto -m {marker} and not multiprocess"
    if parallel_exit in (0, 5):
        assert calls[1:] == [f"-m pytest -q -m {marker} and multiprocess"]


def resolve(requirement, report, *options):
    """The packages a fresh install of ``requirement`` would get (pip resolves, installs
    nothing): name -> version."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), *options, requirement], cwd=REPO, capture_output=True,
        text=True, check=False)
    assert result.returncode == 0, result.stderr
    with open(report) as file:
        return {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.load(file)["install"]}


@pytest.fixture(scope="module")
def cpu_jax(tmp_path_factory):
    return resolve(".[all]", tmp_path_factory.mktemp("cpu") / "report.json")["jax"]


linux_x86 = pytest.mark.skipif((platform.system(), platform.machine()) != ("Linux", "x86_64"),
                               reason="resolves the accelerator wheels for Linux x86-64")


@pytest.mark.slow
# The accelerator wheels exist for Linux on x86-64 (libtpu's only for it).
@linux_x86
@pytest.mark.parametrize("extra,plugins", [
    ("cuda12", ["jax-cuda12-plugin", "jax-cuda12-pjrt"]),
    ("cuda13", ["jax-cuda13-plugin", "jax-cuda13-pjrt"]),
    ("tpu", ["libtpu"]),
])
def test_accelerator_extras_resolve_to_the_cpu_sets_jax(extra, plugins, cpu_jax, tmp_path):
    versions = resolve(f".[all,{extra}]", tmp_path / "report.json")
    assert versions["jax"] == versions["jaxlib"] == cpu_jax
    for plugin in plugins:
        assert plugin in versions, sorted(versions)
    # JAX's CUDA plugins carry jax's own version number (libtpu has a numbering of its own).
    assert all(versions[plugin] == cpu_jax for plugin in plugins if plugin.startswith("jax-"))


PYPI = "https://pypi.org/simple"


def pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen(f"{PYPI}/torch/", timeout=20):
            return True
    except OSError:
        return False


@pytest.mark.slow
@linux_x86
@pytest.mark.parametrize("extra", ["cuda12", "cuda13"])
def test_pytorch_and_the_cuda_extras_resolve_together_from_pypi(extra, cpu_jax, tmp_path):
    # PyPI's own wheels (an index of this machine may serve others, such as PyTorch's CPU
    # build): --isolated leaves out pip's configuration.
    if not pypi_reachable():
        pytest.skip(f"{PYPI} cannot be reached")
    versions = resolve(f".[all,{extra},torch]", tmp_path / "report.json",
                       "--isolated", "--index-url", PYPI)
    assert versions["torch"] == "2.13.0"
    assert versions["jax"] == versions["jaxlib"] == versions[f"jax-{extra}-plugin"] == cpu_jax
    cu12 = sorted(name for name in versions if name.endswith("-cu12"))
    # PyPI's torch 2.13.0 is its CUDA 13 build: beside jax[cuda13] the two share NVIDIA's CUDA 13
    # wheels; beside jax[cuda12] each brings its own (docs/install.md says so).
    assert bool(cu12) == (extra == "cuda12"), cu12
