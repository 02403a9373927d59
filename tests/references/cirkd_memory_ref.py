"""float64 NumPy reference of CIRKD memory-based distillation, written from methods.md §5.4 (NHWC).

The random choices (contrast slots, enqueued pixel positions) are inputs here: the tests pass the
ones the JAX code drew, and check the drawing separately.
"""

import numpy as np


def normalize(x, axis=-1):
    norm = np.sqrt(np.sum(x * x, axis=axis, keepdims=True))
    return x / np.maximum(norm, 1e-12)


def nearest_resize(labels, height, width):
    """PyTorch 'nearest': source index floor(dst * in / out)."""
    n, h_in, w_in = labels.shape
    out = np.zeros((n, height, width), labels.dtype)
    for i in range(height):
        for j in range(width):
            out[:, i, j] = labels[:, (i * h_in) // height, (j * w_in) // width]
    return out


def log_softmax(x):
    x = x - np.max(x)
    return x - np.log(np.sum(np.exp(x)))


def contrast_set(queue, index):
    """(K·n, C): for class 0, 1, ... the rows queue[class, index]."""
    rows = []
    for c in range(queue.shape[0]):
        for i in index:
            rows.append(queue[c, i])
    return np.array(rows)


def cirkd_memory(student_embed, teacher_embed, labels, pixel_queue, region_queue, pixel_index,
                 region_index, mask=None, tau=0.1, kd_tau=1.0, ignore_label=255):
    """(pixel_loss, region_loss) for the given contrast slots."""
    n, h, w, c = student_embed.shape
    num_classes = pixel_queue.shape[0]
    labels = nearest_resize(np.asarray(labels), h, w)
    s = normalize(student_embed)
    t = normalize(teacher_embed)
    losses = []
    for queue, index in ((pixel_queue, pixel_index), (region_queue, region_index)):
        q = contrast_set(queue, index)
        total, count = 0.0, 0
        for b in range(n):
            for i in range(h):
                for j in range(w):
                    lab = labels[b, i, j]
                    if lab == ignore_label or lab < 0 or lab >= num_classes:
                        continue
                    if mask is not None and not mask[b, i, j]:
                        continue
                    log_p_s = log_softmax(q @ s[b, i, j] / tau / kd_tau)
                    log_p_t = log_softmax(q @ t[b, i, j] / tau / kd_tau)
                    total += np.sum(np.exp(log_p_t) * (log_p_t - log_p_s))
                    count += 1
        losses.append(kd_tau**2 * total / count if count else 0.0)
    return tuple(losses)


def enqueue(pixel_queue, pixel_ptr, region_queue, region_ptr, teacher_feat, labels, positions,
            pixels_per_class=16, ignore_label=255):
    """The original per-image, per-class enqueue loop.

    ``positions[b, c]`` holds the raster positions the original reads for class c of image b (its
    ``perm[:k]``); the first ``min(n_c, pixels_per_class)`` of them are used.
    Returns new (pixel_queue, pixel_ptr, region_queue, region_ptr).
    """
    pixel_queue = np.array(pixel_queue, np.float64)
    region_queue = np.array(region_queue, np.float64)
    pixel_ptr, region_ptr = np.array(pixel_ptr), np.array(region_ptr)
    num_classes, pixel_size, _ = pixel_queue.shape
    region_size = region_queue.shape[1]
    n, h, w, c = teacher_feat.shape
    labels = nearest_resize(np.asarray(labels), h, w)
    feats = normalize(teacher_feat)
    for b in range(n):
        this_feat = feats[b].reshape(h * w, c)
        this_label = labels[b].reshape(-1)
        for lb in sorted(set(this_label.tolist())):
            if lb == ignore_label or lb < 0 or lb >= num_classes:
                continue
            idxs = np.nonzero(this_label == lb)[0]
            region_queue[lb, region_ptr[lb]] = normalize(this_feat[idxs].mean(axis=0))
            region_ptr[lb] = (region_ptr[lb] + 1) % region_size

            k = min(len(idxs), pixels_per_class)
            rows = normalize(this_feat[np.asarray(positions[b, lb][:k])])
            ptr = pixel_ptr[lb]
            if ptr + k >= pixel_size:
                pixel_queue[lb, pixel_size - k:] = rows
                pixel_ptr[lb] = 0
            else:
                pixel_queue[lb, ptr:ptr + k] = rows
                pixel_ptr[lb] = (ptr + k) % pixel_size
    return pixel_queue, pixel_ptr, region_queue, region_ptr
