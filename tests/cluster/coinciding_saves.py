"""One process of a run whose saves coincide: the latest and the best checkpoint of the same steps,
written asynchronously at once, as a training run does at a step that both evaluates and saves.

    python -m tests.cluster.coinciding_saves WORKDIR STEPS

Started as a task of a (fake) Slurm job step, so ``kdjax.runtime.distributed`` joins the
processes. Afterwards every process restores the latest step and checks its values.
"""

import sys

import jax
import numpy as np


def state_at(step: int, mesh) -> dict:
    from kdjax.runtime import sharding

    values = {"w": np.arange(64, dtype=np.float32) + step, "step": np.int32(step)}
    return jax.device_put(values, sharding.replicated(mesh))


def main(workdir: str, steps: int) -> int:
    from kdjax.io.checkpoints import TrainCheckpointer
    from kdjax.runtime import distributed, sharding

    assert distributed.initialize_distributed()
    assert jax.process_count() > 1, jax.process_count()
    mesh = sharding.make_mesh()
    with TrainCheckpointer(workdir, keep_last=2, async_save=True) as checkpointer:
        for step in range(1, steps + 1):
            state = state_at(step, mesh)
            checkpointer.save_best(step, state, meta={}, metric_value=float(step))
            checkpointer.save(step, state, meta={}, force=True)
        checkpointer.wait_until_finished()
        abstract = sharding.placed(jax.eval_shape(lambda: state_at(0, mesh)),
                                   sharding.replicated(mesh))
        restored, meta = checkpointer.restore(abstract)
        best, _ = checkpointer.restore_best(abstract)
    for value in (restored, best):
        np.testing.assert_array_equal(np.asarray(value["w"].addressable_data(0)),
                                      np.arange(64, dtype=np.float32) + steps)
    assert meta["step"] == steps
    print(f"process {jax.process_index()}: saved and restored step {steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
