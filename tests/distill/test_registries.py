"""The two registries agree: every method's terms name registered loss kinds with options their
adapters declare, every declared option is an argument of the adapter's loss functions, and what
lists methods (the family configs' `method=`, the `local` flag) reads the registry."""

import inspect

import pytest

from kdjax.config import methods, recipes
from kdjax.config.loading import load_config
from kdjax.config.methods import AF_DCD_WEIGHTS, Method, method_terms, register_method, term
from kdjax.distill import ADAPTERS, parse_terms


@pytest.mark.parametrize("dataset", sorted(AF_DCD_WEIGHTS))
@pytest.mark.parametrize("aux_logits", [True, False])
def test_every_method_parses_on_every_dataset(dataset, aux_logits):
    for name in methods.METHODS:
        terms = parse_terms(method_terms(name, dataset=dataset, aux_logits=aux_logits),
                            train_steps=100)
        assert all(t.loss in ADAPTERS for t in terms)
        assert (not terms) == (name == "student_alone")


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_declared_options_are_arguments_of_the_loss_functions(name):
    adapter = ADAPTERS[name]
    arguments = set().union(*(inspect.signature(f).parameters for f in adapter.functions))
    assert set(adapter.options) <= arguments
    # The objective supplies the mask (mask_ignore); a term cannot set it.
    assert "mask" not in adapter.accepted_options()


def test_a_method_is_registered_once():
    with pytest.raises(ValueError, match="'kd' is registered already"):
        register_method(Method("kd", lambda dataset, aux_logits: {}, "again"))


def test_a_loss_kind_shrinks_one_way_under_local():
    clash = Method("big_contrast", lambda dataset, aux_logits: {}, "test",
                   local={"dense_contrast": lambda config, entry: None})
    with pytest.raises(ValueError, match="shrinks 'dense_contrast' terms under 'local' "
                                         "differently"):
        register_method(clash)
    assert "big_contrast" not in methods.METHODS


def test_an_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown method 'cwdd'; the methods are student_alone, "
                                         "kd, cwd"):
        method_terms("cwdd")


def test_a_registered_method_is_a_choice_of_the_family_configs():
    method = register_method(Method(
        "cwd_strong", lambda dataset, aux_logits: {
            "cwd_logits": term("channel_wise_divergence", weight=6.0, tau=4.0)}, "test"))
    try:
        assert "cwd_strong" in recipes.METHODS
        config = load_config("configs/cityscapes.py:student=r18,method=cwd_strong,local")
        assert config.distill.terms.cwd_logits.weight == 6.0
        assert set(config.methods) == {"student_alone", "cwd_strong"}
    finally:
        methods.METHODS.pop(method.name)
    with pytest.raises(ValueError, match="method=cwd_strong"):
        load_config("configs/cityscapes.py:student=r18,method=cwd_strong,local")


def test_local_shrinks_the_terms_its_methods_declare():
    config = load_config("configs/cityscapes.py:student=r18,method=af_dcd,local")
    assert config.distill.terms.af_dcd.options.pool == 0
    config = load_config("configs/cityscapes.py:student=r18,method=skd,local")
    assert config.distill.terms.adv.options.conv_dim == 8
    assert tuple(config.data.crop_size) == (512, 512)
