"""Trainable modules that live beside the student during distillation (methods.md §1.3, §5.2, §5.4,
§10, §11).

- :class:`Connector`: 1×1 conv mapping student channels to teacher channels (optionally BN + ReLU).
- :class:`CirkdProjectionHead`: CIRKD's embedding projection for its memory losses.
- :class:`CirkdGcn`: CIRKDv2's graph-reasoning block on the student's head feature (§11).
- :class:`SaganDiscriminator`: the SAGAN-style discriminator of SKD's holistic (adversarial) loss.
- :class:`MaskedGenerator`: Af-DCD's generator, which regenerates the teacher's feature from a
  masked student feature.

All are NHWC ``nnx.Module`` s called as ``module(x, train)``, except the generator, which also takes
its keep-mask: ``generator(x, keep_mask, train)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models.layers import BatchNorm2d, Conv2d, ConvBNReLU, Dtype, check_nhwc

Array = jax.Array

# torch.nn.Conv2d's default kernel initialisation (kaiming_uniform with a=√5), which the original
# discriminator keeps: U(−b, b) with b = 1/√fan_in.
torch_default_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# SAGAN discriminator slope (CIRKD utils/sagan.py).
LEAKY_SLOPE = 0.1


class Connector(nnx.Module):
    """1×1 conv (no bias), optionally followed by BN + ReLU: (N, H, W, in_ch) → (N, H, W, out_ch).

    The adapter that maps student features to the teacher's channel count (methods.md §1.3, FitNets
    §5.7). Attributes ``conv`` and, with ``bn_relu``, ``bn``.
    """

    def __init__(self, in_ch: int, out_ch: int, *, bn_relu: bool = False,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(in_ch, out_ch, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm2d(out_ch, dtype=dtype, param_dtype=param_dtype) if bn_relu else None

    def __call__(self, x: Array, train: bool) -> Array:
        y = self.conv(x)
        if self.bn is not None:
            y = jax.nn.relu(self.bn(y, train))
        return y


class CirkdProjectionHead(nnx.Module):
    """CIRKD's projection of student features into the teacher's embedding space (methods.md §5.4).

    Conv1×1 in→out (no bias) → BN → ReLU (``hidden``), then Conv1×1 out→out (no bias) (``output``):
    (N, H, W, in_ch) → (N, H, W, out_ch). The memory losses L2-normalise the result themselves.
    """

    def __init__(self, in_ch: int, out_ch: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden = ConvBNReLU(in_ch, out_ch, 1, **kw)
        self.output = Conv2d(out_ch, out_ch, 1, **kw)

    def __call__(self, x: Array, train: bool) -> Array:
        return self.output(self.hidden(x, train))


class CirkdGcn(nnx.Module):
    """CIRKDv2's GCN block (methods.md §11; ``losses/gcn.py`` of the official code): a
    self-attention over the positions of the feature, whose result is fused back into it.
    (N, H, W, C) → (N, H, W, C).

    With C' = C // 2 and P = H·W positions:

    - ``node_q``, ``node_k``, ``node_v``: 1×1 convs C → C' without bias;
    - attention A = softmax_j((q_i · C'^-½) · k_j) ∈ R^{P×P}, normalised over the key positions j
      (computed in float32);
    - g = A v, then ``conv1`` (1×1 C' → C, no bias) → ``bn1`` → ReLU;
    - the output is ``out_conv`` (1×1 2C → C, no bias) → ``out_bn`` → ReLU of the channel
      concatenation [x, g].

    Convolution kernels start from PyTorch's default initialisation, BN from scale 1 and bias 0,
    as in the original. Its parameters map as ``node_q/k/v`` → ``node_q/k/v``; ``conv1.0``,
    ``conv1.1`` → ``conv1``, ``bn1``; ``out_conv.0``, ``out_conv.1`` → ``out_conv``, ``out_bn``.
    The attention map holds P² values per image (P = 8192 for the 1/8-resolution feature of a
    512×1024 crop). Called as ``gcn(x, train)``; computes in ``dtype``.
    """

    def __init__(self, ch: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        if ch < 2:
            raise ValueError(f"CirkdGcn needs at least 2 channels (it halves them); got {ch}.")
        inner = ch // 2
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=torch_default_kernel_init,
                  rngs=rngs)
        bn = dict(dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.node_q, self.node_k, self.node_v = (Conv2d(ch, inner, 1, **kw) for _ in range(3))
        self.conv1 = Conv2d(inner, ch, 1, **kw)
        self.bn1 = BatchNorm2d(ch, **bn)
        self.out_conv = Conv2d(2 * ch, ch, 1, **kw)
        self.out_bn = BatchNorm2d(ch, **bn)

    def __call__(self, x: Array, train: bool) -> Array:
        check_nhwc("x", x)
        n, h, w, _ = x.shape
        q, k, v = (node(x).reshape(n, h * w, -1) for node in (self.node_q, self.node_k,
                                                               self.node_v))
        scale = jnp.asarray(q.shape[-1] ** -0.5, self.dtype)
        energy = jnp.einsum("nic,njc->nij", q * scale, k).astype(jnp.float32)
        attention = jax.nn.softmax(energy, axis=-1).astype(self.dtype)
        g = jnp.einsum("nij,njc->nic", attention, v).reshape(n, h, w, -1)
        g = jax.nn.relu(self.bn1(self.conv1(g), train))
        fused = jnp.concatenate([x.astype(self.dtype), g], axis=-1)
        return jax.nn.relu(self.out_bn(self.out_conv(fused), train))


def _l2_normalize(v: Array, eps: float = 1e-12) -> Array:
    return v / (jnp.linalg.norm(v) + eps)


class SpectralNormConv2d(nnx.Module):
    """Conv2d with spectrally normalised kernel, W / σ(W) (Miyato et al. 2018), plus a bias.

    σ is estimated by one power iteration per call on W viewed as an (out, kh·kw·in) matrix:
    v = normalize(Wᵀu), u' = normalize(W v), σ = u'ᵀ W v, with u and v held constant for the
    gradient (as the original). ``u`` (out,) is an ``nnx.BatchStat``: train mode stores u', so the
    estimate sharpens over training steps; eval mode leaves it unchanged.

    Since the conv is linear in its kernel, conv(x, W/σ) is computed as conv(x, W)/σ.
    (N, H, W, in_ch) → (N, H', W', out_ch) with PyTorch conv arithmetic.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1,
                 padding: int = 0, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.conv = Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dtype=dtype,
                           param_dtype=param_dtype, kernel_init=torch_default_kernel_init,
                           rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((out_ch,), param_dtype))
        u = jax.random.normal(rngs.params(), (out_ch,), jnp.float32)
        self.u = nnx.BatchStat(_l2_normalize(u).astype(param_dtype))

    def sigma(self, train: bool) -> Array:
        """The power-iteration estimate of the kernel's largest singular value (float32 scalar)."""
        kernel = self.conv.kernel[...].astype(jnp.float32)
        # (out, kh·kw·in); the order of the columns does not change the singular values.
        matrix = kernel.reshape(-1, kernel.shape[-1]).T
        u = jax.lax.stop_gradient(self.u[...].astype(jnp.float32))
        v = jax.lax.stop_gradient(_l2_normalize(matrix.T @ u))
        u = jax.lax.stop_gradient(_l2_normalize(matrix @ v))
        if train:
            self.u.set_value(u.astype(self.u.dtype))
        return u @ (matrix @ v)

    def __call__(self, x: Array, train: bool) -> Array:
        sigma = self.sigma(train).astype(self.dtype)
        return self.conv(x) / sigma + self.bias[...].astype(self.dtype)


class SelfAttention(nnx.Module):
    """SAGAN self-attention block (Zhang et al. 2019) as in CIRKD ``utils/sagan.py``.

    Over the P = H·W positions of (N, H, W, C): query and key are 1×1 convs to C/8 channels, value a
    1×1 conv to C (all with bias); attention A = softmax_j(q_i · k_j) ∈ R^{P×P}; the output is
    γ·(A v) + x with a learned scalar γ initialised to 0, so the block starts as the identity.
    (N, H, W, C) → (N, H, W, C).
    """

    def __init__(self, ch: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=torch_default_kernel_init, rngs=rngs)
        self.dtype = dtype
        self.query = Conv2d(ch, ch // 8, 1, **kw)
        self.key = Conv2d(ch, ch // 8, 1, **kw)
        self.value = Conv2d(ch, ch, 1, **kw)
        self.gamma = nnx.Param(jnp.zeros((1,), param_dtype))

    def __call__(self, x: Array) -> Array:
        n, h, w, c = x.shape
        q, k, v = (proj(x).reshape(n, h * w, -1) for proj in (self.query, self.key, self.value))
        energy = jnp.einsum("nic,njc->nij", q, k).astype(jnp.float32)
        attention = jax.nn.softmax(energy, axis=-1).astype(self.dtype)
        out = jnp.einsum("nij,njc->nic", attention, v).reshape(n, h, w, c)
        return self.gamma[...].astype(self.dtype) * out + x.astype(self.dtype)


class SaganDiscriminator(nnx.Module):
    """SKD's holistic discriminator on logits (methods.md §5.2; CIRKD ``utils/sagan.py``).

    ``preprocess``: BatchNorm over the K input channels (CIRKD's ``preprocess_GAN_mode=1``);
    ``l1..l4``: spectral-norm 4×4 stride-2 padding-1 convs K→d→2d→4d→8d, each followed by
    LeakyReLU(0.1); ``attn1`` (4d channels) after ``l3`` and ``attn2`` (8d) after ``l4``; ``last``:
    a plain 4×4 conv 8d→1 without padding, giving a score map. d = ``conv_dim`` (64 in CIRKD).

    (N, H, W, K) → (N, ⌊H/16⌋ − 3, ⌊W/16⌋ − 3, 1) (each stride-2 conv floors), so H and W must be
    at least 64: 1/8-resolution logits of a 512×512 crop or larger.
    """

    def __init__(self, in_ch: int, *, conv_dim: int = 64, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = (in_ch, conv_dim, 2 * conv_dim, 4 * conv_dim, 8 * conv_dim)
        self.preprocess = BatchNorm2d(in_ch, dtype=dtype, param_dtype=param_dtype)
        self.l1, self.l2, self.l3, self.l4 = (
            SpectralNormConv2d(c_in, c_out, 4, stride=2, padding=1, **kw)
            for c_in, c_out in zip(widths[:-1], widths[1:]))
        self.attn1 = SelfAttention(4 * conv_dim, **kw)
        self.attn2 = SelfAttention(8 * conv_dim, **kw)
        self.last = Conv2d(8 * conv_dim, 1, 4, use_bias=True,
                           kernel_init=torch_default_kernel_init, **kw)

    def __call__(self, x: Array, train: bool) -> Array:
        check_nhwc("x", x)
        if min(x.shape[1:3]) // 16 < 4:
            raise ValueError(f"x must be at least 64×64 spatially (four stride-2 convs, then a 4×4 "
                             f"conv); got shape {tuple(x.shape)}.")
        x = self.preprocess(x, train)
        for conv in (self.l1, self.l2, self.l3):
            x = jax.nn.leaky_relu(conv(x, train), LEAKY_SLOPE)
        x = self.attn1(x)
        x = self.attn2(jax.nn.leaky_relu(self.l4(x, train), LEAKY_SLOPE))
        return self.last(x)


class MaskedGenerator(nnx.Module):
    """Af-DCD's generator (docs/methods.md §10): (N, H, W, in_ch) → (N, H, W, out_ch).

    ``align``, a 1×1 conv in_ch → out_ch, maps the student's channels to the teacher's; it exists
    only when ``in_ch != out_ch`` (None otherwise). Its output is multiplied by the keep-mask, so a
    dropped position is 0 in every channel, and the projector regenerates the teacher's feature:

    - plain (``enhanced=False``, the official default): ``conv1`` → ReLU → ``conv2``;
    - enhanced: ``block1`` → ReLU gives h₁, ``block2`` → ReLU on h₁ gives h₂, and the output is
      ``(adaptor1(h₁) + adaptor2(h₂)) / 2``.

    Every projector conv is 3×3 with padding 1 (the spatial size is kept) and out_ch channels; all
    convs have a bias, and their kernels start from PyTorch's default initialisation, as the
    original's (biases start at 0). The original's parameter names map as: ``align`` → ``align``;
    ``projetor.0`` / ``projetor.2`` → ``conv1`` / ``conv2``; ``projetor.block_1.0``,
    ``projetor.block_2.0``, ``projetor.adpator_1``, ``projetor.adpator_2`` → ``block1``,
    ``block2``, ``adaptor1``, ``adaptor2``.

    Called as ``generator(x, keep_mask, train)``: ``keep_mask`` is bool (N, H, W), True where the
    position is kept (:func:`kdjax.losses.dense_contrast.random_keep_mask`), or None to keep
    everything; ``train`` is accepted for the common signature (no layer depends on it). Computes
    in ``dtype``.
    """

    def __init__(self, in_ch: int, out_ch: int, *, enhanced: bool = False,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=torch_default_kernel_init, rngs=rngs)
        self.dtype = dtype
        self.enhanced = enhanced
        self.align = Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None
        if enhanced:
            self.conv1 = self.conv2 = None
            self.block1, self.block2, self.adaptor1, self.adaptor2 = (
                Conv2d(out_ch, out_ch, 3, padding=1, **kw) for _ in range(4))
        else:
            self.conv1, self.conv2 = (Conv2d(out_ch, out_ch, 3, padding=1, **kw) for _ in range(2))
            self.block1 = self.block2 = self.adaptor1 = self.adaptor2 = None

    def masked(self, x: Array, keep_mask: Array | None) -> Array:
        """The aligned feature with the dropped positions set to 0: the projector's input."""
        check_nhwc("x", x)
        if keep_mask is not None and tuple(jnp.shape(keep_mask)) != tuple(x.shape[:3]):
            raise ValueError(f"keep_mask must have shape (N, H, W) = {tuple(x.shape[:3])}, got "
                             f"{tuple(jnp.shape(keep_mask))}.")
        y = x.astype(self.dtype) if self.align is None else self.align(x)
        if keep_mask is None:
            return y
        return y * jnp.asarray(keep_mask)[..., None].astype(y.dtype)

    def __call__(self, x: Array, keep_mask: Array | None, train: bool) -> Array:
        del train
        y = self.masked(x, keep_mask)
        if not self.enhanced:
            return self.conv2(jax.nn.relu(self.conv1(y)))
        first = jax.nn.relu(self.block1(y))
        second = jax.nn.relu(self.block2(first))
        return (self.adaptor1(first) + self.adaptor2(second)) / 2
