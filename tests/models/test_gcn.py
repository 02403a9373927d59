"""CIRKDv2's GCN block: layout, PyTorch's default initialisation, bfloat16 compute, and the
forward pass, BN statistics and gradients against a PyTorch transcription of the original."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models.distill_modules import CirkdGcn
from kdjax.models.segmentor import count_params
from tests.models.random_state import random_module, randn

C = 8


@nnx.jit(static_argnames="train")
def run(module, x, train=False):
    return module(x, train)


def test_layout_and_parameter_count():
    gcn = nnx.eval_shape(lambda: CirkdGcn(C, rngs=nnx.Rngs(0)))
    for node in (gcn.node_q, gcn.node_k, gcn.node_v):
        assert node.kernel.shape == (1, 1, C, C // 2) and node.bias is None
    assert gcn.conv1.kernel.shape == (1, 1, C // 2, C) and gcn.conv1.bias is None
    assert gcn.out_conv.kernel.shape == (1, 1, 2 * C, C) and gcn.out_conv.bias is None
    assert gcn.bn1.scale.shape == gcn.out_bn.scale.shape == (C,)
    assert count_params(gcn) == 3 * C * (C // 2) + (C // 2) * C + 2 * C * C + 2 * 2 * C


def test_pytorch_default_initialisation():
    gcn = CirkdGcn(64, rngs=nnx.Rngs(0))
    for conv, fan_in in ((gcn.node_q, 64), (gcn.conv1, 32), (gcn.out_conv, 128)):
        kernel = np.asarray(conv.kernel[...])
        bound = 1 / np.sqrt(fan_in)                    # kaiming_uniform(a=√5): U(−b, b)
        assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    for bn in (gcn.bn1, gcn.out_bn):
        assert np.all(np.asarray(bn.scale[...]) == 1) and np.all(np.asarray(bn.bias[...]) == 0)


def test_shape_relu_output_and_bn_statistics():
    gcn = random_module(lambda: CirkdGcn(C, rngs=nnx.Rngs(0)))
    x = randn(0, 2, 5, 6, C)
    out = run(gcn, x)
    assert out.shape == x.shape and out.dtype == jnp.float32 and float(out.min()) == 0.0
    before = [np.asarray(v) for v in jax.tree.leaves(nnx.state(gcn, nnx.BatchStat))]
    run(gcn, x, train=True)
    after = [np.asarray(v) for v in jax.tree.leaves(nnx.state(gcn, nnx.BatchStat))]
    assert not any(np.array_equal(a, b) for a, b in zip(before, after))


def test_bfloat16_compute():
    full = random_module(lambda: CirkdGcn(C, rngs=nnx.Rngs(0)), seed=1)
    half = random_module(lambda: CirkdGcn(C, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), seed=1)
    assert half.node_q.kernel[...].dtype == jnp.float32          # param_dtype stays float32
    x = randn(1, 2, 5, 6, C)
    out = run(half, x)
    assert out.dtype == jnp.bfloat16
    expected = np.asarray(run(full, x))
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=0.05,
                               atol=0.05 * np.abs(expected).max())


def test_bad_inputs():
    gcn = random_module(lambda: CirkdGcn(C, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="rank 4"):
        gcn(randn(2, 5, 6, C), train=False)
    with pytest.raises(ValueError, match="8 channels"):
        gcn(randn(2, 2, 5, 6, 4), train=False)
    with pytest.raises(ValueError, match="at least 2 channels"):
        CirkdGcn(1, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------------
# Against the PyTorch transcription of the original.

def _to_torch(torch, gcn):
    """The state dict of the original's layout holding ``gcn``'s variables."""
    def tensor(value, transpose=None):
        value = np.asarray(value, np.float32)
        return torch.tensor(value.transpose(transpose) if transpose else value)

    state = {f"{name}.weight": tensor(getattr(gcn, name).kernel[...], (3, 2, 0, 1))
             for name in ("node_q", "node_k", "node_v")}
    for prefix, conv, bn in (("conv1", gcn.conv1, gcn.bn1), ("out_conv", gcn.out_conv, gcn.out_bn)):
        state.update({
            f"{prefix}.0.weight": tensor(conv.kernel[...], (3, 2, 0, 1)),
            f"{prefix}.1.weight": tensor(bn.scale[...]), f"{prefix}.1.bias": tensor(bn.bias[...]),
            f"{prefix}.1.running_mean": tensor(bn.mean[...]),
            f"{prefix}.1.running_var": tensor(bn.var[...]),
            f"{prefix}.1.num_batches_tracked": torch.tensor(0)})
    return state


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.torch
@pytest.mark.parametrize("train", [False, True])
def test_matches_the_original(train):
    torch = pytest.importorskip("torch")
    from tests.torch_reference.gcn import Gcn

    gcn = random_module(lambda: CirkdGcn(C, rngs=nnx.Rngs(0)), seed=3)
    reference = Gcn(C)
    reference.load_state_dict(_to_torch(torch, gcn))
    reference.train(train)
    x = randn(4, 2, 5, 6, C)

    def loss(module, x):
        return jnp.sum(module(x, train) ** 2)

    out = run(gcn, x, train=train)
    # Running statistics after one forward pass (in eval mode, unchanged).
    stats = [(np.asarray(bn.mean[...]), np.asarray(bn.var[...])) for bn in (gcn.bn1, gcn.out_bn)]
    grads, x_grad = nnx.grad(loss, argnums=(0, 1))(gcn, x)
    x_torch = torch.tensor(_nchw(x), requires_grad=True)
    expected = reference(x_torch)
    (expected ** 2).sum().backward()

    np.testing.assert_allclose(_nchw(out), expected.detach().numpy(), rtol=1e-4, atol=1e-5)
    for (mean, var), torch_bn in zip(stats, (reference.conv1[1], reference.out_conv[1])):
        np.testing.assert_allclose(mean, torch_bn.running_mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var, torch_bn.running_var.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_nchw(x_grad), x_torch.grad.numpy(), rtol=1e-4, atol=1e-4)
    for name in ("node_q", "node_k", "node_v"):
        np.testing.assert_allclose(
            np.asarray(getattr(grads, name).kernel[...]).transpose(3, 2, 0, 1),
            getattr(reference, name).weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads.out_conv.kernel[...]).transpose(3, 2, 0, 1),
                               reference.out_conv[0].weight.grad.numpy(), rtol=1e-4, atol=1e-4)
