"""Random weights and BatchNorm statistics for parity tests."""

import torch
from torch import nn

# Scale of the BN that closes a residual branch (a block's ``closing_norm``), relative to the others.
CLOSING_NORM_SCALE = 0.25


@torch.no_grad()
def randomize(model, seed, image_size=(64, 64)):
    """Fill every parameter and BN running statistic of ``model`` (an image model, NCHW RGB input) with
    seeded random values; returns the model in eval mode.

    Default initialisation leaves BN at scale 1, bias 0, mean 0, var 1, which would hide a mis-mapped
    BN tensor, so all four are drawn. Conv and linear weights have variance 2/fan_in; BN scales are
    uniform in 0.5..1.5, except that the BN closing a residual branch is scaled by 0.25: with
    branches as strong as the shortcut every block amplifies float32 rounding (ResNet-101's c4 then
    ends 1e-4 away from its own float64 value; at 0.25, 1e-5), and trained networks have small
    closing scales anyway.

    Purely random running statistics would let activations double at every residual block, so
    they are measured on a random batch of ``image_size`` (train-mode BN, as a trained network would
    have them) and then perturbed a little: mean by 0.05 standard deviations, var by a factor
    0.9..1.1 (larger perturbations compound over ResNet-101's 23-block layer3 the same way).
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(shape, scale=1.0, offset=0.0, uniform=False):
        values = torch.rand(shape, generator=generator) if uniform else torch.randn(shape, generator=generator)
        return values * scale + offset

    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.copy_(draw(module.weight.shape, (2.0 / module.weight[0].numel()) ** 0.5))
            if module.bias is not None:
                module.bias.copy_(draw(module.bias.shape, 0.1))
    for bn in norms:
        bn.weight.copy_(draw(bn.num_features, 1.0, 0.5, uniform=True))
        bn.bias.copy_(draw(bn.num_features, 0.1))
    for module in model.modules():
        closing = getattr(module, "closing_norm", None)
        if closing is not None:
            closing.weight.mul_(CLOSING_NORM_SCALE)
            closing.bias.mul_(CLOSING_NORM_SCALE)

    model.eval()
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
        bn.train()
    model(draw((2, 3, *image_size)))
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
        bn.eval()
        # Globally pooled branches (ASPP image pooling, the 1×1 PSP bin) see one value per image,
        # and two noise images pool to nearly the same values: without a floor some channels get a
        # variance near 1e-9, a gain of 300 on float32 rounding.
        bn.running_var.clamp_(min=0.1 * float(bn.running_var.median()))
        std = bn.running_var.sqrt()
        bn.running_mean.add_(draw(bn.num_features, 0.05) * std)
        bn.running_var.mul_(draw(bn.num_features, 0.2, 0.9, uniform=True))
    return model
