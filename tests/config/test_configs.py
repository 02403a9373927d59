"""Every config in configs/ (each paper row of each family file's ROWS, and the other files) is
valid under ``local``; under ``-m slow`` all build and run a step, one of them in bf16 (their
ResNet-101 teachers take one to two minutes each to trace and compile on a CPU)."""

import runpy
from pathlib import Path

import jax
import numpy as np
import pytest

from kdjax import training as train
from kdjax.config.defaults import base_config
from kdjax.config.loading import check_known_keys, load_config
from kdjax.config.recipes import METHODS, STUDENTS
from kdjax.data import dataset_info, make_train_iterator
from kdjax.distill import parse_terms
from kdjax.models import MODEL_NAMES
from kdjax.runtime import sharding

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
README = (CONFIGS.parent / "docs" / "configs.md").read_text()
FILES = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.py"))
# Family file → its table of paper rows; the other files take no argument but `local`.
MODULES = {name: runpy.run_path(str(CONFIGS / name)) for name in FILES}
FAMILIES = {name: rows for name, module in MODULES.items()
            if (rows := module.get("ROWS")) is not None}
# A family's students (its own STUDENTS, else the CNN families' of kdjax.config.recipes).
FAMILY_STUDENTS = {name: MODULES[name].get("STUDENTS", STUDENTS) for name in FAMILIES}
ROWS = {f"{name}:{row.arg}": row for name, rows in FAMILIES.items() for row in rows}
ALL = [*ROWS, *(name for name in FILES if name not in FAMILIES)]
# Runs its step in bf16; the others in float32.
BF16 = ("cityscapes.py:student=r18,method=cirkd",)


def _local(spec):
    config = load_config(f"{CONFIGS / spec}{',local' if ':' in spec else ':local'}")
    check_known_keys(config, base_config())
    if config.teacher.checkpoint is None:  # `compare` trains it first; a step needs weights
        config.teacher.checkpoint = "random"
    return config


def test_there_is_a_row_per_paper_row():
    def rows(name):
        return {(row.student, row.method) for row in FAMILIES[name]}

    methods = ("kd", "cwd", "nfd", "pfs_wpi", "fakd_kd", "fakd_cwd", "skd", "ifvd", "cirkd",
               "dist", "at", "fitnet")
    assert {(student, m) for student in ("r18", "mbv2") for m in methods} <= rows("cityscapes.py")
    assert ("r18", "cwd_logits") in rows("cityscapes_pspnet.py")
    assert ("r18", "cirkd") in rows("voc_aug.py") and ("r18", "cirkd") in rows("ade20k.py")
    assert {"demo.py", "camvid/compare.py"} <= set(ALL)


def test_camvid_protocol_compares_every_method_over_seeds():
    config = load_config(str(CONFIGS / "camvid" / "compare.py"))
    check_known_keys(config, base_config())
    assert config.data.name == "camvid" and config.data.manual_dir == "../shared/data/camvid"
    assert len(config.seeds) >= 3 and config.teacher.checkpoint is None
    assert {"student_alone", "kd", "cwd_logits", "nfd", "pfs_wpi", "fakd_kd",
            "fakd_cwd"} <= set(config.methods)
    assert len({"skd", "ifvd", "cirkd", "dist"} & set(config.methods)) >= 2
    for terms in config.methods.values():
        parse_terms(terms, train_steps=config.train.steps)


@pytest.mark.parametrize("spec", ALL)
def test_config_is_valid_and_documents_its_command(spec):
    name = spec.partition(":")[0]
    text = (CONFIGS / name).read_text()
    assert f"kdjax compare --config=configs/{name}" in text, "the docstring gives the command"
    config = _local(spec)
    dataset_info(config.data.name)
    for model in (config.student, config.teacher):
        assert model.name in MODEL_NAMES
    for terms in (config.distill.terms, *config.methods.values()):
        parse_terms(terms, train_steps=config.train.steps)
    if spec in ROWS:
        row = ROWS[spec]
        assert config.student.name.endswith(FAMILY_STUDENTS[name][row.student])
        assert set(config.methods) == {"student_alone", row.method}
        assert config.distill.terms == config.methods[row.method]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_family_takes_every_student_and_method(name):
    for student, network in FAMILY_STUDENTS[name].items():
        for method in METHODS:
            config = _local(f"{name}:student={student},method={method}")
            assert config.student.name.endswith(network)
            assert set(config.methods) == {"student_alone", method}
            parse_terms(config.distill.terms, train_steps=config.train.steps)


@pytest.mark.parametrize("spec", ROWS)
def test_readme_lists_the_row_with_its_numbers(spec):
    row = ROWS[spec]
    [line] = [line for line in README.splitlines() if line.startswith(f"| `configs/{spec}` |")]
    expected = "not published" if row.expected is None else f"{row.expected:.2f}"
    assert f"| {expected} | {row.alone:.2f} | {row.teacher:.2f} |" in line


@pytest.mark.slow
@pytest.mark.parametrize("spec", ALL)
def test_config_builds_for_every_method(spec):
    config = _local(spec)
    for terms in config.methods.values():
        exp = train.setup(config, terms_config=terms, materialize=False)
        assert exp.abstract_state.step.shape == ()


def _one_step(spec, dtype="float32"):
    config = _local(spec)
    config.student.dtype = config.teacher.dtype = dtype
    exp = train.setup(config)
    batch = next(make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                     seed=config.seed))
    state, metrics = exp.step(exp.init_state(), sharding.global_batch(batch, exp.mesh),
                              nonfinite="freeze")
    metrics = jax.device_get(metrics)
    assert int(state.step) == 1 and int(state.bad_step) == -1, metrics
    return state


@pytest.mark.slow
@pytest.mark.parametrize("spec", BF16)
def test_config_runs_one_step_in_bf16(spec):
    # bf16 compute for both networks; parameters, optimizer state and losses stay float32.
    state = _one_step(spec, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves((state.student.params, state.student.opt_state))} <= {
        np.dtype("float32"), np.dtype("int32")}


@pytest.mark.slow
@pytest.mark.parametrize("spec", [s for s in ALL if s not in BF16])
def test_config_runs_one_step(spec):
    _one_step(spec)
