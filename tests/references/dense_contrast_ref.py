"""float64 NumPy reference of Af-DCD's two losses, written from docs/methods.md §10 (NHWC).

Loops over images, patches and the (position, group) vectors of a patch follow the formula word for
word; speed does not matter at the test sizes.
"""

import numpy as np


def feature_reconstruction(generated, teacher, mask=None):
    n = generated.shape[0]
    valid = np.ones(generated.shape[:3], bool) if mask is None else mask
    total = 0.0
    for i in range(n):
        for y, x in zip(*np.nonzero(valid[i]), strict=True):
            total += np.sum((generated[i, y, x] - teacher[i, y, x]) ** 2)
    images = int(valid.reshape(n, -1).any(axis=1).sum())
    return total / max(images, 1)


def max_pool(x, window):
    """F.max_pool2d(x, window) on NHWC: windows of window×window, stride window, floor mode."""
    n, h, w, c = x.shape
    out = np.empty((n, h // window, w // window, c))
    for r in range(h // window):
        for q in range(w // window):
            block = x[:, r * window:(r + 1) * window, q * window:(q + 1) * window]
            out[:, r, q] = block.max(axis=(1, 2))
    return out


def patch_vectors(x, top, left, patch, groups):
    """The vectors of one patch of one image (H, W, C), as (K, D) with their position and group
    indices (K,): position row-major over the patch, then group; group m holds channels
    m·D .. (m+1)·D − 1."""
    ph, pw = patch
    d = x.shape[-1] // groups
    vectors, positions, group_of = [], [], []
    for r in range(ph):
        for q in range(pw):
            for m in range(groups):
                vectors.append(x[top + r, left + q, m * d:(m + 1) * d])
                positions.append(r * pw + q)
                group_of.append(m)
    return np.array(vectors), np.array(positions), np.array(group_of)


def omni_contrast(generated, teacher, groups=16, patch=(4, 4), pool=4, crop=None, tau=0.07):
    if isinstance(patch, int):
        patch = (patch, patch)
    g, t = generated, teacher
    if crop is not None:
        g, t = g[:, :crop[0], :crop[1]], t[:, :crop[0], :crop[1]]
    if pool:
        g, t = max_pool(g, pool), max_pool(t, pool)
    n, h, w, _ = g.shape
    ph, pw = patch
    total = 0.0
    for i in range(n):
        for top in range(0, h, ph):
            for left in range(0, w, pw):
                rows, positions, group_of = patch_vectors(g[i], top, left, patch, groups)
                columns, _, _ = patch_vectors(t[i], top, left, patch, groups)
                # similarity[a, b] = −‖row a − column b‖₁ / τ
                similarity = -np.abs(rows[:, None, :] - columns[None, :, :]).sum(-1) / tau
                for a in range(len(rows)):
                    same = (positions == positions[a]) & (group_of == group_of[a])
                    other_group = group_of != group_of[a]
                    logits = similarity[a][same | other_group]   # the positive and the negatives
                    positive = similarity[a][same][0]
                    top_logit = logits.max()
                    total += top_logit + np.log(np.sum(np.exp(logits - top_logit))) - positive
    return total / (n * h * w)
