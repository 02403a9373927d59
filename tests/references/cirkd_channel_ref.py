"""float64 NumPy reference of CIRKDv2 channel distillation, written from docs/methods.md §11 (NHWC).

The random choices (the rows enqueued, the queue slots of the contrast set) are inputs here: the
tests pass the ones the JAX code drew, and check the drawing separately.
"""

import numpy as np


def avg_pool_ceil(x, window):
    """(N, H, W, C) average pool, kernel = stride = window, ceil mode: a partial last window
    averages its in-bounds pixels."""
    kh, kw = window
    n, h, w, c = x.shape
    ho, wo = -(-h // kh), -(-w // kw)
    out = np.zeros((n, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            out[:, i, j] = x[:, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean(axis=(1, 2))
    return out


def embeddings(x, mask=None):
    """(N, C, H·W): each channel's map over the positions (raster order), masked positions zeroed,
    divided by max(norm, 1e-12)."""
    x = np.array(x, np.float64)
    if mask is not None:
        x = np.where(np.asarray(mask)[..., None], x, 0.0)
    n, h, w, c = x.shape
    e = x.reshape(n, h * w, c).transpose(0, 2, 1)
    norm = np.sqrt(np.sum(e * e, axis=-1, keepdims=True))
    return e / np.maximum(norm, 1e-12)


def valid_images(mask, n):
    if mask is None:
        return np.ones(n, bool)
    return np.asarray(mask).reshape(n, -1).any(axis=1)


def log_softmax(z):
    z = z - np.max(z)
    return z - np.log(np.sum(np.exp(z)))


def kl(z_t, z_s):
    """KL(softmax(z_t) ‖ softmax(z_s)) of two 1-D logit vectors."""
    log_p_t, log_p_s = log_softmax(z_t), log_softmax(z_s)
    return float(np.sum(np.exp(log_p_t) * (log_p_t - log_p_s)))


def minibatch(student_embed, teacher_embed, tau=0.1, group_size=2, mask=None, block_size=None):
    """Mean over the rows of every pair (i, j) of valid images of each group of the row KL of the
    C×C channel similarity maps."""
    del block_size  # an implementation choice with the same result
    n, _, _, c = student_embed.shape
    b = n if group_size is None else group_size
    s, t = embeddings(student_embed, mask), embeddings(teacher_embed, mask)
    valid = valid_images(mask, n)
    total, rows = 0.0, 0
    for g in range(0, n, b):
        for i in range(g, g + b):
            for j in range(g, g + b):
                if not (valid[i] and valid[j]):
                    continue
                m_s, m_t = s[i] @ s[j].T / tau, t[i] @ t[j].T / tau
                for r in range(c):
                    total += kl(m_t[r], m_s[r])
                    rows += 1
    return total / rows if rows else 0.0


def mse(student_embed, teacher_embed, mask=None):
    """Mean over the valid positions × C of the squared embedding differences."""
    n, h, w, _ = student_embed.shape
    d = (embeddings(student_embed, mask) - embeddings(teacher_embed, mask)) ** 2  # (N, C, P)
    if mask is None:
        return float(d.mean())
    m = np.broadcast_to(np.asarray(mask).reshape(n, 1, h * w), d.shape)
    count = m.sum()
    return float(d[m].sum() / count) if count else 0.0


def memory(student_embed, teacher_embed, queue, index, tau=0.1, kd_tau=1.0, mask=None):
    """kd_tau² · mean over the channels of valid images of KL(softmax(t·Qᵀ/τ/kd_tau) ‖
    softmax(s·Qᵀ/τ/kd_tau)), Q = queue[index]."""
    n = student_embed.shape[0]
    s, t = embeddings(student_embed, mask), embeddings(teacher_embed, mask)
    q = np.asarray(queue, np.float64)[np.asarray(index)]
    valid = valid_images(mask, n)
    total, rows = 0.0, 0
    for i in range(n):
        if not valid[i]:
            continue
        for r in range(s.shape[1]):
            total += kl(q @ t[i, r] / tau / kd_tau, q @ s[i, r] / tau / kd_tau)
            rows += 1
    return kd_tau ** 2 * total / rows if rows else 0.0


def enqueue(queue, ptr, teacher_embed, order, taken, mask=None):
    """The original's ring-buffer enqueue of the rows ``order[:taken]`` of the (N·C, P) teacher
    channel embeddings (image-major), each normalised once more. Returns (queue, ptr)."""
    queue = np.array(queue, np.float64)
    size = queue.shape[0]
    n, h, w, c = teacher_embed.shape
    rows = embeddings(teacher_embed, mask).reshape(n * c, h * w)[np.asarray(order)[:taken]]
    rows = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    ptr = int(ptr)
    if ptr + taken >= size:
        queue[size - taken:] = rows
        ptr = 0
    else:
        queue[ptr:ptr + taken] = rows
        ptr = (ptr + taken) % size
    return queue, ptr
