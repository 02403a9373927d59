"""kdjax.runtime.platform: the platform is predicted before JAX starts, the CPU-only process
settings apply on the CPU alone, and an accelerator JAX cannot use is reported loudly."""

import logging

import pytest

from kdjax.runtime import platform
from kdjax.runtime.cpu_flags import CPU_FLAGS


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.setattr(platform, "visible_accelerators", lambda: {})


def test_jax_platforms_decides(no_accelerators):
    assert platform.expected_platform({"JAX_PLATFORMS": "cuda,cpu"}) == "gpu"
    assert platform.expected_platform({"JAX_PLATFORMS": "tpu"}) == "tpu"
    assert platform.expected_platform({"JAX_PLATFORMS": "cpu"}) == "cpu"
    assert platform.expected_platform({}) == "cpu"


def test_a_visible_accelerator_counts_only_with_its_plugin(monkeypatch):
    monkeypatch.setattr(platform, "visible_accelerators", lambda: {"gpu": "NVIDIA GPU"})
    monkeypatch.setattr(platform, "_has_plugin", lambda name: False)
    assert platform.expected_platform({}) == "cpu"
    monkeypatch.setattr(platform, "_has_plugin", lambda name: name == "gpu")
    assert platform.expected_platform({}) == "gpu"


def test_cpu_settings_apply_on_the_cpu_only(no_accelerators, monkeypatch):
    applied = []
    monkeypatch.setattr(platform, "keep_freed_memory", lambda environ: applied.append(True))
    gpu = {"JAX_PLATFORMS": "cuda"}
    assert platform.configure_process(gpu) == "gpu"
    assert "XLA_FLAGS" not in gpu and not applied
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert platform.configure_process(cpu) == "cpu"
    assert cpu["XLA_FLAGS"].split() == list(CPU_FLAGS) and applied


def test_an_unused_accelerator_is_reported_with_its_install_command(monkeypatch, caplog):
    monkeypatch.setattr(platform, "visible_accelerators",
                        lambda: {"gpu": "NVIDIA GPU (/dev/nvidia*, nvidia-smi)"})
    with caplog.at_level(logging.INFO, logger=platform.__name__):
        platform.report()
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info and info[0].startswith("platform cpu: ") and "process(es)" in info[0]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "JAX runs on the CPU only" in warning[0] and "make install ACCEL=cuda" in warning[0]


def test_nothing_is_reported_without_accelerators(no_accelerators, caplog):
    with caplog.at_level(logging.INFO, logger=platform.__name__):
        platform.report()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
