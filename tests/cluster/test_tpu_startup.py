"""Start-up on a TPU VM, simulated: ``JAX_PLATFORMS=tpu`` asks for the TPU and a recorder stands
in for ``jax.distributed.initialize`` (tests/cluster/tpu_recorder). The ``kdjax`` command must call
it once, on a single host too, before anything touches a device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECORDER = Path(__file__).with_name("tpu_recorder")
TINY = REPO / "tests" / "training" / "tiny_config.py"


@pytest.mark.end_to_end
def test_the_command_initializes_before_touching_a_device_on_tpu(tmp_path):
    record = tmp_path / "initialize.jsonl"
    env = {**os.environ,
           "JAX_PLATFORMS": "tpu", "PYTHONPATH": f"{RECORDER}{os.pathsep}{REPO}",
           "KDJAX_INITIALIZE_RECORD": str(record)}
    proc = subprocess.run([sys.executable, "-m", "kdjax", "train", f"--config={TINY}",
                           f"--workdir={tmp_path / 'run'}", "--config.train.steps=1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [{"arguments": {"initialization_timeout": "900"},
                      "backends_started": False}], calls
    assert "multi-process start-up: TPU (the TPU VM's metadata names the workers)" in proc.stderr
