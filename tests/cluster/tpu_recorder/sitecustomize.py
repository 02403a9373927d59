"""Put on ``PYTHONPATH``, this replaces ``jax.distributed.initialize`` in every Python process
started with it by a recorder, for a TPU start-up simulated on a machine without TPUs.

Each call appends one JSON line to ``$KDJAX_INITIALIZE_RECORD``: its arguments and whether any JAX
backend had started by then (it must not have: on a TPU slice ``initialize`` must come before
anything touches a device). Then, since no TPU is here, the recorder points JAX at the CPU, which
works only while no backend has started, and the run goes on there as one process.
"""

import json
import os

import jax
from jax._src import xla_bridge


def _record(**kwargs):
    entry = {"arguments": {k: str(v) for k, v in kwargs.items()},
             "backends_started": xla_bridge.backends_are_initialized()}
    with open(os.environ["KDJAX_INITIALIZE_RECORD"], "a") as file:
        file.write(json.dumps(entry) + "\n")
    jax.config.update("jax_platforms", "cpu")


jax.distributed.initialize = _record
