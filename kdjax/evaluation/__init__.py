"""Evaluation, one job per module, with the public names re-exported here.

- ``metrics``: confusion matrix, its host-side int64 accumulation, mIoU / IoU / accuracies.
- ``inference``: ``EvalMode`` and whole / sliding-window / multi-scale + flip class probabilities.
- ``loop``: ``evaluate``, a model over an eval set.
- ``overlays``: colour-coded label maps and PNG rows image | label | predictions.
- ``report``: result rows of runs and the comparison tables, JSON and plot.
- ``curves``: the validation curves of a comparison, one panel per method.
"""

from kdjax._extras import require

# Before the imports below: without the extra, one line says what to install.
require("train", by=__name__)

from kdjax.evaluation.inference import EvalMode, infer_probabilities, predict_classes  # noqa: E402
from kdjax.evaluation.loop import batch_confusion, evaluate  # noqa: E402
from kdjax.evaluation.metrics import (  # noqa: E402
    ConfusionAccumulator, SegmentationMetrics, confusion_matrix, segmentation_metrics)
from kdjax.evaluation.overlays import colorize, write_overlays  # noqa: E402

__all__ = [
    "ConfusionAccumulator", "EvalMode", "SegmentationMetrics", "batch_confusion", "colorize",
    "confusion_matrix", "evaluate", "infer_probabilities", "predict_classes",
    "segmentation_metrics", "write_overlays",
]
