"""Af-DCD (Fan et al., NeurIPS 2023) in PyTorch, NCHW: the generator and the two losses of the
official ``losses/ocmgd.py`` (OSVAI/Af-DCD), transcribed from their formulas.

Parameter names follow the original (``align``, ``projetor``; the enhanced projector's
``block_1.0``, ``block_2.0``, ``adpator_1``, ``adpator_2``), so a test can map this module's
``state_dict()`` onto :class:`kdjax.models.MaskedGenerator` the way a converted checkpoint would be.
The keep-mask is an argument rather than drawn inside, so both sides can use the same one;
:func:`random_keep` and :func:`centre_third_keep` build it as the original does. Importing this
module needs torch.
"""

import torch
from torch import nn
from torch.nn import functional as F


def random_keep(n, h, w, ratio=0.75, generator=None):
    """The original random mask: a uniform draw per (image, position); the position is dropped
    where the draw exceeds 1 − ratio. Returns bool (N, H, W), True where kept."""
    draw = torch.rand((n, h, w), generator=generator)
    return ~(draw > 1 - ratio)


def centre_third_keep(n, h, w):
    """The original deterministic mask (``rand_mask=False``): rows H//3 .. 2*H//3 − 1 and columns
    W//3 .. 2*W//3 − 1 dropped. Returns bool (N, H, W), True where kept."""
    keep = torch.ones((n, h, w), dtype=torch.bool)
    keep[:, h // 3:2 * h // 3, w // 3:2 * w // 3] = False
    return keep


class EnhancedProjector(nn.Module):
    """Two 3×3 conv + ReLU blocks in sequence; the output is the mean of a 3×3 conv ('adaptor') of
    each block's output."""

    def __init__(self, channels):
        super().__init__()
        self.block_1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.block_2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.adpator_1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.adpator_2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        first = self.block_1(x)
        second = self.block_2(first)
        return (self.adpator_1(first) + self.adpator_2(second)) / 2


def contrast_vectors(x, patch, groups):
    """(N, C, H, W) → (N·P, K, C/M): per patch the K = ph·pw·M vectors, vector k holding position
    k // M (row-major in the patch) and channel group k % M."""
    n, c, h, w = x.shape
    ph, pw = patch
    x = x.reshape(n, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)  # n, bh, bw, c, ph, pw
    x = x.reshape(n, h // ph, w // pw, groups, c // groups, ph * pw)    # c → (group, d)
    x = x.permute(0, 1, 2, 5, 3, 4)                                     # n, bh, bw, pos, m, d
    return x.reshape(-1, ph * pw * groups, c // groups)


def omni_contrast_sum(generated, teacher, *, groups=16, patch=(4, 4), pool=4, crop=None, tau=0.07):
    """The original's omni-contrastive loss before its division by the batch size: the summed
    cross-entropy of every (position, group) row divided by H'·W' of the pooled (or cropped) map.

    Similarities are −L1 distances (``torch.cdist(p=1)``); per row, the positive is the teacher's
    vector of the same position and group, the negatives those of the other groups (any position),
    listed after the positive, and the label is 0.
    """
    if crop is not None:
        generated, teacher = generated[:, :, :crop[0], :crop[1]], teacher[:, :, :crop[0], :crop[1]]
    if pool:
        generated, teacher = F.max_pool2d(generated, pool), F.max_pool2d(teacher, pool)
    _, _, h, w = generated.shape
    rows = contrast_vectors(generated, patch, groups)
    columns = contrast_vectors(teacher, patch, groups)
    similarity = -torch.cdist(rows, columns, p=1)                 # (N·P, K, K)
    k = similarity.shape[-1]
    group = torch.arange(k) % groups
    positive = torch.eye(k, dtype=torch.bool).expand_as(similarity)
    negative = (group[:, None] != group[None, :]).expand_as(similarity)
    positives = similarity[positive].reshape(-1, 1)
    negatives = similarity[negative].reshape(positives.shape[0], -1)
    logits = torch.cat([positives, negatives], dim=1) / tau
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, labels, reduction="sum") / (h * w)


class AfDcdCriterion(nn.Module):
    """The generator beside the student and both losses: ``forward(feat_s, feat_t, keep)`` returns
    ``(reconstruction, contrast)``, each divided by the batch size as in the original.

    ``align`` (1×1 conv with bias) exists only when the channel counts differ (the original always
    calls it, so it fails for equal counts); the aligned feature is multiplied by ``keep`` and the
    projector (3×3 conv, ReLU, 3×3 conv, or :class:`EnhancedProjector`) regenerates the teacher's.
    """

    def __init__(self, student_channels, teacher_channels, *, enhanced=False, groups=16,
                 patch=(4, 4), pool=4, crop=None, tau=0.07):
        super().__init__()
        self.options = dict(groups=groups, patch=patch, pool=pool, crop=crop, tau=tau)
        self.align = (nn.Conv2d(student_channels, teacher_channels, 1)
                      if student_channels != teacher_channels else None)
        if enhanced:
            self.projetor = EnhancedProjector(teacher_channels)
        else:
            self.projetor = nn.Sequential(
                nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1), nn.ReLU(),
                nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1))

    def generate(self, feat_s, keep):
        x = feat_s if self.align is None else self.align(feat_s)
        return self.projetor(x * keep[:, None].to(x.dtype))

    def forward(self, feat_s, feat_t, keep):
        generated = self.generate(feat_s, keep)
        batch = feat_t.shape[0]
        reconstruction = F.mse_loss(generated, feat_t, reduction="sum") / batch
        contrast = omni_contrast_sum(generated, feat_t, **self.options) / batch
        return reconstruction, contrast
