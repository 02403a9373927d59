"""float64 NumPy references of AT (methods.md §5.6) and FitNets (§5.7), NHWC."""

import numpy as np


def attention_transfer(student_feat, teacher_feat, mask=None):
    n, h, w, _ = student_feat.shape
    valid = np.ones((n, h, w), bool) if mask is None else mask

    def attention(f):
        a = np.where(valid, (f**2).mean(axis=-1), 0.0).reshape(n, -1)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    diff = (attention(student_feat) - attention(teacher_feat)) ** 2
    return diff[valid.reshape(n, -1)].sum() / max(valid.sum(), 1)


def fitnet(adapted_student_feat, teacher_feat, mask=None):
    sq = (adapted_student_feat - teacher_feat) ** 2
    valid = np.ones(sq.shape[:3], bool) if mask is None else mask
    return sq[valid].sum() / max(valid.sum() * sq.shape[-1], 1)


def skd_adversarial_losses(d_student, d_teacher):
    return (-d_student.mean(),
            np.maximum(1 - d_teacher, 0).mean() + np.maximum(1 + d_student, 0).mean())
