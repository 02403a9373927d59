"""Peak memory of the relational losses, dense against blockwise and Gram, as the pixels grow.

    python benchmarks/memory.py [--quick] [--sides 32,64,96,128] [--losses NAME,...]
                                [--block_size 256] [--json FILE] [--write]

``pixel_feature_similarity``, ``skd_pairwise`` and ``cirkd_minibatch`` compare P×P affinity maps
(P = H·W pixels). With ``block_size=None`` they materialise the maps, O(P²) memory; with an int
``block_size`` they scan over blocks of rows, O(P·block_size). PFS and SKD also have the
Gram form (``form='gram'``), which never forms a P×P map: O(C²) scratch memory besides the
O(P·C) normalised features. For each loss, form and
feature size H = W = side (N = 2 images, C = 128 channels for student and teacher, the losses'
default options) the script compiles the jitted forward + backward step (loss and gradient with
respect to the student feature) and reads XLA's compiled memory analysis: ``temp_size_in_bytes``,
the scratch memory the step needs besides its inputs and outputs. Nothing is executed, so sizes
whose dense maps would not fit in RAM can be measured too.

The growth exponent is the slope of log(temp) against log(P), fitted by least squares over all sizes,
and between the two largest sizes: ~2 for the dense form (quadratic), ~1 for the blockwise one
(linear). ``skd_pairwise`` max-pools 2×2 first, so its maps have P/4 cells. ``--write`` puts the table
into the 'Memory' section of benchmarks/RESULTS.md (the part between its markers).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import sys
from pathlib import Path

# Sibling modules of this script (results_file, torch_losses), also when it is loaded by path.
sys.path.insert(0, str(Path(__file__).parent))
import results_file  # noqa: E402

SECTION = "## Memory"
BEGIN, END = "<!-- memory.py: begin -->", "<!-- memory.py: end -->"

BATCH, CHANNELS = 2, 128
SIDES, QUICK_SIDES = (32, 64, 96, 128), (16, 32, 48)
LOSSES = ("pixel_feature_similarity", "skd_pairwise", "cirkd_minibatch")


def forms(loss: str, block_size: int) -> dict[str, dict]:
    """Label -> keyword options of each form of ``loss`` that the table compares: dense and
    blockwise maps, and the Gram form where the loss has one (a ``form`` argument)."""
    from kdjax import losses

    pairs = {"dense": {}, f"block {block_size}": {"block_size": block_size}}
    if "form" not in inspect.signature(getattr(losses, loss)).parameters:
        return pairs
    return {"gram": {"form": "gram"}, **{label: {"form": "pairs", **options}
                                         for label, options in pairs.items()}}


def step_memory(loss: str, side: int, options: dict) -> dict:
    """XLA's memory analysis of the compiled value-and-gradient step for (N, side, side, C) features."""
    import jax
    import jax.numpy as jnp

    from kdjax import losses

    fn = getattr(losses, loss)
    feat = jax.ShapeDtypeStruct((BATCH, side, side, CHANNELS), jnp.float32)
    step = jax.jit(jax.value_and_grad(lambda s, t: fn(s, t, **options)))
    stats = step.lower(feat, feat).compile().memory_analysis()
    return {"temp": stats.temp_size_in_bytes, "argument": stats.argument_size_in_bytes,
            "output": stats.output_size_in_bytes}


def slope(pixels: list[int], values: list[float]) -> float:
    """Least-squares slope of log(values) against log(pixels)."""
    x = [math.log(p) for p in pixels]
    y = [math.log(v) for v in values]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def measure(losses: list[str], sides: list[int], block_size: int) -> list[dict]:
    rows = []
    pixels = [s * s for s in sides]
    for loss in losses:
        for form, options in forms(loss, block_size).items():
            stats = [step_memory(loss, side, options) for side in sides]
            temps = [s["temp"] for s in stats]
            row = {"loss": loss, "form": form, "options": options, "sides": sides, "pixels": pixels,
                   "temp_bytes": temps, "argument_bytes": [s["argument"] for s in stats],
                   "output_bytes": [s["output"] for s in stats],
                   "exponent_fit": slope(pixels, temps),
                   "exponent_last": (math.log(temps[-1] / temps[-2]) / math.log(pixels[-1] / pixels[-2])
                                     if len(sides) > 1 else None)}
            rows.append(row)
            print(f"{loss:26s} {form:10s} " + " ".join(f"{t / 2**20:10.1f}" for t in temps)
                  + f"  exponent {row['exponent_fit']:.2f}", file=sys.stderr, flush=True)
    return rows


def mb(x: float) -> str:
    x /= 2**20
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def table(result: dict) -> str:
    sides = result["sides"]
    lines = [
        BEGIN,
        f"Compiled forward + backward (loss and gradient w.r.t. the student feature) of the relational "
        f"losses for N = {BATCH}, C = {CHANNELS} (student and teacher), default options, on "
        f"{result['machine']['machine']} (jax {result['machine']['jax']}). XLA's compiled memory analysis, "
        f"`temp_size_in_bytes` in MB: the step's scratch memory besides its inputs and outputs "
        f"(compiled, not executed). Exponent: slope of log(temp) against log(P), least squares over all "
        f"sizes / between the two largest.",
        "",
        f"    {result['command']}",
        "",
        "| loss | form | " + " | ".join(f"{s}×{s} (P = {s * s})" for s in sides) + " | exponent (fit / last) |",
        "|---|---|" + "---|" * len(sides) + "---|",
    ]
    for r in result["rows"]:
        last = f"{r['exponent_last']:.2f}" if r["exponent_last"] is not None else "–"
        lines.append(f"| {r['loss']} | {r['form']} | " + " | ".join(mb(t) for t in r["temp_bytes"])
                     + f" | {r['exponent_fit']:.2f} / {last} |")
    by_key = {(r["loss"], r["form"].split()[0]): r for r in result["rows"]}
    block_notes, gram_notes = [], []
    for loss in result["losses"]:
        dense, block, gram = (by_key.get((loss, form)) for form in ("dense", "block", "gram"))
        if dense and block:
            block_notes.append(f"{loss} {dense['temp_bytes'][-1] / block['temp_bytes'][-1]:.0f}×")
        if dense and gram:
            gram_notes.append(f"{loss} {dense['temp_bytes'][-1] / gram['temp_bytes'][-1]:.0f}×")
    side = sides[-1]
    lines += ["", f"Dense / blockwise temporary memory at {side}×{side}: {', '.join(block_notes)}"
              + (f"; dense / Gram: {', '.join(gram_notes)}" if gram_notes else "") + ". "
              f"The dense form grows with P² (one P×P float32 map per image is {mb(4 * side**4)} MB "
              f"at {side}×{side}), the blockwise form with P·block_size, the Gram form with P·C "
              f"(its normalised features).", END]
    return "\n".join(lines) + "\n"


# Replaces the generated part of the 'Memory' section (or appends the section).
write_section = results_file.section_writer(SECTION, BEGIN, END)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"sides {QUICK_SIDES}: a smoke run")
    parser.add_argument("--sides", default=None, help=f"comma list of H = W (default {SIDES})")
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma list of loss names")
    parser.add_argument("--block_size", type=int, default=256, help="rows per block of the blockwise form")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    sides = ([int(s) for s in args.sides.split(",") if s] if args.sides
             else list(QUICK_SIDES if args.quick else SIDES))
    losses = [s for s in args.losses.split(",") if s]
    if unknown := set(losses) - set(LOSSES):
        parser.error(f"unknown losses {sorted(unknown)}; choose from {list(LOSSES)}")
    if len(sides) < 2:
        parser.error("--sides needs at least two sizes to fit an exponent")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"machine": {"machine": platform.machine(), "jax": jax.__version__},
              "command": command.strip(), "batch": BATCH, "channels": CHANNELS, "sides": sides,
              "block_size": args.block_size, "losses": losses,
              "rows": measure(losses, sides, args.block_size)}
    results_file.emit(result, table(result), json_path=args.json, write=args.write,
                      section=SECTION, begin=BEGIN, end=END)
    return result


if __name__ == "__main__":
    main()
