"""Peak memory as the pixels grow: of the relational losses, dense against blockwise and Gram, and
of the train step.

    python benchmarks/memory.py [--quick] [--sides 32,64,96,128] [--losses NAME,...]
                                [--block_size 256] [--json FILE] [--write]
    python benchmarks/memory.py --train_step [--quick] [--sides 128,256,384,512] [--batch 8]
                                [--torch] [--json FILE] [--write]
    python benchmarks/memory.py --from_json FILE [--write]     # the table of a saved run

``pixel_feature_similarity``, ``skd_pairwise`` and ``cirkd_minibatch`` compare P×P affinity maps
(P = H·W pixels). With ``block_size=None`` they materialise the maps, O(P²) memory; with an int
``block_size`` they scan over blocks of rows, O(P·block_size). PFS and SKD also have the
Gram form (``form='gram'``), which never forms a P×P map: O(C²) scratch memory besides the
O(P·C) normalised features. For each loss, form and
feature size H = W = side (N = 2 images, C = 128 channels for student and teacher, the losses'
default options) the script compiles the jitted forward + backward step (loss and gradient with
respect to the student feature) and reads XLA's compiled memory analysis: ``temp_size_in_bytes``,
the scratch memory the step needs besides its inputs and outputs. Nothing is executed, so sizes
whose dense maps would not fit in RAM can be measured too. Both modes compile under the XLA flags
that the ``kdjax`` command sets (``kdjax.runtime.cpu_flags``), whose memory-saving scheduler decides
which buffers the programs can share.

The growth exponent is the slope of log(temp) against log(P), fitted by least squares over all sizes,
and between the two largest sizes: ~2 for the dense form (quadratic), ~1 for the blockwise one
(linear). ``skd_pairwise`` max-pools 2×2 first, so its maps have P/4 cells.

``--train_step``: the compiled float32 train steps of ``benchmarks/step.py`` (DeepLabV3-ResNet18
alone, and distilled from DeepLabV3-ResNet101 with CWD), batch ``--batch`` (8), for square crops
of each side, compiled as ``step.py`` compiles them.
Reported: XLA's peak, arguments + outputs + temporaries − donated (the MB column of
``step.py``'s table), and the exponent of the temporaries against the pixels. This is the CPU
program, with its CPU forms (Winograd's convolutions, the schedule ties); TPU and GPU compile
their own. ``--torch`` adds PyTorch's peak for the same steps, measured as ``step.py`` measures
it (this runs them). ``--quick``: 64 and 96 pixels a side, batch 2, ResNet-18 as the teacher.

``--write`` puts each table into the 'Memory' section of benchmarks/RESULTS.md, between its own
markers.
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

from kdjax.runtime.cpu_flags import add_cpu_flags  # noqa: E402

SECTION = "## Memory"
BEGIN, END = "<!-- memory.py: begin -->", "<!-- memory.py: end -->"
STEP_BEGIN, STEP_END = "<!-- memory.py train step: begin -->", "<!-- memory.py train step: end -->"

BATCH, CHANNELS = 2, 128
SIDES, QUICK_SIDES = (32, 64, 96, 128), (16, 32, 48)
LOSSES = ("pixel_feature_similarity", "skd_pairwise", "cirkd_minibatch")
STEP_SIDES, QUICK_STEP_SIDES = (128, 256, 384, 512), (64, 96)
STEP_BATCH, QUICK_STEP_BATCH = 8, 2
STEP_CASES = {"student_alone": False, "distill": True}     # case -> with the distillation terms


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


def exponents(pixels: list[int], values: list[float]) -> tuple[float, float]:
    """Growth exponent of ``values`` against ``pixels``: least squares over all, and between the
    two largest."""
    last = math.log(values[-1] / values[-2]) / math.log(pixels[-1] / pixels[-2])
    return slope(pixels, values), last


def measure(losses: list[str], sides: list[int], block_size: int) -> list[dict]:
    rows = []
    pixels = [s * s for s in sides]
    for loss in losses:
        for form, options in forms(loss, block_size).items():
            stats = [step_memory(loss, side, options) for side in sides]
            temps = [s["temp"] for s in stats]
            fit, last = exponents(pixels, temps)
            row = {"loss": loss, "form": form, "options": options, "sides": sides, "pixels": pixels,
                   "temp_bytes": temps, "argument_bytes": [s["argument"] for s in stats],
                   "output_bytes": [s["output"] for s in stats],
                   "exponent_fit": fit, "exponent_last": last}
            rows.append(row)
            print(f"{loss:26s} {form:10s} " + " ".join(f"{t / 2**20:10.1f}" for t in temps)
                  + f"  exponent {row['exponent_fit']:.2f}", file=sys.stderr, flush=True)
    return rows


def train_step_memory(sides: list[int], batch: int, student: str, teacher: str,
                      with_torch: bool) -> list[dict]:
    """XLA's memory analysis of each compiled train step of ``step.py`` at each crop side, and with
    ``with_torch`` the peak of the same step in PyTorch (run three times per crop: ``step.py``'s
    warm-up, FLOP count and memory calls)."""
    import step

    pixels = [side * side for side in sides]
    rows = {case: {"case": case, "sides": sides, "pixels": pixels, "peak_bytes": [],
                   "memory_analysis": [], **({"torch_peak_bytes": []} if with_torch else {})}
            for case in STEP_CASES}
    for side in sides:
        args = argparse.Namespace(size=(side, side), batch=batch, student=student, teacher=teacher,
                                  demo=False, kernels="auto")
        batch_arrays = step.make_batch(args)
        for case, distill in STEP_CASES.items():
            impl, _, _ = step.kdjax_train_step(args, "float32", distill, batch_arrays)
            rows[case]["peak_bytes"].append(impl.peak_bytes)
            rows[case]["memory_analysis"].append(impl.extra["memory_analysis"])
        if with_torch:
            torch_cases, _ = step.torch_impls(args, "float32", batch_arrays)
            for case in STEP_CASES:
                rows[case]["torch_peak_bytes"].append(torch_cases[case].peak_bytes)
        for case, row in rows.items():
            torch_part = (f", PyTorch {mb(row['torch_peak_bytes'][-1])} MB" if with_torch else "")
            print(f"{case:14s} {side}×{side}: peak {mb(row['peak_bytes'][-1])} MB, temporaries "
                  f"{mb(row['memory_analysis'][-1]['temp'])} MB{torch_part}", file=sys.stderr, flush=True)
    for row in rows.values():
        row["temp_exponent_fit"], row["temp_exponent_last"] = exponents(
            pixels, [a["temp"] for a in row["memory_analysis"]])
    return list(rows.values())


def mb(x: float) -> str:
    x /= 2**20
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def table_head(begin: str, description: str, command: str, columns: list[str]) -> list[str]:
    """The lines of a generated table before its rows: the begin marker, what was measured, the
    command, and the header of a table with these columns."""
    return [begin, description, "", f"    {command}", "", "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns)]


def table(result: dict) -> str:
    sides = result["sides"]
    lines = table_head(
        BEGIN,
        f"Compiled forward + backward (loss and gradient w.r.t. the student feature) of the relational "
        f"losses for N = {BATCH}, C = {CHANNELS} (student and teacher), default options, on "
        f"{result['machine']['machine']} (jax {result['machine']['jax']}), "
        + (f"XLA_FLAGS `{result['xla_flags']}` (the `kdjax` command's). " if "xla_flags" in result
           else "XLA's default flags. ")
        + "XLA's compiled memory analysis, "
        f"`temp_size_in_bytes` in MB: the step's scratch memory besides its inputs and outputs "
        f"(compiled, not executed). Exponent: slope of log(temp) against log(P), least squares over all "
        f"sizes / between the two largest.",
        result["command"],
        ["loss", "form", *(f"{s}×{s} (P = {s * s})" for s in sides), "exponent (fit / last)"])
    for r in result["rows"]:
        lines.append(f"| {r['loss']} | {r['form']} | " + " | ".join(mb(t) for t in r["temp_bytes"])
                     + f" | {r['exponent_fit']:.2f} / {r['exponent_last']:.2f} |")
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


def step_table(result: dict) -> str:
    lines = table_head(
        STEP_BEGIN,
        f"Compiled float32 train steps of `benchmarks/step.py` ({result['student']} alone, and "
        f"distilled from {result['teacher']} with CWD), batch {result['batch']}, square crops, on "
        f"{result['machine']['machine']} (jax {result['machine']['jax']}), under the `kdjax` "
        "command's XLA flags. Peak in MB: XLA's buffer assignment, arguments + outputs + "
        "temporaries − donated (compiled, not executed). Exponent: slope of log(temporaries) "
        "against log(P), least squares over all sizes / between the two largest. The CPU "
        "program; TPU and GPU compile their own.",
        result["command"],
        ["step", *(f"{s}×{s}" for s in result["sides"]), "temporaries exponent (fit / last)"])
    for r in result["rows"]:
        peaks = [mb(p) for p in r["peak_bytes"]]
        if "torch_peak_bytes" in r:
            peaks = [f"{k} / {mb(t)}" for k, t in zip(peaks, r["torch_peak_bytes"])]
        lines.append(f"| {r['case']} | " + " | ".join(peaks)
                     + f" | {r['temp_exponent_fit']:.2f} / {r['temp_exponent_last']:.2f} |")
    if any("torch_peak_bytes" in r for r in result["rows"]):
        lines += ["", "Each cell: kdjax / PyTorch eager (`step.py`'s measure: the tensors held at the "
                  "start plus the allocator's peak during the step, from torch.profiler)."]
    lines.append(STEP_END)
    return "\n".join(lines) + "\n"


def any_table(result: dict) -> str:
    """The table of a saved result of either mode."""
    return step_table(result) if "student" in result else table(result)


def write_section(text: str) -> None:
    """Replaces the generated part of the 'Memory' section that ``text`` carries the markers of (or
    appends the section)."""
    begin, end = (STEP_BEGIN, STEP_END) if STEP_BEGIN in text else (BEGIN, END)
    results_file.write_generated(SECTION, begin, end, text)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"sides {QUICK_SIDES} ({QUICK_STEP_SIDES} with --train_step): a smoke run")
    parser.add_argument("--sides", default=None,
                        help=f"comma list of H = W (default {SIDES}; {STEP_SIDES} with --train_step)")
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma list of loss names")
    parser.add_argument("--block_size", type=int, default=256, help="rows per block of the blockwise form")
    parser.add_argument("--train_step", action="store_true",
                        help="the train steps' memory instead of the relational losses'")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"images per train step (default {STEP_BATCH}, quick {QUICK_STEP_BATCH})")
    parser.add_argument("--torch", action="store_true",
                        help="with --train_step: PyTorch's peak for the same steps (runs them)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--from_json", default=None, help=results_file.FROM_JSON_HELP)
    args = parser.parse_args(argv)
    if args.from_json:
        return results_file.replay(args.from_json, any_table, write_section if args.write else None)
    defaults = ((QUICK_STEP_SIDES if args.quick else STEP_SIDES) if args.train_step
                else (QUICK_SIDES if args.quick else SIDES))
    sides = [int(s) for s in args.sides.split(",") if s] if args.sides else list(defaults)
    losses = [s for s in args.losses.split(",") if s]
    if unknown := set(losses) - set(LOSSES):
        parser.error(f"unknown losses {sorted(unknown)}; choose from {list(LOSSES)}")
    if len(sides) < 2:
        parser.error("--sides needs at least two sizes to fit an exponent")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    add_cpu_flags()  # the programs compiled as the kdjax command compiles them; before JAX starts
    import jax

    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"machine": {"machine": platform.machine(), "jax": jax.__version__},
              "command": command.strip(), "sides": sides,
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if args.train_step:
        import step

        batch = args.batch or (QUICK_STEP_BATCH if args.quick else STEP_BATCH)
        names = step.QUICK if args.quick else {"student": "deeplabv3_resnet18",
                                               "teacher": "deeplabv3_resnet101"}
        result.update(batch=batch, student=names["student"], teacher=names["teacher"],
                      rows=train_step_memory(sides, batch, names["student"], names["teacher"],
                                             args.torch))
        results_file.emit(result, step_table(result), json_path=args.json, write=args.write,
                          section=SECTION, begin=STEP_BEGIN, end=STEP_END)
        return result
    result.update(batch=BATCH, channels=CHANNELS, block_size=args.block_size, losses=losses,
                  rows=measure(losses, sides, args.block_size))
    results_file.emit(result, table(result), json_path=args.json, write=args.write,
                      section=SECTION, begin=BEGIN, end=END)
    return result


if __name__ == "__main__":
    main()
