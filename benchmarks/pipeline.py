"""Input-pipeline throughput: training images per second delivered on this machine.

    python benchmarks/pipeline.py [--quick] [--write]

Cases (CIRKD's training settings: random scale 0.5–2.0, crop with padding, flip, ImageNet normalisation):
  - CamVid, 360×360 crops, read from the TFDS builder (prepared on first use from --camvid_dir into
    --data_dir), with and without ``cache``; skipped when the CamVid files are absent.
  - Cityscapes-sized synthetic frames: 1024×2048 PNGs in memory, 512×1024 crops, with and without the
    photometric distortion.

Throughput is the median over timed windows of consecutive batches, after a warm-up window. --write
puts the table into the 'Input pipeline' section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import tensorflow as tf

from kdjax.data import default_data_config, make_train_iterator, synthetic
from kdjax.data.sources import EncodedExample, EncodedSource

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Input pipeline"
# Images/s of the DeepLabV3-R101 → R18 distillation step at 360×360 crops on this CPU, measured by
# `benchmarks/step.py --size 360 360` (RESULTS.md, 'Train step'); larger crops only lower it. The
# pipeline must deliver at least twice this.
TRAIN_STEP_IMAGES_PER_SECOND = 0.101


def images_per_second(iterator, batch_size: int, windows: int, batches_per_window: int) -> list[float]:
    """Rates of ``windows`` timed windows, after one untimed warm-up window (tracing, autotuning)."""
    for _ in range(batches_per_window):
        next(iterator)
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(batches_per_window):
            next(iterator)
        rates.append(batch_size * batches_per_window / (time.perf_counter() - start))
    return rates


def train_config(crop_size, **overrides):
    config = default_data_config()
    config.crop_size = crop_size
    config.update(overrides)
    return config


def camvid_cases(args, windows, batches):
    if not Path(args.camvid_dir, "train.txt").is_file():
        print(f"CamVid not found in {args.camvid_dir}; skipping its cases", file=sys.stderr)
        return []
    rows = []
    for cache in (False, True):
        config = train_config((360, 360), name="camvid", data_dir=args.data_dir, manual_dir=args.camvid_dir,
                              cache=cache)
        iterator = make_train_iterator(config, global_batch_size=args.batch_size, seed=0, process_index=0,
                                       process_count=1)
        rates = images_per_second(iterator, args.batch_size, windows, batches)
        rows.append(("CamVid 480×360 (TFDS)" + (", cache" if cache else ""), "360×360", rates))
    return rows


def cityscapes_sized_cases(args, windows, batches):
    # Rendered once and PNG-encoded, so the pipeline decodes full frames as it would Cityscapes files.
    frames = []
    for i in range(args.frames):
        image, label = synthetic.render_scene(synthetic.scene_seed(0, "train", i), 1024, 2048)
        frames.append(EncodedExample(f"frame{i}.png", tf.io.encode_png(image).numpy(),
                                     tf.io.encode_png(label[..., None]).numpy()))
    source = EncodedSource(synthetic.SYNTHETIC_INFO, {"train": frames})
    rows = []
    for photometric in (False, True):
        config = train_config((512, 1024), photometric=photometric)
        iterator = make_train_iterator(config, global_batch_size=args.batch_size, seed=0, process_index=0,
                                       process_count=1, source=source)
        rates = images_per_second(iterator, args.batch_size, windows, batches)
        rows.append(("synthetic 1024×2048 PNG" + (", photometric" if photometric else ""), "512×1024", rates))
    return rows


def table(rows, args, command, load_average) -> str:
    lines = [
        SECTION, "",
        f"Training images/s delivered by `kdjax.data` on {platform.machine()} with {os.cpu_count()} CPU cores "
        f"(TensorFlow {tf.__version__}; load average {load_average:.1f} from other jobs when the run started), "
        f"batch {args.batch_size}, random scale 0.5–2.0, crop with padding, flip, ImageNet normalisation, "
        f"`num_parallel_calls` AUTOTUNE. Median (min–max) over timed windows after a warm-up window.", "",
        f"    {command}", "",
        "| data | crop | images/s | min–max |",
        "|---|---|---|---|",
    ]
    for name, crop, rates in rows:
        lines.append(f"| {name} | {crop} | {statistics.median(rates):.1f} | {min(rates):.1f}–{max(rates):.1f} |")
    full_size = statistics.median(rows[-2][2])  # Cityscapes-sized frames, no photometric distortion
    step = TRAIN_STEP_IMAGES_PER_SECOND
    lines += [
        "",
        f"Against the train step: the DeepLabV3-R101 → R18 distillation step consumes {step:g} images/s "
        f"on this CPU at 360×360 crops (`benchmarks/step.py`, section 'Train step'), and less at "
        f"512×1024. The pipeline delivers {full_size:.1f} images/s at 512×1024, "
        f"{full_size / step:.0f}× what the step needs at the smaller crop, against the required 2×.",
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Replaces the 'Input pipeline' section of RESULTS.md (or appends it), keeping the other sections."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer frames and windows: a smoke run")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--frames", type=int, default=None, help="synthetic frames rendered (default 16, quick 4)")
    parser.add_argument("--camvid_dir", default=str(Path(__file__).parents[2] / "shared" / "data" / "camvid"))
    parser.add_argument("--data_dir", default=None, help="TFDS data dir for the prepared CamVid (default TFDS's)")
    args = parser.parse_args(argv)
    args.frames = args.frames or (4 if args.quick else 16)
    windows, batches = (2, 2) if args.quick else (5, 4)
    load_average = os.getloadavg()[0]

    rows = camvid_cases(args, windows, batches) + cityscapes_sized_cases(args, windows, batches)
    command = "python benchmarks/pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows, args, command.strip(), load_average)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
