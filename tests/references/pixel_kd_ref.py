"""float64 NumPy reference of pixel KD, written from methods.md §5.1 (NHWC)."""

import numpy as np


def log_softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))


def pixel_kd(student_logits, teacher_logits, mask=None, temperature=1.0, normalize="pixel_mean"):
    log_s = log_softmax(student_logits / temperature)
    log_t = log_softmax(teacher_logits / temperature)
    kl = np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)
    valid = np.ones(kl.shape, bool) if mask is None else mask
    count = max(valid.sum(), 1)
    if normalize == "pixel_mean":
        return temperature**2 * kl[valid].sum() / count
    return kl[valid].sum() / (count * student_logits.shape[-1])
