"""CIRKDv2's channel contrast in PyTorch (NCHW), transcribed from the formula of the original
``losses/cirkd_channel.py`` (docs/methods.md §11), with the random draws and the projection head
passed in so that a test can share them with kdjax.

One call is one forward of the original module: pool both features 4×4 (ceil mode), project the
student, normalise every channel's map over the positions, form the mini-batch loss and the MSE,
enqueue the drawn teacher rows, then contrast every channel row with the drawn queue rows.
"""

import torch
from torch.nn import functional as F


def channel_embeddings(feat):
    """(B, C, H, W) -> (B, C, H·W), each channel's map L2-normalised over the positions."""
    b, c = feat.shape[:2]
    return F.normalize(feat.reshape(b, c, -1), p=2, dim=-1)


def minibatch_loss(emb_s, emb_t, temperature):
    """1/B² Σ_{i,j} KL-batchmean over the C rows of softmax(E_i E_jᵀ / τ) maps, one GPU's batch."""
    b = emb_s.shape[0]
    total = emb_s.new_zeros(())
    for i in range(b):
        for j in range(b):
            log_p_s = F.log_softmax(emb_s[i] @ emb_s[j].T / temperature, dim=1)
            p_t = F.softmax(emb_t[i] @ emb_t[j].T / temperature, dim=1)
            total = total + F.kl_div(log_p_s, p_t, reduction="batchmean")
    return total / (b * b)


@torch.no_grad()
def enqueue(queue, ptr, keys, order, count):
    """Writes ``keys[order[:count]]`` (normalised) into the ring buffer; returns the new pointer."""
    rows = F.normalize(keys[order[:count]], p=2, dim=1)
    size = queue.shape[0]
    if ptr + count >= size:
        queue[size - count:] = rows
        return 0
    queue[ptr:ptr + count] = rows
    return (ptr + count) % size


def memory_loss(rows_s, rows_t, contrast, temperature, kd_temperature):
    """kd_T² · KL-batchmean(softmax(t·Qᵀ/τ/kd_T) ‖ softmax(s·Qᵀ/τ/kd_T)) over the rows."""
    s_logits = rows_s @ contrast.T / temperature
    t_logits = (rows_t @ contrast.T / temperature).detach()
    log_p_s = F.log_softmax(s_logits / kd_temperature, dim=1)
    p_t = F.softmax(t_logits / kd_temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * kd_temperature ** 2


def channel_contrast(feat_s, feat_t, queue, ptr, enqueue_order, contrast_index, *, project=None,
                     temperature=0.1, kd_temperature=1.0, update_count=256, pool=4):
    """One forward of the channel contrast module on one GPU (world size 1).

    Args:
      feat_s, feat_t: (B, C, H, W) head features.
      queue: (S, P') float tensor, updated in place; ptr: int.
      enqueue_order: a permutation of the B·C teacher rows (the original's ``randperm``).
      contrast_index: the queue slots of the contrast set (the original's ``randperm(S)[:M]``).
      project: the projection head applied to the pooled student, or None for the identity.
    Returns:
      (minibatch, memory, mse, new_ptr).
    """
    pooling = torch.nn.AvgPool2d(pool, pool, padding=0, ceil_mode=True)
    feat_s, feat_t = pooling(feat_s), pooling(feat_t)
    if project is not None:
        feat_s = project(feat_s)
    emb_s, emb_t = channel_embeddings(feat_s), channel_embeddings(feat_t)
    batch = minibatch_loss(emb_s, emb_t, temperature)
    rows_s = emb_s.reshape(-1, emb_s.shape[-1])
    rows_t = emb_t.reshape(-1, emb_t.shape[-1])
    mse = ((rows_s - rows_t) ** 2).mean()
    count = min(rows_t.shape[0], update_count)
    ptr = enqueue(queue, ptr, rows_t.detach().clone(), enqueue_order, count)
    contrast = queue[contrast_index]
    memory = memory_loss(rows_s, rows_t, contrast, temperature, kd_temperature)
    return batch, memory, mse, ptr
