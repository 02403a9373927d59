"""The demo's wall time as a new user meets it: `kdjax compare` from an empty compilation cache,
beside a measure of how fast the host is at that moment.

    python benchmarks/demo_time.py [--runs N] [--config FILE] [--isa ISA] [--json FILE]
                                   [-- OVERRIDE ...]

Each run starts the `kdjax` command in a fresh process with a new, empty
``JAX_COMPILATION_CACHE_DIR`` and a new workdir (both removed afterwards), as `make demo` does on
a fresh machine, the install aside. Reported per run:

- wall time, and the user and system CPU time of the command and its children: the demo is
  mostly compiling, and on 2 cores its CPU time over two is the floor of its wall time;
- the host's speed just before the run: the seconds a fixed pure-Python loop takes in a fresh
  interpreter (one core, no memory traffic). Shared virtual machines change speed from hour to
  hour; runs compare only at similar probe times, and a wall time quoted without its probe says
  little (``benchmarks/NOTES.md`` items 49, 57 and 60);
- the comparison's table (mIoU and step time per method), and whether every run computed the same
  table: different numbers mean different work, not a slower host.

``--isa AVX2`` caps XLA's code generation at that instruction set (``--xla_cpu_max_isa``), so an
AVX-512 host measures the AVX2 code. Arguments after ``--`` go to `kdjax compare` as they are
(``--config.seeds='(0,1)'``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import losses  # noqa: E402

ROOT = Path(__file__).parents[1]
# 2.7 s on the 2-core AMD EPYC (AVX2) of benchmarks/NOTES.md item 60, in the slowest hour measured there;
# it scales with the host's single-core speed.
PROBE = "s = 0\nfor i in range(20_000_000):\n    s += i\n"


def probe_seconds() -> float:
    """Seconds of :data:`PROBE` in a fresh interpreter, the interpreter's start excluded."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    empty = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", PROBE], check=True)
    return time.perf_counter() - start - empty


def children_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def table_rows(workdir: Path) -> list[dict]:
    """(method, seed, mIoU, step ms) of each row of the comparison's ``results.json``."""
    rows = json.loads((workdir / "results.json").read_text())
    return [{"method": r["method"], "seed": r["seed"], "miou": round(r["miou"], 2),
             "step_ms": round(1000 * r["step_seconds"], 1)} for r in rows]


def timed_run(config: str, overrides: list[str], log: Path) -> dict:
    """One `kdjax compare` of ``config`` from an empty compilation cache in a new workdir."""
    scratch = Path(tempfile.mkdtemp(prefix="kdjax_demo_time_"))
    try:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(scratch / "xla_cache")}
        command = [sys.executable, "-m", "kdjax", "compare", f"--config={config}",
                   f"--workdir={scratch / 'workdir'}", *overrides]
        probe = probe_seconds()
        load = os.getloadavg()[0]
        user0, system0 = children_cpu()
        start = time.perf_counter()
        with log.open("a") as out:
            proc = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
        user1, system1 = children_cpu()
        if proc.returncode != 0:
            raise SystemExit(f"demo_time.py: `{' '.join(command)}` failed with status "
                             f"{proc.returncode}; its output is in {log}.")
        return {"probe_s": round(probe, 2), "load_average": round(load, 2),
                "wall_s": round(wall, 1), "user_s": round(user1 - user0, 1),
                "system_s": round(system1 - system0, 1),
                "rows": table_rows(scratch / "workdir")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scores(run: dict) -> tuple:
    """A run's table without its step times, which vary with the host."""
    return tuple((row["method"], row["seed"], row["miou"]) for row in run["rows"])


def report(result: dict) -> str:
    lines = [f"Machine: {losses.cpu_description(result['machine'])}, "
             f"{result['machine']['cores']} cores, {result['machine']['ram_gb']} GB RAM; "
             f"Python {result['machine']['python']}, jax {result['machine']['jax']}.",
             "", f"    {result['command']}", "",
             "| run | wall (s) | user CPU (s) | system CPU (s) | probe (s) | load average |",
             "|---:|---:|---:|---:|---:|---:|"]
    for i, run in enumerate(result["runs"]):
        lines.append(f"| {i + 1} | {run['wall_s']} | {run['user_s']} | {run['system_s']} | "
                     f"{run['probe_s']} | {run['load_average']} |")
    lines.append("")
    lines.append("Tables: " + ("identical in every run" if result["same_tables"]
                               else "DIFFERENT between runs (different work)") + "; the first:")
    lines.append("")
    lines.append("| method | seed | mIoU | step (ms) |")
    lines.append("|---|---:|---:|---:|")
    for row in result["runs"][0]["rows"]:
        lines.append(f"| {row['method']} | {row['seed']} | {row['miou']:.2f} | {row['step_ms']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs, one after the other")
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "demo_time.log",
                        help="the runs' output (appended)")
    losses.add_isa_option(parser)
    args = parser.parse_args(own)
    losses.limit_isa(args.isa)
    runs = []
    for i in range(args.runs):
        runs.append(timed_run(args.config, overrides, args.log))
        print(f"run {i + 1}: {runs[-1]['wall_s']} s wall, {runs[-1]['user_s']} s user CPU, "
              f"probe {runs[-1]['probe_s']} s", flush=True)
    result = {
        "command": "python benchmarks/demo_time.py " + " ".join(argv),
        "machine": losses.machine_info(os.cpu_count() or 1, with_torch=False),
        "runs": runs,
        "same_tables": len({_scores(run) for run in runs}) == 1,
    }
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
