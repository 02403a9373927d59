"""Predictors of frozen networks (``kdjax.evaluation.predictions``)."""

import jax
import numpy as np

from kdjax.data.metadata import dataset_info
from kdjax.evaluation import predict_classes
from kdjax.evaluation.predictions import network_predictor
from kdjax.evaluation.validation import eval_mode
from kdjax.io.networks import load_teacher
from kdjax.runtime.sharding import make_mesh
from tests.training import tiny_config


def _network(config, seed):
    return load_teacher(config.teacher, num_classes=dataset_info(config.data.name).num_classes,
                        mesh=make_mesh(), seed=seed)


def test_networks_of_one_architecture_share_one_program_and_predict_their_own_classes():
    config = tiny_config.get_config()   # a random-weight teacher: each seed its own weights
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    num_classes = dataset_info(config.data.name).num_classes
    networks = [_network(config, seed) for seed in (0, 1)]
    predictors = [network_predictor(n, config, num_classes) for n in networks]
    # The weights are arguments of the program, not constants compiled into it.
    programs = [p.func.lower(*p.args, images).as_text() for p in predictors]
    assert programs[0] == programs[1]
    for network, predict in zip(networks, predictors):
        expected = predict_classes(lambda x, n=network: n.logits(n.variables, x), images,
                                   eval_mode=eval_mode(config), num_classes=num_classes)
        np.testing.assert_array_equal(np.asarray(predict(images)), np.asarray(expected))
    assert not np.array_equal(*(np.asarray(p(images)) for p in predictors))
    assert jax.tree.leaves(predictors[0].args[0])[0] is jax.tree.leaves(networks[0].variables)[0]
