"""The README's example of the trainer's Python API, run exactly as it is written there."""

import os
import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MARKER = "trainer-api-example"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- {MARKER} -->\n```python\n(.*?)```\n<!-- /{MARKER} -->", text, re.S)
    assert block, f"README.md has no {MARKER} block"
    return block.group(1)


def test_the_readme_trainer_example_runs(tmp_path, monkeypatch, capsys):
    # The example names paths relative to the repository root and writes runs/api_student.
    os.symlink(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    metrics = eval(printed[0])  # noqa: S307 (the example prints a dict of floats)
    assert set(metrics) == set(namespace["exp"].metric_names) >= {"ce", "loss", "kd/cwd_logits"}
    assert all(np.isfinite(v) for v in metrics.values())
    assert 0.0 <= float(printed[1]) <= 100.0
    assert int(namespace["state"].step) == 3
    assert (tmp_path / "runs" / "api_student" / "model_spec.json").is_file()
