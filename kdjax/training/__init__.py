"""Training: the public Python API of the trainer.

    from kdjax import training
    from kdjax.config import load_config

    config = load_config("configs/demo.py:local")
    exp = training.setup(config)            # builds and checks everything; runs nothing
    state = exp.init_state()                # or exp.init_state(student=kdjax.convert.from_torch(...))
    state, metrics = exp.step(state, batch) # batch: {'image': (N,H,W,3) f32, 'label': (N,H,W) i32}
    print(exp.evaluate(state)["miou"])      # or exp.evaluate(state, batches)
    exp.export(state, "runs/student")       # a model directory

Rooms: ``state`` (the train state), ``optimizer``, ``step`` (the pure step and its non-finite
guard), ``experiment`` (setup and the compiled entry points), ``loop`` (``run_training``: logs,
validation, checkpoints), ``resume`` (recipe fingerprints, the reported checkpoint) and
``metrics_log`` (progress line, ``metrics.jsonl``, TensorBoard).
"""

from kdjax.training.experiment import Experiment, setup
from kdjax.training.loop import RunResult, run_training
from kdjax.training.optimizer import make_optimizer
from kdjax.training.state import TrainState
from kdjax.training.step import NonFiniteLossError, make_train_step

__all__ = ["Experiment", "NonFiniteLossError", "RunResult", "TrainState", "make_optimizer",
           "make_train_step", "run_training", "setup"]
