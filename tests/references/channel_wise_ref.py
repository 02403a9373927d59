"""float64 NumPy reference of CWD, written from methods.md §1.1 (NHWC)."""

import numpy as np


def spatial_log_softmax(x, tau, valid):
    n, h, w, c = x.shape
    z = x.reshape(n, h * w, c) / tau
    out = np.zeros_like(z)
    for i in range(n):
        keep = valid[i].reshape(-1)
        if keep.any():
            zi = z[i][keep]
            zi = zi - zi.max(axis=0)
            out[i][keep] = zi - np.log(np.exp(zi).sum(axis=0))
    return out


def channel_wise_divergence(student, teacher, mask=None, tau=4.0, c_norm=None):
    n, h, w, c = student.shape
    valid = np.ones((n, h, w), bool) if mask is None else mask
    log_s = spatial_log_softmax(student, tau, valid)
    log_t = spatial_log_softmax(teacher, tau, valid)
    keep = valid.reshape(n, h * w, 1)
    kl = np.where(keep, np.exp(log_t) * (log_t - log_s), 0.0).sum()
    images = max(int(valid.reshape(n, -1).any(axis=1).sum()), 1)
    return tau**2 * kl / (images * (c if c_norm is None else c_norm))
