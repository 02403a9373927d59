"""float64 NumPy reference of the masked, weighted pixel cross-entropy (PyTorch semantics)."""

import numpy as np


def cross_entropy(logits, labels, mask=None, ignore_label=255, class_weights=None):
    k = logits.shape[-1]
    numerator, denominator = 0.0, 0.0
    for idx in np.ndindex(labels.shape):
        y = labels[idx]
        if y == ignore_label or not 0 <= y < k or (mask is not None and not mask[idx]):
            continue
        z = logits[idx]
        nll = np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[y]
        w = 1.0 if class_weights is None else class_weights[y]
        numerator += w * nll
        denominator += w
    return numerator / denominator if denominator else 0.0
