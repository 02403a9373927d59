"""Segmentation heads on random backbone features: layout, PyTorch parity, train/eval, jit, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models.heads import (ASPP, DeepLabV3Head, DeepLabV3PlusHead, FCNHead, PSPHead,
                                aspp_rates)
from tests.models.random_state import random_module, randn

K = 5


@nnx.jit(static_argnames="train")
def run(module, *inputs, train=False, rngs=None):
    """The module's forward pass; ``rngs`` keys a head's dropout in train mode."""
    return module(*inputs, train) if rngs is None else module(*inputs, train, rngs=rngs)


def _state_arrays(module):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param, nnx.BatchStat))]


def _param_shapes(module):
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(map(str, path)): tuple(v.get_value().shape) for path, v in flat}


# --------------------------------------------------------------------------------------------------
# Layout: attribute paths mirror CIRKD's state-dict keys (cirkd-models.md §4), shapes follow §3.3.

def test_deeplabv3_head_layout():
    head = nnx.eval_shape(lambda: DeepLabV3Head(64, K, width=16, rngs=nnx.Rngs(0)))
    shapes = _param_shapes(head)
    assert shapes["aspp.b0.conv.kernel"] == (1, 1, 64, 16)
    for b in ("b1", "b2", "b3"):
        assert shapes[f"aspp.{b}.conv.kernel"] == (3, 3, 64, 16)
    assert shapes["aspp.b4.conv.kernel"] == (1, 1, 64, 16)
    assert shapes["aspp.project.conv.kernel"] == (1, 1, 5 * 16, 16)
    assert shapes["block.conv.kernel"] == (3, 3, 16, 16)
    assert shapes["classifier.kernel"] == (1, 1, 16, K)
    assert shapes["classifier.bias"] == (K,)
    # Only the classifier has a bias; every other ".bias" belongs to a BatchNorm.
    assert {p for p in shapes if p.endswith("bias") and ".bn." not in p} == {"classifier.bias"}
    assert [(b.conv.dilation, b.conv.padding) for b in (head.aspp.b1, head.aspp.b2, head.aspp.b3)] \
        == [((r, r), (r, r)) for r in (12, 24, 36)]


def test_psp_and_fcn_head_layout():
    psp = _param_shapes(nnx.eval_shape(lambda: PSPHead(64, K, width=8, rngs=nnx.Rngs(0))))
    for i in (1, 2, 3, 4):
        assert psp[f"psp.conv{i}.conv.kernel"] == (1, 1, 64, 16)
    assert psp["block.conv.kernel"] == (3, 3, 128, 8)
    assert psp["classifier.kernel"] == (1, 1, 8, K)
    fcn = _param_shapes(nnx.eval_shape(lambda: FCNHead(64, K, rngs=nnx.Rngs(0))))
    assert fcn["block.conv.kernel"] == (3, 3, 64, 16)
    assert fcn["classifier.kernel"] == (1, 1, 16, K)


def test_aspp_rates_follow_output_stride():
    assert aspp_rates(8) == (12, 24, 36)
    assert aspp_rates(16) == (6, 12, 18)
    with pytest.raises(ValueError, match="output_stride.*32"):
        aspp_rates(32)
    with pytest.raises(ValueError, match="rates"):
        ASPP(8, 4, (6, 12), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------------
# Small randomised heads, built once (eager construction dominates the run time on CPU).

C4, C1 = 16, 6


@pytest.fixture(scope="module")
def heads():
    def rngs():
        return nnx.Rngs(0)

    return {
        "deeplabv3": random_module(lambda: DeepLabV3Head(C4, K, width=8, rngs=rngs()), 1),
        "psp": random_module(lambda: PSPHead(C4, K, width=8, rngs=rngs()), 2),
        "fcn": random_module(lambda: FCNHead(C4, K, rngs=rngs()), 3),
        "plus": random_module(lambda: DeepLabV3PlusHead(C4, C1, K, width=8, rngs=rngs()), 4),
    }


# --------------------------------------------------------------------------------------------------
# Shapes.

def test_head_output_shapes_keep_input_resolution(heads):
    c4 = randn(0, 2, 5, 7, C4)
    for name, width in (("deeplabv3", 8), ("psp", 8), ("fcn", C4 // 4)):
        out = run(heads[name], c4)
        assert out["logits"].shape == (2, 5, 7, K), name
        assert out["feature"].shape == (2, 5, 7, width), name


def test_deeplabv3plus_outputs_at_c1_resolution(heads):
    head = heads["plus"]
    out = run(head, randn(0, 2, 5, 7, C4), randn(1, 2, 9, 13, C1))
    assert out["logits"].shape == (2, 9, 13, K)
    assert out["feature"].shape == (2, 9, 13, 8)
    assert head.low_level.conv.kernel.shape == (1, 1, C1, 48)
    assert head.fuse.conv.kernel.shape == (3, 3, 8 + 48, 8)
    assert head.taps == ("c4", "c1")


def test_heads_reject_wrong_rank(heads):
    with pytest.raises(ValueError, match="x must have rank 4"):
        heads["deeplabv3"](jnp.zeros((5, 7, C4)), train=False)
    with pytest.raises(ValueError, match="low_level must have rank 4"):
        heads["plus"](jnp.zeros((1, 5, 7, C4)), jnp.zeros((9, 13, C1)), train=False)


# --------------------------------------------------------------------------------------------------
# Eval-mode parity with the PyTorch layers CIRKD uses, on odd sizes where ASPP dilations exceed the
# map and PSP bins overlap.

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None



def needs_torch(test):
    skip = pytest.mark.skipif(torch is None, reason="PyTorch parity needs torch")
    return pytest.mark.torch(skip(test))


def _t(x):
    return torch.from_numpy(np.array(x, np.float32))


def _torch_conv(x, conv):
    weight = _t(conv.kernel[...]).permute(3, 2, 0, 1)
    bias = None if conv.bias is None else _t(conv.bias[...])
    return F.conv2d(x, weight, bias, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation)


def _torch_cbr(x, cbr):
    y = _torch_conv(x, cbr.conv)
    bn = cbr.bn
    y = F.batch_norm(y, _t(bn.mean[...]), _t(bn.var[...]), _t(bn.scale[...]), _t(bn.bias[...]),
                     training=False, eps=1e-5)
    return F.relu(y)


def _torch_aspp(x, aspp):
    size = x.shape[2:]
    pooled = _torch_cbr(F.adaptive_avg_pool2d(x, 1), aspp.b4)
    pooled = F.interpolate(pooled, size, mode="bilinear", align_corners=True)
    feats = [_torch_cbr(x, b) for b in (aspp.b0, aspp.b1, aspp.b2, aspp.b3)] + [pooled]
    return _torch_cbr(torch.cat(feats, 1), aspp.project)


def _torch_psp(x, psp):
    size = x.shape[2:]
    branches = [F.interpolate(_torch_cbr(F.adaptive_avg_pool2d(x, b), conv), size,
                              mode="bilinear", align_corners=True)
                for b, conv in zip((1, 2, 3, 6), (psp.conv1, psp.conv2, psp.conv3, psp.conv4))]
    return torch.cat([x, *branches], 1)


def _torch_tail(x, head):
    feature = _torch_cbr(x, head.block)
    return _torch_conv(feature, head.classifier), feature


def _nchw(x):
    return _t(x).permute(0, 3, 1, 2)


def _assert_close(ours, theirs):
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    err = np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs))
    assert err < 1e-5, err


@needs_torch
def test_pyramid_pooling_uneven_bins_match_torch(heads):
    # 7×11: bins 2, 3 and 6 all overlap (PyTorch edges floor(i·n/o)..ceil((i+1)·n/o)).
    psp = heads["psp"].psp
    x = randn(1, 2, 7, 11, C4)
    _assert_close(run(psp, x), _torch_psp(_nchw(x), psp))


@needs_torch
@pytest.mark.parametrize("size", [(5, 7), (38, 42)])
def test_deeplabv3_head_matches_torch(heads, size):
    head = heads["deeplabv3"]
    x = randn(2, 2, *size, C4)
    out = run(head, x)
    logits, feature = _torch_tail(_torch_aspp(_nchw(x), head.aspp), head)
    _assert_close(out["logits"], logits)
    _assert_close(out["feature"], feature)


@needs_torch
def test_psp_fcn_and_plus_heads_match_torch(heads):
    x = randn(3, 2, 7, 11, C4)
    psp, fcn, plus = heads["psp"], heads["fcn"], heads["plus"]
    _assert_close(run(psp, x)["logits"], _torch_tail(_torch_psp(_nchw(x), psp.psp), psp)[0])
    _assert_close(run(fcn, x)["logits"], _torch_tail(_nchw(x), fcn)[0])

    c1 = randn(4, 2, 13, 21, C1)
    context = F.interpolate(_torch_aspp(_nchw(x), plus.aspp), (13, 21), mode="bilinear",
                            align_corners=True)
    fused = _torch_cbr(torch.cat([context, _torch_cbr(_nchw(c1), plus.low_level)], 1), plus.fuse)
    _assert_close(run(plus, x, c1)["logits"], _torch_tail(fused, plus)[0])


# --------------------------------------------------------------------------------------------------
# Train vs eval.

def test_eval_is_deterministic_and_changes_nothing(heads):
    head = heads["deeplabv3"]
    x = randn(5, 2, 5, 7, C4)
    before = _state_arrays(head)
    a, b = run(head, x), run(head, x)
    np.testing.assert_array_equal(a["logits"], b["logits"])
    for old, new in zip(before, _state_arrays(head)):
        np.testing.assert_array_equal(old, new)


def test_train_uses_batch_stats_updates_running_stats_and_drops_out(heads):
    head = nnx.clone(heads["psp"])
    x = randn(6, 2, 7, 11, C4)
    mean_before = np.asarray(head.block.bn.mean[...])
    rngs = nnx.Rngs(dropout=1)
    a = run(head, x, train=True, rngs=rngs)
    assert not np.allclose(head.block.bn.mean[...], mean_before)
    b = run(head, x, train=True, rngs=rngs)
    # Dropout(0.1) zeroes about a tenth of the classifier input, differently on each draw of
    # the stream, and the same way for the same key.
    zeros_a, zeros_b = (np.asarray(o["feature"]) == 0 for o in (a, b))
    assert not np.array_equal(zeros_a, zeros_b)
    again = run(head, x, train=True, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(np.asarray(again["feature"]) == 0, zeros_a)
    eval_feature = np.asarray(run(head, x)["feature"])
    dropped = zeros_a.mean() - (eval_feature == 0).mean()
    assert 0.03 < dropped < 0.2, dropped


def test_dropout_keys_are_call_arguments_not_state(heads):
    head = random_module(lambda: FCNHead(C4, K, rngs=nnx.Rngs(params=0)))
    assert not jax.tree.leaves(nnx.state(head, nnx.RngState))
    x = randn(7, 2, 5, 7, C4)
    assert head(x, train=False)["logits"].shape == (2, 5, 7, K)
    with pytest.raises(ValueError, match=r"rngs=nnx.Rngs\(dropout=key\)"):
        head(x, train=True)


# --------------------------------------------------------------------------------------------------
# jit and bf16.

def test_jit_matches_eager_and_bf16_is_close(heads):
    head = heads["deeplabv3"]
    x = randn(8, 2, 5, 7, C4)
    jitted = np.asarray(run(head, x)["logits"])
    eager = np.asarray(head(x, train=False)["logits"])
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)

    graphdef_bf16 = nnx.graphdef(nnx.eval_shape(
        lambda: DeepLabV3Head(C4, K, width=8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    head_bf16 = nnx.merge(graphdef_bf16, nnx.state(head))
    out = run(head_bf16, x)["logits"]
    assert out.dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(out, np.float32) - eager)) / np.max(np.abs(eager))
    assert err < 3e-2, err
