"""The code examples of the README and the docs, run exactly as they are written there: every
block between ``<!-- NAME-example -->`` and ``<!-- /NAME-example -->``."""

import math
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- (?P<name>[a-z-]+-example) -->\n```python\n(?P<code>.*?)```\n"
                   r"<!-- /(?P=name) -->", re.S)


def examples() -> dict[str, tuple[Path, str]]:
    """name → (file, code) of every example block."""
    found = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for block in BLOCK.finditer(path.read_text()):
            assert block["name"] not in found, f"{block['name']} appears twice"
            found[block["name"]] = (path, block["code"])
    return found


EXAMPLES = examples()


def run(name, tmp_path, monkeypatch, capsys) -> tuple[dict, list[str]]:
    """Runs example ``name`` in ``tmp_path`` (with configs/ at hand, as in the repository root);
    returns its namespace and printed lines."""
    path, code = EXAMPLES[name]
    os.symlink(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(path.relative_to(REPO)), "exec"), namespace)  # noqa: S102
    return namespace, capsys.readouterr().out.splitlines()


def test_every_example_is_tested():
    assert set(EXAMPLES) == {"loss-library-example", "own-train-step-example",
                             "trainer-api-example"}


def test_the_loss_library_example_runs(tmp_path, monkeypatch, capsys):
    namespace, printed = run("loss-library-example", tmp_path, monkeypatch, capsys)
    loss, shape = printed[0].split(" ", 1)
    assert math.isfinite(float(loss)) and shape == "(2, 64, 64, 19)"
    assert namespace["grads"].shape == namespace["student_logits"].shape


def test_the_own_train_step_example_runs(tmp_path, monkeypatch, capsys):
    namespace, printed = run("own-train-step-example", tmp_path, monkeypatch, capsys)
    parts = eval(printed[0])  # noqa: S307 (the example prints a dict of floats)
    assert set(parts) == {"ce", "cwd"} and all(math.isfinite(v) for v in parts.values())
    assert int(namespace["optimizer"].step[...]) == 3


def test_the_trainer_api_example_runs(tmp_path, monkeypatch, capsys):
    namespace, printed = run("trainer-api-example", tmp_path, monkeypatch, capsys)
    metrics = eval(printed[0])  # noqa: S307 (the example prints a dict of floats)
    assert set(metrics) == set(namespace["exp"].metric_names) >= {"ce", "loss", "kd/cwd_logits"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= float(printed[1]) <= 100.0
    assert int(namespace["state"].step) == 3
    assert (tmp_path / "runs" / "api_student" / "model_spec.json").is_file()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_an_example_fits_the_page(name):
    # Examples are read, not scrolled: no line wider than the page's text.
    assert max(len(line) for line in EXAMPLES[name][1].splitlines()) <= 100
