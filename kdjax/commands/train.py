"""``kdjax train``: trains the config's student, distilling when the config has terms, and
writes the reported student to ``WORKDIR/model``."""

from __future__ import annotations

import ml_collections

from kdjax import training
from kdjax.io.paths import as_path


def run_train(config: ml_collections.ConfigDict, workdir: str) -> training.RunResult:
    """Trains (or resumes) the run of ``config`` in ``workdir``; prints the reported mIoU."""
    exp = training.setup(config)
    result = training.run_training(exp, workdir)
    model_dir = exp.export(result.state, as_path(workdir) / "model")
    e = result.eval
    print(f"step {result.step}: val mIoU {e['miou']:.2f} ({e['eval_mode']}, {e['checkpoint']} "
          f"checkpoint at step {e['checkpoint_step']}); model written to {model_dir}")
    return result
