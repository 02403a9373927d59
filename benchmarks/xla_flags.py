"""XLA CPU options against kdjax's student train step: which flags, dtypes or thread settings make
the step faster on this machine.

    python benchmarks/xla_flags.py [--size H W] [--batch N] [--steps K] [--rounds R]
                                   [--variants NAME,...] [--json FILE] [--write]
    python benchmarks/xla_flags.py --from_json FILE [--write]     # the table of a saved run

Each variant is a set of ``XLA_FLAGS`` (and optionally the compute dtype) applied to a fresh
process, since XLA reads its flags once at start-up. The process builds the student-alone train
step of ``step.py`` (DeepLabV3-ResNet18 by default: forward, CE + aux CE, backward, SGD), compiles
it, runs one untimed step and times ``--steps`` more; it reports their median. The variants run in
rounds, each round in a rotated order, so that slow drifts of the machine's load fall on all of them;
a variant's ratio is the median over rounds of (baseline time / variant time) within the round
(> 1: the variant is faster). A flag this XLA build does not know makes the process fail at
start-up; the variant is then reported as rejected. Every variant first checks that its first-step
loss equals the baseline's within 1e-3 relative (fast-math and bf16 variants are allowed 5e-2), so
a faster but different step is not mistaken for a speed-up.

``--write`` puts the table into the 'XLA options' section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import results_file  # noqa: E402

SECTION = "## XLA options"
BEGIN, END = "<!-- xla_flags.py: begin -->", "<!-- xla_flags.py: end -->"

# name → (XLA_FLAGS, compute dtype, loss tolerance).
VARIANTS = {
    "baseline": ("", "float32", 1e-3),
    "onednn": ("--xla_cpu_use_onednn=true", "float32", 1e-3),
    "onednn_custom_call": ("--xla_cpu_experimental_onednn_custom_call=true", "float32", 1e-3),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", "float32", 1e-3),
    "fast_math": ("--xla_cpu_enable_fast_math=true", "float32", 5e-2),
    "no_multi_thread_eigen": ("--xla_cpu_multi_thread_eigen=false", "float32", 1e-3),
    "bfloat16": ("", "bfloat16", 5e-2),
    # Which operations XLA hands to YNNPACK (this jaxlib's default: convolutions, dots, reductions
    # and the element-wise operations fused into them).
    "ynn_without_reduce": ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution,dot,eltwise",
                           "float32", 1e-3),
    "ynn_without_convolution": ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce,eltwise",
                                "float32", 1e-3),
}


def child(args) -> dict:
    """Runs in the variant's process: compile and time the student-alone step."""
    import step

    dtype = VARIANTS[args.child][1]
    batch = step.make_batch(args)
    impl, _, _ = step.kdjax_train_step(args, dtype, distill=False, batch=batch)
    impl.call()  # the untimed first step
    first_loss = float(impl.last["metrics"]["loss"])
    times = [step.timed(impl.call) for _ in range(args.steps)]
    return {"variant": args.child, "median_s": statistics.median(times), "times_s": times,
            "compile_s": impl.extra["compile_s"], "first_loss": first_loss}


def run_variant(name: str, args) -> dict:
    flags, _, _ = VARIANTS[name]
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, __file__, "--child", name, "--size", *map(str, args.size),
               "--batch", str(args.batch), "--steps", str(args.steps),
               "--student", args.student]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"variant": name, "error": lines[-1][:200] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    names = args.variants
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        results = {name: run_variant(name, args) for name in order}
        rounds.append(results)
        print(f"round {r + 1}: " + ", ".join(
            f"{n} {results[n]['median_s'] * 1e3:.0f} ms" if "median_s" in results[n]
            else f"{n} rejected" for n in names), file=sys.stderr)
    summary = []
    for name in names:
        runs = [rnd[name] for rnd in rounds]
        if any("error" in run for run in runs):
            summary.append({"variant": name, "flags": VARIANTS[name][0], "dtype": VARIANTS[name][1],
                            "status": "rejected", "error": next(run["error"] for run in runs
                                                                if "error" in run)})
            continue
        tolerance = VARIANTS[name][2]
        reference = rounds[0]["baseline"]["first_loss"]
        if any(abs(run["first_loss"] - reference) > tolerance * abs(reference) for run in runs):
            summary.append({"variant": name, "flags": VARIANTS[name][0], "dtype": VARIANTS[name][1],
                            "status": "mismatch", "error": f"first-step loss {runs[0]['first_loss']:.5g} "
                                                           f"against the baseline's {reference:.5g}"})
            continue
        ratios = [rnd["baseline"]["median_s"] / rnd[name]["median_s"] for rnd in rounds]
        times = [run["median_s"] for run in runs]
        summary.append({"variant": name, "flags": VARIANTS[name][0], "dtype": VARIANTS[name][1],
                        "status": "ok", "median_ms": 1e3 * statistics.median(times),
                        "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
                        "ratio": statistics.median(ratios),
                        "compile_s": statistics.median(run["compile_s"] for run in runs)})
    return {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "size": list(args.size),
            "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
            "student": args.student, "load_average": round(os.getloadavg()[0], 2),
            "variants": summary}


def table(result: dict) -> str:
    h, w = result["size"]
    lines = [BEGIN,
             f"Student-alone train step ({result['student']}, {h}×{w}, batch {result['batch']}), "
             f"median of {result['steps']} steps per process, {result['rounds']} rounds in rotated "
             f"order; load average {result['load_average']} at the end.",
             "", f"    python benchmarks/{result['command']}", "",
             "| variant | XLA_FLAGS | dtype | step ms (min–max over rounds) | speed vs baseline | "
             "compile s |", "|---|---|---|---|---:|---:|"]
    for v in result["variants"]:
        flags = f"`{v['flags']}`" if v["flags"] else "—"
        if v["status"] != "ok":
            lines.append(f"| {v['variant']} | {flags} | {v['dtype']} | {v['status']}: {v['error']} "
                         "| – | – |")
            continue
        lines.append(f"| {v['variant']} | {flags} | {v['dtype']} | {v['median_ms']:.0f} "
                     f"({v['min_ms']:.0f}–{v['max_ms']:.0f}) | {v['ratio']:.2f}× | "
                     f"{v['compile_s']:.0f} |")
    return "\n".join(lines + [END]) + "\n"


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The student step of step.py as it is built by default: full-width networks, 'auto' kernels.
    parser.set_defaults(demo=False, kernels="auto")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--student", default="deeplabv3_resnet18")
    parser.add_argument("--teacher", default="deeplabv3_resnet18", help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--from_json", default=None, help=results_file.FROM_JSON_HELP)
    args = parser.parse_args(argv)
    if args.from_json:
        writer = results_file.section_writer(SECTION, BEGIN, END) if args.write else None
        return results_file.replay(args.from_json, table, writer)
    if args.child:
        print(json.dumps(child(args)))
        return None
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or "baseline" not in args.variants:
        raise SystemExit(f"--variants must include 'baseline' and name only {', '.join(VARIANTS)}")
    result = measure(args)
    results_file.emit(result, table(result), json_path=args.json, write=args.write,
                      section=SECTION, begin=BEGIN, end=END)
    return result


if __name__ == "__main__":
    main()
