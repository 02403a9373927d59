"""The platform choice: plain XLA kernels and the CPU kernels agree, and the XLA path is plain
XLA (no custom_vjp, no platform_dependent), so forward-mode differentiation works through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models import build_segmentor
from kdjax.models.layers import set_kernels
from kdjax.ops.kernels import resolve_kernels, resolve_loss_scratch


def _model(kernels):
    # Channels past the CPU forms' thresholds are not needed for the dispatch: a small model
    # still runs the tap forms for its 1×1 convolutions above their size threshold, and the
    # custom batch-norm backward everywhere.
    return build_segmentor("deeplabv3_resnet18", num_classes=3, width_multiplier=0.25,
                           head_width=16, kernels=kernels, rngs=nnx.Rngs(0))


def _without_dropout(model):
    # Masks drawn in float64 differ from float32's: the float64 reference runs without them.
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Dropout):
            module.rate = 0.0
    return model


def _loss_and_grads(kernels, images, dtype=jnp.float32):
    """A train-mode loss (dropout off) of the same float32-initialised weights, in ``dtype``."""
    graphdef = nnx.graphdef(_without_dropout(nnx.eval_shape(lambda: build_segmentor(
        "deeplabv3_resnet18", num_classes=3, width_multiplier=0.25, head_width=16,
        kernels=kernels, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))))
    _, params, rest = nnx.split(_model(kernels), nnx.Param, ...)
    params, rest = jax.tree.map(lambda x: x.astype(dtype), (params, rest))

    def loss(params):
        model = nnx.merge(graphdef, params, rest, copy=True)
        out = model(images.astype(dtype), train=True)
        return jnp.sum(out.logits ** 2) + jnp.sum(out.aux_logits ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


def _images(size=48):
    return jnp.asarray(np.random.default_rng(0).standard_normal((2, size, size, 3)), jnp.float32)


def test_auto_is_the_platforms_kernels_and_bad_names_are_refused():
    backend = jax.default_backend()
    assert resolve_kernels("auto") == (backend if backend in ("cpu", "gpu") else "xla")
    assert resolve_kernels("xla") == "xla" and resolve_kernels("gpu") == "gpu"
    with pytest.raises(ValueError, match="kernels must be one of"):
        resolve_kernels("cudnn")


def test_the_losses_scratch_budget_is_16_mib_on_cpu_and_bad_settings_are_refused():
    mib = 2**20
    assert resolve_loss_scratch("auto") == (16 if jax.default_backend() == "cpu" else 256) * mib
    assert resolve_loss_scratch(64) == 64 * mib
    assert resolve_loss_scratch(None) is None
    for bad in (0, -1, 1.5, True, "big"):
        with pytest.raises(ValueError, match="distill.loss_scratch_mb must be"):
            resolve_loss_scratch(bad)


def test_the_two_paths_agree_on_outputs_and_gradients():
    """The CPU forms are as accurate as XLA's own: against float64, each gradient of the CPU path
    errs at most twice as much as the XLA path's in float32. (Train-mode BN over two small
    images is ill-conditioned: both float32 paths differ from float64 by up to ~1e-3 of a leaf's
    largest gradient, so a fixed tolerance between the two would be decided by the dropout masks.)
    """
    images = _images()
    xla_value, xla_grads = _loss_and_grads("xla", images)
    cpu_value, cpu_grads = _loss_and_grads("cpu", images)
    with jax.enable_x64():
        exact_value, exact_grads = _loss_and_grads("xla", images, jnp.float64)
        exact_grads = jax.tree.map(np.asarray, exact_grads)
    np.testing.assert_allclose(cpu_value, xla_value, rtol=1e-5)
    np.testing.assert_allclose(xla_value, exact_value, rtol=1e-5)
    for (path, exact), xla, cpu in zip(jax.tree_util.tree_leaves_with_path(exact_grads),
                                       jax.tree.leaves(xla_grads), jax.tree.leaves(cpu_grads)):
        scale = np.max(np.abs(exact)) + 1e-12
        xla_error, cpu_error = (np.max(np.abs(np.asarray(g, np.float64) - exact)) / scale
                                for g in (xla, cpu))
        assert cpu_error <= 2 * xla_error + 1e-5, (path, cpu_error, xla_error)


def test_the_gpu_path_agrees_with_xlas_and_forms_only_dilated_kernel_gradients():
    """The 'gpu' kernels change the dilated convolutions' kernel gradient alone: the same value,
    gradients within float32 rounding of XLA's, and custom rules only in the backward of the
    dilated layers (layers 3 and 4 and the ASPP of a DeepLabV3 student)."""
    images = _images()
    with jax.default_matmul_precision("highest"):
        (xla_value, xla_grads), (gpu_value, gpu_grads) = (_loss_and_grads(k, images)
                                                          for k in ("xla", "gpu"))
    np.testing.assert_allclose(gpu_value, xla_value, rtol=1e-6)
    for xla, gpu in zip(jax.tree.leaves(xla_grads), jax.tree.leaves(gpu_grads)):
        np.testing.assert_allclose(gpu, xla, rtol=1e-4, atol=1e-5 * (float(jnp.abs(xla).max()) + 1e-12))
    forward, backward = _jaxpr_texts("gpu")
    assert "platform_index" not in forward + backward
    assert "custom_vjp" in forward and "dot_general" in backward


def _jaxpr_texts(kernels):
    """The jaxprs of a train-mode loss and of its gradient, as text."""
    graphdef, params, rest = nnx.split(_model(kernels), nnx.Param, ...)

    def loss(params):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return jnp.sum(model(_images(32), train=True, rngs=nnx.Rngs(dropout=1)).logits)

    return str(jax.make_jaxpr(loss)(params)), str(jax.make_jaxpr(jax.grad(loss))(params))


def test_the_xla_path_is_plain_xla():
    for text in _jaxpr_texts("xla"):
        assert "custom_vjp" not in text and "platform_index" not in text
    # The CPU path is what the check would catch.
    assert "custom_vjp" in _jaxpr_texts("cpu")[0]


def test_forward_mode_runs_through_a_whole_model_on_the_xla_path():
    model = _model("xla")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images, tangent = _images(32), _images(32) * 0.1

    def logits(images):
        return nnx.merge(graphdef, params, rest)(images, train=False).logits

    _, jvp = jax.jvp(logits, (images,), (tangent,))
    eps = 1e-2
    finite = (logits(images + eps * tangent) - logits(images - eps * tangent)) / (2 * eps)
    np.testing.assert_allclose(jvp, finite, rtol=2e-2, atol=2e-3 * float(jnp.abs(jvp).max()))


def test_set_kernels_switches_every_layer():
    model = _model("cpu")
    set_kernels(model, "xla")
    kinds = {sub.kernels for _, sub in nnx.iter_modules(model) if hasattr(sub, "kernels")}
    assert kinds == {"xla"}


@pytest.mark.parametrize("x_shape, kernel_shape, groups, cpu_forms", [
    ((2, 8, 8, 4), (3, 3, 4, 4), 1, False),          # 2·10⁵ FLOPs: XLA's form and gradients
    ((8, 64, 64, 64), (3, 3, 64, 64), 1, True),      # 2·10⁹ FLOPs: the CPU forms
    ((2, 8, 8, 4), (3, 3, 1, 4), 4, True),           # depthwise, at any size
])
def test_the_cpu_kernels_keep_xlas_form_only_for_small_ungrouped_convolutions(
        x_shape, kernel_shape, groups, cpu_forms):
    from kdjax.ops.convolution import conv2d

    def loss(x, kernel):
        return jnp.sum(conv2d(x, kernel, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                              groups=groups, kernels="cpu") ** 2)

    text = str(jax.make_jaxpr(loss)(jnp.zeros(x_shape), jnp.zeros(kernel_shape)))
    assert ("custom_vjp" in text) == cpu_forms
