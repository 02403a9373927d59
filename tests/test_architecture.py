"""docs/architecture.md's rules, read from the source: which rooms each room imports, that no
command imports another, that only the kernels room and the platform module ask which platform
runs, that only the registries dispatch on a loss kind's name, that the losses' own derivative
rules live in one module, and that the tests' folders mirror the rooms."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdjax"

# Room → the other rooms it may import (docs/architecture.md, "The arrows"). The package root
# (its version) and the extras guard are open to every room.
ALLOWED = {
    "losses": {"ops"},
    "ops": set(),
    "models": {"ops"},
    "config": set(),
    "distill": {"losses", "models", "config"},
    "data": {"runtime", "io"},
    "evaluation": {"data", "models", "runtime", "io"},
    "io": {"models", "convert", "runtime"},
    "convert": {"models", "runtime"},
    "runtime": set(),
    "training": {"distill", "data", "evaluation", "io", "config", "runtime", "models", "ops"},
    "commands": {"config", "convert", "data", "distill", "evaluation", "io", "models", "runtime",
                 "training", "losses", "ops"},
}
OPEN_TO_ALL = {"kdjax", "_extras"}
# Where a module may ask which platform JAX runs on.
PLATFORM_QUERIES = ("ops/kernels.py", "ops/cpu/", "runtime/platform.py")
# Where a loss kind's name may decide what runs: the adapters and the methods that name them.
LOSS_NAMES = ("distill/adapters.py", "config/methods.py")
# The one module of the losses room that may define a derivative rule, and the words that name one.
DERIVATIVE_RULES = "losses/_derivative_rules.py"
RULE_WORDS = ("custom_vjp", "custom_jvp", "defvjp", "defjvp")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text())


def imported(tree):
    """(line, the kdjax module each import names), ``from kdjax import x`` read as kdjax.x."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = ([f"kdjax.{alias.name}" for alias in node.names] if node.module == "kdjax"
                     else [node.module])
        else:
            continue
        for name in names:
            if name == "kdjax" or name.startswith("kdjax."):
                yield node.lineno, name.split(".")


def test_the_rooms_import_as_the_arrows_say():
    wrong = []
    for path, tree in modules():
        room = path.split("/")[0]
        if room not in ALLOWED:
            continue
        for line, parts in imported(tree):
            target = parts[1] if len(parts) > 1 else "kdjax"
            if target not in {room, *ALLOWED[room], *OPEN_TO_ALL}:
                wrong.append(f"kdjax/{path}:{line} imports {'.'.join(parts)}")
    assert not wrong, "\n".join(wrong)


def test_every_room_has_its_arrows():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert rooms == set(ALLOWED)


def test_no_command_imports_another():
    wrong = []
    for path, tree in modules():
        if not path.startswith("commands/") or path in ("commands/main.py",
                                                        "commands/__init__.py"):
            continue
        for line, parts in imported(tree):
            if parts[1:2] == ["commands"]:
                wrong.append(f"kdjax/{path}:{line} imports {'.'.join(parts)}")
    assert not wrong, "\n".join(wrong)


def _asks_the_platform(node) -> bool:
    if isinstance(node, ast.Attribute) and node.attr == "default_backend":
        return True
    # device.platform == 'cpu' and the like.
    return (isinstance(node, ast.Compare) and any(
        isinstance(side, ast.Attribute) and side.attr == "platform"
        for side in (node.left, *node.comparators)))


def test_only_the_kernels_room_and_the_platform_module_ask_the_platform():
    wrong = [f"kdjax/{path}:{node.lineno}" for path, tree in modules()
             if not path.startswith(PLATFORM_QUERIES)
             for node in ast.walk(tree) if _asks_the_platform(node)]
    assert not wrong, "platform queries outside " + ", ".join(PLATFORM_QUERIES) + ":\n" + (
        "\n".join(wrong))


def _is_loss_name(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "loss" or (
        isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
        and node.slice.value == "loss")


def _dispatches_on_a_loss_name(node) -> bool:
    """``x.loss == 'kind'``, ``x.loss in ('a', 'b')`` or ``x.loss.startswith('kind')``."""
    if isinstance(node, ast.Compare):
        sides = (node.left, *node.comparators)
        return any(map(_is_loss_name, sides)) and any(
            isinstance(side, (ast.Constant, ast.Tuple, ast.List, ast.Set)) for side in sides)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith") and _is_loss_name(node.func.value))


def test_only_the_registries_dispatch_on_loss_names():
    wrong = [f"kdjax/{path}:{node.lineno}" for path, tree in modules()
             if path not in LOSS_NAMES
             for node in ast.walk(tree) if _dispatches_on_a_loss_name(node)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("source, expected", [
    ("term.loss == 'fakd_kd'", True),
    ("t.loss in ('a', 'b')", True),
    ("term.loss.startswith('fakd')", True),
    ("raw['loss'] == 'dist'", True),
    ("entry.loss in shrinks", False),
    ("term.loss", False),
])
def test_the_dispatch_check_sees_what_it_forbids(source, expected):
    tree = ast.parse(source)
    assert any(_dispatches_on_a_loss_name(n) for n in ast.walk(tree)) == expected


def test_the_platform_check_sees_what_it_forbids():
    for source in ("jax.default_backend() == 'cpu'", "jax.devices()[0].platform != 'gpu'"):
        assert any(_asks_the_platform(n) for n in ast.walk(ast.parse(source)))
    assert not any(_asks_the_platform(n) for n in ast.walk(ast.parse("jax.devices()")))


def _rule_lines(text: str) -> list[int]:
    """The lines of ``text`` that name a derivative rule (code, comment or docstring alike)."""
    return [number for number, line in enumerate(text.splitlines(), 1)
            if any(word in line for word in RULE_WORDS)]


def test_only_the_rules_module_defines_the_losses_derivative_rules():
    wrong = [f"kdjax/{path.relative_to(PACKAGE).as_posix()}:{line}"
             for path in sorted((PACKAGE / "losses").rglob("*.py"))
             if path.relative_to(PACKAGE).as_posix() != DERIVATIVE_RULES
             for line in _rule_lines(path.read_text())]
    assert not wrong, f"derivative rules outside kdjax/{DERIVATIVE_RULES}:\n" + "\n".join(wrong)


def test_the_rules_check_sees_what_it_forbids():
    assert _rule_lines("x = 1\n@jax.custom_vjp\ndef f(x): ...\nf.defvjp(fwd, bwd)\n") == [2, 4]
    assert _rule_lines("g = functools.partial(jax.custom_jvp, nondiff_argnums=(0,))") == [1]
    assert _rule_lines("rule = gradient_from_forward(parts)\n") == []
    # The module the check exempts exists and holds the rules.
    assert _rule_lines((PACKAGE / DERIVATIVE_RULES).read_text())


# Test folders of what is not a room of the package: the project's own folders (benchmarks/,
# datasets/, launch/), the simulated cluster, and the references and modules the tests share.
OUTSIDE_ROOMS = {"benchmarks", "datasets", "launch", "cluster", "references", "torch_reference",
                 "hidden_modules"}


def test_the_tests_folders_mirror_the_rooms():
    tests = Path(__file__).resolve().parent
    folders = {path.name for path in tests.iterdir() if (path / "__init__.py").exists()
               or path.name in OUTSIDE_ROOMS}
    rooms = {path.name for path in PACKAGE.iterdir()
             if path.is_dir() and (path / "__init__.py").exists()}
    assert folders - OUTSIDE_ROOMS == rooms, (sorted(folders - OUTSIDE_ROOMS - rooms),
                                             sorted(rooms - folders))
