"""A config file's argument (``key=value`` pairs and ``local``), and the one-row config files that
the family files replaced: each names the argument that selects the same experiment now."""

import re
import runpy
from pathlib import Path

import pytest

from kdjax.commands import main as cli
from kdjax.config.loading import REPLACED_CONFIGS, ConfigError, load_config
from kdjax.config.recipes import parse_arg

ROOT = Path(__file__).resolve().parents[2]
CHOICES = {"student": ("r18", "mbv2"), "method": ("kd", "cwd")}


def test_pairs_and_local_in_any_order():
    assert parse_arg("student=r18,method=cwd", **CHOICES) == (
        {"student": "r18", "method": "cwd"}, False)
    assert parse_arg(" local, method=kd ,student=mbv2", **CHOICES) == (
        {"student": "mbv2", "method": "kd"}, True)
    assert parse_arg(None) == ({}, False) and parse_arg("local") == ({}, True)


@pytest.mark.parametrize("arg, message", [
    ("student=r18,method=cwd,teacher=r50",
     re.escape("'teacher=r50' is not accepted: this config takes student=r18|mbv2,method=kd|cwd, "
               "optionally with ',local'")),
    ("student=r18,method=cwd,student=mbv2", "'student=mbv2' is not accepted"),
    ("student=r18,cwd", "'cwd' is not accepted"),
    ("student=r50,method=cwd", "'student=r50' is not accepted: student is one of r18, mbv2"),
    ("student=r18,method=fitnets", "'method=fitnets' is not accepted: method is one of kd, cwd"),
    ("student=r18,local", "lacks method=: this config takes student="),
    (None, "lacks student=, method="),
])
def test_a_bad_argument_lists_what_is_accepted(arg, message):
    with pytest.raises(ValueError, match=message):
        parse_arg(arg, **CHOICES)


def test_a_config_without_choices_takes_only_local():
    with pytest.raises(ValueError, match="'fast' is not accepted: this config takes only 'local'"):
        load_config(f"{ROOT / 'configs' / 'demo.py'}:fast")


@pytest.mark.parametrize("old", REPLACED_CONFIGS)
def test_a_replaced_path_names_its_argument(old, monkeypatch):
    new = REPLACED_CONFIGS[old]
    assert not (ROOT / old).exists()
    family, _, arg = new.partition(":")
    assert arg in {row.arg for row in runpy.run_path(str(ROOT / family))["ROWS"]}
    monkeypatch.chdir(ROOT)
    relative = f"{old} was replaced: use --config={new}"
    with pytest.raises(ConfigError, match=f"^{re.escape(relative)}$"):
        load_config(old)
    absolute = f"{ROOT / old} was replaced: use --config={ROOT / family}:{arg},local"
    with pytest.raises(ConfigError, match=f"^{re.escape(absolute)}$"):
        load_config(f"{ROOT / old}:local")


def test_the_command_line_names_the_replacement(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = cli.main(["train", "--config=configs/cityscapes/deeplabv3_r101_r18_cwd.py",
                     f"--workdir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert ("configs/cityscapes/deeplabv3_r101_r18_cwd.py was replaced: use "
            "--config=configs/cityscapes.py:student=r18,method=cwd") in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())
