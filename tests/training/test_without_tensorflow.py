"""The core runs where TensorFlow cannot be imported: losses, models, the PyTorch import, the
trainer's Python API (init, step, evaluate on given arrays, export) and a checkpoint round trip."""

import pytest

from tests.python_process import run_python

CODE = r'''
import sys
sys.modules["tensorflow"] = None             # `import tensorflow` now raises ImportError
sys.modules["tensorflow_datasets"] = None
import tempfile
import jax, numpy as np
from kdjax import convert, losses, models, training
from kdjax.config import load_config
from kdjax.io.checkpoints import TrainCheckpointer

config = load_config("tests/training/tiny_config.py")
exp = training.setup(config)
state = exp.init_state()
rng = np.random.default_rng(0)
batch = {"image": rng.standard_normal((8, 32, 32, 3), np.float32),
         "label": rng.integers(0, exp.num_classes, (8, 32, 32), np.int32)}
state, metrics = exp.step(state, batch)
assert all(np.isfinite(float(v)) for v in metrics.values())
result = exp.evaluate(state, [batch])
assert 0.0 <= result["miou"] <= 100.0
workdir = tempfile.mkdtemp()
with TrainCheckpointer(workdir, async_save=False) as checkpointer:
    checkpointer.save(1, state, meta={}, force=True)
    restored, meta = checkpointer.restore(exp.abstract_state)
for a, b in zip(jax.tree.leaves(restored.student.params), jax.tree.leaves(state.student.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
exp.export(state, workdir + "/model")
assert "tensorflow" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok", int(restored.step))
'''


@pytest.mark.end_to_end
def test_the_core_trains_and_checkpoints_without_tensorflow():
    assert run_python(CODE).split()[-2:] == ["ok", "1"]
