"""kdjax.ops.cost.traced_flops: the FLOPs of matrix products and convolutions from the jaxpr, equal
to XLA's cost analysis of the same operations on the CPU (where that analysis exists), through
gradients, loops, branches and custom derivative rules."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import lax

from kdjax.models.segmentor import build_segmentor, summary
from kdjax.ops.cost import traced_flops
from tests.devices import skip_unless_cpu


def xla_flops(fn, *args) -> float:
    # The count under test is read from the jaxpr, the same on every platform; its reference,
    # XLA's cost analysis, answers None under the GPU's and TPU's PJRT plugins.
    skip_unless_cpu("XLA's cost analysis")
    return jax.jit(fn).trace(*args).lower().cost_analysis()["flops"]


def ours(fn, *args) -> float:
    return traced_flops(jax.jit(fn).trace(*args))


CONVS = [  # (input NHWC, kernel HWIO, strides, padding, input dilation, kernel dilation, groups)
    ((2, 17, 16, 8), (3, 3, 8, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1),
    ((2, 17, 16, 8), (3, 3, 8, 4), (2, 2), ((1, 1), (1, 1)), (1, 1), (2, 2), 1),
    ((1, 9, 12, 6), (3, 3, 3, 6), (2, 1), ((2, 0), (1, 3)), (1, 1), (1, 3), 2),
    ((2, 8, 8, 4), (3, 3, 4, 5), (1, 1), ((2, 2), (2, 2)), (2, 2), (1, 1), 1),    # transposed
    ((1, 20, 20, 16), (3, 3, 1, 16), (1, 1), ((12, 12), (12, 12)), (1, 1), (12, 12), 16),  # depthwise
]


def conv(x, w, strides, padding, lhs_dilation, rhs_dilation, groups):
    return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)


@pytest.mark.parametrize("case", CONVS, ids=range(len(CONVS)))
def test_convolutions_and_their_gradients_count_as_xla_counts_them(case):
    x_shape, w_shape, *options = case
    x, w = jnp.ones(x_shape), jnp.ones(w_shape)

    def forward(x, w):
        return conv(x, w, *options)

    cotangent = jnp.ones(jax.eval_shape(forward, x, w).shape)

    def gradients(x, w, cotangent):
        # Both gradients are convolutions (the kernel's with batch groups where the forward had
        # feature groups); the forward pass they do not need is left out, as XLA leaves it out.
        return jax.vjp(forward, x, w)[1](cotangent)

    assert ours(forward, x, w) == xla_flops(forward, x, w) > 0
    assert ours(gradients, x, w, cotangent) == xla_flops(gradients, x, w, cotangent) > 0


def test_matrix_products_with_batch_dimensions():
    a, b = jnp.ones((3, 5, 7, 11)), jnp.ones((3, 11, 13))

    def product(a, b):
        return jnp.einsum("bijk,bkl->bijl", a, b)

    assert ours(product, a, b) == xla_flops(product, a, b) == 2 * 3 * 5 * 7 * 13 * 11


def test_loops_branches_and_custom_rules():
    x = jnp.ones((4, 8))
    w = jnp.ones((8, 8))
    one_product = 2 * 4 * 8 * 8

    def scanned(x, w):
        return lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

    def branched(x, w, p):
        return lax.cond(p, lambda: (x @ w) @ w, lambda: x @ w)

    @jax.custom_vjp
    def custom(x, w):
        return x @ w

    custom.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    assert ours(scanned, x, w) == 5 * one_product
    assert ours(branched, x, w, True) == 2 * one_product     # the costlier branch
    assert ours(jax.jit(lambda x, w: jax.jit(jnp.matmul)(x, w)), x, w) == one_product
    assert ours(custom, x, w) == one_product
    # Forward and both gradient products of the rule.
    assert ours(jax.value_and_grad(lambda x, w: custom(x, w).sum(), (0, 1)), x, w) == 3 * one_product


def test_a_network_counts_its_convolutions_and_products_within_xlas_total():
    # XLA's total adds the elementwise work (batch norm, ReLU, the upsampling's arithmetic): a
    # few per cent on a convolutional network. summary() counts as traced_flops does.
    model = nnx.eval_shape(lambda: build_segmentor("deeplabv3_resnet18", num_classes=19,
                                                   rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images, train=False).logits

    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    counted = ours(forward, state, images)
    assert 0.95 * xla_flops(forward, state, images) <= counted < xla_flops(forward, state, images)
    assert summary("deeplabv3_resnet18", (1, 64, 64, 3)).flops == counted
