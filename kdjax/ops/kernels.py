"""The one place where kdjax chooses platform-specific kernels and sizes.

``'xla'`` traces plain XLA convolutions and batch normalisation, differentiable in forward and
reverse mode: what TPUs run. ``'cpu'`` uses the forms of :mod:`kdjax.ops.cpu`, written for XLA's
CPU backend (reverse mode only: their gradients are written out). ``'gpu'`` is ``'xla'`` with the
dilated convolutions' kernel gradient as a matrix product (:mod:`kdjax.ops.gpu.convolution`,
reverse mode only). ``'auto'`` is ``'cpu'`` or ``'gpu'`` when JAX's default backend is the CPU or
a GPU, and ``'xla'`` otherwise.

The losses' reductions (:mod:`kdjax.ops.reductions`) take their CPU forms under the same rule as
``'auto'``: :func:`cpu_forms`.

The losses that loop over chunks (FAKD-CWD's images, Af-DCD's contrast patches) take a scratch
budget (``scratch_bytes``); the trainer resolves ``distill.loss_scratch_mb`` once here. On the CPU
a loop's scratch is one fresh allocation per call, and glibc serves allocations above 32 MB with
``mmap``, so their pages fault in again on every call; 16 MB keeps them below that
(benchmarks/NOTES.md, 'FAKD-CWD in chunks of images'). Accelerators' fusions may never write the
chunks out: 256 MB only bounds the worst case and keeps the loops short (a loop over a batch that
is sharded across devices would gather it).
"""

from __future__ import annotations

import jax

KERNELS = ("auto", "xla", "cpu", "gpu")
# distill.loss_scratch_mb = 'auto' on the CPU and elsewhere.
CPU_LOSS_SCRATCH_MB = 16
ACCELERATOR_LOSS_SCRATCH_MB = 256


def resolve_kernels(kernels: str) -> str:
    """``'xla'``, ``'cpu'`` or ``'gpu'`` for a ``model.kernels`` setting (see the module docstring).

    Raises:
      ValueError: ``kernels`` is not one of ``KERNELS``.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}; got {kernels!r}.")
    if kernels == "auto":
        backend = jax.default_backend()
        return backend if backend in ("cpu", "gpu") else "xla"
    return kernels


def cpu_forms() -> bool:
    """Whether the losses' reductions take their CPU forms (:mod:`kdjax.ops.reductions`): where
    JAX's default backend is the CPU, as ``'auto'`` kernels do."""
    return resolve_kernels("auto") == "cpu"


def resolve_loss_scratch(setting: str | int | None) -> int | None:
    """The scratch budget in bytes of the losses that loop over chunks, for a
    ``distill.loss_scratch_mb`` setting: ``'auto'`` (by platform, see the module docstring), a
    number of MiB, or None (no bound: each loss in one step).

    Raises:
      ValueError: ``setting`` is none of these.
    """
    if setting == "auto":
        setting = (CPU_LOSS_SCRATCH_MB if jax.default_backend() == "cpu"
                   else ACCELERATOR_LOSS_SCRATCH_MB)
    if setting is None:
        return None
    if isinstance(setting, bool) or not isinstance(setting, int) or setting <= 0:
        raise ValueError(f"distill.loss_scratch_mb must be 'auto', a positive number of MiB or "
                         f"None; got {setting!r}.")
    return setting * 2**20
