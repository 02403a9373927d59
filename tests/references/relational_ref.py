"""float64 NumPy references of PFS, SKD pair-wise and CIRKD mini-batch, from methods.md §3,
§5.2, §5.4 and §9.3 (NHWC). ``form`` and ``block_size`` are accepted and ignored: they change
time and memory, not the value.

Masks: a masked pixel leaves every pair it belongs to; a pooled cell is valid if any of its pixels
is, and pools over its valid pixels only.
"""

import math

import numpy as np


def pool_cells(x, window, kind, valid):
    """Ceil-mode pooling, kernel = stride = window, over the valid in-bounds pixels of each cell."""
    n, h, w, c = x.shape
    kh, kw = window
    if (kh, kw) == (1, 1):
        return np.where(valid[..., None], x, 0.0), valid
    ho, wo = math.ceil(h / kh), math.ceil(w / kw)
    out = np.zeros((n, ho, wo, c))
    out_valid = np.zeros((n, ho, wo), bool)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                rows = slice(i * kh, min((i + 1) * kh, h))
                cols = slice(j * kw, min((j + 1) * kw, w))
                keep = valid[b, rows, cols]
                if not keep.any():
                    continue
                pixels = x[b, rows, cols][keep]  # (count, C)
                out[b, i, j] = pixels.mean(axis=0) if kind == "avg" else pixels.max(axis=0)
                out_valid[b, i, j] = True
    return out, out_valid


def normalize(v):
    """F.normalize over the last axis."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def window_of(pool, h, w):
    if pool == "half":
        return int(0.5 * h), int(0.5 * w)
    if isinstance(pool, tuple):
        return pool
    return pool, pool


def affinity_mse(student, teacher, valid):
    """mean over images n and pairs of valid cells (i, j) of (A^S_nij − A^T_nij)²."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        keep = valid[b].reshape(-1)
        s = student[b].reshape(-1, student.shape[-1])[keep]
        t = teacher[b].reshape(-1, teacher.shape[-1])[keep]
        total += np.sum((s @ s.T - t @ t.T) ** 2)
        count += keep.sum() ** 2
    return total / max(count, 1)


def pixel_feature_similarity(student_feat, teacher_feat, mask=None, pool=1, form="auto",
                             block_size=None):
    window = window_of(pool, *student_feat.shape[1:3])
    valid = np.ones(student_feat.shape[:3], bool) if mask is None else mask
    s, cells = pool_cells(student_feat, window, "avg", valid)
    t, _ = pool_cells(teacher_feat, window, "avg", valid)
    return affinity_mse(normalize(s), normalize(t), cells)


def skd_pairwise(student_feat, teacher_feat, mask=None, pool=2, norm="normalize", form="auto",
                 block_size=None, student_norm_at=None):
    """``student_norm_at``: for norm='detached', take the student's norms from this array instead
    of ``student_feat``: the norm frozen at that point, as the official code's ``.detach()`` makes
    it for the gradient."""
    window = window_of(pool, *student_feat.shape[1:3])
    valid = np.ones(student_feat.shape[:3], bool) if mask is None else mask
    s, cells = pool_cells(student_feat, window, "max", valid)
    t, _ = pool_cells(teacher_feat, window, "max", valid)
    if norm == "normalize":
        s, t = normalize(s), normalize(t)
    else:
        at = s if student_norm_at is None else pool_cells(student_norm_at, window, "max", valid)[0]
        s = s / (np.linalg.norm(at, axis=-1, keepdims=True) + 1e-8)
        t = t / (np.linalg.norm(t, axis=-1, keepdims=True) + 1e-8)
    return affinity_mse(s, t, cells)


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cirkd_minibatch(student_feat, teacher_feat, mask=None, tau=0.1, group_size=2, block_size=None):
    n, h, w, _ = student_feat.shape
    b = n if group_size is None else group_size
    valid = np.ones((n, h, w), bool) if mask is None else mask
    s = normalize(student_feat).reshape(n, h * w, -1)
    t = normalize(teacher_feat).reshape(n, h * w, -1)
    keep = valid.reshape(n, h * w)
    total, rows = 0.0, 0
    for g in range(n // b):
        for i in range(g * b, (g + 1) * b):
            for j in range(g * b, (g + 1) * b):
                if not keep[i].any() or not keep[j].any():
                    continue
                a_s = s[i][keep[i]] @ s[j][keep[j]].T / tau
                a_t = t[i][keep[i]] @ t[j][keep[j]].T / tau
                log_p_s, log_p_t = log_softmax(a_s), log_softmax(a_t)
                total += np.sum(np.exp(log_p_t) * (log_p_t - log_p_s))
                rows += a_s.shape[0]
    return total / max(rows, 1)
