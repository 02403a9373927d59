"""The floating-point operations of a traced program, counted the same way on every platform.

XLA's cost analysis of a lowered program is unavailable on the GPU and TPU runtimes (PJRT plugins
answer None), and of a compiled one it skips the convolutions a GPU hands to cuDNN. So kdjax
counts from the jaxpr itself: 2 per multiply-add of every matrix product (``dot_general``) and
convolution (``conv_general_dilated``), the work that dominates a segmentation network and that
FLOP-utilisation figures are read against. A convolution counts only the window taps that meet an
input element, not padding or the holes of an input dilation (a strided convolution's input
gradient has many): the rule of XLA's ``HloCostAnalysis``, so the two counts agree on these
operations where both exist.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from jax.extend import core as jax_core

FMA_FLOPS = 2


def traced_flops(traced: jax.stages.Traced) -> float:
    """FLOPs of the matrix products and convolutions of ``traced``
    (``jax.jit(f).trace(*args)``, arguments arrays or ``jax.ShapeDtypeStruct``s), gradients
    included where ``f`` takes them. A ``scan`` counts its body ``length`` times, a ``cond`` its
    costliest branch, a ``while_loop`` its body once (its trip count is not known when traced)."""
    return _jaxpr_flops(traced.jaxpr.jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in _live_eqns(jaxpr):
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        else:
            inner = [_jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params)]
            if name == "cond":
                total += max(inner, default=0.0)
            elif name == "scan":
                total += eqn.params["length"] * sum(inner)
            else:
                total += sum(inner)
    return total


def _live_eqns(jaxpr) -> list:
    """The equations that the outputs need or that have effects: what XLA runs. A traced
    ``jax.vjp`` keeps the forward pass even where only its gradients are returned."""
    live = {v for v in jaxpr.outvars if isinstance(v, jax_core.Var)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(v for v in eqn.invars if isinstance(v, jax_core.Var))
    return kept[::-1]


def _sub_jaxprs(params: dict) -> Iterator:
    """The jaxprs a higher-order primitive's parameters hold (pjit, remat, custom derivative
    rules, scan, cond branches, while bodies)."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax_core.Jaxpr):
                yield item


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval.shape
    (contracting, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval.shape
    return FMA_FLOPS * float(np.prod(out)) * float(np.prod([lhs[d] for d in contracting]))


def _conv_flops(eqn) -> float:
    p = eqn.params
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    dims = p["dimension_numbers"]
    (lhs_batch, lhs_feature, *lhs_space), (_, _, *rhs_space), (_, out_feature, *out_space) = (
        dims.lhs_spec, dims.rhs_spec, dims.out_spec)
    taps = 1.0
    for i, (low, _) in enumerate(p["padding"]):
        taps *= _valid_taps(size_in=lhs[lhs_space[i]], size_kernel=rhs[rhs_space[i]],
                            size_out=out[out_space[i]], stride=p["window_strides"][i], low=low,
                            lhs_dilation=p["lhs_dilation"][i], rhs_dilation=p["rhs_dilation"][i])
    multiply_adds = (lhs[lhs_feature] // p["feature_group_count"]) * out[out_feature] \
        * (lhs[lhs_batch] // p["batch_group_count"]) * taps
    return FMA_FLOPS * multiply_adds


def _valid_taps(*, size_in, size_kernel, size_out, stride, low, lhs_dilation, rhs_dilation) -> float:
    """(output position, kernel position) pairs of one spatial dimension whose input index lands
    on an input element: inside the input and, under an input dilation, not in a hole."""
    index = (np.arange(size_out)[:, None] * stride - low
             + np.arange(size_kernel)[None, :] * rhs_dilation)
    valid = (index >= 0) & (index % lhs_dilation == 0) & (index // lhs_dilation < size_in)
    return float(valid.sum())
