"""float64 NumPy reference of NFD, written from methods.md §2 and §9.2 (NHWC)."""

import numpy as np


def normalize(x, valid, axes, eps, ddof):
    """Loops over the slices that share statistics; masked positions come out as 0."""
    n, h, w, c = x.shape
    out = np.zeros_like(x)
    if axes == "spatial":
        slices = [(b, slice(None), slice(None), ch) for b in range(n) for ch in range(c)]
    elif axes == "channel":
        slices = [(b, i, j, slice(None)) for b in range(n) for i in range(h) for j in range(w)]
    else:
        slices = [(b, slice(None), slice(None), slice(None)) for b in range(n)]
    keep = np.broadcast_to(valid[..., None], x.shape)
    for index in slices:
        values = x[index][keep[index]]
        if values.size == 0:
            continue
        mean = values.mean()
        var = ((values - mean) ** 2).sum() / max(values.size - ddof, 1)
        out[index] = np.where(keep[index], (x[index] - mean) / np.sqrt(var + eps), 0.0)
    return out


def normalized_feature_distillation(student, teacher, mask=None, axes="spatial",
                                    normalize_student=True, eps=1e-5, ddof=0, distance="mse"):
    n, h, w, c = student.shape
    valid = np.ones((n, h, w), bool) if mask is None else mask
    t = normalize(teacher, valid, axes, eps, ddof)
    s = normalize(student, valid, axes, eps, ddof) if normalize_student else student
    diff = (t - s)[valid]  # (valid pixels, C)
    if distance == "mse":
        return (diff**2).sum() / max(diff.size, 1)
    return np.sqrt((diff**2).sum()) / (h * w)
