"""Predictions of several models on the first validation images, drawn side by side: what
``kdjax eval`` and ``kdjax compare`` write as overlays."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np
from etils.epath import Path

from kdjax.data.metadata import dataset_info
from kdjax.evaluation.inference import predict_classes
from kdjax.evaluation.overlays import write_overlays
from kdjax.evaluation.validation import eval_mode
from kdjax.runtime.compilation import UNOPTIMIZED

Predictor = Callable[[jax.Array], jax.Array]


def network_predictor(network, config: ml_collections.ConfigDict,
                      num_classes: int) -> Predictor:
    """Jitted (N, H, W, 3) images → (N, H, W) classes of a frozen network
    (:class:`kdjax.io.networks.Network`), in the eval mode."""
    return functools.partial(_predict(network, config, num_classes), network.variables)


def compile_predictor(network, config: ml_collections.ConfigDict, num_classes: int,
                      images: jax.ShapeDtypeStruct) -> None:
    """Compiles the program of :func:`network_predictor` for ``images`` (N, H, W, 3) without
    running it, for JAX's persistent cache to serve its first call; ``network`` may be abstract
    (``load_teacher(..., materialize=False)``)."""
    _predict(network, config, num_classes).lower(network.variables, images).compile()


def _predict(network, config: ml_collections.ConfigDict, num_classes: int):
    mode = eval_mode(config)

    def predict(variables, images):
        logits = functools.partial(network.logits, variables)
        return predict_classes(logits, images, eval_mode=mode, num_classes=num_classes)

    # The weights are an argument, not constants of the program: networks of one architecture
    # then share one program (JAX's persistent cache), and none compiles its weights in. It runs
    # once, on a few images, so it is compiled without optimisation (kdjax.runtime.compilation).
    return jax.jit(predict, compiler_options=UNOPTIMIZED)


def write_prediction_overlays(config: ml_collections.ConfigDict,
                              predictors: Mapping[str, Predictor], out_dir: Path, count: int, *,
                              prediction_only_copies: bool = False) -> list[Path]:
    """``overlay_<k>.png`` (image | label | each predictor's classes) for the first ``count``
    validation images; with ``prediction_only_copies`` also ``predictions_<k>.png``, the
    prediction panels alone. Runs on one process."""
    # tf.data and its image ops: imported when a pipeline is built.
    from kdjax.data.augment import denormalize
    from kdjax.data.pipeline import make_eval_iterator

    info = dataset_info(config.data.name)
    paths = []
    for batch in make_eval_iterator(config.data, global_batch_size=config.eval.batch_size,
                                    process_index=0, process_count=1):
        predictions = {name: np.asarray(predict(batch["image"]))
                       for name, predict in predictors.items()}
        images = denormalize(batch["image"], config.data.normalization)
        for i in np.flatnonzero(batch["valid"]):
            if len(paths) == count:
                return paths
            h, w = int(batch["height"][i]), int(batch["width"][i])
            row = dict(image_uint8=images[i, :h, :w], label=batch["label"][i, :h, :w],
                       predictions={name: p[i, :h, :w] for name, p in predictions.items()},
                       palette=info.palette, ignore_label=info.ignore_label)
            if prediction_only_copies:
                write_overlays(out_dir / f"predictions_{len(paths):03d}.png", **row,
                               show_inputs=False)
            paths.append(write_overlays(out_dir / f"overlay_{len(paths):03d}.png", **row))
    return paths


