"""Every config in configs/ is valid under its `:local` switch; under ``-m slow`` all build and
run a step, one of them in bf16 (their ResNet-101 teachers take one to two minutes each to trace
and compile on a CPU)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from kdjax import sharding, train
from kdjax.config import check_known_keys, load_config
from kdjax.data import dataset_info, make_train_iterator
from kdjax.defaults import base_config
from kdjax.distill import parse_terms
from kdjax.models import MODEL_NAMES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.py"))
# Runs its step in bf16; the others in float32.
BF16 = ("cityscapes/deeplabv3_r101_r18_cirkd.py",)


def _local(name):
    config = load_config(f"{CONFIGS / name}:local")
    check_known_keys(config, base_config())
    if config.teacher.checkpoint is None:  # `compare` trains it first; a step needs weights
        config.teacher.checkpoint = "random"
    return config


def test_there_is_a_config_per_paper_row():
    rows = [n for n in ALL if n.startswith("cityscapes/deeplabv3")]
    methods = ("kd", "cwd", "nfd", "pfs_wpi", "fakd_kd", "fakd_cwd", "skd", "ifvd", "cirkd",
               "dist", "at", "fitnet")
    for student in ("r18", "mbv2"):
        assert {f"cityscapes/deeplabv3_r101_{student}_{m}.py" for m in methods} <= set(rows)
    assert {"cityscapes/pspnet_r101_r18_cwd.py", "voc_aug/deeplabv3_r101_r18_cirkd.py",
            "ade20k/deeplabv3_r101_r18_cirkd.py", "demo.py"} <= set(ALL)


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


@pytest.mark.parametrize("name", ALL)
def test_config_is_valid_and_documents_its_command(name):
    text = (CONFIGS / name).read_text()
    assert f"--config=configs/{name}" in text, "the docstring gives the exact command"
    config = _local(name)
    dataset_info(config.data.name)
    for model in (config.student, config.teacher):
        assert model.name in MODEL_NAMES
    for terms in (config.distill.terms, *config.methods.values()):
        parse_terms(terms, train_steps=config.train.steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_config_builds_for_every_method(name):
    config = _local(name)
    for terms in config.methods.values():
        exp = train.setup(config, terms_config=terms, materialize=False)
        assert exp.abstract_state.step.shape == ()


def _one_step(name, dtype="float32"):
    config = _local(name)
    config.student.dtype = config.teacher.dtype = dtype
    exp = train.setup(config)
    batch = next(make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                     seed=config.seed))
    state, metrics = exp.compiled_step()(exp.init_state(), exp.teacher_inputs(),
                                         sharding.global_batch(batch, exp.mesh))
    metrics = jax.device_get(metrics)
    assert int(state.step) == 1 and int(state.bad_step) == -1, metrics
    return state


@pytest.mark.slow
@pytest.mark.parametrize("name", BF16)
def test_config_runs_one_step_in_bf16(name):
    # bf16 compute for both networks; parameters, optimizer state and losses stay float32.
    state = _one_step(name, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} <= {
        np.dtype("float32"), np.dtype("int32")}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if n not in BF16])
def test_config_runs_one_step(name):
    _one_step(name)
