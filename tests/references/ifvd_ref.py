"""float64 NumPy reference of IFVD, written from methods.md §5.3 (NHWC)."""

import numpy as np


def nearest_resize(labels, height, width):
    # PyTorch's nearest rule src = floor(dst * in / out), with the scale and product in float32.
    n, h_in, w_in = labels.shape
    out = np.zeros((n, height, width), labels.dtype)
    for i in range(height):
        r = min(int(np.floor(np.float32(i) * np.float32(h_in / height))), h_in - 1)
        for j in range(width):
            c = min(int(np.floor(np.float32(j) * np.float32(w_in / width))), w_in - 1)
            out[:, i, j] = labels[:, r, c]
    return out


def cosine(x, y):
    return x @ y / (max(np.linalg.norm(x), 1e-8) * max(np.linalg.norm(y), 1e-8))


def similarities(feat, labels, valid, num_classes, ignore_label):
    n, h, w, _ = feat.shape
    sim = np.zeros((n, h, w))
    for b in range(n):
        prototypes = {}
        for k in range(num_classes):
            if k == ignore_label:
                continue
            members = (labels[b] == k) & valid[b]
            prototypes[k] = feat[b][members].sum(axis=0) / (members.sum() + 1e-6)
        for i in range(h):
            for j in range(w):
                f = feat[b, i, j]
                g = prototypes.get(labels[b, i, j], f) if valid[b, i, j] else f
                sim[b, i, j] = cosine(f, g)
    return sim


def ifvd(student_feat, teacher_feat, labels, mask=None, num_classes=1, ignore_label=255):
    n, h, w, _ = student_feat.shape
    labels = nearest_resize(labels, h, w)
    valid = np.ones((n, h, w), bool) if mask is None else mask
    sim_s = similarities(student_feat, labels, valid, num_classes, ignore_label)
    sim_t = similarities(teacher_feat, labels, valid, num_classes, ignore_label)
    return ((sim_s - sim_t) ** 2)[valid].sum() / max(valid.sum(), 1)
