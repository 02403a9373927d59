"""float64 NumPy convolution written from torch.nn.Conv2d's definition (NHWC, HWIO kernels), with
its two gradients, and the cases the convolution forms are tested on."""

import itertools

import numpy as np

# (size (H, W), C_in, C_out, kernel, stride, padding, dilation, groups)
CASES = {
    "3x3": ((7, 6), 4, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "3x3 on 16x16": ((16, 16), 3, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "3x3 stride 2": ((9, 8), 4, 6, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "dilated 2": ((8, 8), 3, 4, (3, 3), (1, 1), (2, 2), (2, 2), 1),
    "dilation past the map (centre tap only)": ((8, 8), 3, 4, (3, 3), (1, 1), (12, 12), (12, 12), 1),
    "dilation partly past the map": ((8, 7), 3, 4, (3, 3), (1, 1), (5, 5), (5, 5), 1),
    "strided and dilated": ((9, 9), 2, 3, (3, 3), (2, 2), (3, 3), (3, 3), 1),
    "depthwise": ((7, 7), 6, 6, (3, 3), (2, 2), (1, 1), (1, 1), 6),
    "groups 3, multiplier 2": ((6, 6), 6, 12, (3, 3), (1, 1), (2, 2), (2, 2), 3),
    "1x1 stride 2": ((7, 7), 5, 3, (1, 1), (2, 2), (0, 0), (1, 1), 1),
    "7x7 stem": ((11, 10), 3, 4, (7, 7), (2, 2), (3, 3), (1, 1), 1),
    "1x3 asymmetric": ((5, 6), 4, 4, (1, 3), (1, 1), (0, 1), (1, 1), 1),
    "strided past the map (every tap reads padding)": ((1, 1), 3, 4, (1, 1), (2, 2), (1, 1), (1, 1), 1),
}


# float64 NumPy reference: out[n, o, p, :] = Σ_{i,j} x_pad[n, o·s + i·d, p·s + j·d, :] · K[i, j]

def windows(x, kernel_size, stride, padding, dilation):
    """Yields (i, j, window) with window = x_pad[:, i·d::s, j·d::s] cut to the output size."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n, h, w, _ = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    for i, j in itertools.product(range(kh), range(kw)):
        yield i, j, padded[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]


def grouped(a, groups):
    return a.reshape(*a.shape[:-1], groups, a.shape[-1] // groups)


def reference_forward(x, kernel, stride, padding, dilation, groups):
    out = 0.0
    for i, j, window in windows(x, kernel.shape[:2], stride, padding, dilation):
        k = kernel[i, j].reshape(kernel.shape[2], groups, -1)        # (C_in/G, G, C_out/G)
        term = np.einsum("nhwgc,cgo->nhwgo", grouped(window, groups), k)
        out = out + term.reshape(*term.shape[:3], -1)
    return out


def reference_gradients(x, kernel, cotangent, stride, padding, dilation, groups):
    """(dx, dK) of Σ cotangent · reference_forward, from the same per-tap sum."""
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    n, h, w, _ = x.shape
    d_padded = np.zeros((n, h + 2 * ph, w + 2 * pw, x.shape[3]))
    d_kernel = np.zeros_like(kernel)
    g = grouped(cotangent, groups)                                      # (N, H', W', G, C_out/G)
    oh, ow = cotangent.shape[1:3]
    for i, j, window in windows(x, kernel.shape[:2], stride, padding, dilation):
        k = kernel[i, j].reshape(kernel.shape[2], groups, -1)
        d_kernel[i, j] = np.einsum("nhwgc,nhwgo->cgo", grouped(window, groups), g).reshape(
            kernel.shape[2], -1)
        d_window = np.einsum("nhwgo,cgo->nhwgc", g, k).reshape(n, oh, ow, -1)
        d_padded[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw] += d_window
    return d_padded[:, ph:ph + h, pw:pw + w], d_kernel


def case_arrays(name, seed=0):
    size, c_in, c_out, kernel_size, stride, padding, dilation, groups = CASES[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *size, c_in))
    kernel = rng.standard_normal((*kernel_size, c_in // groups, c_out))
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, kernel, options
