"""The `kdjax` command: argument handling, user errors without tracebacks, `data show`."""

import pytest

from kdjax.commands import main as cli
from tests.training.test_train import CONFIG


def test_overrides_are_split_from_the_arguments():
    rest, overrides = cli.split_overrides(
        ["train", f"--config={CONFIG}", "--config.train.steps=3", "--workdir=w",
         "--config.data.name", "synthetic"])
    assert rest == ["train", f"--config={CONFIG}", "--workdir=w"]
    assert overrides == ["train.steps=3", "data.name=synthetic"]


def test_unknown_key_is_a_one_line_error_with_near_matches(tmp_path, capsys):
    code = cli.main(["train", f"--config={CONFIG}", f"--workdir={tmp_path}",
                     "--config.train.setps=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown config key 'train.setps'" in err and "train.steps" in err
    assert "Traceback" not in err


def test_a_bad_value_is_reported_not_raised(tmp_path, capsys):
    code = cli.main(["train", f"--config={CONFIG}", f"--workdir={tmp_path}",
                     "--config.data.name=nodata"])
    assert code == 2
    assert "nodata" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="unknown config key"):
        cli.main(["train", f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.nope=1"])


def test_an_interrupt_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_run", interrupted)
    code = cli.main(["train", f"--config={CONFIG}", f"--workdir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 130
    assert "interrupted" in err and "same command resumes" in err and "Traceback" not in err


def test_data_show_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli.main(["data", "show", f"--config={CONFIG}", f"--out={out}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out
