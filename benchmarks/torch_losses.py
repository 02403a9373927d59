"""PyTorch implementations of the kdjax losses, for the speed comparison in ``benchmarks/losses.py``.

Each loss computes the formula documented in ``kdjax.losses`` (with the options the benchmark uses),
in NCHW float32, the way a PyTorch user would write it: vectorised tensor code with the library's
fused primitives (``log_softmax``, ``kl_div``, ``instance_norm``, ``bmm`` …). Loops remain only
where the formula itself is a loop: the CIRKD queue update visits every image and class in turn,
as the original code does (the CIRKDv2 channel queue takes one batch of rows at a time).

A loss is a :class:`TorchLoss`: a scalar ``term`` function and a ``plan`` that turns the inputs into
the list of calls of ``term`` whose weighted sum is the loss. Most losses are one call over the whole
batch. PFS and CIRKD memory are split into per-image terms and CIRKD mini-batch into per-image-pair
terms, each back-propagated before the next is formed, which is how these losses fit in memory in
PyTorch at Cityscapes size (one image's P×P maps, 268 MB each at 64×128, instead of the whole
batch's). SKD pair-wise pools 2×2 first and runs on the whole batch. ``plan`` also does the work
that needs no gradient (the CIRKD queue updates and the sampling of their contrast sets, BPKD's
edge and body regions).
``torch.compile`` is applied to ``term``.

Teacher tensors never require a gradient; the gradient is taken with respect to the student input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Call = tuple[tuple, float]  # (arguments of term, weight of its value in the loss)


@dataclass(frozen=True)
class TorchLoss:
    """A loss as ``Σ weight · term(*args)`` over the calls that ``plan(inputs)`` returns."""

    term: Callable[..., Tensor]
    plan: Callable[[dict], Iterable[Call]]


def value_and_grad(loss: TorchLoss, inputs: dict, term: Callable[..., Tensor] | None = None):
    """The loss value and its gradient with respect to ``inputs['student']`` (a leaf tensor).

    Every term is back-propagated as soon as it is formed; ``term`` overrides ``loss.term`` (e.g. its
    ``torch.compile`` version).
    """
    fn = loss.term if term is None else term
    student = inputs["student"]
    student.grad = None
    total = torch.zeros(())
    for args, weight in loss.plan(inputs):
        value = fn(*args) * weight
        value.backward()
        total = total + value.detach()
    return total, student.grad


def whole(*names: str) -> Callable[[dict], list[Call]]:
    """A plan of one call on the named inputs."""
    return lambda inputs: [(tuple(inputs[name] for name in names), 1.0)]


# --------------------------------------------------------------------------------------------------
# Logit losses.

def pixel_kd(s: Tensor, t: Tensor, temperature: float = 1.0) -> Tensor:
    """T² · batch-mean over pixels of KL(softmax(t/T) ‖ softmax(s/T)) over the classes."""
    k = s.shape[1]
    rows_s = s.permute(0, 2, 3, 1).reshape(-1, k)
    rows_t = t.permute(0, 2, 3, 1).reshape(-1, k)
    return F.kl_div(F.log_softmax(rows_s / temperature, dim=1),
                    F.log_softmax(rows_t / temperature, dim=1), reduction="batchmean",
                    log_target=True) * temperature**2


def channel_wise_divergence(s: Tensor, t: Tensor, tau: float = 4.0) -> Tensor:
    """τ²/(N·C) Σ_{n,c} KL(softmax_HW(t_nc/τ) ‖ softmax_HW(s_nc/τ))."""
    n, c = s.shape[:2]
    log_p_s = F.log_softmax(s.reshape(n, c, -1) / tau, dim=-1)
    log_p_t = F.log_softmax(t.reshape(n, c, -1) / tau, dim=-1)
    return torch.sum(log_p_t.exp() * (log_p_t - log_p_s)) * tau**2 / (n * c)


def weighted_pixel_imitation(s: Tensor, t: Tensor, temperature: float = 1.0) -> Tensor:
    """mean_{n,p} w·g with g = T²·KL per pixel and w = P·g / Σ_p g per image (a constant)."""
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    gap = temperature**2 * torch.sum(log_p_t.exp() * (log_p_t - log_p_s), dim=1)   # (N, H, W)
    with torch.no_grad():
        pixels = gap.shape[1] * gap.shape[2]
        weights = pixels * gap / gap.sum(dim=(1, 2), keepdim=True)
    return torch.mean(weights * gap)


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist(s: Tensor, t: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> Tensor:
    """τ²(β·(1 − mean_p r(y^S_p, y^T_p)) + γ·(1 − mean_k r(y^S_k, y^T_k))), Pearson r, whole batch."""
    k = s.shape[1]
    y_s = F.softmax(s.permute(0, 2, 3, 1).reshape(-1, k) / tau, dim=1)
    y_t = F.softmax(t.permute(0, 2, 3, 1).reshape(-1, k) / tau, dim=1)
    inter = 1.0 - _pearson(y_s, y_t, dim=1).mean()
    intra = 1.0 - _pearson(y_s, y_t, dim=0).mean()
    return tau**2 * (beta * inter + gamma * intra)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_label: int = 255) -> Tensor:
    return F.cross_entropy(logits, labels, ignore_index=ignore_label)


def _nearest_labels(labels: Tensor, height: int, width: int) -> Tensor:
    """Nearest label resize with PyTorch's (legacy 'nearest') floor rule."""
    small = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")
    return small[:, 0].long()


def fakd_kd(s: Tensor, t: Tensor, kernel: Tensor, variance: Tensor, labels: Tensor, strength: float,
            temperature: float = 1.0, ignore_label: int = 255) -> Tensor:
    """Closed-form FAKD-KD bound, mean over pixels of
    τ²[Σ_k q_k logsumexp_j((z_j − z_k)/τ + λ/(2τ²)·M_y[j,k]) + Σ_k q_k log q_k],
    M_y[j,k] = Σ_a (W[a,j] − W[a,k])² σ²_{y,a}, M = 0 for pixels without a class."""
    n, k, h, w = s.shape
    y = _nearest_labels(labels, h, w).reshape(-1)
    has_class = (y >= 0) & (y < k) & (y != ignore_label)
    y = torch.where(has_class, y, torch.zeros_like(y))
    beta = strength / (2 * temperature**2)
    diff2 = (kernel[:, :, None] - kernel[:, None, :]) ** 2                    # (A, K_j, K_k)
    quad = torch.einsum("ya,ajk->yjk", variance, diff2)                       # (K_y, K_j, K_k)
    shift = beta * quad[y] * has_class[:, None, None]                          # (P, K_j, K_k)
    z = s.permute(0, 2, 3, 1).reshape(-1, k) / temperature
    log_q = F.log_softmax(t.permute(0, 2, 3, 1).reshape(-1, k) / temperature, dim=1)
    q = log_q.exp()
    lse = torch.logsumexp(z[:, :, None] - z[:, None, :] + shift, dim=1)        # (P, K_k)
    return temperature**2 * torch.mean(torch.sum(q * (lse + log_q), dim=1))


def fakd_cwd(s: Tensor, t: Tensor, kernel: Tensor, variance: Tensor, labels: Tensor, strength: float,
             tau: float = 4.0, ignore_label: int = 255) -> Tensor:
    """Closed-form FAKD-CWD bound: τ²/(N·C) Σ_{n,c} Σ_i q_i (term_i + log q_i) with
    term_i = log(1 + Σ_{j≠i} exp((z_j − z_i)/τ + β(s_{c,y_j} + s_{c,y_i}))),
    s_{c,y} = Σ_a W[a,c]² σ²_{y,a}.

    The leave-one-out sum is the full sum minus the own term, in O(P) per channel."""
    n, k, h, w = s.shape
    y = _nearest_labels(labels, h, w).reshape(n, 1, h * w)
    has_class = (y >= 0) & (y < k) & (y != ignore_label)
    y = torch.where(has_class, y, torch.zeros_like(y))
    beta = strength / (2 * tau**2)
    spread = variance @ kernel**2                                               # (K_y, K_c)
    u = beta * spread[y[:, 0]].transpose(1, 2) * has_class                      # (N, K_c, P)
    z = s.reshape(n, k, -1) / tau
    a = z + u
    shift = a.detach().amax(dim=-1, keepdim=True)
    e = torch.exp(a - shift)
    others = e.sum(dim=-1, keepdim=True) - e                                     # Σ_{j≠i} exp(a_j − shift)
    term = F.softplus(u - z + shift + torch.log(others))
    log_q = F.log_softmax(t.reshape(n, k, -1) / tau, dim=-1)
    return tau**2 * torch.sum(log_q.exp() * (term + log_q)) / (n * k)


def boundary_regions(labels: Tensor, height: int, width: int, num_classes: int, band: int = 1,
                     ignore_label: int = 255) -> tuple[Tensor, Tensor]:
    """BPKD's (edge, body) regions, bool (N, H, W) each, from labels nearest-resized to the logits:
    a labelled pixel is an edge pixel when its (2·band+1)² window (cut at the border) holds a
    labelled pixel of another class, i.e. when the window's largest or smallest valid class differs
    from its own (``max_pool2d`` of the classes, with the invalid pixels out of both)."""
    y = _nearest_labels(labels, height, width)
    valid = (y >= 0) & (y < num_classes) & (y != ignore_label)
    classes = y.float()[:, None]
    side = 2 * band + 1
    top = F.max_pool2d(classes.masked_fill(~valid[:, None], float("-inf")), side, 1, band)
    bottom = -F.max_pool2d((-classes).masked_fill(~valid[:, None], float("-inf")), side, 1, band)
    edge = valid & ((top[:, 0] > y) | (bottom[:, 0] < y))
    return edge, valid & ~edge


def bpkd(s: Tensor, t: Tensor, edge: Tensor, body: Tensor, edge_weight: float = 1.0,
         body_weight: float = 3.0, edge_tau: float = 1.0, body_tau: float = 4.0) -> Tensor:
    """λ_e·τ_e²·mean over the edge pixels of KL(softmax(t/τ_e) ‖ softmax(s/τ_e)) over the classes
    + λ_b·CWD over the body pixels: τ_b²/(N_B·K) Σ_{n,k} KL of the spatial softmaxes of z/τ_b over
    image n's body pixels (the other pixels leave the softmax; N_B: images with a body pixel)."""
    k = s.shape[1]
    kl = F.kl_div(F.log_softmax(s / edge_tau, dim=1), F.log_softmax(t / edge_tau, dim=1),
                  reduction="none", log_target=True).sum(1)                       # (N, H, W)
    edge_loss = edge_tau**2 * (kl * edge).sum() / edge.sum().clamp(min=1)
    has_body = body.flatten(1).any(1)                                               # (N,)
    # Images without a body pixel keep every position in the softmax and are left out below.
    out = (~body & has_body[:, None, None]).flatten(1)[:, None]                     # (N, 1, P)
    log_p_s = F.log_softmax((s.flatten(2) / body_tau).masked_fill(out, float("-inf")), dim=-1)
    log_p_t = F.log_softmax((t.flatten(2) / body_tau).masked_fill(out, float("-inf")), dim=-1)
    terms = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)         # (N, K, P)
    inside = body.flatten(1)[:, None] & has_body[:, None, None]
    body_loss = (body_tau**2 * torch.where(inside, terms, 0.0).sum()
                 / (has_body.sum().clamp(min=1) * k))
    return edge_weight * edge_loss + body_weight * body_loss


def bpkd_plan(num_classes: int) -> Callable[[dict], list[Call]]:
    """One call on the whole batch, the regions found first (they need no gradient)."""

    def plan(inputs):
        s = inputs["student"]
        with torch.no_grad():
            edge, body = boundary_regions(inputs["labels"], s.shape[2], s.shape[3], num_classes)
        return [((s, inputs["teacher"], edge, body), 1.0)]

    return plan


# --------------------------------------------------------------------------------------------------
# Feature losses.

def normalized_feature_distillation(s: Tensor, t: Tensor, eps: float = 1e-5) -> Tensor:
    """MSE of the per-(image, channel) spatially normalised features (biased variance, no affine)."""
    return F.mse_loss(F.instance_norm(s, eps=eps), F.instance_norm(t, eps=eps))


def attention_transfer(s: Tensor, t: Tensor) -> Tensor:
    def attention(x):
        return F.normalize(x.pow(2).mean(1).reshape(x.shape[0], -1), dim=1)

    return (attention(s) - attention(t)).pow(2).mean()


def fitnet(s: Tensor, t: Tensor) -> Tensor:
    return F.mse_loss(s, t)


def feature_reconstruction(g: Tensor, t: Tensor) -> Tensor:
    """Af-DCD's masked-generation term: Σ (G − T)² / N."""
    return F.mse_loss(g, t, reduction="sum") / g.shape[0]


def omni_contrast(g: Tensor, t: Tensor, groups: int = 16, patch: int = 4, pool: int = 4,
                  tau: float = 0.07) -> Tensor:
    """Af-DCD's omni-contrast term: both maps max-pooled (``pool``×``pool``, stride ``pool``), cut
    into patch×patch patches and the channels into ``groups`` groups; within a patch every
    (position, group) vector of G has logits −‖g − t‖₁/τ (``torch.cdist``, p = 1) against the
    teacher's vector of the same position and group (the positive) and those of every other group
    at any position (the negatives); the loss is the summed cross-entropy of the positive over
    N·H'·W'."""
    g, t = F.max_pool2d(g, pool), F.max_pool2d(t, pool)
    n, c, h, w = g.shape

    def vectors(x):       # (N·patches, K, C/M), vector k = position (k // M) of the patch, group k % M
        x = x.reshape(n, groups, c // groups, h // patch, patch, w // patch, patch)
        x = x.permute(0, 3, 5, 4, 6, 1, 2)
        return x.reshape(-1, patch * patch * groups, c // groups)

    logits = -torch.cdist(vectors(g), vectors(t), p=1) / tau                        # (B, K, K)
    k, device = logits.shape[-1], logits.device
    group = torch.arange(k, device=device) % groups
    same_group_elsewhere = ((group[:, None] == group[None, :])
                            & ~torch.eye(k, dtype=torch.bool, device=device))
    logits = logits.masked_fill(same_group_elsewhere, float("-inf"))
    target = torch.arange(k, device=device).expand(logits.shape[0], k)
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="sum") / (n * h * w)


def ifvd(s: Tensor, t: Tensor, labels: Tensor, num_classes: int = 19,
         ignore_label: int = 255) -> Tensor:
    """mean_{n,p} (cos(f^S_p, μ^S_{y_p}) − cos(f^T_p, μ^T_{y_p}))², per-image class prototypes μ."""
    n, _, h, w = s.shape
    y = _nearest_labels(labels, h, w).reshape(n, -1)
    member = (y >= 0) & (y < num_classes) & (y != ignore_label)
    onehot = F.one_hot(torch.where(member, y, 0), num_classes).float() * member[..., None]
    counts = onehot.sum(1)                                                      # (N, K)

    def similarity(feat):
        feat = feat.reshape(n, feat.shape[1], -1).transpose(1, 2)                  # (N, P, C)
        prototypes = onehot.transpose(1, 2) @ feat / (counts[..., None] + 1e-6)    # (N, K, C)
        centre = torch.where(member[..., None], onehot @ prototypes, feat)
        return F.cosine_similarity(feat, centre, dim=2, eps=1e-8)

    return F.mse_loss(similarity(s), similarity(t))


# --------------------------------------------------------------------------------------------------
# Relational losses (P×P affinity maps).

def _affinity(f: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, P, P): cosine similarities of the pixels."""
    f = F.normalize(f, dim=1).flatten(2)
    return torch.bmm(f.transpose(1, 2), f)


def affinity_mse(s: Tensor, t: Tensor) -> Tensor:
    """mean over images and pairs of (A^S − A^T)²: PFS (pool 1), and SKD after its pooling."""
    return (_affinity(s) - _affinity(t)).pow(2).mean()


def skd_pairwise(s: Tensor, t: Tensor, pool: int = 2) -> Tensor:
    return affinity_mse(F.max_pool2d(s, pool, pool, ceil_mode=True),
                        F.max_pool2d(t, pool, pool, ceil_mode=True))


def per_image(*names: str) -> Callable[[dict], list[Call]]:
    """A plan of one call per image, each weighted 1/N (for a loss that is a mean over images)."""

    def plan(inputs):
        n = inputs[names[0]].shape[0]
        return [(tuple(inputs[name][i:i + 1] for name in names), 1.0 / n) for i in range(n)]

    return plan


def cirkd_pair(s_i: Tensor, s_j: Tensor, t_i: Tensor, t_j: Tensor, tau: float = 0.1) -> Tensor:
    """Σ over the rows of A_ij of KL(softmax(A^T_ij/τ) ‖ softmax(A^S_ij/τ)), softmax over columns."""
    def rows(f_i, f_j):
        f_i, f_j = F.normalize(f_i, dim=1).flatten(2), F.normalize(f_j, dim=1).flatten(2)
        return torch.bmm(f_i.transpose(1, 2), f_j) / tau

    log_p_s = F.log_softmax(rows(s_i, s_j), dim=-1)
    log_p_t = F.log_softmax(rows(t_i, t_j), dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)


def cirkd_pairs(group_size: int = 2) -> Callable[[dict], list[Call]]:
    """CIRKD mini-batch: every ordered pair (i, j) of each group, mean over rows, pairs and groups."""

    def plan(inputs):
        s, t = inputs["student"], inputs["teacher"]
        n, p = s.shape[0], s.shape[2] * s.shape[3]
        weight = 1.0 / (p * group_size**2 * (n // group_size))
        calls = []
        for g in range(0, n, group_size):
            for i in range(g, g + group_size):
                for j in range(g, g + group_size):
                    calls.append(((s[i:i + 1], s[j:j + 1], t[i:i + 1], t[j:j + 1]), weight))
        return calls

    return plan


# --------------------------------------------------------------------------------------------------
# CIRKD memory: the original per-image, per-class queue update, then the contrast KD losses.

def cirkd_enqueue(state: dict, teacher: Tensor, labels: Tensor, positions=None,
                  pixels_per_class: int = 16, ignore_label: int = 255) -> None:
    """Enqueues normalised teacher embeddings in place: per image and present class, the normalised
    class mean into the region queue and min(n_c, 16) embeddings into the pixel queue, read at
    ``randperm(n_c)[:k]`` of the image's raster positions (``positions[b, c]`` instead, if given)."""
    pixel_queue, region_queue = state["pixel_queue"], state["region_queue"]
    num_classes, pixel_size, c = pixel_queue.shape
    region_size = region_queue.shape[1]
    feat = F.normalize(teacher, dim=1)
    for b in range(feat.shape[0]):
        this_feat = feat[b].reshape(c, -1)
        this_label = labels[b].reshape(-1)
        for lb in torch.unique(this_label).tolist():
            if lb < 0 or lb >= num_classes or lb == ignore_label:
                continue
            idxs = (this_label == lb).nonzero()[:, 0]
            ptr = int(state["region_ptr"][lb])
            region_queue[lb, ptr] = F.normalize(this_feat[:, idxs].mean(1), dim=0)
            state["region_ptr"][lb] = (ptr + 1) % region_size
            num = idxs.shape[0]
            perm = torch.randperm(num) if positions is None else positions[b, lb]
            k = min(num, pixels_per_class)
            rows = F.normalize(this_feat[:, perm[:k]].T, dim=1)
            ptr = int(state["pixel_ptr"][lb])
            if ptr + k >= pixel_size:
                pixel_queue[lb, -k:] = rows
                state["pixel_ptr"][lb] = 0
            else:
                pixel_queue[lb, ptr:ptr + k] = rows
                state["pixel_ptr"][lb] = (ptr + k) % pixel_size


def cirkd_contrast_terms(s: Tensor, t: Tensor, anchors: Tensor, pixel_contrast: Tensor,
                         region_contrast: Tensor, tau: float = 0.1, kd_tau: float = 1.0) -> Tensor:
    """Σ over the anchors of one image of KL(softmax(t·Qᵀ/τ/kd_tau) ‖ softmax(s·Qᵀ/τ/kd_tau)),
    for the pixel and the region contrast set together, times kd_tau²."""
    c = s.shape[1]
    s = F.normalize(s, dim=1).permute(0, 2, 3, 1).reshape(-1, c)[anchors]
    t = F.normalize(t, dim=1).permute(0, 2, 3, 1).reshape(-1, c)[anchors]
    total = s.new_zeros(())
    for contrast in (pixel_contrast, region_contrast):
        log_p_s = F.log_softmax(s @ contrast.T / (tau * kd_tau), dim=1)
        log_p_t = F.log_softmax(t @ contrast.T / (tau * kd_tau), dim=1)
        total = total + F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return total * kd_tau**2


def cirkd_memory_plan(pixel_contrast: int = 4096, region_contrast: int = 1024,
                      ignore_label: int = 255) -> Callable[[dict], list[Call]]:
    """Updates the queues with this batch, samples the contrast sets (or takes ``inputs['draws']``),
    then one call per image, each weighted 1/(anchors of the batch)."""

    def plan(inputs):
        s, t, state = inputs["student"], inputs["teacher"], inputs["memory"]
        n, _, h, w = s.shape
        labels = _nearest_labels(inputs["labels"], h, w)
        draws = inputs.get("draws")
        with torch.no_grad():
            cirkd_enqueue(state, t, labels, None if draws is None else draws["positions"],
                          ignore_label=ignore_label)
            num_classes, pixel_size, c = state["pixel_queue"].shape
            region_size = state["region_queue"].shape[1]
            n_pix = min(pixel_contrast // num_classes + 1, pixel_size)
            n_reg = min(region_contrast // num_classes + 1, region_size)
            if draws is None:
                pixel_index = torch.randperm(pixel_size)[:n_pix]
                region_index = torch.randperm(region_size)[:n_reg]
            else:
                pixel_index, region_index = draws["pixel_index"], draws["region_index"]
            pixel_set = state["pixel_queue"][:, pixel_index].reshape(-1, c)
            region_set = state["region_queue"][:, region_index].reshape(-1, c)
        anchors = ((labels >= 0) & (labels < num_classes) & (labels != ignore_label)).reshape(n, -1)
        weight = 1.0 / max(int(anchors.sum()), 1)
        return [((s[i:i + 1], t[i:i + 1], anchors[i], pixel_set, region_set), weight)
                for i in range(n)]

    return plan


# --------------------------------------------------------------------------------------------------
# CIRKDv2 channel losses, on the 4×4-pooled (and, for the student, projected) features: every
# channel's map over the P' positions, L2-normalised, is one embedding.

def channel_embeddings(x: Tensor) -> Tensor:
    """(N, C, H', W') -> (N, C, P'), each channel's map L2-normalised over the positions."""
    return F.normalize(x.flatten(2), dim=2)


def cirkd_channel_minibatch(s: Tensor, t: Tensor, tau: float = 0.1, group_size: int = 2) -> Tensor:
    """Mean over groups of 1/B² Σ_{i,j} 1/C Σ_rows KL(softmax(E^T_i E^Tᵀ_j/τ) ‖ softmax(E^S_i E^Sᵀ_j/τ)),
    every ordered pair (i, j) of a group of B images at once."""
    n, c = s.shape[:2]

    def maps(x):
        e = channel_embeddings(x).reshape(n // group_size, group_size, c, -1)       # (G, B, C, P')
        return torch.einsum("gicp,gjdp->gijcd", e, e) / tau                       # (G, B, B, C, C)

    log_p_s = F.log_softmax(maps(s), dim=-1)
    log_p_t = F.log_softmax(maps(t), dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / (n * group_size * c)


def cirkd_channel_mse(s: Tensor, t: Tensor) -> Tensor:
    """mean_{n,c,p} (s − t)² of the channel embeddings."""
    return F.mse_loss(channel_embeddings(s), channel_embeddings(t))


def cirkd_channel_contrast(s: Tensor, t: Tensor, contrast: Tensor, tau: float = 0.1,
                           kd_tau: float = 1.0) -> Tensor:
    """kd_tau² · mean over the N·C channel rows of KL(softmax(t·Qᵀ/τ/kd_tau) ‖ softmax(s·Qᵀ/τ/kd_tau))."""
    rows_s = channel_embeddings(s).flatten(0, 1)                                    # (N·C, P')
    rows_t = channel_embeddings(t).flatten(0, 1)
    log_p_s = F.log_softmax(rows_s @ contrast.T / (tau * kd_tau), dim=1)
    log_p_t = F.log_softmax(rows_t @ contrast.T / (tau * kd_tau), dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * kd_tau**2


def cirkd_channel_memory_plan(channel_contrast: int = 2048,
                              channels_per_step: int = 256) -> Callable[[dict], list[Call]]:
    """Enqueues k = min(N·C, 256) random teacher channel rows (normalised once more) into the ring
    queue at its pointer (into the last k slots with the pointer reset to 0 once ptr + k reaches the
    size), samples ``randperm(S)[:2048]`` queue rows as the contrast set (or takes
    ``inputs['draws']``), then one call on the whole batch."""

    def plan(inputs):
        s, t, state = inputs["student"], inputs["teacher"], inputs["memory"]
        draws = inputs.get("draws")
        with torch.no_grad():
            queue = state["queue"]
            size = queue.shape[0]
            rows = channel_embeddings(t).flatten(0, 1)
            k = min(rows.shape[0], channels_per_step)
            order = (torch.randperm(rows.shape[0], device=rows.device)[:k] if draws is None
                     else draws["order"])
            rows = F.normalize(rows[order], dim=1)
            ptr = int(state["ptr"])
            if ptr + k >= size:
                queue[size - k:] = rows
                state["ptr"].fill_(0)
            else:
                queue[ptr:ptr + k] = rows
                state["ptr"].fill_(ptr + k)
            index = (torch.randperm(size, device=queue.device)[:min(channel_contrast, size)]
                     if draws is None else draws["contrast_index"])
            contrast = queue[index]
        return [((s, t, contrast), 1.0)]

    return plan


# --------------------------------------------------------------------------------------------------
# The losses by kdjax name, with the benchmark's options.

def losses(strength: float, num_classes: int = 19) -> dict[str, TorchLoss]:
    st = ("student", "teacher")
    fakd = ("student", "teacher", "kernel", "variance", "labels")

    def with_strength(fn):
        return lambda *args: fn(*args, strength=strength)

    return {
        "pixel_kd": TorchLoss(pixel_kd, whole(*st)),
        "channel_wise_divergence": TorchLoss(channel_wise_divergence, whole(*st)),
        "normalized_feature_distillation": TorchLoss(normalized_feature_distillation, whole(*st)),
        "pixel_feature_similarity": TorchLoss(affinity_mse, per_image(*st)),
        "weighted_pixel_imitation": TorchLoss(weighted_pixel_imitation, whole(*st)),
        "skd_pairwise": TorchLoss(skd_pairwise, whole(*st)),
        "ifvd": TorchLoss(lambda s, t, y: ifvd(s, t, y, num_classes), whole(*st, "labels")),
        "cirkd_minibatch": TorchLoss(cirkd_pair, cirkd_pairs(2)),
        "cirkd_memory": TorchLoss(cirkd_contrast_terms, cirkd_memory_plan()),
        "dist": TorchLoss(dist, whole(*st)),
        "attention_transfer": TorchLoss(attention_transfer, whole(*st)),
        "fitnet": TorchLoss(fitnet, whole(*st)),
        "fakd_kd": TorchLoss(with_strength(fakd_kd), whole(*fakd)),
        "fakd_cwd": TorchLoss(with_strength(fakd_cwd), whole(*fakd)),
        "cross_entropy": TorchLoss(cross_entropy, whole("student", "labels")),
        "bpkd": TorchLoss(bpkd, bpkd_plan(num_classes)),
        "feature_reconstruction": TorchLoss(feature_reconstruction, whole(*st)),
        "omni_contrast": TorchLoss(omni_contrast, whole(*st)),
        "cirkd_channel_minibatch": TorchLoss(cirkd_channel_minibatch, whole(*st)),
        "cirkd_channel_mse": TorchLoss(cirkd_channel_mse, whole(*st)),
        "cirkd_channel_memory": TorchLoss(cirkd_channel_contrast, cirkd_channel_memory_plan()),
    }

