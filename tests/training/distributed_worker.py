"""One process of the two-process ``jax.distributed`` check in test_multiprocess.py.

    python tests/training/distributed_worker.py --process-id=I --num-processes=2 --port=P --out=FILE

Each process starts with its own simulated CPU devices (``XLA_FLAGS`` set by the caller), joins
the coordinator on 127.0.0.1:P, builds the tiny experiment over the mesh of all global devices and
runs three train steps. Process 0 writes the per-step metrics and the final student weights to
``FILE`` (.npz) for comparison with a single-process run of the same steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STEPS = 3
GLOBAL_BATCH = 8
GLOBAL_DEVICES = 8
CONFIG = Path(__file__).with_name("tiny_config.py")


def _key(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))))
                    for p in path)


def host_value(x):
    """A replicated global array as numpy. Every process holds a full copy, so the first local
    shard is the whole value and no cross-process fetch is needed; numpy input passes through."""
    import numpy as np
    return np.asarray(x.addressable_data(0) if hasattr(x, "addressable_data") else x)


def flat_state(state) -> dict:
    """The student's weights, BN statistics and optimizer state of a ``TrainState`` by tree path:
    the part of the state the comparison with a single-process run checks."""
    import jax
    leaves, _ = jax.tree_util.tree_flatten_with_path(state.student)
    return {_key(path): host_value(leaf) for path, leaf in leaves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    # Imported after argument parsing only for a faster --help; XLA_FLAGS comes from the caller.
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from kdjax.runtime import distributed, sharding
    from kdjax import training as train
    from kdjax.config.loading import load_config
    from kdjax.data import make_train_iterator
    from tests.training.test_train import tie_free

    assert distributed.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes,
                                           args.process_id)
    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.device_count() == GLOBAL_DEVICES, jax.device_count()

    config = load_config(str(CONFIG))
    assert config.train.batch_size == GLOBAL_BATCH
    exp = train.setup(config)
    assert exp.mesh.devices.size == jax.device_count()

    # The input pipeline's own per-process sharding (each host reads disjoint files) is covered by
    # tests/data. Here every process builds the full global batches of a single-process run and
    # hands over only its rows, so the result isolates the distributed train step: it must equal
    # the single-process step on the very same global batches.
    batches = make_train_iterator(config.data, global_batch_size=GLOBAL_BATCH, seed=config.seed,
                                  process_index=0, process_count=1)
    rows = GLOBAL_BATCH // args.num_processes
    mine = slice(args.process_id * rows, (args.process_id + 1) * rows)

    state = exp.init_state()
    step = exp.compile()
    teacher = exp.teacher_inputs()
    history = []
    for seed in range(STEPS):
        full = tie_free(next(batches), seed)
        local = {name: value[mine] for name, value in full.items()}
        batch = sharding.global_batch(local, exp.mesh)
        assert batch["image"].shape[0] == GLOBAL_BATCH
        state, metrics = step(state, teacher, batch)
        history.append({k: float(host_value(v)) for k, v in metrics.items()})

    if args.process_id == 0:
        np.savez(args.out, metrics=np.array(json.dumps(history)),
                 step=host_value(state.step),
                 **{f"state/{k}": v for k, v in flat_state(state).items()})
    # Process 0 hosts the coordinator service: both processes leave together so that neither sees
    # its peer vanish mid-run and reports a spurious error at exit.
    multihost_utils.sync_global_devices("distributed_worker done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
