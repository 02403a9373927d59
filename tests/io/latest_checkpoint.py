"""Restores the latest step that ``tests.io.save_until_killed`` committed in WORKDIR and
prints ``{"latest": step, "intact": bool}`` as JSON (run it with the emulator's environment).

``python -m tests.io.latest_checkpoint WORKDIR``
"""

import json
import sys

import numpy as np

from kdjax.io.checkpoints import TrainCheckpointer
from tests.io.save_until_killed import abstract_train_state, train_state

if __name__ == "__main__":
    with TrainCheckpointer(sys.argv[1], keep_last=2) as checkpointer:
        state, meta = checkpointer.restore(abstract_train_state())
        expected = train_state(meta["step"])
        intact = (int(state["step"]) == meta["step"]
                  and np.array_equal(np.asarray(state["params"]["w"]), expected["params"]["w"]))
        print(json.dumps({"latest": checkpointer.latest_step(), "intact": bool(intact)}))
