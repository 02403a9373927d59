"""benchmarks/accelerator_check.py --dry-run: every section runs on the CPU at toy sizes, the JSON
holds sane values, TensorFlow stays out of the process, and the table comes last."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.python_process import plain_cpu_env

ROOT = Path(__file__).parents[2]
SECTIONS = ("environment", "tests", "losses", "step", "student", "compare")


# Slow: a minute. `make test-without-torch` (CI) runs it, with PyTorch hidden.
@pytest.mark.slow
def test_dry_run_writes_every_section_and_prints_the_table_last(tmp_path):
    out = tmp_path / "check.json"
    env = dict(plain_cpu_env(), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator_check.py"),
                           "--dry-run", "--json", str(out)], check=False, cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(out.read_text())
    with_torch = importlib.util.find_spec("torch") is not None

    assert result["dry_run"] and not result["tensorflow_imported"]
    for section in SECTIONS:
        assert "error" not in result[section], result[section]
    assert set(result["section_seconds"]) == set(SECTIONS)

    env = result["environment"]
    assert env["platform"] == "cpu" and env["device_count"] >= 1
    assert {"python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"} <= set(env["versions"])
    assert all(x > 0 for x in env["matmul_tflops"].values())
    assert all(x > 0 for x in env["bandwidth_gbs"].values())
    assert set(env["peak_tflops"]) == {"bfloat16", "float32"}
    assert ("torch float32" in env["matmul_tflops"]) == with_torch

    tests = result["tests"]
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0, tests
    assert tests["exit_code"] == 0 and not tests["timed_out"]
    assert (out.parent / tests["log"]).exists()

    rows = result["losses"]["rows"]
    assert [r["loss"] for r in rows] == ["channel_wise_divergence", "cirkd_memory"]
    for row in rows:
        assert row["status"] == "ok", row
        assert 0 < row["kdjax"]["min_ms"] <= row["kdjax"]["median_ms"] <= row["kdjax"]["max_ms"]
        assert row["kdjax"]["peak_mb"] > 0
        if with_torch:
            assert row["ratio_eager"] > 0 and row["check"]["grad_rel_diff"] < 1e-3
            assert row["torch_compile"]["status"].startswith("skipped: --dry-run")

    step = result["step"]
    assert step["batch"] == 2 and step["size"] == [64, 64] and step["gflop_per_step"] > 0
    variants = {v["name"]: v for v in step["variants"]}
    assert len(variants) == 6
    kdjax = variants["kdjax float32"]
    assert kdjax["status"] == "ok" and kdjax["images_per_s"] > 0 and kdjax["compile_s"] > 0
    assert kdjax["peak_mb"] > 0 and kdjax["mfu_percent"] > 0
    assert variants["kdjax bfloat16"]["status"] == "skipped: --dry-run"
    assert variants["kdjax bfloat16 (XLA kernels)"]["status"] == "skipped: --dry-run"
    assert kdjax["kernels"] == "auto" and kdjax["gflop_traced"] > 0

    student = result["student"]
    assert student["batch"] == 2 and student["gflop_per_step"] > 0
    assert [row["kernels"] for row in student["kernels"]] == ["xla", "auto"]
    for row in student["kernels"]:
        assert row["status"] == "ok" and row["images_per_s"] > 0 and row["mfu_percent"] > 0, row
    torch_variants = ("torch eager float32", "torch eager AMP bf16", "torch.compile AMP bf16")
    if with_torch:
        for name in torch_variants[:2]:
            assert variants[name]["status"] == "ok" and variants[name]["images_per_s"] > 0
        assert variants["torch.compile AMP bf16"]["status"] == "skipped: --dry-run"
        assert variants["torch eager AMP bf16"]["ratio_vs_baseline"] == 1.0
        assert kdjax["ratio_vs_baseline"] > 0
    else:
        # Without PyTorch its variants say so, whatever else would have skipped them.
        assert all(variants[name]["status"] == "skipped: no torch" for name in torch_variants)

    profile = step["profile"]
    assert profile["variant"] == "kdjax float32" and profile["steps"] == 3
    assert (out.parent / profile["trace"]).stat().st_size > 0 and (out.parent / profile["hlo"]).exists()
    busiest = profile["lines"][0]
    assert 0 < busiest["busy_ms"] <= busiest["span_ms"] and 0 < busiest["busy_percent"] <= 100
    assert busiest["top"] and all(e["ms"] > 0 and e["count"] >= 1 for e in busiest["top"])

    assert result["compare"]["status"].startswith("skipped")

    # The table is the last thing printed, after every log line.
    lines = proc.stdout.rstrip().splitlines()
    first = max(i for i, line in enumerate(lines) if line.startswith("== accelerator check:"))
    assert "(dry run)" in lines[first]
    assert lines[-1].startswith("compare: skipped")
    table = "\n".join(lines[first:])
    for text in ("matmul TFLOP/s", "tests (tests/ops/test_ordering.py): ", "| kdjax float32 |",
                 "profile (kdjax float32, 3 steps, profile_step.xplane.pb.gz): ",
                 "| channel_wise_divergence |", "student step alone: ", "| auto |"):
        assert text in table
