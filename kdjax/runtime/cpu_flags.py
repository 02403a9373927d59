"""XLA flags that kdjax's commands set for the CPU backend before JAX starts it.

- ``--xla_cpu_enable_concurrency_optimized_scheduler=false``. XLA's CPU scheduler orders a program
  for concurrency by default, which keeps more temporaries live at once. Without it, the compiled
  distillation step needs about half the memory at the same step time. This jaxlib reads the
  scheduler choice from the process-wide flags only: the same option given to one program as
  ``compiler_options`` is accepted and changes nothing.
- ``--xla_cpu_prefer_vector_width=512``. XLA's own loops use 256-bit vectors by default, also on
  AVX-512 CPUs. The softmax losses' exponentials run in such loops over (N, H, W, K) maps, and
  with 512-bit vectors their forward + backward is faster, while the train step does not move.
  CPUs without AVX-512 keep their widest vectors.

The measurements: ``benchmarks/NOTES.md`` item 51.

Each flag applies only where the environment does not name the option already, so a user's own
setting wins (e.g. ``--xla_cpu_prefer_vector_width=256`` on a CPU that lowers its clock for
512-bit work).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",
             "--xla_cpu_prefer_vector_width=512")


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def add_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> None:
    """Appends each of ``CPU_FLAGS`` to ``environ['XLA_FLAGS']`` unless that names the option
    already, so a user's own setting wins. Takes effect only before JAX initialises its backends
    (the first computation or device query of the process)."""
    current = environ.get("XLA_FLAGS", "").split()
    named = {_name(flag) for flag in current}
    missing = [flag for flag in CPU_FLAGS if _name(flag) not in named]
    if missing:
        environ["XLA_FLAGS"] = " ".join(current + missing)
