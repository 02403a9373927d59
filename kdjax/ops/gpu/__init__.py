"""GPU forms of the convolution: XLA's own, except where cuDNN's kernel for a gradient is slow."""
