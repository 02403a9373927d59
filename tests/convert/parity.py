"""Helpers for comparing a converted kdjax model with the PyTorch reference it came from."""

import jax
import numpy as np
import torch
from flax import nnx

# max|kdjax − torch| / max|torch| allowed in float32.
RELATIVE_TOLERANCE = 1e-4
STAGES = ("c1", "c2", "c3", "c4")


def random_images(height, width, batch=2, seed=0):
    """(N, H, W, 3) float32 images, roughly the scale of mean-subtracted pixels divided by 60."""
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


def nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def torch_segmentor_outputs(reference, images):
    """The reference's eval outputs, NHWC: logits, aux_logits (if any), feature and c1..c4."""
    with torch.no_grad():
        out = reference.eval().forward_all(nchw(images))
    return {key: nhwc(value) for key, value in out.items() if value is not None}


def torch_backbone_outputs(reference, images):
    with torch.no_grad():
        stages = reference.eval().forward_stages(nchw(images))
    return {key: nhwc(value) for key, value in zip(STAGES, stages)}


def eval_forward(model, images):
    """``model(images, train=False)`` compiled: far faster than op-by-op for a whole network."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))(state, images)


def kdjax_segmentor_outputs(model, images):
    out = eval_forward(model, images)
    result = {"logits": out.logits, "feature": out.features["head"],
              **{key: out.features[key] for key in STAGES}}
    assert np.array_equal(out.features["pre_classifier"], out.features["head"])
    if out.aux_logits is not None:
        result["aux_logits"] = out.aux_logits
    return {key: np.asarray(value) for key, value in result.items()}


def kdjax_backbone_outputs(model, images):
    return {key: np.asarray(value) for key, value in eval_forward(model, images).items()}


def relative_error(actual, expected):
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def assert_outputs_match(actual, expected):
    """Same tensors, same shapes, each within ``RELATIVE_TOLERANCE``; returns the errors."""
    assert sorted(actual) == sorted(expected)
    errors = {}
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        errors[key] = relative_error(actual[key], value)
    assert all(error < RELATIVE_TOLERANCE for error in errors.values()), errors
    return errors
