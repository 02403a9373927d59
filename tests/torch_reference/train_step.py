"""CIRKD's training step in PyTorch, written from the specs, to check kdjax's step against.

The objective is CIRKD's (cirkd-models.md §3.3, methods.md §1.3): cross-entropy on the logits
upsampled bilinearly (align_corners=True) to the label size, ignore label 255, plus 0.4 × the same
on the aux logits, plus weight × CWD between the student's and the frozen teacher's logits
(methods.md §1.1: KL(teacher ‖ student) of the spatial softmaxes at temperature τ, summed over
positions, divided by N·C, times τ²). The optimizer is ``torch.optim.SGD`` with momentum and
coupled weight decay on every parameter, BN and biases included, under the poly schedule
lr·(1 − step/steps)^power (methods.md §6.1).

The student trains with batch statistics; the teacher runs in eval mode (running statistics).
Dropout is switched off (:func:`disable_dropout`) so that two frameworks can see the same network.
"""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

IGNORE_LABEL = 255


def disable_dropout(model):
    """Sets every ``nn.Dropout`` of ``model`` to p = 0 (dropout masks cannot match across frameworks)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def upsampled_cross_entropy(logits, labels, ignore_label=IGNORE_LABEL):
    """CE of (N, K, h, w) logits upsampled (bilinear, align corners) to the (N, H, W) labels; the
    mean over the pixels whose label is not ``ignore_label``."""
    upsampled = F.interpolate(logits, labels.shape[1:], mode="bilinear", align_corners=True)
    return F.cross_entropy(upsampled, labels, ignore_index=ignore_label)


def channel_wise_divergence(student, teacher, tau):
    """CWD of (N, C, h, w) maps: τ²/(N·C) Σ_{n,c} KL(softmax(teacher_{n,c}/τ) ‖ softmax(student_{n,c}/τ))
    with each softmax over the h·w positions."""
    n, c, h, w = student.shape
    log_p_student = F.log_softmax(student.reshape(n * c, h * w) / tau, dim=1)
    log_p_teacher = F.log_softmax(teacher.reshape(n * c, h * w) / tau, dim=1)
    return tau**2 * torch.sum(log_p_teacher.exp() * (log_p_teacher - log_p_student)) / (n * c)


def poly_sgd(params, *, learning_rate, steps, power=0.9, momentum=0.9, weight_decay=1e-4):
    """``torch.optim.SGD`` (coupled L2 on every parameter) and a ``LambdaLR`` poly schedule: step k
    (from 0) uses learning_rate · (1 − k/steps)^power. Call ``scheduler.step()`` after each step."""
    optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / steps) ** power)
    return optimizer, scheduler


class ReferenceTrainer:
    """Trains a CIRKD segmentor (``forward`` → [logits, aux_logits, feature]) one batch at a time.

    ``cwd_weight`` > 0 adds CWD on the logits against ``teacher``; the trainer computes in the dtype
    of the student's parameters (call ``.double()`` on both networks for a float64 replay).
    """

    def __init__(self, student, teacher=None, *, learning_rate, steps, aux_weight=0.4, cwd_weight=0.0,
                 tau=4.0, power=0.9, momentum=0.9, weight_decay=1e-4):
        if cwd_weight and teacher is None:
            raise ValueError("cwd_weight > 0 needs a teacher")
        self.student = disable_dropout(student).train()
        self.teacher = None if teacher is None else teacher.eval()
        self.aux_weight, self.cwd_weight, self.tau = aux_weight, cwd_weight, tau
        self.dtype = next(student.parameters()).dtype
        self.optimizer, self.scheduler = poly_sgd(
            student.parameters(), learning_rate=learning_rate, steps=steps, power=power,
            momentum=momentum, weight_decay=weight_decay)

    def step(self, images, labels):
        """One optimizer step on NHWC ``images`` and (N, H, W) ``labels`` (numpy); returns the
        step's terms as floats, named as kdjax's metrics: ce, aux_ce, kd/cwd_logits (with a
        teacher), loss and grad_norm (the global norm of the loss gradient, before weight decay)."""
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.dtype)
        y = torch.from_numpy(labels.astype(np.int64))
        logits, aux_logits, _ = self.student(x)
        terms = {"ce": upsampled_cross_entropy(logits, y),
                 "aux_ce": upsampled_cross_entropy(aux_logits, y)}
        loss = terms["ce"] + self.aux_weight * terms["aux_ce"]
        if self.cwd_weight:
            with torch.no_grad():
                teacher_logits = self.teacher(x)[0]
            terms["kd/cwd_logits"] = channel_wise_divergence(logits, teacher_logits, self.tau)
            loss = loss + self.cwd_weight * terms["kd/cwd_logits"]
        terms["loss"] = loss
        self.optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in self.student.parameters()]
        terms["grad_norm"] = torch.sqrt(sum(torch.sum(g * g) for g in grads))
        self.optimizer.step()
        self.scheduler.step()
        return {name: float(value.detach()) for name, value in terms.items()}
