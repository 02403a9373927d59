"""Python code run in a fresh process, without the tests' simulated-device XLA_FLAGS."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plain_cpu_env() -> dict[str, str]:
    """The test process's environment without its XLA_FLAGS (eight simulated devices, level 0, the
    command's CPU flags)."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def run_python(code: str) -> str:
    """Runs ``python -c code`` in the repository root; fails the test on a non-zero exit. Returns
    its standard output."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=plain_cpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
