"""Ceil-mode average and max pooling of NHWC maps, with an optional pixel mask.

PyTorch's ``avg_pool2d`` / ``max_pool2d`` with ``stride = kernel``, ``padding = 0`` and
``ceil_mode=True`` (methods.md §0): the output has ``ceil(H / kh) × ceil(W / kw)`` cells, the last
window of a row or column may be partial, and a partial average divides by its in-bounds count.

With a mask (N, H, W bool), masked pixels are treated like out-of-bounds ones: a cell averages
(or takes the maximum of) its valid pixels only, and the pooled mask marks the cells holding at
least one valid pixel. Cells without any valid pixel hold 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import check_choice

Array = jax.Array


def pooled_size(size: int, window: int) -> int:
    """Number of ceil-mode windows of ``window`` pixels (stride = window) along ``size`` pixels."""
    return -(-size // window)


def pool_ceil(x: Array, window: tuple[int, int], *, kind: str,
              mask: Array | None = None) -> tuple[Array, Array | None]:
    """Non-overlapping ceil-mode pooling, optionally over the valid pixels only.

    Args:
      x: float (N, H, W, C).
      window: (kh, kw), the kernel and the stride.
      kind: 'avg' or 'max'.
      mask: optional bool (N, H, W).
    Returns:
      pooled (N, ceil(H/kh), ceil(W/kw), C) in the dtype of ``x``, and the pooled mask
      (N, ceil(H/kh), ceil(W/kw)) bool, or None when ``mask`` is None (every cell then holds at
      least one in-bounds pixel). Masked pixels never reach the output, so NaNs there cannot leak
      into the value or the gradient.
    """
    check_choice("kind", kind, ("avg", "max"))
    kh, kw = window
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        x = jnp.where(mask[..., None], x, 0.0)
    if (kh, kw) == (1, 1):
        return x, mask
    n, h, w, c = x.shape
    ho, wo = pooled_size(h, kh), pooled_size(w, kw)
    pad_h, pad_w = ho * kh - h, wo * kw - w
    valid = jnp.ones((n, h, w), bool) if mask is None else mask
    # Padding is invalid: the partial last windows then pool over their in-bounds pixels only.
    valid = jnp.pad(valid, ((0, 0), (0, pad_h), (0, pad_w)))
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    windows = x.reshape(n, ho, kh, wo, kw, c)
    valid = valid.reshape(n, ho, kh, wo, kw, 1)
    occupied = jnp.any(valid, axis=(2, 4))
    if kind == "avg":
        total = jnp.sum(jnp.where(valid, windows, 0.0), axis=(2, 4))
        count = jnp.sum(valid, axis=(2, 4), dtype=jnp.float32)
        pooled = (total / jnp.maximum(count, 1.0)).astype(x.dtype)
    else:
        pooled = jnp.max(jnp.where(valid, windows, -jnp.inf), axis=(2, 4))
        # An empty cell's maximum is -inf; where() keeps it (and its gradient) out of the result.
        pooled = jnp.where(occupied, pooled, 0.0).astype(x.dtype)
    return pooled, None if mask is None else occupied[..., 0]
