"""float64 NumPy reference of BPKD, written from methods.md §12 (NHWC), with the regions found by
explicit loops over every pixel and its window."""

import numpy as np

from tests.references.ifvd_ref import nearest_resize


def is_valid(label, num_classes, ignore_label):
    if label < 0 or label == ignore_label:
        return False
    return num_classes is None or label < num_classes


def class_regions(classes, valid, width, ignore_borders=False):
    n, h, w = classes.shape
    edge = np.zeros((n, h, w), bool)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                if not valid[b, i, j]:
                    continue
                for di in range(-width, width + 1):
                    for dj in range(-width, width + 1):
                        y, x = i + di, j + dj
                        if not (0 <= y < h and 0 <= x < w):
                            continue
                        if valid[b, y, x]:
                            if classes[b, y, x] != classes[b, i, j]:
                                edge[b, i, j] = True
                        elif ignore_borders:
                            edge[b, i, j] = True
    return edge, valid & ~edge


def valid_map(labels, num_classes, ignore_label):
    flat = [is_valid(int(v), num_classes, ignore_label) for v in labels.reshape(-1)]
    return np.array(flat, bool).reshape(labels.shape)


def boundary_regions(labels, size, width=1, ignore_label=255, num_classes=None,
                     ignore_borders=False):
    labels = nearest_resize(np.asarray(labels), *size)
    return class_regions(labels, valid_map(labels, num_classes, ignore_label), width,
                         ignore_borders)


def log_softmax(x, axis):
    x = x - np.max(x, axis=axis, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))


def pixel_kl(student, teacher, tau):
    log_s = log_softmax(student / tau, -1)
    log_t = log_softmax(teacher / tau, -1)
    return np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)


def channel_wise(student, teacher, keep, tau):
    """τ²/(N_valid·K) Σ_{n,k} KL of the spatial softmaxes over the kept positions of image n."""
    n, _, _, k = student.shape
    total, images = 0.0, 0
    for b in range(n):
        positions = keep[b].reshape(-1)
        if not positions.any():
            continue
        images += 1
        s = student[b].reshape(-1, k)[positions]
        t = teacher[b].reshape(-1, k)[positions]
        log_s = log_softmax(s / tau, 0)
        log_t = log_softmax(t / tau, 0)
        total += np.sum(np.exp(log_t) * (log_t - log_s))
    return tau**2 * total / (max(images, 1) * k)


def bpkd_parts(student_logits, teacher_logits, labels, mask=None, num_classes=None,
               ignore_label=255, edge_tau=1.0, body_tau=4.0, width=1, ignore_borders=False,
               edge_source="labels", edge_reduction="pixel_mean", body_masking="exclude"):
    _, h, w, k = student_logits.shape
    labels = nearest_resize(np.asarray(labels), h, w)
    valid = valid_map(labels, num_classes, ignore_label)
    classes = labels if edge_source == "labels" else np.argmax(teacher_logits, axis=-1)
    edge, body = class_regions(classes, valid, width, ignore_borders)
    if mask is not None:
        edge, body = edge & mask, body & mask

    kl = pixel_kl(student_logits, teacher_logits, edge_tau)
    if edge_reduction == "pixel_mean":
        edge_loss = kl[edge].sum() / max(edge.sum(), 1)
    else:
        means = []
        for c in range(k):
            members = edge & (classes == c)
            if members.any():
                means.append(kl[members].mean())
        edge_loss = float(np.mean(means)) if means else 0.0
    edge_loss *= edge_tau**2

    if body_masking == "exclude":
        body_loss = channel_wise(student_logits, teacher_logits, body, body_tau)
    else:
        inside = body[..., None]
        body_loss = channel_wise(np.where(inside, student_logits, 0.0),
                                 np.where(inside, teacher_logits, 0.0), np.ones_like(body),
                                 body_tau)
    return edge_loss, body_loss


def bpkd(student_logits, teacher_logits, labels, mask=None, edge_weight=1.0, body_weight=3.0,
         **options):
    edge, body = bpkd_parts(student_logits, teacher_logits, labels, mask=mask, **options)
    return edge_weight * edge + body_weight * body
