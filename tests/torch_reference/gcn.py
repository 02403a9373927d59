"""CIRKDv2's GCN block in PyTorch, NCHW, transcribed from ``losses/gcn.py`` of the official code
(winycg/CIRKD): attention over the positions of the feature, fused back into it.

Parameter names follow the original (``node_q``, ``node_k``, ``node_v``; ``conv1`` and
``out_conv`` as conv + BN + ReLU sequences), so a test can copy this module's ``state_dict()``
into :class:`kdjax.models.CirkdGcn`. Importing this module needs torch.
"""

import torch
from torch import nn


def conv_bn_relu(in_ch, out_ch, norm_layer=nn.BatchNorm2d):
    """1×1 conv without bias, then BN and ReLU (indices 0, 1, 2)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), norm_layer(out_ch), nn.ReLU())


class Gcn(nn.Module):
    """(N, C, H, W) → (N, C, H, W). With C' = C // 2 and P = H·W: q, k, v are bias-free 1×1
    convs to C'; the (P, P) map softmax over its last axis (the key positions) of q_i·k_j / √C'
    mixes the values; ``conv1`` maps the mix back to C channels, and ``out_conv`` fuses it with
    the input (input channels first)."""

    def __init__(self, channels, norm_layer=nn.BatchNorm2d):
        super().__init__()
        inner = channels // 2
        self.node_k = nn.Conv2d(channels, inner, 1, bias=False)
        self.node_v = nn.Conv2d(channels, inner, 1, bias=False)
        self.node_q = nn.Conv2d(channels, inner, 1, bias=False)
        self.conv1 = conv_bn_relu(inner, channels, norm_layer)
        self.out_conv = conv_bn_relu(2 * channels, channels, norm_layer)

    def forward(self, x):
        n, _, h, w = x.shape
        key = self.node_k(x).flatten(2)                       # (N, C', P)
        value = self.node_v(x).flatten(2).transpose(1, 2)     # (N, P, C')
        query = self.node_q(x).flatten(2).transpose(1, 2)     # (N, P, C')
        inner = key.shape[1]
        attention = torch.softmax(torch.bmm(query * inner ** -0.5, key), dim=-1)   # (N, P, P)
        mixed = torch.bmm(attention, value).transpose(1, 2).reshape(n, inner, h, w)
        return self.out_conv(torch.cat([x, self.conv1(mixed)], dim=1))
