"""Saves a 32 MB train state at steps 1, 2, 3, … into WORKDIR until the process is killed.

``python -m tests.io.save_until_killed WORKDIR``. The state at a step is
``train_state(step)``, so whoever restores it can check every value.
"""

import functools
import sys

import jax
import numpy as np

from kdjax.io.checkpoints import TrainCheckpointer

SIZE = 8 * 2**20  # float32 elements; random, so the writes do not compress away


@functools.cache
def _base() -> np.ndarray:
    return np.random.default_rng(0).normal(size=SIZE).astype(np.float32)


def train_state(step: int) -> dict:
    return {"params": {"w": _base() + np.float32(step)}, "step": np.int32(step)}


def abstract_train_state() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train_state(0))


def main(workdir: str) -> None:
    with TrainCheckpointer(workdir, keep_last=2) as checkpointer:
        step = 1
        while True:
            state = jax.tree.map(jax.device_put, train_state(step))
            checkpointer.save(step, state, meta={"metrics": {"loss": 1.0 / step}})
            step += 1


if __name__ == "__main__":
    main(sys.argv[1])
