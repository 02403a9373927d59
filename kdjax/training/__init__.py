"""Training: the public Python API of the trainer.

    from kdjax import training
    from kdjax.config import load_config

    config = load_config("configs/demo.py:local")
    exp = training.setup(config)            # builds and checks everything; runs nothing
    state = exp.init_state()                # or init_state(student=kdjax.convert.from_torch(...))
    state, metrics = exp.step(state, batch) # batch: {'image': (N,H,W,3) f32, 'label': (N,H,W) i32}
    print(exp.evaluate(state)["miou"])      # or exp.evaluate(state, batches)
    exp.export(state, "runs/student")       # a model directory

``setup`` also takes NNX modules of your own as the student or the teacher and an optax
transformation as the optimizer. Batches are NumPy arrays of this process's rows or global
``jax.Array`` values, in ``step`` and ``evaluate`` alike; a non-finite loss raises
:class:`NonFiniteLossError` naming the terms and the step (``exp.step(..., nonfinite='freeze')``
keeps the last finite state instead and lets the steps queue up).

Rooms: ``state`` (the train state), ``optimizer``, ``step`` (the pure step and its non-finite
guard), ``experiment`` (setup and the compiled entry points), ``loop`` (``run_training``: logs,
validation, checkpoints), ``resume`` (recipe fingerprints, the reported checkpoint) and
``metrics_log`` (progress line, ``metrics.jsonl``, TensorBoard).
"""

from kdjax._extras import require

# Before the imports below: without the extra, one line says what to install.
require("train", by=__name__)

from kdjax.training.experiment import Experiment, setup, trained_teacher  # noqa: E402
from kdjax.training.loop import RunResult, run_training  # noqa: E402
from kdjax.training.optimizer import make_optimizer  # noqa: E402
from kdjax.training.state import TrainState  # noqa: E402
from kdjax.training.step import NonFiniteLossError, check_finite, make_train_step  # noqa: E402

__all__ = ["Experiment", "NonFiniteLossError", "RunResult", "TrainState", "check_finite",
           "make_optimizer", "make_train_step", "run_training", "setup", "trained_teacher"]
