"""float64 NumPy references of FAKD, written from methods.md §4 and §9.4 (NHWC).

The bounds are evaluated term by term from their formulas, the covariance estimator follows ISDA's
streaming rule class by class, and the Monte-Carlo functions sample the feature augmentation itself.
"""

import numpy as np


def resize_labels(labels, height, width):
    """Nearest resize with the floor rule src = floor(dst · in / out)."""
    labels = np.asarray(labels)
    _, h_in, w_in = labels.shape
    rows = [min(int(np.floor(r * h_in / height)), h_in - 1) for r in range(height)]
    cols = [min(int(np.floor(c * w_in / width)), w_in - 1) for c in range(width)]
    return labels[:, rows][:, :, cols]


def kernel_matrix(classifier_kernel):
    kernel = np.asarray(classifier_kernel, np.float64)
    return kernel.reshape(kernel.shape[-2:]) if kernel.ndim == 4 else kernel


def has_class(label, num_classes, ignore_label):
    return 0 <= label < num_classes and label != ignore_label


def logsumexp(x):
    x = np.asarray(x, np.float64)
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def fakd_kd(student_logits, teacher_logits, classifier_kernel, variance, labels, mask=None,
            strength=0.0, temperature=1.0, ignore_label=255):
    n, h, w, k = student_logits.shape
    kernel = kernel_matrix(classifier_kernel)
    y = resize_labels(labels, h, w)
    tau = temperature
    beta = strength / (2 * tau**2)
    total, count = 0.0, 0
    for b in range(n):
        for r in range(h):
            for c in range(w):
                if mask is not None and not mask[b, r, c]:
                    continue
                z = student_logits[b, r, c]
                q = softmax(teacher_logits[b, r, c] / tau)
                label = y[b, r, c]
                if has_class(label, k, ignore_label):
                    var_y = variance[label]
                else:
                    var_y = np.zeros(kernel.shape[0])
                value = 0.0
                for kk in range(k):
                    # M_y[:, kk]
                    quad = np.sum((kernel - kernel[:, [kk]]) ** 2 * var_y[:, None], axis=0)
                    value += q[kk] * logsumexp((z - z[kk]) / tau + beta * quad)
                value += np.sum(q * np.log(q))
                total += tau**2 * value
                count += 1
    return total / max(count, 1)


def fakd_cwd(student_logits, teacher_logits, classifier_kernel, variance, labels, mask=None,
             strength=0.0, tau=4.0, c_norm=None, ignore_label=255):
    n, h, w, k = student_logits.shape
    kernel = kernel_matrix(classifier_kernel)
    y = resize_labels(labels, h, w).reshape(n, -1)
    valid = np.ones((n, h, w), bool) if mask is None else np.asarray(mask, bool)
    beta = strength / (2 * tau**2)
    total, images = 0.0, 0
    for b in range(n):
        keep = valid[b].reshape(-1)
        if not keep.any():
            continue
        images += 1
        for ch in range(k):
            zs = student_logits[b, :, :, ch].reshape(-1)[keep] / tau
            q = softmax(teacher_logits[b, :, :, ch].reshape(-1)[keep] / tau)
            s = np.array([np.sum(kernel[:, ch] ** 2 * variance[label])
                          if has_class(label, k, ignore_label) else 0.0 for label in y[b][keep]])
            for i in range(zs.size):
                others = np.arange(zs.size) != i
                if others.any():
                    exponents = zs[others] - zs[i] + beta * (s[others] + s[i])
                    term = np.logaddexp(0.0, logsumexp(exponents))
                else:
                    term = 0.0
                total += q[i] * (term + np.log(q[i]))
    return tau**2 * total / (max(images, 1) * (k if c_norm is None else c_norm))


def update_class_covariance(mean, var, count, features, labels, ignore_label=255, mask=None):
    """ISDA's streaming update, one class at a time."""
    mean, var, count = (np.array(x, np.float64) for x in (mean, var, count))
    n, h, w, a = features.shape
    y = resize_labels(labels, h, w)
    valid = np.ones((n, h, w), bool) if mask is None else np.asarray(mask, bool)
    for k in range(mean.shape[0]):
        pick = valid & (y == k) & (y != ignore_label)
        b = int(pick.sum())
        if b == 0:
            continue
        f = features[pick].astype(np.float64)
        m = f.mean(axis=0)
        v = ((f - m) ** 2).mean(axis=0)
        weight = b / (b + count[k])
        var[k] = (1 - weight) * var[k] + weight * v + weight * (1 - weight) * (mean[k] - m) ** 2
        mean[k] = (1 - weight) * mean[k] + weight * m
        count[k] += b
    return mean, var, count


def augmented_logits(student_logits, classifier_kernel, variance, labels, strength, noise,
                     ignore_label=255):
    """z̃ = z + δ·W with δ = sqrt(λ·σ²_y) ⊙ ε per pixel (no augmentation without a class).

    Args:
      noise: (S, N, H, W, A) standard normal samples ε.
    Returns:
      (S, N, H, W, K).
    """
    n, h, w, k = student_logits.shape
    kernel = kernel_matrix(classifier_kernel)
    y = resize_labels(labels, h, w)
    std = np.zeros((n, h, w, kernel.shape[0]))
    for idx in np.ndindex(n, h, w):
        if has_class(y[idx], k, ignore_label):
            std[idx] = np.sqrt(strength * variance[y[idx]])
    return student_logits[None] + (noise * std[None]) @ kernel


def pixel_kd_samples(augmented, teacher_logits, temperature, mask=None):
    """τ² · mean over valid pixels of KL(q || softmax(z̃/τ)) for every sample: (S,)."""
    t = teacher_logits / temperature
    log_q = t - t.max(-1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
    zs = augmented / temperature
    log_p = zs - zs.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    kl = np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)  # (S, N, H, W)
    valid = np.ones(teacher_logits.shape[:3], bool) if mask is None else mask
    return temperature**2 * kl[:, valid].sum(axis=1) / max(valid.sum(), 1)


def cwd_samples(augmented, teacher_logits, tau, mask=None):
    """CWD (τ²/(N·C) Σ spatial KL) of every augmented sample: (S,)."""
    s_count, n, h, w, c = augmented.shape
    valid = np.ones((n, h, w), bool) if mask is None else mask
    out = np.zeros(s_count)
    images = 0
    for b in range(n):
        keep = valid[b].reshape(-1)
        if not keep.any():
            continue
        images += 1
        t = teacher_logits[b].reshape(-1, c)[keep] / tau  # (P, C)
        log_q = t - t.max(0)
        log_q = log_q - np.log(np.exp(log_q).sum(0))
        z = augmented[:, b].reshape(s_count, -1, c)[:, keep] / tau  # (S, P, C)
        log_p = z - z.max(1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
        out += np.sum(np.exp(log_q) * (log_q - log_p), axis=(1, 2))
    return tau**2 * out / (max(images, 1) * c)
