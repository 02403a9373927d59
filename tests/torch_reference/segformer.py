"""CIRKD's SegFormer (``models/segformer.py``) in plain PyTorch, with its module names.

Written from CIRKD's definition without its timm / mmcv imports: the ``state_dict()`` keys and
shapes are CIRKD's (``patch_embed1.proj.weight``, ``block1.0.attn.kv.weight``,
``block1.0.mlp.dwconv.dwconv.weight``, ``norm1.weight``, ``linear_c1.proj.weight``,
``linear_fuse.0.weight``, ``linear_fuse.1.running_var``, ``linear_pred.bias``, …), so a state dict
of this model is what a CIRKD SegFormer checkpoint holds. The blocks and stages use LayerNorm eps
1e-6, the patch embeddings and the attention's spatial reduction PyTorch's default 1e-5, as CIRKD.

``forward`` returns CIRKD's ``[logits, feature]`` at stride 4; ``forward_all`` also returns the
stages c1..c4 in a dict for the parity tests.
"""

import torch
import torch.nn.functional as F
from torch import nn

# name → (embed_dims, depths, decoder_dim), CIRKD's MiT_B0 .. MiT_B5.
VARIANTS = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3), 768),
}
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
BLOCK_EPS = 1e-6


class DropPath(nn.Module):
    """Per-sample stochastic depth, kept samples scaled by 1 / keep; the identity in eval mode."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class DWConv(nn.Module):
    """The depthwise 3×3 conv of the Mix-FFN, on tokens (B, N, C) of an H×W map."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, height, width):
        batch, _, channels = x.shape
        x = x.transpose(1, 2).reshape(batch, channels, height, width)
        return self.dwconv(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, height, width):
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, height, width):
        batch, tokens, channels = x.shape
        head_dim = channels // self.num_heads
        q = self.q(x).reshape(batch, tokens, self.num_heads, head_dim).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            reduced = x.permute(0, 2, 1).reshape(batch, channels, height, width)
            reduced = self.norm(self.sr(reduced).reshape(batch, channels, -1).permute(0, 2, 1))
        else:
            reduced = x
        kv = self.kv(reduced).reshape(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio, drop_path=0.0, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x, height, width):
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class OverlapPatchEmbed(nn.Module):
    def __init__(self, patch_size, stride, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        height, width = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class LinearMLP(nn.Module):
    """The decoder's per-stage embedding: (B, C, H, W) → tokens (B, H·W, D)."""

    def __init__(self, input_dim, embed_dim):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x):
        return self.proj(x.flatten(2).transpose(1, 2))


class Segformer(nn.Module):
    def __init__(self, num_classes, embed_dims, depths, decoder_dim, drop_path_rate=0.1):
        super().__init__()
        self.depths = depths
        # Registration order as CIRKD's, so state_dict() lists the keys in its order.
        for i, (in_chans, dim) in enumerate(zip((3, *embed_dims[:3]), embed_dims), start=1):
            patch, stride = (7, 4) if i == 1 else (3, 2)
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(patch, stride, in_chans, dim))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        start = 0
        for i, (dim, depth, heads, sr) in enumerate(zip(embed_dims, depths, NUM_HEADS, SR_RATIOS),
                                                     start=1):
            setattr(self, f"block{i}", nn.ModuleList(
                [Block(dim, heads, sr, drop_path=rates[start + j]) for j in range(depth)]))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=BLOCK_EPS))
            start += depth
        for i in (4, 3, 2, 1):
            setattr(self, f"linear_c{i}", LinearMLP(embed_dims[i - 1], decoder_dim))
        self.linear_fuse = nn.Sequential(nn.Conv2d(4 * decoder_dim, decoder_dim, 1),
                                         nn.BatchNorm2d(decoder_dim), nn.ReLU())
        self.dropout = nn.Dropout2d(0.0)
        self.linear_pred = nn.Conv2d(decoder_dim, num_classes, kernel_size=1)

    def forward_stages(self, x):
        batch = x.shape[0]
        stages = []
        for i in range(1, 5):
            x, height, width = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, height, width)
            x = getattr(self, f"norm{i}")(x)
            x = x.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
            stages.append(x)
        return stages

    def forward_all(self, x):
        c1, c2, c3, c4 = self.forward_stages(x)
        batch = c1.shape[0]
        size = c1.shape[2:]
        embedded = []
        for i, c in ((4, c4), (3, c3), (2, c2), (1, c1)):
            e = getattr(self, f"linear_c{i}")(c).permute(0, 2, 1).reshape(batch, -1, *c.shape[2:])
            if i != 1:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        feature = self.linear_fuse(torch.cat(embedded, dim=1))
        logits = self.linear_pred(self.dropout(feature))
        return {"c1": c1, "c2": c2, "c3": c3, "c4": c4, "logits": logits, "feature": feature}

    def forward(self, x):
        out = self.forward_all(x)
        return [out["logits"], out["feature"]]


def build_segformer(variant="mit_b0", num_classes=19, drop_path_rate=0.1):
    """CIRKD's ``get_segformer('MiT_B0', ...)`` and siblings, by kdjax's variant name."""
    embed_dims, depths, decoder_dim = VARIANTS[variant]
    return Segformer(num_classes, embed_dims, depths, decoder_dim, drop_path_rate)
