"""Smoke tests of the benchmark scripts: their smallest settings run and write well-formed JSON."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdjax.runtime.cpu_flags import CPU_FLAGS
from tests.python_process import plain_cpu_env, run_python

ROOT = Path(__file__).parents[2]
BENCHMARKS = ROOT / "benchmarks"


def run_script(script, tmp_path, *args):
    """Runs benchmarks/<script> in a fresh process (its own thread settings) and returns its JSON."""
    out = tmp_path / f"{Path(script).stem}.json"
    # The test process simulates 8 devices through XLA_FLAGS; the benchmarks run on the plain CPU.
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
                          cwd=ROOT, env=plain_cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def load_module(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check_loss_rows(result, expected):
    assert set(result) >= {"machine", "command", "sizes", "rtol", "settings", "cases",
                           "meets_target", "misses_target"}
    assert {"cpu", "cores", "ram_gb", "jax", "torch", "threads", "torch_threads"} <= set(result["machine"])
    assert result["machine"]["torch_threads"] == result["machine"]["threads"]
    assert [(r["loss"], r["variant"]) for r in result["cases"]] == expected
    for row in result["cases"]:
        assert row["status"] == "ok", row
        assert row["check"]["value_rel_diff"] <= result["rtol"]
        assert row["check"]["grad_rel_diff"] < 1e-3
        for side in ("kdjax", "torch_eager"):
            timing = row[side]
            assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
            assert timing["reps"] >= 2 and timing["peak_mb"] > 0
        assert row["kdjax"]["memory_analysis"]["argument"] > 0
        ratio = row["torch_eager"]["median_ms"] / row["kdjax"]["median_ms"]
        assert row["ratio_eager"] == pytest.approx(ratio)
    named = {name.split(" (")[0] for name in result["meets_target"] + result["misses_target"]}
    assert named == {loss for loss, _ in expected}


@pytest.mark.torch
def test_losses_quick_small(tmp_path):
    pytest.importorskip("torch")
    result, stdout = run_script("losses.py", tmp_path, "--quick", "--sizes", "small",
                                "--losses", "pixel_kd,pixel_feature_similarity")
    check_loss_rows(result, [("pixel_kd", ""), ("pixel_feature_similarity", "gram"),
                             ("pixel_feature_similarity", "dense"),
                             ("pixel_feature_similarity", "block 256")])
    assert result["sizes"] == ["small"] and result["quick"]
    for row in result["cases"]:
        assert row["torch_compile"]["status"].startswith("skipped")
        assert row["shapes"]["student"][0] == 2
    assert "<!-- losses.py: begin -->" in stdout and "| pixel_kd |" in stdout
    # --from_json renders the same table from the saved results without measuring.
    saved = tmp_path / "losses.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "losses.py"), "--from_json", str(saved)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == stdout


def test_memory_quick(tmp_path):
    result, stdout = run_script("memory.py", tmp_path, "--quick")
    assert set(result) >= {"machine", "command", "sides", "block_size", "losses", "rows", "xla_flags"}
    assert set(CPU_FLAGS) <= set(result["xla_flags"].split())
    assert f"XLA_FLAGS `{result['xla_flags']}`" in stdout
    forms = [(r["loss"], r["form"]) for r in result["rows"]]
    assert forms == ([(loss, form) for loss in ("pixel_feature_similarity", "skd_pairwise")
                      for form in ("gram", "dense", "block 256")]
                     + [("cirkd_minibatch", "dense"), ("cirkd_minibatch", "block 256")])
    for row in result["rows"]:
        assert len(row["temp_bytes"]) == len(result["sides"]) == len(row["pixels"])
        assert all(t > 0 for t in row["temp_bytes"])
    by_form = {(r["loss"], r["form"]): r for r in result["rows"]}
    for loss in ("pixel_feature_similarity", "cirkd_minibatch"):
        # At these small sizes the per-image maps share the scratch with linear terms: PFS's dense
        # exponent was 1.72 between 32×32 and 48×48 (1.95 between 96×96 and 128×128).
        assert by_form[(loss, "dense")]["exponent_last"] > 1.6
        assert by_form[(loss, "block 256")]["exponent_last"] < 1.2
    assert by_form[("pixel_feature_similarity", "gram")]["exponent_last"] < 1.2
    assert "| cirkd_minibatch | dense |" in stdout
    assert "dense / Gram: pixel_feature_similarity" in stdout


@pytest.mark.slow
def test_memory_train_step_quick(tmp_path):
    result, stdout = run_script("memory.py", tmp_path, "--train_step", "--quick")
    assert result["sides"] == [64, 96] and result["batch"] == 2
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in result["xla_flags"]
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"student_alone", "distill"}
    for row in rows.values():
        for peak, analysis in zip(row["peak_bytes"], row["memory_analysis"]):
            assert peak == (analysis["argument"] + analysis["output"] + analysis["temp"]
                            - analysis["alias"])
            assert analysis["temp"] > 0 and analysis["argument"] > 0
    # The distillation step also takes the teacher's weights.
    assert all(d > s for d, s in zip(rows["distill"]["peak_bytes"], rows["student_alone"]["peak_bytes"]))
    assert "<!-- memory.py train step: begin -->" in stdout and "| distill |" in stdout
    replay = subprocess.run([sys.executable, str(BENCHMARKS / "memory.py"), "--from_json",
                             str(tmp_path / "memory.json")], cwd=ROOT, env=plain_cpu_env(),
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert replay.stdout == stdout


def test_memory_writes_each_table_between_its_own_markers(tmp_path, monkeypatch):
    memory = load_module("memory")
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(memory.results_file, "RESULTS", results)
    results.write_text(f"# Benchmark results\n\n{memory.SECTION}\n\n{memory.BEGIN}\nlosses 1\n"
                       f"{memory.END}\n\nprose\n\n{memory.STEP_BEGIN}\nstep 1\n{memory.STEP_END}\n"
                       "\n## Train step\n")
    memory.write_section(f"{memory.STEP_BEGIN}\nstep 2\n{memory.STEP_END}\n")
    memory.write_section(f"{memory.BEGIN}\nlosses 2\n{memory.END}\n")
    assert results.read_text() == (
        f"# Benchmark results\n\n{memory.SECTION}\n\n{memory.BEGIN}\nlosses 2\n{memory.END}\n\n"
        f"prose\n\n{memory.STEP_BEGIN}\nstep 2\n{memory.STEP_END}\n\n## Train step\n")


def test_write_replaces_only_the_generated_part(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Input pipeline\n\npipeline table\n")
    for name, begin, end in (("losses", "<!-- losses.py: begin -->", "<!-- losses.py: end -->"),
                             ("memory", "<!-- memory.py: begin -->", "<!-- memory.py: end -->")):
        module = load_module(name)
        monkeypatch.setattr(module.results_file, "RESULTS", results)
        module.write_section(f"{begin}\nfirst\n{end}\n")
        text = results.read_text()
        results.write_text(text.replace(f"{end}\n", f"{end}\n\nNotes kept across runs.\n"))
        module.write_section(f"{begin}\nsecond\n{end}\n")
        text = results.read_text()
        assert "second" in text and "first" not in text and "Notes kept across runs." in text
        assert text.startswith("# Benchmark results\n\n## Input pipeline\n\npipeline table\n")
        assert text.count(module.SECTION) == 1


# The machine record of a benchmark result, for the tests that render tables from made-up results.
MACHINE = {"cpu": "CPU", "machine": "x86_64", "cores": 2, "ram_gb": 1, "python": "3.11", "jax": "0",
           "torch": "0", "threads": 2, "torch_threads": 2, "xla_flags": "", "load_average": 0.0}


def step_result(dtypes, median_ms):
    """A ``benchmarks/step.py`` result with one block per dtype, every case at ``median_ms``."""
    side = {"median_ms": median_ms, "min_ms": median_ms, "max_ms": median_ms, "reps": 3,
            "images_per_s": 1.0, "gflop": 100.0, "peak_mb": 10.0, "compile_s": 1.0,
            "gflop_with_padding": 120.0}
    cases = {case: {"kdjax": side, "torch": side, "ratio": 1.0}
             for case in ("teacher_forward", "student_alone", "distill")}
    blocks = [{"dtype": dtype, "cases": cases, "overhead_percent": {"kdjax": -100.0, "torch": -100.0},
               "overhead_target_met": {"kdjax": True, "torch": True}, "step_target_met": True}
              for dtype in dtypes]
    return {"machine": MACHINE, "command": "python benchmarks/step.py", "blocks": blocks,
            "settings": {"size": [64, 64], "batch": 2, "reps": 3, "student": "s", "teacher": "t",
                         "classes": 19, "host_memory": "kept"},
            "matmul_peak_gflops": {"kdjax": 100.0, "torch": 100.0}}


def test_step_writes_each_dtype_between_its_own_markers(tmp_path, monkeypatch):
    step = load_module("step")
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(step.results_file, "RESULTS", results)
    before = ("# Benchmark results\n\n## Train step\n\n<!-- step.py: begin -->\nold float32\n"
              "<!-- step.py: end -->\n\nfloat32 notes\n\n### bfloat16 compute\n\nbfloat16 notes\n\n"
              "<!-- step.py bfloat16: begin -->\nold bfloat16\n<!-- step.py bfloat16: end -->\n\n"
              "more bfloat16 notes\n\n## Convolutions\n\nconvolution table\n")
    results.write_text(before)
    step.write_section(step.table(step_result(["float32", "bfloat16"], 1234.0)))
    text = results.read_text()
    assert "old float32" not in text and "old bfloat16" not in text
    float32_part = text[text.index("## Train step"):text.index("float32 notes")]
    bfloat16_part = text[text.index("bfloat16 notes"):text.index("more bfloat16 notes")]
    assert "| distill | float32 | 1,234" in float32_part and "bfloat16 |" not in float32_part
    assert "| distill | bfloat16 | 1,234" in bfloat16_part and "float32 |" not in bfloat16_part
    assert text.endswith("more bfloat16 notes\n\n## Convolutions\n\nconvolution table\n")
    # A bfloat16-only run replaces the bfloat16 table and leaves the float32 one.
    step.write_section(step.table(step_result(["bfloat16"], 5678.0)))
    text = results.read_text()
    assert "| distill | float32 | 1,234" in text and "| distill | bfloat16 | 5,678" in text
    assert "| distill | bfloat16 | 1,234" not in text
    assert text.count("<!-- step.py: begin -->") == text.count("<!-- step.py bfloat16: begin -->") == 1


@pytest.mark.slow
@pytest.mark.torch
def test_losses_quick_every_loss(tmp_path):
    pytest.importorskip("torch")
    result, _ = run_script("losses.py", tmp_path, "--quick", "--sizes", "small")
    expected = [(case.loss, label) for case in load_module("losses").cases() for label in case.variants]
    check_loss_rows(result, expected)


def test_losses_benchmark_has_a_case_for_every_registered_loss_function():
    from kdjax.distill import ADAPTERS

    registered = {fn.__name__ for adapter in ADAPTERS.values() for fn in adapter.functions}
    # The task loss, and the SKD discriminator's hinge losses, which act on its scores (no map).
    registered = registered - {"skd_adversarial_losses"} | {"cross_entropy"}
    assert registered <= {case.loss for case in load_module("losses").cases()}


@pytest.mark.slow
@pytest.mark.torch
def test_step_quick(tmp_path):
    pytest.importorskip("torch")
    result, stdout = run_script("step.py", tmp_path, "--quick")
    assert set(result) >= {"machine", "command", "settings", "parameters", "matmul_peak_gflops", "blocks"}
    assert result["machine"]["torch_threads"] == result["machine"]["threads"]
    assert result["settings"]["size"] == [64, 64] and result["settings"]["batch"] == 2
    assert all(v > 0 for v in result["matmul_peak_gflops"].values())
    assert result["parameters"]["student"]["kdjax"] == result["parameters"]["student"]["torch"]
    [block] = result["blocks"]
    assert block["dtype"] == "float32"
    cases = block["cases"]
    assert set(cases) == {"teacher_forward", "student_alone", "distill"}
    for row in cases.values():
        for side in ("kdjax", "torch"):
            timing = row[side]
            assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
            assert timing["reps"] == 2 and timing["gflop"] > 0 and timing["peak_mb"] > 0
        assert row["kdjax"]["compile_s"] > 0
        assert row["ratio"] == pytest.approx(row["torch"]["median_ms"] / row["kdjax"]["median_ms"])
    flops = cases["student_alone"]["kdjax"]["gflop"], cases["student_alone"]["torch"]["gflop"]
    assert max(flops) / min(flops) < 1.5
    for side in ("kdjax", "torch"):
        ms = {case: row[side]["median_ms"] for case, row in cases.items()}
        expected = 100 * (ms["distill"] - ms["teacher_forward"] - ms["student_alone"]) / ms["student_alone"]
        assert block["overhead_percent"][side] == pytest.approx(expected)
        assert isinstance(block["overhead_target_met"][side], bool)
    assert isinstance(block["step_target_met"], bool)
    assert "<!-- step.py: begin -->" in stdout and "| distill | float32 |" in stdout
    assert result["settings"]["host_memory"] == "kept" and "freed memory kept for reuse" in stdout


@pytest.mark.slow
def test_step_quick_without_torch(tmp_path):
    result, stdout = run_script("step.py", tmp_path, "--quick", "--no-torch", "--default-allocator")
    assert result["machine"]["torch"] == "" and set(result["matmul_peak_gflops"]) == {"kdjax"}
    assert result["settings"]["host_memory"] == "glibc default" and "glibc's defaults" in stdout
    [block] = result["blocks"]
    for row in block["cases"].values():
        assert row["kdjax"]["median_ms"] > 0 and set(row) == {"kdjax"}
    assert block["step_target_met"] is None
    assert "not measured (no PyTorch)" in stdout
    # A saved run's table, printed again without measuring.
    replay = subprocess.run([sys.executable, str(BENCHMARKS / "step.py"), "--from_json",
                             str(tmp_path / "step.json")], cwd=ROOT, env=plain_cpu_env(),
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert replay.stdout.strip() == stdout.strip()


def test_machine_info_without_torch_leaves_later_imports_working():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import losses; "
            "info = losses.machine_info(2, with_torch=False); "
            "assert info['torch'] == '' and info['torch_threads'] == 2 and info['jax'], info; "
            "assert 'torch' not in sys.modules; import jax; jax.numpy.zeros(1).block_until_ready()")
    run_python(code)


def loss_row(kdjax_ms, torch_ms, grad_diff=1e-7):
    """A measured ``benchmarks/losses.py`` row of the small size, min and max 1 ms around the median."""
    def side(ms):
        return {"median_ms": ms, "min_ms": ms - 1.0, "max_ms": ms + 1.0, "reps": 10}

    return {"loss": "pixel_kd", "variant": "", "size": "small", "status": "ok",
            "kdjax": {**side(kdjax_ms), "peak_mb": 1.0}, "torch_eager": {**side(torch_ms), "peak_mb": 2.0},
            "torch_compile": {"status": "skipped (--compile off)"},
            "check": {"kdjax": 1.0, "torch": 1.0, "value_rel_diff": 0.0, "grad_rel_diff": grad_diff},
            "ratio_eager": torch_ms / kdjax_ms}


def test_losses_runs_combine_into_medians_and_each_runs_ratio():
    losses = load_module("losses")
    skipped = {"loss": "fitnet", "variant": "", "size": "small", "status": "skipped: too big",
               "kdjax": {"peak_mb": 5000.0}}
    runs = [[loss_row(10.0, 30.0), skipped],
            [loss_row(20.0, 30.0, grad_diff=1e-5), skipped],
            [loss_row(12.0, 18.0), skipped]]
    row, second = losses.combine_runs(runs)
    assert second == skipped
    assert row["kdjax"]["median_ms"] == 12.0 and row["torch_eager"]["median_ms"] == 30.0
    assert (row["kdjax"]["min_ms"], row["kdjax"]["max_ms"], row["kdjax"]["reps"]) == (9.0, 21.0, 30)
    assert row["ratios_eager"] == [3.0, 1.5, 1.5] and row["ratio_eager"] == 1.5
    assert row["check"]["grad_rel_diff"] == 1e-5 and "ratio_compile" not in row
    assert runs[0][0]["ratio_eager"] == 3.0  # the runs' own rows are left as they were

    result = {"machine": MACHINE, "command": "python benchmarks/losses.py --runs 3",
              "sizes": ["small"], "rtol": 1e-4, "cases": [row],
              "settings": {"max_gb": 4.0, "budget_s": 4.0, "min_reps": 3, "max_reps": 30,
                           "process": "per_case", "runs": 3}}
    text = losses.table(result)
    assert "| 1.50 (3.00, 1.50, 1.50) |" in text and "Every case ran 3 times" in text
    assert "Missed by: pixel_kd (1.50×)." in text


def test_machine_line_names_the_vector_isa_and_its_bfloat16_arithmetic():
    losses = load_module("losses")
    assert losses.vector_isa({"avx2", "fma"}) == "AVX2, no bfloat16 arithmetic"
    assert losses.vector_isa({"avx2", "avx512f", "avx512_bf16"}) == "AVX-512, AVX-512 BF16"
    assert (losses.vector_isa({"avx512f", "avx512_bf16", "amx_bf16"})
            == "AVX-512, AVX-512 BF16 and AMX BF16")
    assert losses.vector_isa({"neon"}) == ""
    record = {"cpu": "AMD EPYC", "machine": "x86_64", "vector_isa": "AVX2, no bfloat16 arithmetic"}
    assert losses.cpu_description(record) == "AMD EPYC (x86_64, AVX2, no bfloat16 arithmetic)"
    # Records saved before the field existed still render.
    assert losses.cpu_description({"cpu": "AMD EPYC", "machine": "x86_64"}) == "AMD EPYC (x86_64)"


def test_compare_throughput_reads_every_run(tmp_path):
    def write(run, rates):
        run.mkdir(parents=True)
        lines = [{"split": "train", "step": k, "images_per_second": r} for k, r in enumerate(rates)]
        lines.insert(1, {"split": "val", "step": 1, "miou": 10.0})
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    # The first window includes compilation and is left out.
    write(tmp_path / "teacher", [0.1, 4.0, 6.0])
    write(tmp_path / "student_alone" / "seed_0", [0.5, 16.0, 16.0])
    write(tmp_path / "student_alone" / "seed_1", [0.5, 15.0, 17.0])
    write(tmp_path / "kd" / "seed_0", [0.5, 8.0, 8.0])
    module = load_module("compare_throughput")
    rates = module.method_rates(tmp_path)
    assert rates == {"teacher": [5.0], "student_alone": [16.0, 16.0], "kd": [8.0]}
    rows = module.table(rates).splitlines()
    assert rows[2:] == ["| teacher | 1 | 5.00 | 5.00–5.00 | — |",
                        "| student_alone | 2 | 16.00 | 16.00–16.00 | 1.00× |",
                        "| kd | 1 | 8.00 | 8.00–8.00 | 2.00× |"]


@pytest.mark.slow
@pytest.mark.torch
def test_convolutions_smallest(tmp_path):
    pytest.importorskip("torch")
    result, stdout = run_script("convolutions.py", tmp_path, "--size", "32", "32", "--batch", "1",
                                "--reps", "1")
    rows = result["rows"]
    # ResNet-18 DeepLabV3: deep stem, four stages, ASPP (four branches, pooling, projection), heads.
    assert len(rows) >= 15 and sum(row["count"] for row in rows) >= 30
    for row in rows:
        assert all(row[f"{key}_ms"] > 0 for key in ("kdjax_fwd", "torch_fwd", "kdjax_both",
                                                    "torch_both", "xla_both"))
    assert result["totals"]["gflop"] == pytest.approx(sum(r["gflop"] * r["count"] for r in rows))
    assert "<!-- convolutions.py: begin -->" in stdout and "**all × count**" in stdout
    assert result["host_memory"] == "kept" and "freed memory kept for reuse" in stdout


@pytest.mark.slow
def test_demo_time_runs_a_comparison_from_an_empty_cache(tmp_path):
    """benchmarks/demo_time.py on the tests' tiny comparison: a fresh cache and workdir, timed,
    with the host's probe and the table it computed (minutes: every program is compiled)."""
    result, stdout = run_script("demo_time.py", tmp_path, "--config", "tests/io/compare_config.py",
                                "--log", str(tmp_path / "log"))
    (run,) = result["runs"]
    assert result["same_tables"]
    assert run["wall_s"] > 0 and run["user_s"] > 0 and run["probe_s"] > 0
    assert [(r["method"], r["seed"]) for r in run["rows"]] == [
        ("teacher", 0), ("student alone", 0), ("distilled", 0)]
    assert all(0 <= r["miou"] <= 100 and r["step_ms"] > 0 for r in run["rows"])
    assert "| student alone | 0 |" in stdout
