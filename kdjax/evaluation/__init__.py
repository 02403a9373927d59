"""The pieces of evaluation, one job per module; ``kdjax.evaluate`` is the public entry.

- ``metrics``: confusion matrix, its host-side int64 accumulation, mIoU / IoU / accuracies.
- ``inference``: ``EvalMode`` and whole / sliding-window / multi-scale + flip class probabilities.
- ``overlays``: colour-coded label maps and PNG rows image | label | predictions.
"""
