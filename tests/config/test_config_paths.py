"""A config file's argument (``key=value`` pairs and ``local``), the one-row config files that the
family files replaced (each names the argument that selects the same experiment now), and the
commands and config keys that the README and the docs show."""

import re
import runpy
import shlex
from pathlib import Path

import pytest

from kdjax.commands import main as cli
from kdjax.config.defaults import base_config
from kdjax.config.loading import REPLACED_CONFIGS, ConfigError, apply_overrides, load_config
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


# --------------------------------------------------------------------------------------------------
# The README's and the docs' commands: every config file they name exists, every config argument
# and override they pass loads, every `kdjax` command line parses and every `make` target exists.

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCED = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
# Words that stand for a value in usage lines ("--workdir=DIR"); a config file is never one.
PLACEHOLDER = re.compile(r"(?<![\w.])(DIR|FILE|ARG|NAME|PATH|BUCKET|HOST|PORT|METHOD|STUDENT|"
                         r"TEACHER_DIR|IMAGENET_PTH|OWNER|N|I|K|S|X)(?![\w])|…|\.\.\.|\[")
MAKE_TARGET = re.compile(r"^([a-z][a-z-]*):", re.M)
KDJAX = ("kdjax", ".venv/bin/kdjax")


def _logical_lines(block: str) -> list[str]:
    """A code block's lines with ``\\`` continuations joined and a leading ``$ `` prompt dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip().removeprefix("$ ") for line in joined.splitlines()]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) of every line of code in the README and the docs that passes a
    config or runs `kdjax` or `make`, less what the command prints and the examples of an error
    (a line followed by the error it gives)."""
    found = []
    for path in DOCS:
        text = path.read_text()
        where = str(path.relative_to(ROOT))
        for block in FENCED.findall(text):
            lines = _logical_lines(block)
            for line, after in zip(lines, [*lines[1:], ""]):
                if not ERROR.match(line) and not ERROR.match(after):
                    found.append((where, line))
        # In prose only whole commands: `--config...` items and make targets, not `kdjax eval`.
        for span in INLINE.findall(FENCED.sub("", text)):
            if "--config" in span or re.match(r"make [a-z]", span):
                found.append((where, span.strip()))
    return [(where, line) for where, line in found
            if "--config" in line or re.match(r"(\.venv/bin/)?kdjax |make |\S*python -m kdjax ",
                                              line)]


# What the command prints ("kdjax train: error: ...", "kdjax train: stopped by SIGTERM ...").
ERROR = re.compile(r"^kdjax [\w-]+: ")
COMMANDS = documented_commands()


def _words(line: str) -> list[str]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:          # prose in backticks, such as an unbalanced quote
        words = line.split()
    # A YAML list in a Kubernetes spec ("[python, -m, kdjax, train, --config=...,").
    return [w.strip("[],") for w in words if w.strip("[],")]


def _has_key(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _check_key(config, key: str) -> None:
    # Named terms and methods are free-form groups: only the group itself must exist.
    for group in ("distill.terms.", "methods."):
        if key.startswith(group):
            key = group[:-1]
    assert _has_key(config, key), f"unknown config key {key!r}"


def _kdjax_argv(words: list[str]) -> list[str] | None:
    """The arguments after ``kdjax`` (``.venv/bin/kdjax``, ``python -m kdjax``), or None."""
    for index, word in enumerate(words):
        if word in KDJAX or word == "kdjax" and words[index - 1:index] == ["-m"]:
            return words[index + 1:]
    return None


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{w}:{l[:60]}" for w, l in COMMANDS])
def test_a_documented_command_is_true(where, line):
    words = _words(line)
    if words[0] == "make":
        targets = set(MAKE_TARGET.findall((ROOT / "Makefile").read_text()))
        assert [w for w in words[1:] if "=" not in w][0] in targets, f"{where}: {line}"
        return
    spec = next((w.split("=", 1)[1] for w in words if w.startswith("--config=")), "")
    overrides = [w[len(cli.CONFIG_PREFIX):] for w in words
                 if w.startswith(cli.CONFIG_PREFIX) and not w.startswith("--config.key")]
    if spec and not spec.startswith("FILE"):
        file, _, arg = spec.partition(":")
        assert (ROOT / file).is_file(), f"{where}: {file} does not exist"
        if not PLACEHOLDER.search(arg):
            config = load_config(str(ROOT / spec))
            apply_overrides(config, [o for o in overrides if not PLACEHOLDER.search(o)])
            for override in overrides:
                _check_key(config, override.partition("=")[0])
    else:
        for override in overrides:
            _check_key(base_config(), override.partition("=")[0])
    argv = _kdjax_argv(words)
    if argv and not any(PLACEHOLDER.search(w) for w in argv):
        try:
            cli.build_parser().parse_args([w for w in argv if not w.startswith(cli.CONFIG_PREFIX)])
        except SystemExit as done:      # --version prints and exits
            assert done.code == 0, f"{where}: {line}"


def test_config_files_named_in_prose_exist():
    # `configs/cityscapes.py:student=r18,...` in a sentence, not only in commands.
    named = set()
    for path in DOCS:
        for span in INLINE.findall(path.read_text()):
            named |= set(re.findall(r"(?<![\w/])configs/[\w/]+\.py", span))
    missing = sorted(p for p in named if not (ROOT / p).is_file() and p not in REPLACED_CONFIGS
                     and not PLACEHOLDER.search(p.removeprefix("configs/")))
    assert not missing
