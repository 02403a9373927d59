"""The losses' own derivative rules, each kept for the memory it saves at the Cityscapes size.

A loss defines its own derivative only where plain autodiff would store, or form again, tensors
that matter at 512×1024 inputs; everywhere else it is plain JAX and takes both autodiff modes.
The rules are built here, from two combinators, and nowhere else in ``kdjax.losses``
(tests/test_architecture.py): a loss module keeps the maths (the parts that form a value and its
gradients, the moments and scales of a backward) and hands it to one of them.

- :func:`gradient_from_forward`: the forward pass forms the gradients beside the value, and the
  backward pass only scales them by the cotangent. Its users:

  - relational row blocks (``relational.pairwise_row_sum``; PFS, SKD and CIRKD mini-batch pairs
    forms, CIRKDv2's channel mini-batch): each block of rows turns its rows of the P×P maps into
    its share of the gradient before the next block starts, so no map is kept for the backward
    pass: O(P·block_size) instead of O(P²) per map (~270 MB per map for a 64×128 feature).
  - FAKD chunked bound (``fakd._chunked_bound``): the leave-one-out bound of every class channel
    runs over chunks of images, and nothing of a chunk's steps is kept for the backward pass:
    about 16 MB of scratch per chunk, where autodiff's grew with the batch.
  - Af-DCD patch chunks (``dense_contrast._contrast_sum``): a chunk's (N, K, K, C/M) differences
    and K×K distances die with the chunk; only a gradient of the input's size is kept.
  - CIRKD memory anchor blocks (``cirkd_memory._contrast_kl_sums``; CIRKD's memory losses and
    CIRKDv2's channel memory loss): only a block's (R, M) similarity maps are alive at once,
    whatever the batch, and the backward pass forms none of them again.

- :func:`backward_from_residuals`: a forward that keeps small residuals and a written-out
  backward. Its user:

  - NFD group moments (``normalized_feature._squared_distance``): the distance comes from per-group
    moments, and the backward from them and the inputs, so no normalised tensor is stored: 124 MB
    less and 1.5× faster at the Cityscapes size (AMD EPYC, AVX2).

The figures and the A/B runs behind them are in benchmarks/NOTES.md ('Gradients formed in the
forward pass', 'FAKD-CWD in chunks of images', items 51 and 52). Every rule is reverse-mode only:
``jax.jvp`` through it raises a TypeError.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

# value_and_grads(*args) -> (value, grads): grads holds one entry per argument, the gradient of
# the value w.r.t. it, of shape value.shape + arg.shape, or None where the argument is a constant.
ValueAndGrads = Callable[..., tuple[Array, tuple[Array | None, ...]]]


def gradient_from_forward(value_and_grads: ValueAndGrads,
                          value: Callable[..., Array] | None = None) -> Callable[..., Array]:
    """A function whose gradients are formed in its forward pass, and scaled in the backward pass.

    The returned ``f(*args)`` has the value ``value(*args)``, or ``value_and_grads(*args)[0]``
    when ``value`` is None. Under reverse-mode differentiation its forward pass runs
    ``value_and_grads``, keeps only the gradients, and its backward pass contracts the cotangent
    with them: ``cotangent · g`` for a scalar value, the sum over the value's axes otherwise.

    Static options (block sizes, Python temperatures, pair terms, flags) are not arguments of
    ``f``: the caller closes them over (``functools.partial``). The arguments of ``f`` are
    pytrees of arrays (or None); those without a gradient (the teacher, masks, contrast sets,
    traced temperatures) get None in ``grads`` and a zero cotangent.

    Args:
      value_and_grads: ``(*args) -> (value, grads)``: value, float (V...) (a scalar or, e.g., one
        sum per contrast set); grads, a tuple aligned with ``args`` whose entries are None or
        arrays of shape (V..., *arg.shape) and the argument's dtype.
      value: ``(*args) -> value``, a cheaper path that forms no gradient, for calls that are not
        differentiated; it must give the value of ``value_and_grads``.
    Returns:
      ``f(*args) -> value``, reverse-mode differentiable in the arguments with a gradient.
    """
    primal = value if value is not None else (lambda *args: value_and_grads(*args)[0])

    @jax.custom_vjp
    def rule(*args):
        return primal(*args)

    def forward(*args):
        out, grads = value_and_grads(*args)
        _check_gradients(out, grads, args)
        return out, grads

    def backward(grads, cotangent):
        return tuple(None if grad is None else _contract(cotangent, grad) for grad in grads)

    rule.defvjp(forward, backward)
    return rule


def backward_from_residuals(forward: Callable[..., tuple[Array, object]],
                            backward: Callable[[object, Array], tuple[Array | None, ...]]
                            ) -> Callable[..., Array]:
    """A function with a written-out backward pass from the residuals its forward pass keeps.

    For rules whose gradient costs a pass of its own but needs far less than autodiff would
    store (NFD keeps per-group moments, not normalised tensors). Static options are closed over
    by the caller, as for :func:`gradient_from_forward`.

    Args:
      forward: ``(*args) -> (value, residuals)``; the value alone is the function's value.
      backward: ``(residuals, cotangent) -> cotangents``, a tuple aligned with ``args``: arrays of
        the arguments' shapes and dtypes, or None for a zero cotangent.
    Returns:
      ``f(*args) -> value``, reverse-mode differentiable by ``backward``.
    """

    @jax.custom_vjp
    def rule(*args):
        return forward(*args)[0]

    rule.defvjp(forward, backward)
    return rule


def _check_gradients(value: Array, grads: tuple[Array | None, ...], args: tuple) -> None:
    """Raises ValueError unless ``grads`` is aligned with ``args`` and each gradient has the shape
    value.shape + arg.shape and the argument's dtype (static shapes only: nothing is traced)."""
    if not isinstance(grads, tuple) or len(grads) != len(args):
        raise ValueError(
            f"value_and_grads must return one gradient (or None) per argument: {len(args)} "
            f"arguments, got {grads!r:.200}.")
    for position, (grad, arg) in enumerate(zip(grads, args)):
        if grad is None:
            continue
        expected = (tuple(jnp.shape(value)) + tuple(jnp.shape(arg)), jnp.result_type(arg))
        if (tuple(grad.shape), grad.dtype) != expected:
            raise ValueError(
                f"the gradient w.r.t. argument {position} must have shape value.shape + "
                f"arg.shape = {expected[0]} and dtype {expected[1]}, got {tuple(grad.shape)} "
                f"and {grad.dtype}.")


def _contract(cotangent: Array, grad: Array) -> Array:
    """``Σ_v cotangent[v] · grad[v, ...]`` over the value's (leading) axes of ``grad``."""
    if cotangent.ndim == 0:
        return cotangent * grad
    # A broadcast product and a sum, which XLA fuses into one pass over the gradients; the value
    # has few entries (CIRKD memory: one per contrast set).
    value_axes = tuple(range(cotangent.ndim))
    spread = jnp.expand_dims(cotangent, tuple(range(cotangent.ndim, grad.ndim)))
    return jnp.sum(spread * grad, axis=value_axes)
