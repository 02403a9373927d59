"""Throughput of kdjax's distillation train step: images/s with the teacher forward, the student
forward and backward, CE + aux CE (+ CWD on logits) and the SGD update, with compile time reported
separately; and the same step without the distillation terms (no teacher), which bounds from above
what any distillation step can consume.

    python benchmarks/step.py --size 360 360 --batch 2 --steps 3
    python benchmarks/step.py --size 512 1024 --batch 2 --steps 2 --teacher deeplabv3_resnet50

Random weights and random batches of the given size: the step's cost does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from kdjax import sharding, train
from kdjax.defaults import base_config
from kdjax.recipes import method_terms


def step_config(args, distill: bool):
    config = base_config()
    config.data.name = "synthetic"
    config.data.crop_size = tuple(args.size)
    config.student.name = args.student
    config.teacher.name = args.teacher
    config.teacher.checkpoint = "random"
    config.student.dtype = config.teacher.dtype = args.dtype
    config.train.batch_size = args.batch
    if distill:
        config.distill.terms = method_terms("cwd_logits")
    return config


def measure(args, distill: bool) -> dict:
    config = step_config(args, distill)
    mesh = sharding.make_mesh(jax.devices()[:1])
    start = time.perf_counter()
    exp = train.setup(config, mesh=mesh)
    state = exp.init_state()
    rng = np.random.default_rng(0)
    h, w = config.data.crop_size
    batch = sharding.global_batch(
        {"image": rng.normal(size=(args.batch, h, w, 3)).astype(np.float32),
         "label": rng.integers(0, 8, size=(args.batch, h, w)).astype(np.int32)}, mesh)
    step = exp.compiled_step()
    state, metrics = step(state, exp.teacher_inputs(), batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        tick = time.perf_counter()
        state, metrics = step(state, exp.teacher_inputs(), batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    return {"distill": distill, "setup_and_compile_s": compile_seconds, "step_s_median": median,
            "step_s_min": min(times), "step_s_max": max(times),
            "images_per_s": args.batch / median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(360, 360), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--student", default="deeplabv3_resnet18")
    parser.add_argument("--teacher", default="deeplabv3_resnet101")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--without-distillation-only", action="store_true",
                        help="measure only the student's step (no teacher, no KD terms)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    runs = [measure(args, distill=False)]
    if not args.without_distillation_only:
        runs.append(measure(args, distill=True))
    for run in runs:
        kind = f"distillation ({args.teacher} → {args.student})" if run["distill"] else \
            f"student alone ({args.student})"
        print(f"{kind}, {args.size[0]}×{args.size[1]}, batch {args.batch}, {args.dtype}: "
              f"{run['images_per_s']:.3f} images/s (step {run['step_s_median']:.2f} s, "
              f"{run['step_s_min']:.2f}–{run['step_s_max']:.2f}), setup+compile "
              f"{run['setup_and_compile_s']:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
