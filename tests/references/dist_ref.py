"""float64 NumPy reference of DIST, written from methods.md §5.5 (NHWC)."""

import numpy as np


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def pearson(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8)


def dist(student_logits, teacher_logits, mask=None, beta=1.0, gamma=1.0, tau=1.0, group_size=None):
    n, h, w, k = student_logits.shape
    valid = np.ones((n, h, w), bool) if mask is None else mask
    y_s = softmax(student_logits / tau)
    y_t = softmax(teacher_logits / tau)

    inter = [1 - pearson(y_s[p], y_t[p]) for p in zip(*np.nonzero(valid))]
    inter = np.sum(inter) / max(len(inter), 1)

    group = n if group_size is None else group_size
    intra = []
    for start in range(0, n, group):
        keep = valid[start:start + group]
        if not keep.any():
            continue
        cols_s = y_s[start:start + group][keep]  # (valid pixels of the group, K)
        cols_t = y_t[start:start + group][keep]
        intra.append(np.mean([1 - pearson(cols_s[:, c], cols_t[:, c]) for c in range(k)]))
    intra = np.sum(intra) / max(len(intra), 1)
    return tau**2 * (beta * inter + gamma * intra)
