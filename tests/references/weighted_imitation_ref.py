"""float64 NumPy reference of weighted pixel imitation, methods.md §9.3 (weights held constant)."""

import numpy as np


def pixel_gap(student_logits, teacher_logits, temperature):
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    log_s = log_softmax(student_logits / temperature)
    log_t = log_softmax(teacher_logits / temperature)
    return temperature**2 * np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)


def gap_weights(gap, valid):
    w = np.zeros_like(gap)
    for n in range(gap.shape[0]):
        total = gap[n][valid[n]].sum()
        if total > 0:
            w[n] = valid[n].sum() * gap[n] / total
    return w


def weighted_pixel_imitation(student_logits, teacher_logits, mask=None, temperature=1.0,
                             weights=None):
    """``weights`` given: the loss with those weights frozen (for central-difference gradients)."""
    gap = pixel_gap(student_logits, teacher_logits, temperature)
    valid = np.ones(gap.shape, bool) if mask is None else mask
    if weights is None:
        weights = gap_weights(gap, valid)
    return (weights * gap)[valid].sum() / max(valid.sum(), 1)
