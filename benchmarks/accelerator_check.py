"""Accelerator check: kdjax on one GPU in a few minutes, against PyTorch on the same GPU.

    python benchmarks/accelerator_check.py [--json FILE] [--budget S] [--step-budget S]
                                           [--batches B,...] [--losses NAME,...] [--tests PATH ...]
                                           [--no-torch] [--dry-run]

Six sections, in this order, written to the JSON file after each one (so a run stopped early keeps
what it had), then a short table printed last:

1. ``environment``: the devices (kind, count, platform), the versions of Python, jax, jaxlib,
   flax, optax, orbax-checkpoint, torch, CUDA and cuDNN, and the measured peaks every later rate is
   read against: TFLOP/s of an N×N @ N×N product (N = 8192) in bfloat16 and float32, jitted in JAX
   and in PyTorch (median of rounds of several products), and memory bandwidth in GB/s (``x + 1``
   on a 1 GiB float32 array, bytes read + written).
2. ``step``: the distillation train step of ``benchmarks/step.py`` (DeepLabV3-ResNet101 teacher,
   DeepLabV3-ResNet18 student, CE + 0.4·aux CE + CWD on the logits, SGD; 19 classes, 512×1024
   crops, random weights and inputs): kdjax jitted in float32 and bfloat16 with the platform's
   kernels (``kdjax/ops/kernels.py``), and in bfloat16 with XLA's convolutions, PyTorch (the CIRKD
   networks of tests/torch_reference) eager in float32, eager under bfloat16 autocast (AMP) and
   ``torch.compile`` of both networks under AMP. The batch is the largest of 8, 16, 32
   (``--batches``) whose compiled kdjax step (float32, or the first kdjax variant of
   ``--variants``) fits the device memory, estimated from the smallest one's buffer assignment
   (its temporaries grow with the batch) and checked on the compiled step; every variant runs that
   batch. Reported per variant: images/s (median of the repetitions after one warm-up step), the
   ratio to PyTorch eager AMP, compile time, peak memory (kdjax: the compiled step's buffer
   assignment; PyTorch: ``torch.cuda.max_memory_allocated``) and model FLOP utilisation: the
   step's FLOPs (``kdjax.ops.cost.traced_flops`` of kdjax's step with XLA's convolutions where
   that variant ran, else of the first: its matrix products and convolutions, the same work for
   every variant) / step time / the measured matmul peak of the variant's dtype (the faster
   library's). kdjax compiles first, PyTorch runs and empties its
   cache, then kdjax runs: the two allocators do not share memory. Last, ``--profile-steps`` (3)
   steps of kdjax's bfloat16 step (float32 where that did not run) are traced by
   ``jax.profiler``: the trace (``profile_step.xplane.pb.gz``) and the compiled HLO
   (``profile_step.hlo.txt.gz``) go beside the JSON file, and the JSON gets each device timeline
   line's busy time, its longest events and the HLO instructions they ran for.
3. ``student``: the student's step alone (CE + 0.4·aux CE, SGD) in bfloat16 with each of
   ``--student-kernels`` (``xla,auto``), timed side by side at the step's batch: images/s,
   compile time, peak memory and its share of the bf16 peak.
4. ``losses``: every ``kdjax.losses`` case of ``benchmarks/losses.py`` at its Cityscapes size,
   forward + backward, jitted, against ``benchmarks/torch_losses.py`` eager and ``torch.compile``
   on the same device: median ms, the ratios PyTorch / kdjax, both values' and gradients' relative
   differences, peak memory (kdjax: XLA's buffer assignment; PyTorch: the allocator's peak during
   the step, inputs included, on CUDA only).
5. ``tests``: the platform-sensitive part of the test suite (``--tests``; default tests/losses,
   tests/models, tests/ops) run by pytest in a subprocess on the accelerator. tests/conftest.py
   puts the tests on eight simulated CPU devices unless the environment says otherwise, so the
   subprocess gets JAX_PLATFORMS set to this process's backend and XLA_FLAGS set (to the
   environment's own, or empty), which drops the simulated devices. The trainer's one-vs-eight
   device test is added where there are several devices and TensorFlow (its input pipeline) is
   installed. Reported: counts per outcome and the failing tests with their first error line; the
   whole log is saved beside the JSON file.
6. ``compare``: ``kdjax compare --config=configs/demo.py:local`` in a subprocess, timed end to
   end. Its synthetic data pass through tf.data, so without TensorFlow it is skipped.

This script never imports TensorFlow (``tensorflow_imported`` in the JSON says so). JAX is told not
to preallocate GPU memory, so PyTorch can run in the same process. ``--budget`` (seconds, 450)
bounds the run. The step comes first with ``--step-budget`` (240 s): its optional parts (a larger
batch, kdjax bfloat16, ``torch.compile``) are skipped or stopped when the time left would not
cover them. The losses get ``--losses-budget`` (90 s; each ``torch.compile`` a third of what is
left; ``--no-losses-compile`` skips it), the tests what remains, at most ``--tests-timeout``
(150 s). A section that fails is recorded with its error and the others still run.

``--dry-run``: the same code on the CPU at toy sizes (64×64 crops, batch 2, ResNet-18 teacher, one
timed repetition, two small losses, one test file, no ``torch.compile`` or kdjax bfloat16 step, no
``kdjax compare``; the profile reads the XLA CPU client's threads), so that the script is
exercised without an accelerator. ``--no-torch`` or a missing torch skips the PyTorch parts with a
note.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

# Sibling benchmark modules (step, losses, torch_losses) and the repository root (tests.*).
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO))
import losses  # noqa: E402
import step  # noqa: E402

FULL = {"matmul_n": 8192, "bandwidth_mib": 1024, "reps": 5, "inner": 10,
        "tests": ["tests/losses", "tests/models", "tests/ops"], "test_workers": 8,
        "size": (512, 1024), "batches": (8, 16, 32), "teacher": "deeplabv3_resnet101",
        "loss_size": "cityscapes", "losses": "", "loss_reps": 20, "budget": 450.0}
DRY = {"matmul_n": 256, "bandwidth_mib": 16, "reps": 1, "inner": 2,
       "tests": ["tests/ops/test_ordering.py"], "test_workers": 0,
       "size": (64, 64), "batches": (2,), "teacher": "deeplabv3_resnet18",
       "loss_size": "small", "losses": "channel_wise_divergence,cirkd_memory", "loss_reps": 2,
       "budget": 180.0}
STUDENT = "deeplabv3_resnet18"
TRAINER_TEST = "tests/training/test_train.py::test_eight_devices_match_one_device"
FIT = 0.85                 # share of the device memory a compiled step may take
STEP_RESERVE_S = 30.0      # time kept for the kdjax repetitions when torch.compile starts
# (name, library, dtype, mode, kdjax's kernels). The ratio column is read against BASELINE.
VARIANTS = (("kdjax float32", "kdjax", "float32", "jit", "auto"),
            ("kdjax bfloat16", "kdjax", "bfloat16", "jit", "auto"),
            ("kdjax bfloat16 (XLA kernels)", "kdjax", "bfloat16", "jit", "xla"),
            ("torch eager float32", "torch", "float32", "eager", None),
            ("torch eager AMP bf16", "torch", "bfloat16", "eager", None),
            ("torch.compile AMP bf16", "torch", "bfloat16", "compile", None))
VARIANT = {v[0]: v for v in VARIANTS}
BASELINE = "torch eager AMP bf16"
NOT_IN_DRY_RUN = {"kdjax bfloat16", "kdjax bfloat16 (XLA kernels)", "torch.compile AMP bf16"}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Clock:
    """A time budget: the run's, or a section's within it."""

    def __init__(self, budget: float):
        self.start = time.monotonic()
        self.end = self.start + budget

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def part(self, budget: float) -> Clock:
        """A budget of ``budget`` seconds from now that ends no later than this one."""
        return Clock(min(budget, self.left()))


class TimeUp(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float):
    """Raises :class:`TimeUp` in the block after ``seconds``."""
    def ring(*_):
        raise TimeUp(f"stopped after {seconds:.0f} s (time budget)")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def seconds_of(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:200]


class TorchDevice:
    """Where PyTorch runs, and how to wait for it and read its peak memory (CUDA only)."""

    def __init__(self, name: str):
        import torch

        self.torch, self.name = torch, name
        self.cuda = name == "cuda"

    def sync(self, _=None) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def move(self, tensors: dict) -> dict:
        """``tensors`` (nested dicts) on this device; the student input stays a leaf with a grad."""
        moved = {k: self.move(v) if isinstance(v, dict) else v.detach().to(self.name)
                 for k, v in tensors.items()}
        if "student" in moved:
            moved["student"].requires_grad_(True)
        return moved


def rates(calls: dict, work: float, reps: int, inner: int) -> dict:
    """``work`` per second of each ``(fn, wait)`` in ``calls``: the median of ``reps`` rounds of
    ``inner`` calls, each round waited for once at its end."""
    def round_of(fn, wait):
        def run():
            for _ in range(inner):
                out = fn()
            wait(out)
        return run

    times = step.interleaved({name: round_of(*call) for name, call in calls.items()}, reps)
    return {name: work * inner / statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------------------------------
# Environment.

def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(settings: dict, device: TorchDevice | None) -> dict:
    import jax
    import jax.numpy as jnp

    devices = jax.devices()
    env = {"platform": jax.default_backend(), "device_kind": devices[0].device_kind,
           "device_count": len(devices), "backend_version": getattr(devices[0].client, "platform_version", None),
           "host": platform.node(), "cpu_cores": os.cpu_count(),
           "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
           "versions": {"python": platform.python_version(), "jax": jax.__version__,
                        **{name: version(name) for name in ("jaxlib", "flax", "optax",
                                                            "orbax-checkpoint", "torch")}}}
    n, reps, inner = settings["matmul_n"], settings["reps"] + 2, settings["inner"]
    product, matmuls = jax.jit(lambda x, y: x @ y), {}
    for dtype in ("bfloat16", "float32"):
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
        matmuls[f"jax {dtype}"] = (functools.partial(product, a, a), jax.block_until_ready)
    elements = settings["bandwidth_mib"] * 2**20 // 4
    plus_one = jax.jit(lambda x: x + 1.0)
    copies = {"jax": (functools.partial(plus_one, jnp.zeros(elements, jnp.float32)), jax.block_until_ready)}
    if device is not None:
        torch = device.torch
        env["versions"]["cuda"] = torch.version.cuda if device.cuda else None
        env["versions"]["cudnn"] = torch.backends.cudnn.version() if device.cuda else None
        env["torch_device"] = torch.cuda.get_device_name() if device.cuda else "cpu"
        env["torch_float32_matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
        env["torch_float32_conv_tf32"] = torch.backends.cudnn.allow_tf32
        for dtype in ("bfloat16", "float32"):
            a = torch.randn(n, n, dtype=getattr(torch, dtype), device=device.name)
            matmuls[f"torch {dtype}"] = (functools.partial(torch.mm, a, a), device.sync)
        x = torch.zeros(elements, dtype=torch.float32, device=device.name)
        copies["torch"] = (functools.partial(torch.add, x, 1.0), device.sync)
    env["matmul_n"] = n
    env["matmul_tflops"] = {k: v / 1e12 for k, v in rates(matmuls, 2.0 * n**3, reps, inner).items()}
    env["bandwidth_bytes"] = 8 * elements
    env["bandwidth_gbs"] = {k: v / 1e9 for k, v in rates(copies, 8.0 * elements, reps, inner).items()}
    env["peak_tflops"] = {dtype: max(v for k, v in env["matmul_tflops"].items() if k.endswith(dtype))
                          for dtype in ("bfloat16", "float32")}
    return env


# --------------------------------------------------------------------------------------------------
# Tests.

OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
NODE = re.compile(r"\btests/\S+?\.py(::\S+)?(?=\s|$)")   # a test, or a module that failed to collect
SUMMARY = re.compile(r"^=+ (.*\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b.*) =+$")


INTERRUPT_GRACE_S = 15.0


def run_logged(command: list[str], log_path: Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """Runs ``command`` in the repository root with its output in ``log_path``; (exit code, or
    None when it was stopped at ``timeout``, seconds). At ``timeout`` the whole process group is
    interrupted (SIGINT, as Ctrl-C would), so that pytest still prints its summary of the failures
    so far, and ``INTERRUPT_GRACE_S`` later killed, so workers it started cannot outlive it."""
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout - INTERRUPT_GRACE_S, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    return code, time.perf_counter() - start


def parse_pytest(text: str) -> dict:
    """Outcome counts, failures with their first error line, and pytest's closing line, from a
    ``pytest -v -rfE`` log (with or without xdist); a test's last reported outcome counts."""
    outcomes, reasons, summary = {}, {}, None
    for line in text.splitlines():
        word, node = OUTCOME.search(line), NODE.search(line)
        if word and node:
            outcomes[node.group()] = word.group(1)
            if word.group(1) in ("FAILED", "ERROR") and " - " in line[node.end():]:
                reasons[node.group()] = line[node.end():].split(" - ", 1)[1][:200]
        if match := SUMMARY.match(line.strip()):
            summary = match.group(1)
    counts = {name: sum(1 for v in outcomes.values() if v == key)
              for key, name in (("PASSED", "passed"), ("FAILED", "failed"), ("ERROR", "errors"),
                                ("SKIPPED", "skipped"), ("XFAIL", "xfailed"), ("XPASS", "xpassed"))}
    failures = [{"test": node, "reason": reasons.get(node, "")}
                for node, word in outcomes.items() if word in ("FAILED", "ERROR")]
    return {**counts, "failures": failures, "summary": summary}


def jax_platform() -> str:
    """The name of JAX's default backend as JAX_PLATFORMS takes it: 'cuda' rather than
    ``jax.default_backend()``'s 'gpu', which JAX_PLATFORMS expands to every GPU plugin and fails
    on those not installed."""
    from jax.extend import backend

    default = backend.get_backend()
    return next(name for name, client in backend.backends().items() if client is default)


def tests_section(args, clock: Clock, log_path: Path) -> dict:
    import jax

    backend = jax_platform()
    paths, notes = list(args.tests), []
    if args.tests_default:
        if jax.device_count() > 1 and importlib.util.find_spec("tensorflow"):
            paths.append(TRAINER_TEST)
        else:
            notes.append(f"{TRAINER_TEST} not selected: needs several devices and TensorFlow")
    env = dict(os.environ, JAX_PLATFORMS=backend)
    if backend == "cpu":
        env.pop("XLA_FLAGS", None)      # conftest's eight simulated CPU devices, as in CI
    else:
        env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    command = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist"):
        command += ["-n", str(args.test_workers)]
    timeout = min(args.tests_timeout, clock.left())
    log(f"tests: {' '.join(paths)} on {backend} (at most {timeout:.0f} s)")
    code, seconds = run_logged(command + paths, log_path, timeout, env)
    result = {"paths": paths, "platform": backend, "exit_code": code, "seconds": seconds,
              "timed_out": code is None, "log": log_path.name, "notes": notes,
              **parse_pytest(log_path.read_text(errors="replace"))}
    log(f"tests: {result['summary'] or 'no summary'} ({seconds:.0f} s)")
    return result


# --------------------------------------------------------------------------------------------------
# Losses.

def loss_case(case, size: str, device: TorchDevice | None, compile_timeout: float | None,
              reps: int) -> list[dict]:
    """One ``losses.cases()`` case: every kdjax variant and, with ``device``, PyTorch eager and
    (unless ``compile_timeout`` is None) compiled on that device; a row per variant."""
    inputs = losses.make_inputs(case.kind, size)
    steps = {label: losses.JaxStep(fn, inputs, case.stateful, float("inf"))
             for label, fn in case.variants.items()}
    rows = [{"loss": case.loss, "variant": label, "size": size, "status": "ok",
             "kdjax": {"compile_s": s.compile_s, "peak_mb": s.peak_bytes / 2**20}}
            for label, s in steps.items()]
    calls = {f"kdjax:{label}": s for label, s in steps.items()}
    checks = {}
    if device is not None:
        import torch_losses

        loss = torch_losses.losses(losses.FAKD_STRENGTH, losses.CLASSES)[case.loss]
        t_inputs = device.move(losses.to_torch(inputs))
        if case.stateful:
            first = next(iter(steps.values()))
            t_inputs["memory"] = device.move(first.memory_state())
            t_inputs["draws"] = device.move(first.draws())    # the first step's random choices
        t_value, t_grad = torch_losses.value_and_grad(loss, t_inputs)
        t_inputs.pop("draws", None)
        t_value, t_grad = float(t_value), t_grad.permute(0, 2, 3, 1).cpu().numpy()
        for label, s in steps.items():
            value, grad = s()
            checks[label] = {"value_rel_diff": abs(float(value) - t_value) / max(abs(t_value), 1e-30),
                             "grad_rel_diff": losses.relative_difference(grad, t_grad)}
        calls["torch_eager"] = lambda: torch_losses.value_and_grad(loss, t_inputs)
        compiled, compile_info = None, "skipped: --dry-run or --no-losses-compile"
        if compile_timeout is not None:
            compiled, compile_info = losses.compile_torch(loss, t_inputs, compile_timeout)
        if compiled is not None:
            calls["torch_compile"] = lambda: torch_losses.value_and_grad(loss, t_inputs, compiled)
    synced = {name: (lambda c=c: device.sync(c())) if not name.startswith("kdjax") else c
              for name, c in calls.items()}
    times = step.interleaved(synced, reps)
    torch_rows = {}
    if device is not None:
        device.reset_peak()
        synced["torch_eager"]()
        torch_rows["torch_eager"] = {**losses.summary(times["torch_eager"]), "peak_mb": device.peak_mb()}
        torch_rows["torch_compile"] = ({**losses.summary(times["torch_compile"]), "compile_s": compile_info}
                                       if compiled is not None else {"status": compile_info})
    for row, label in zip(rows, steps):
        row["kdjax"].update(losses.summary(times[f"kdjax:{label}"]))
        row.update(torch_rows)
        if label in checks:
            row["check"] = checks[label]
        for side in ("eager", "compile"):
            if "median_ms" in row.get(f"torch_{side}", {}):
                row[f"ratio_{side}"] = row[f"torch_{side}"]["median_ms"] / row["kdjax"]["median_ms"]
    return rows


def loss_section(args, clock: Clock, device: TorchDevice | None) -> dict:
    wanted = [name for name in args.losses.split(",") if name]
    selected = [c for c in losses.cases() if not wanted or c.loss in wanted]
    rows = []
    for case in selected:
        left = clock.left()
        if left <= 0:
            rows += [{"loss": case.loss, "variant": label, "size": args.loss_size,
                      "status": "skipped: time budget"} for label in case.variants]
            continue
        # torch.compile gets a third of the time left, so one slow compile leaves room for the rest.
        compile_timeout = left / 3 if args.losses_compile else None
        try:
            rows += loss_case(case, args.loss_size, device, compile_timeout, args.loss_reps)
        except Exception as error:  # noqa: BLE001 - one failing loss must not stop the check
            rows += [{"loss": case.loss, "variant": label, "size": args.loss_size,
                      "status": f"failed: {first_line(error)}"} for label in case.variants]
        for row in rows[-len(case.variants):]:
            measured = (f"kdjax {fmt(row['kdjax']['median_ms'])} ms, eager ratio {fmt(row.get('ratio_eager'))}, "
                        f"compiled ratio {fmt(row.get('ratio_compile'))}")
            log(f"loss {row['loss']} {row['variant']}: {measured if row['status'] == 'ok' else row['status']}")
        if device is not None:
            device.release()
    return {"size": args.loss_size, "shape": list(losses.SIZES[args.loss_size]), "reps": args.loss_reps,
            "rows": rows}


# --------------------------------------------------------------------------------------------------
# Train step.

class DeviceTorchSide(step.TorchSide):
    """``step.TorchSide`` (networks, optimizer, batch, the distillation step) on ``device``, with
    autocast on that device's type."""

    def __init__(self, args, batch: dict, device: TorchDevice):
        super().__init__(args, "float32", batch)
        self.device = device
        self.images, self.labels = self.images.to(device.name), self.labels.to(device.name)
        self.student.to(device.name)
        self.teacher.to(device.name)

    def autocast(self):
        if self.bf16:
            return self.device.torch.autocast(self.device.name, dtype=self.device.torch.bfloat16)
        return contextlib.nullcontext()

    def distill(self):
        self.train_step(True)
        self.device.sync()


def step_args(settings: dict, batch: int, kernels: str = "auto") -> types.SimpleNamespace:
    return types.SimpleNamespace(size=settings["size"], batch=batch, student=STUDENT,
                                 teacher=settings["teacher"], demo=False, kernels=kernels)


def memory_limit() -> int:
    """Bytes the device lets JAX allocate (the host's RAM on the CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kdjax_step(settings: dict, batch_size: int, dtype: str, kernels: str = "auto",
               distill: bool = True):
    """step.py's compiled kdjax distillation step (``distill=False``: the student's step alone) at
    ``batch_size`` with ``kernels`` (``kdjax/ops/kernels.py``): (Impl, batch arrays)."""
    args = step_args(settings, batch_size, kernels)
    batch = step.make_batch(args)
    impl, _, _ = step.kdjax_train_step(args, dtype, distill, batch)
    return impl, batch


def choose_batch(settings: dict, clock: Clock, dtype: str, kernels: str
                 ) -> tuple[object, dict, dict]:
    """The largest batch of ``settings['batches']`` whose compiled ``dtype`` step is estimated to
    fit (the smallest batch's buffers, its temporaries scaled with the batch), checked by
    compiling it; (Impl, batch arrays, record of the search)."""
    candidates = sorted(settings["batches"])
    impl, batch = kdjax_step(settings, candidates[0], dtype, kernels)
    limit = memory_limit()
    temp = impl.extra["memory_analysis"]["temp"]
    estimates = {b: impl.peak_bytes + temp * (b / candidates[0] - 1) for b in candidates}
    chosen = max([b for b in candidates if estimates[b] <= FIT * limit], default=candidates[0])
    record = {"candidates": candidates, "limit_mb": limit / 2**20,
              "estimated_mb": {str(b): e / 2**20 for b, e in estimates.items()},
              "first_compile_s": impl.extra["compile_s"]}
    if chosen != candidates[0] and clock.left() > 4 * impl.extra["compile_s"] + STEP_RESERVE_S:
        try:
            bigger, bigger_batch = kdjax_step(settings, chosen, dtype, kernels)
        except Exception as error:  # noqa: BLE001 - the smallest batch's step still runs
            record["check_failed"] = first_line(error)
        else:
            record["checked_mb"] = bigger.peak_bytes / 2**20
            if bigger.peak_bytes <= FIT * limit:
                impl, batch = bigger, bigger_batch
    record["batch"] = len(batch["image"])
    return impl, batch, record


def timing_row(seconds: list[float], batch: int) -> dict:
    row = losses.summary(seconds)
    row["images_per_s"] = batch / statistics.median(seconds)
    return row


def torch_variants(settings: dict, batch: dict, device: TorchDevice, clock: Clock, wanted) -> dict:
    """PyTorch's variants of the step (``wanted``: their names), each timed alone; its memory is
    given back afterwards."""
    torch = device.torch
    torch.backends.cudnn.benchmark = True       # fixed input sizes, as CIRKD trains
    side = DeviceTorchSide(step_args(settings, len(batch["image"])), batch, device)
    out = {}
    for name, _, dtype, mode, _ in (v for v in VARIANTS if v[0] in wanted):
        if mode == "compile" and clock.left() < 3 * STEP_RESERVE_S:
            out[name] = {"status": "skipped: time budget"}
            continue
        side.bf16 = dtype == "bfloat16"
        row = {}
        try:
            if mode == "compile":
                side.student, side.teacher = torch.compile(side.student), torch.compile(side.teacher)
                with alarm(clock.left() - STEP_RESERVE_S):
                    row["compile_s"] = seconds_of(side.distill)     # the first call compiles
            device.reset_peak()
            times = step.interleaved({name: side.distill}, settings["reps"])[name]
            row.update(timing_row(times, len(batch["image"])), peak_mb=device.peak_mb(), status="ok")
        except Exception as error:  # noqa: BLE001 - out of memory, a compiler failure, TimeUp
            row["status"] = f"failed: {first_line(error)}"
            side.optimizer.zero_grad(set_to_none=True)
            device.release()
        out[name] = row
        log(f"step {name}: {row.get('images_per_s', 0):.1f} img/s ({row['status']})")
    del side
    device.release()
    return out


def step_section(args, settings: dict, clock: Clock, device: TorchDevice | None, peaks: dict) -> dict:
    skipped = {name: "skipped: --dry-run" for name in NOT_IN_DRY_RUN} if args.dry_run else {}
    skipped.update({v[0]: "skipped: not in --variants" for v in VARIANTS
                    if args.variants and v[0] not in args.variants})
    if device is None:
        skipped.update({v[0]: "skipped: no torch" for v in VARIANTS if v[1] == "torch"})
    # The first kdjax variant left chooses the batch; every variant runs that batch.
    first = next((v for v in VARIANTS if v[1] == "kdjax" and v[0] not in skipped), VARIANTS[0])
    impls = {}
    impls[first[0]], batch, search = choose_batch(settings, clock, first[2], first[4])
    n = len(batch["image"])
    log(f"step: batch {n} (search {search})")
    for name, _, dtype, _, kernels in VARIANTS:
        if name in skipped or name in impls or kernels is None:
            continue
        if clock.left() < 2 * search["first_compile_s"] + STEP_RESERVE_S:
            skipped[name] = "skipped: time budget"
            continue
        try:
            impls[name], _ = kdjax_step(settings, n, dtype, kernels)
        except Exception as error:  # noqa: BLE001 - the other variants still run
            skipped[name] = f"failed: {first_line(error)}"
    # Each kdjax variant's count of its step's products and convolutions. The rates are read
    # against the model's: XLA's forms, where the count skips the taps that read only padding
    # (the 'gpu' kernel gradient multiplies them too).
    flops = next((impl.flops for name, impl in impls.items() if VARIANT[name][4] == "xla"),
                 impls[first[0]].flops)
    rows = {}
    if device is not None:
        rows.update(torch_variants(settings, batch, device, clock,
                                   {v[0] for v in VARIANTS if v[1] == "torch"} - set(skipped)))
    for name, impl in impls.items():
        rows[name] = {"compile_s": impl.extra["compile_s"], "peak_mb": impl.peak_bytes / 2**20,
                      "gflop_traced": impl.flops / 1e9}
        try:
            times = step.interleaved({name: impl.call}, settings["reps"])[name]
            rows[name].update(timing_row(times, n), status="ok")
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: reported
            rows[name]["status"] = f"failed: {first_line(error)}"
        log(f"step {name}: {rows[name].get('images_per_s', 0):.1f} img/s ({rows[name]['status']})")
    profile = None
    if args.profile_steps > 0:
        name = next((n for n in ("kdjax bfloat16", "kdjax float32") if rows.get(n, {}).get("status") == "ok"),
                    None)
        try:
            profile = (profile_step(impls[name], name, args.profile_steps, args.out_dir) if name
                       else {"status": "skipped: no kdjax step ran"})
        except Exception as error:  # noqa: BLE001 - the timings stand without it
            profile = {"status": f"failed: {first_line(error)}"}
    baseline = rows.get(BASELINE, {}).get("images_per_s")
    for name, library, dtype, mode, kernels in VARIANTS:
        row = rows[name] if name in rows else {"status": skipped[name]}
        rows[name] = row
        row.update(library=library, dtype=dtype, mode=mode, kernels=kernels)
        if "images_per_s" in row:
            step_s = n / row["images_per_s"]
            row["mfu_percent"] = 100.0 * flops / step_s / (peaks[dtype] * 1e12)
            if baseline:
                row["ratio_vs_baseline"] = row["images_per_s"] / baseline
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {"teacher": settings["teacher"], "student": STUDENT, "size": list(settings["size"]),
            "batch": n, "classes": step.CLASSES, "batch_search": search, "gflop_per_step": flops / 1e9,
            "baseline": BASELINE, "reps": settings["reps"],
            "jax_device_peak_mb": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
            "variants": [{"name": name, **rows[name]} for name, *_ in VARIANTS], "profile": profile}


def student_section(args, settings: dict, clock: Clock, batch_size: int, peaks: dict) -> dict:
    """The student's train step alone (CE + 0.4·aux CE, SGD) in bfloat16 with each of
    ``args.student_kernels``, timed side by side: images/s, compile s, peak MB and the share of
    the measured bf16 matmul peak, read against the FLOPs of XLA's forms where they ran."""
    impls, rows = {}, {}
    for kernels in args.student_kernels:
        if impls and clock.left() < 2 * max(r.get("compile_s", 0.0) for r in rows.values()):
            rows[kernels] = {"status": "skipped: time budget"}
            continue
        try:
            impls[kernels], _ = kdjax_step(settings, batch_size, "bfloat16", kernels, distill=False)
        except Exception as error:  # noqa: BLE001 - the other kernels still run
            rows[kernels] = {"status": f"failed: {first_line(error)}"}
            continue
        rows[kernels] = {"compile_s": impls[kernels].extra["compile_s"],
                         "peak_mb": impls[kernels].peak_bytes / 2**20,
                         "gflop_traced": impls[kernels].flops / 1e9}
        log(f"student step ({kernels} kernels): compiled in {rows[kernels]['compile_s']:.0f} s")
    if impls:
        times = step.interleaved({k: impl.call for k, impl in impls.items()}, settings["reps"])
        flops = impls["xla"].flops if "xla" in impls else next(iter(impls.values())).flops
        for kernels, seconds in times.items():
            rows[kernels].update(timing_row(seconds, batch_size), status="ok")
            rows[kernels]["mfu_percent"] = (100.0 * flops * rows[kernels]["images_per_s"]
                                            / batch_size / (peaks["bfloat16"] * 1e12))
            log(f"student step ({kernels} kernels): {rows[kernels]['images_per_s']:.1f} img/s")
    return {"student": STUDENT, "size": list(settings["size"]), "batch": batch_size,
            "dtype": "bfloat16", "gflop_per_step": flops / 1e9 if impls else None,
            "kernels": [{"kernels": k, **rows[k]} for k in args.student_kernels]}


# --------------------------------------------------------------------------------------------------
# Profile.

TOP_OPS = 25


def merged_ns(intervals: list[tuple[float, float]]) -> float:
    """Nanoseconds covered by the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def timeline_summary(xplane: Path) -> dict:
    """Where the traced steps spent their time, per line of the trace's device planes (on a GPU:
    'XLA Ops' holds HLO instructions, the 'Stream #…' lines the kernels they launched; on the CPU,
    the XLA client's threads): each line's busy time (overlaps merged) against its span, and its
    ``TOP_OPS`` longest events by total time, with their count and the first event's statistics,
    and, where events name the HLO instruction they ran for (a GPU's kernels do: ``hlo_op``), the
    ``TOP_OPS`` instructions of the longest total time, to be looked up in the compiled HLO."""
    import jax

    data = jax.profiler.ProfileData.from_file(str(xplane))
    lines = []
    for plane in data.planes:
        on_device = plane.name.startswith("/device:")
        for line in plane.lines:
            if not (on_device or line.name.startswith("tf_XLAPjRt")):
                continue
            totals, counts, stats, by_hlo, spans = {}, {}, {}, {}, []
            for event in line.events:
                if event.duration_ns <= 0:
                    continue
                event_stats = {k: str(v)[:400] for k, v in event.stats}
                totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns
                counts[event.name] = counts.get(event.name, 0) + 1
                stats.setdefault(event.name, event_stats)
                if "hlo_op" in event_stats:
                    by_hlo[event_stats["hlo_op"]] = by_hlo.get(event_stats["hlo_op"], 0.0) + event.duration_ns
                spans.append((event.start_ns, event.start_ns + event.duration_ns))
            if not spans:
                continue
            busy = merged_ns(spans)
            span = max(e for _, e in spans) - min(s for s, _ in spans)
            top = sorted(totals, key=totals.get, reverse=True)[:TOP_OPS]
            lines.append({"plane": plane.name, "line": line.name, "busy_ms": busy / 1e6,
                          "span_ms": span / 1e6, "busy_percent": 100.0 * busy / max(span, 1.0),
                          "events": len(spans), "distinct": len(totals),
                          "top": [{"name": n, "ms": totals[n] / 1e6, "count": counts[n],
                                   "share_percent": 100.0 * totals[n] / busy, "stats": stats[n]}
                                  for n in top],
                          "top_hlo_ops": [{"hlo_op": op, "ms": by_hlo[op] / 1e6}
                                          for op in sorted(by_hlo, key=by_hlo.get, reverse=True)[:TOP_OPS]]})
    return {"lines": sorted(lines, key=lambda line: line["busy_ms"], reverse=True)}


def profile_step(impl, name: str, steps: int, out_dir: Path) -> dict:
    """``steps`` calls of a compiled step under ``jax.profiler.trace``: the trace (gzipped, one
    folder up from the profiler's nested layout so that it travels back with the JSON), the
    compiled program's HLO text beside it, and :func:`timeline_summary`."""
    import gzip
    import shutil

    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                impl.call()
        xplane = next(Path(trace_dir).rglob("*.xplane.pb"))
        summary = timeline_summary(xplane)
        trace = out_dir / "profile_step.xplane.pb.gz"
        with open(xplane, "rb") as source, gzip.open(trace, "wb") as target:
            shutil.copyfileobj(source, target)
    result = {"variant": name, "steps": steps, "trace": trace.name, **summary}
    if impl.compiled is not None:
        hlo = out_dir / "profile_step.hlo.txt.gz"
        hlo.write_bytes(gzip.compress(impl.compiled.as_text().encode()))
        result["hlo"] = hlo.name
    return result


# --------------------------------------------------------------------------------------------------
# kdjax compare.

def compare_section(args, clock: Clock, log_path: Path) -> dict:
    if not args.compare:
        return {"status": "skipped: " + ("--dry-run (minutes on a CPU; --compare runs it)" if args.dry_run
                                         else "--no-compare")}
    if importlib.util.find_spec("tensorflow") is None:
        return {"status": "skipped: TensorFlow not installed (the synthetic data need tf.data)"}
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "kdjax", "compare", f"--config={args.compare_config}",
                   f"--workdir={workdir}"]
        env = dict(os.environ, JAX_PLATFORMS=jax_platform())
        code, seconds = run_logged(command, log_path, min(args.compare_timeout, clock.left()), env)
        results = Path(workdir, "results.json")
        rows = json.loads(results.read_text()) if results.exists() else []
    status = "ok" if code == 0 else "timed out" if code is None else f"failed (exit code {code})"
    return {"status": status, "command": f"kdjax compare --config={args.compare_config}", "seconds": seconds,
            "log": log_path.name, "miou": {f"{r['method']} (seed {r['seed']})": r["miou"] for r in rows}}


# --------------------------------------------------------------------------------------------------
# Report.

fmt = step.fmt


def environment_lines(env: dict) -> list[str]:
    return ["matmul TFLOP/s: " + ", ".join(f"{k} {fmt(x)}" for k, x in env["matmul_tflops"].items())
            + "; bandwidth GB/s: " + ", ".join(f"{k} {fmt(x)}" for k, x in env["bandwidth_gbs"].items())]


def tests_lines(tests: dict) -> list[str]:
    return ([f"tests ({' '.join(tests['paths'])}): {tests['passed']} passed, {tests['failed']} failed, "
             f"{tests['errors']} errors, {tests['skipped']} skipped in {tests['seconds']:.0f} s"
             + (" (timed out)" if tests["timed_out"] else "")]
            + [f"  {f['test']} {f['reason']}" for f in tests["failures"][:10]])


def step_lines(result: dict) -> list[str]:
    size = "×".join(map(str, result["size"]))
    lines = [(f"step: {result['teacher']} → {result['student']}, CWD, {size}, batch {result['batch']}, "
              f"{fmt(result['gflop_per_step'])} GFLOP/step"),
             "| variant | img/s | vs eager AMP | compile s | peak MB | MFU % | status |",
             "|---|---|---|---|---|---|---|"]
    for row in result["variants"]:
        cells = [row["name"], *(fmt(row.get(key)) for key in ("images_per_s", "ratio_vs_baseline", "compile_s",
                                                               "peak_mb", "mfu_percent")), row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + profile_lines(result.get("profile"))


def profile_lines(profile: dict | None, top: int = 8) -> list[str]:
    """The profiled step's HLO-op timeline line (else its busiest) and its longest events."""
    if not profile:
        return []
    if "lines" not in profile:
        return [f"profile: {profile['status']}"]
    if not profile["lines"]:
        return [f"profile ({profile['variant']}): no device or XLA thread events in {profile['trace']}"]
    # On a GPU, 'XLA Ops' (one event per HLO instruction) rather than 'XLA Modules' (one per step).
    busiest = next((line for line in profile["lines"] if line["line"] == "XLA Ops"), profile["lines"][0])
    lines = [(f"profile ({profile['variant']}, {profile['steps']} steps, {profile['trace']}): "
              f"{busiest['plane']} '{busiest['line']}' busy {fmt(busiest['busy_ms'])} of "
              f"{fmt(busiest['span_ms'])} ms ({fmt(busiest['busy_percent'])} %), {busiest['distinct']} distinct")]
    lines += [f"  {fmt(e['share_percent'])} %  {fmt(e['ms'])} ms  ×{e['count']}  {e['name'][:90]}"
              for e in busiest["top"][:top]]
    return lines


def losses_lines(result: dict) -> list[str]:
    lines = [f"losses ({result['size']}, N×H×W {result['shape']}), ratios = PyTorch / kdjax:",
             "| loss | kdjax ms | eager ms | ratio | compiled ms | ratio | grad diff | status |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        name = row["loss"] + (f" ({row['variant']})" if row["variant"] else "")
        eager, comp = row.get("torch_eager", {}), row.get("torch_compile", {})
        compiled = fmt(comp["median_ms"]) if "median_ms" in comp else comp.get("status", "–")
        cells = [name, fmt(row.get("kdjax", {}).get("median_ms")), fmt(eager.get("median_ms")),
                 fmt(row.get("ratio_eager")), compiled, fmt(row.get("ratio_compile")),
                 fmt(row.get("check", {}).get("grad_rel_diff")), row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def compare_lines(result: dict) -> list[str]:
    return [f"compare: {result['status']}" + (f", {result['seconds']:.0f} s" if "seconds" in result else "")]


def student_lines(result: dict) -> list[str]:
    size = "×".join(map(str, result["size"]))
    lines = [(f"student step alone: {result['student']}, {result['dtype']}, {size}, batch "
              f"{result['batch']}, {fmt(result['gflop_per_step'])} GFLOP/step"),
             "| kernels | img/s | compile s | peak MB | MFU % | status |", "|---|---|---|---|---|---|"]
    for row in result["kernels"]:
        cells = [row["kernels"], *(fmt(row.get(key)) for key in ("images_per_s", "compile_s", "peak_mb",
                                                                 "mfu_percent")), row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


SECTION_LINES = {"environment": environment_lines, "step": step_lines, "student": student_lines,
                 "losses": losses_lines, "tests": tests_lines, "compare": compare_lines}


def table(result: dict) -> str:
    """The run in a few lines: one block per section, a failed section as its error."""
    env = result["environment"]
    v = env.get("versions", {})
    lines = [(f"== accelerator check: {env.get('device_count', '?')} × {env.get('device_kind', '?')} "
              f"({env.get('platform', '?')}), jax {v.get('jax', '?')}, torch {v.get('torch') or '–'}, "
              f"CUDA {v.get('cuda') or '–'}; {result['seconds']:.0f} s"
              f"{' (dry run)' if result['dry_run'] else ''} ==")]
    for name, section_lines in SECTION_LINES.items():
        if name not in result:
            continue
        section = result[name]
        lines += [f"{name}: failed: {section['error']}"] if "error" in section else section_lines(section)
        lines.append("")
    return "\n".join(lines).rstrip()


# --------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: a smoke run")
    parser.add_argument("--json", default=None,
                        help="JSON output (default: $OUT/accelerator_check.json, else ./accelerator_check.json)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (450; dry run 180)")
    parser.add_argument("--step-budget", type=float, default=240.0,
                        help="seconds for the train step; its optional parts fit in or are skipped")
    parser.add_argument("--variants", default="",
                        help="comma list of the step's variants to run (default: all; "
                             + ", ".join(v[0] for v in VARIANTS) + ")")
    parser.add_argument("--student-kernels", default="xla,auto",
                        help="comma list of kdjax kernels (kdjax/ops/kernels.py) for the student's "
                             "step alone in bfloat16; empty: skip it")
    parser.add_argument("--student-budget", type=float, default=120.0,
                        help="seconds for the student's step alone")
    parser.add_argument("--batches", default=None,
                        help="comma list of batch sizes to choose from (default 8,16,32; dry run 2)")
    parser.add_argument("--tests", nargs="+", default=None,
                        help=f"test paths (default: {' '.join(FULL['tests'])}; dry run: {DRY['tests'][0]})")
    parser.add_argument("--test-workers", type=int, default=None, help="pytest-xdist workers (8; dry run 0)")
    parser.add_argument("--tests-timeout", type=float, default=150.0, help="seconds for the tests")
    parser.add_argument("--losses", default=None, help="comma list of loss names (default: all)")
    parser.add_argument("--losses-budget", type=float, default=90.0, help="seconds for the losses")
    parser.add_argument("--losses-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile of each loss too (default: yes, except in a dry run)")
    parser.add_argument("--profile-steps", type=int, default=3,
                        help="steps of kdjax's step (bfloat16, else float32) traced by jax.profiler; 0: none")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                        help="run kdjax compare (default: yes, except in a dry run)")
    parser.add_argument("--compare-config", default="configs/demo.py:local")
    parser.add_argument("--compare-timeout", type=float, default=240.0)
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="kdjax only")
    args = parser.parse_args(argv)
    settings = DRY if args.dry_run else FULL
    args.tests_default = args.tests is None
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    args.student_kernels = [k.strip() for k in args.student_kernels.split(",") if k.strip()]
    if unknown := set(args.variants) - {v[0] for v in VARIANTS}:
        parser.error(f"unknown --variants {sorted(unknown)}; known: {[v[0] for v in VARIANTS]}")
    for name in ("tests", "test_workers", "losses", "budget"):
        if getattr(args, name) is None:
            setattr(args, name, settings[name])
    args.loss_size, args.loss_reps = settings["loss_size"], settings["loss_reps"]
    if args.batches:
        settings = {**settings, "batches": tuple(int(b) for b in args.batches.split(","))}
    args.compare = (not args.dry_run) if args.compare is None else args.compare
    if args.losses_compile is None:
        args.losses_compile = not args.dry_run
    json_path = Path(args.json or Path(os.environ.get("OUT", "."), "accelerator_check.json"))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    args.out_dir = json_path.parent

    # Before JAX starts its backends: PyTorch shares the GPU, so JAX allocates as it goes.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
        losses.configure_threads(None)      # both libraries on every core, OpenMP waits asleep
    clock = Clock(args.budget)
    device, notes = None, []
    if not args.torch:
        notes.append("torch: skipped (--no-torch)")
    elif importlib.util.find_spec("torch") is None:
        notes.append("torch: not installed, its parts skipped")
    else:
        import torch

        device = TorchDevice("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    result = {"command": "python benchmarks/accelerator_check.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "dry_run": args.dry_run, "budget_s": args.budget, "notes": notes, "seconds": 0.0,
              "section_seconds": {}}

    def save(section: str, measure) -> None:
        """Runs one section and writes the JSON; a section that fails is recorded as its error."""
        try:
            result[section] = measure()
        except Exception as error:  # noqa: BLE001 - the other sections still run
            log(traceback.format_exc())
            result[section] = {"error": first_line(error), "traceback": traceback.format_exc()[-4000:]}
        result["section_seconds"][section] = clock.elapsed() - result["seconds"]
        result["seconds"] = clock.elapsed()
        result["tensorflow_imported"] = "tensorflow" in sys.modules
        json_path.write_text(json.dumps(result, indent=1, default=str))

    logs = {name: json_path.with_name(f"{json_path.stem}_{name}.log") for name in ("tests", "compare")}
    save("environment", lambda: environment(settings, device))
    if "error" not in result["environment"]:
        log(environment_lines(result["environment"])[0])
    # The step first, while every second of the budget is still there; the tests take what is left.
    save("step", lambda: step_section(args, settings, clock.part(args.step_budget), device,
                                      result["environment"]["peak_tflops"]))
    if args.student_kernels:
        batch = (result["step"].get("batch") or settings["batches"][0])
        save("student", lambda: student_section(args, settings, clock.part(args.student_budget),
                                                batch, result["environment"]["peak_tflops"]))
    save("losses", lambda: loss_section(args, clock.part(args.losses_budget), device))
    save("tests", lambda: tests_section(args, clock, logs["tests"]))
    save("compare", lambda: compare_section(args, clock, logs["compare"]))
    print(table(result), flush=True)
    return result


if __name__ == "__main__":
    main()
