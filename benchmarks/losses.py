"""Loss speed and memory: every kdjax loss, forward + backward, against PyTorch on the same inputs.

    python benchmarks/losses.py [--quick] [--sizes small,cityscapes] [--losses NAME,...] [--threads N]
                                [--process per_case|shared] [--runs K] [--isa ISA] [--json FILE]
                                [--write]
    python benchmarks/losses.py --from_json FILE [--write]     # the table of a saved run

For every loss of ``kdjax.losses`` the benchmark times one jitted step that returns the loss and its
gradient with respect to the student input, against the same formula in PyTorch
(``benchmarks/torch_losses.py``), eager and (where it compiles) ``torch.compile``:

1. Both sides get the same float32 inputs (NHWC for kdjax, the same values permuted to NCHW for
   PyTorch). Before any timing the two values must agree within ``--rtol`` (1e-4) relative, or the
   case is reported as a mismatch and not timed; the gradients' relative difference is reported.
2. Repetitions are interleaved (kdjax, eager, compiled, then the reverse order, and so on), so load
   from other jobs falls on all implementations alike. Reported: median and min–max over the
   repetitions, after one untimed warm-up call each. Each (loss, size) case runs in a fresh process
   (``--process per_case``, the default; ``shared`` runs all in one): both libraries' large buffers
   come from glibc, whose choice between its heap and a fresh ``mmap`` (a page fault per page)
   depends on what was freed before, so in a shared process one case changes the next one's time.
3. The ratio is torch time / kdjax time: above 1 kdjax is faster.
   ``--runs K`` measures every case K times, the runs one after another (each case in a fresh
   process every time), and reports the median of the runs' medians, the min–max over all their
   repetitions and the median of the runs' ratios, with each run's ratio. On a shared machine
   whose speed drifts over minutes, one run's ratio can move by ±20 % for the same code; the runs'
   ratios show how far.
4. Peak memory. kdjax: XLA's buffer assignment of the compiled step, arguments + outputs +
   temporaries − aliased (donated) buffers (``Compiled.memory_analysis()``; jax reports no device
   memory statistics on CPU). PyTorch eager: the input tensors plus the peak of the bytes the CPU
   allocator holds during one step above what it held at the start, from the allocation events of
   ``torch.profiler`` (``profile_memory=True``). Both count tensor storage, not the interpreter.
5. Repetitions: as many as fit in ``--budget`` seconds per implementation (4), within
   ``--min_reps``–``--max_reps`` (3–30). A kdjax variant whose compiled peak exceeds ``--max_gb`` (4) is
   compiled but not run; ``torch.compile`` is not tried when one eager step takes longer than
   ``--compile_max_step`` (20 s), and a compile that fails or exceeds ``--compile_timeout`` is 'n/a'.
   ``--quick``: the small size only, 2–3 repetitions, no ``torch.compile`` (about a minute).

Threads: both libraries get the same number (``--threads``, default every core of the process's
CPU affinity): the affinity mask is narrowed to that many cores (XLA sizes its CPU thread pool from
it), ``torch.set_num_threads`` and OMP/MKL get the same count, and with one thread XLA's Eigen
multithreading is switched off.

XLA flags: ``kdjax.runtime.cpu_flags.CPU_FLAGS``, which the ``kdjax`` command sets and code that calls the
losses can set with ``kdjax.runtime.cpu_flags.add_cpu_flags()`` (512-bit vectors for XLA's own loops, which
the softmax losses' exponentials gain from), plus the environment's ``XLA_FLAGS``, whose options win.
The table names them.

Sizes: 'cityscapes' is a 512×1024 Cityscapes crop at output stride 8 (N = 8, 64×128, 19-class logits,
128-channel student and 256-channel teacher features); 'small' is N = 2, 32×64. Losses that compare
maps of one shape (FitNet, NFD, CIRKD, Af-DCD: the generator's output) get 256 channels on both
sides. BPKD's ground truth has one class per 8×8 block of logit pixels, so that both its edge and its
body region are large (a random class per pixel would leave no body). The CIRKDv2 channel losses
take, as kdjax's functions do, the 4×4-pooled maps (16×32 at 'cityscapes'), the student's already
projected to the teacher's 256 channels. ``--write`` puts the table into the 'Losses' section of
benchmarks/RESULTS.md (the part between its markers).
"""

from __future__ import annotations

import argparse
import gc
import importlib
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
from dataclasses import dataclass, field
from pathlib import Path

# Sibling modules of this script (results_file, torch_losses), also when it is loaded by path.
sys.path.insert(0, str(Path(__file__).parent))
import results_file  # noqa: E402

from kdjax.runtime.cpu_flags import add_cpu_flags  # noqa: E402

SECTION = "## Losses"
BEGIN, END = "<!-- losses.py: begin -->", "<!-- losses.py: end -->"

SIZES = {"small": (2, 32, 64), "cityscapes": (8, 64, 128)}
CLASSES, STUDENT_C, TEACHER_C = 19, 128, 256
LABEL_SCALE = 8          # ground truth at the crop size, 8× the feature size
REGION = 8               # BPKD's ground truth: one class per REGION×REGION block of logit pixels
CHANNEL_POOL = 4         # CIRKDv2 channel losses: features average-pooled 4×4 (ceil) before them
IGNORE = 255
FAKD_STRENGTH = 3.75     # λ halfway through the λ₀ = 7.5 ramp
BLOCK_SIZE = 256         # rows of the affinity map per block for the blockwise relational losses
TARGET = 2.0             # the goal: kdjax forward + backward at least 2× faster than PyTorch eager


# --------------------------------------------------------------------------------------------------
# Threads (before jax and torch are imported).

def configure_threads(threads: int | None) -> int:
    cores = sorted(os.sched_getaffinity(0))
    threads = threads or len(cores)
    if not 1 <= threads <= len(cores):
        raise SystemExit(f"--threads must be between 1 and {len(cores)}, got {threads}")
    os.sched_setaffinity(0, cores[:threads])
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    # libgomp's default spin-waiting turns every PyTorch parallel region into a ~100 ms stall when
    # another process holds one of the cores; sleeping waits keep shared-machine timings sane.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    return threads


# XLA's names for the x86 instruction sets that --xla_cpu_max_isa caps code generation at.
ISAS = ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX")


def add_isa_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--isa", choices=ISAS, default=None,
                        help="compile kdjax's programs for at most this instruction set "
                             "(XLA's --xla_cpu_max_isa): an AVX-512 host measures AVX2 code")


def limit_isa(isa: str | None) -> None:
    """Caps XLA's code generation at ``isa`` for this process and its children (before JAX
    starts). kdjax chooses the same forms on every instruction set, so only the generated code
    changes; PyTorch's kernels are not capped (``ATEN_CPU_CAPABILITY`` caps those)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if isa and f"--xla_cpu_max_isa={isa}" not in flags.split():   # a child inherits it already
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_max_isa={isa}".strip()


def machine_info(threads: int, with_torch: bool = True) -> dict:
    """The machine, the libraries and the thread settings; the torch fields are empty without it."""
    import jax

    torch_version, torch_threads = "", threads
    if with_torch:
        import torch

        torch_version, torch_threads = torch.__version__, torch.get_num_threads()
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if model != "unknown CPU" and flags:
                break
    except OSError:
        pass
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        mem_kb = 0
    return {
        "cpu": model, "vector_isa": vector_isa(flags), "machine": platform.machine(),
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 2**20, 1), "python": platform.python_version(),
        "jax": jax.__version__, "torch": torch_version, "threads": threads,
        "torch_threads": torch_threads, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_average": round(os.getloadavg()[0], 2),
    }


def vector_isa(flags: set[str]) -> str:
    """The widest x86 vector extension in /proc/cpuinfo's flags, and its bfloat16 instructions.

    Both libraries pick their kernels by it (a host with AVX-512 BF16 or AMX computes bfloat16
    natively, one with AVX2 only converts), so runs on different hosts compare only with it named.
    """
    if "avx512f" in flags:
        widest = "AVX-512"
    elif "avx2" in flags:
        widest = "AVX2"
    else:
        return ""
    bf16 = [name for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX BF16"))
            if flag in flags]
    return f"{widest}, " + (" and ".join(bf16) if bf16 else "no bfloat16 arithmetic")


def cpu_description(m: dict) -> str:
    """'<model> (<arch>[, <vector ISA>])' of a machine_info record."""
    isa = f", {m['vector_isa']}" if m.get("vector_isa") else ""
    capped = re.search(r"--xla_cpu_max_isa=(\S+)", m.get("xla_flags", ""))
    cap = f"; kdjax's code capped at {capped.group(1)}" if capped else ""
    return f"{m['cpu']} ({m['machine']}{isa}{cap})"


# --------------------------------------------------------------------------------------------------
# Inputs.

def make_inputs(kind: str, size: str, seed: int = 0) -> dict:
    """float32 NHWC arrays (and int labels) for one input kind at one size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n, h, w = SIZES[size]

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def labels(scale, block=1):
        coarse = rng.integers(0, CLASSES, (n, h // block, w // block)).astype(np.int32)
        coarse[rng.random(coarse.shape) < 0.05] = IGNORE
        return np.repeat(np.repeat(coarse, scale * block, axis=1), scale * block, axis=2)

    if kind == "logits":
        return {"student": normal(n, h, w, CLASSES, scale=2.0), "teacher": normal(n, h, w, CLASSES, scale=2.0)}
    if kind == "ce":
        return {"student": normal(n, h, w, CLASSES, scale=2.0), "labels": labels(1)}
    if kind == "logits_regions":  # BPKD: ground truth in class regions, so both of its parts count
        return {**make_inputs("logits", size, seed), "labels": labels(LABEL_SCALE, REGION)}
    if kind == "fakd":
        return {"student": normal(n, h, w, CLASSES, scale=2.0), "teacher": normal(n, h, w, CLASSES, scale=2.0),
                "kernel": normal(TEACHER_C, CLASSES, scale=0.05),
                "variance": rng.uniform(0.0, 1.0, (CLASSES, TEACHER_C)).astype(np.float32),
                "labels": labels(LABEL_SCALE)}
    if kind == "features":      # head → head: channels differ
        return {"student": normal(n, h, w, STUDENT_C), "teacher": normal(n, h, w, TEACHER_C)}
    if kind == "adapted":       # student through its connector: the teacher's channels
        return {"student": normal(n, h, w, TEACHER_C), "teacher": normal(n, h, w, TEACHER_C)}
    if kind == "features_labels":
        return {**make_inputs("features", size, seed), "labels": labels(LABEL_SCALE)}
    if kind == "embeddings":    # CIRKD memory: projected student and teacher embeddings
        return {**make_inputs("adapted", size, seed), "labels": labels(LABEL_SCALE)}
    if kind == "pooled":        # CIRKDv2 channels: pooled (student: and projected) features
        hp, wp = -(-h // CHANNEL_POOL), -(-w // CHANNEL_POOL)
        return {"student": normal(n, hp, wp, TEACHER_C), "teacher": normal(n, hp, wp, TEACHER_C)}
    raise ValueError(kind)


def to_torch(inputs: dict) -> dict:
    import numpy as np
    import torch

    out = {}
    for name, value in inputs.items():
        if name in ("student", "teacher"):
            out[name] = torch.from_numpy(np.ascontiguousarray(value.transpose(0, 3, 1, 2)))
        elif name == "labels":
            out[name] = torch.from_numpy(value.astype(np.int64))
        else:
            out[name] = torch.from_numpy(np.array(value))
    out["student"].requires_grad_(True)
    return out


# --------------------------------------------------------------------------------------------------
# Cases.

@dataclass
class Case:
    loss: str                       # the kdjax.losses name (and the torch_losses key)
    kind: str                       # input kind
    variants: dict = field(default_factory=dict)   # label -> jax loss fn(student, rest) or Memory
    stateful: bool = False          # CIRKD memories: the step threads the queues through


@dataclass(frozen=True)
class Memory:
    """A loss with a queue: the step updates the state with the batch, then takes the loss of the
    updated state, as a training step does; the state is donated from step to step.

    ``init(key, student, rest)`` gives the first state, ``update(state, rest, key)`` the next,
    ``loss(student, rest, state, key)`` the value; ``draws(state, rest, key_update, key_loss)``
    the random choices of the next step (int arrays by name), for the PyTorch check.
    """

    init: object
    update: object
    loss: object
    draws: object


def cirkd_memory() -> Memory:
    """CIRKD v1: class queues of pixel and region embeddings; pixel + region loss."""
    from kdjax import losses as L

    def loss(s, rest, memory, key):
        pixel, region = L.cirkd_memory(s, rest["teacher"], rest["labels"], memory, key)
        return pixel + region

    def draws(state, rest, key_update, key_loss):
        M = importlib.import_module("kdjax.losses.cirkd_memory")

        teacher = rest["teacher"]
        _, h, w, _ = teacher.shape
        flat = M._flat_labels(rest["labels"], h, w, CLASSES, IGNORE)
        _, positions = M._update(state, teacher, flat, key_update, count=16, pixel_pool="first_n")
        pixel_index, region_index = M._contrast_indices(key_loss, state, 4096, 1024)
        return {"positions": positions, "pixel_index": pixel_index, "region_index": region_index}

    return Memory(init=lambda key, s, rest: L.init_cirkd_memory(key, CLASSES, TEACHER_C),
                  update=lambda m, rest, key: L.update_cirkd_memory(m, rest["teacher"], rest["labels"], key),
                  loss=loss, draws=draws)


def cirkd_channel_memory() -> Memory:
    """CIRKDv2: one queue of teacher channel embeddings (rows of H'·W' positions)."""
    from kdjax import losses as L

    def draws(state, rest, key_update, key_loss):
        C = importlib.import_module("kdjax.losses.cirkd_channel")

        n, _, _, c = rest["teacher"].shape
        _, order = C._update(state, rest["teacher"], key_update, None, count=min(256, n * c))
        index = C._contrast_slots(key_loss, state.queue.shape[0], 2048)
        return {"order": order, "contrast_index": index}

    return Memory(init=lambda key, s, rest: L.init_cirkd_channel_memory(key, s.shape[1] * s.shape[2]),
                  update=lambda m, rest, key: L.update_cirkd_channel_memory(m, rest["teacher"], key),
                  loss=lambda s, rest, m, key: L.cirkd_channel_memory(s, rest["teacher"], m, key),
                  draws=draws)


def cases() -> list[Case]:
    from kdjax import losses as L
    from kdjax.ops.kernels import resolve_loss_scratch

    # The losses that loop over chunks run within the budget the trainer gives them here.
    scratch = resolve_loss_scratch("auto")

    def pair(fn, **options):
        return lambda s, r: fn(s, r["teacher"], **options)

    def fakd(fn, **options):
        return lambda s, r: fn(s, r["teacher"], r["kernel"], r["variance"], r["labels"],
                               strength=FAKD_STRENGTH, **options)

    return [
        Case("pixel_kd", "logits", {"": pair(L.pixel_kd)}),
        Case("channel_wise_divergence", "logits", {"": pair(L.channel_wise_divergence, tau=4.0)}),
        Case("normalized_feature_distillation", "adapted", {"": pair(L.normalized_feature_distillation)}),
        Case("pixel_feature_similarity", "features", {
            "gram": pair(L.pixel_feature_similarity, form="gram"),
            "dense": pair(L.pixel_feature_similarity, form="pairs"),
            f"block {BLOCK_SIZE}": pair(L.pixel_feature_similarity, form="pairs",
                                        block_size=BLOCK_SIZE)}),
        Case("weighted_pixel_imitation", "logits", {"": pair(L.weighted_pixel_imitation)}),
        Case("skd_pairwise", "features", {"gram": pair(L.skd_pairwise, form="gram"),
                                          "dense": pair(L.skd_pairwise, form="pairs")}),
        Case("ifvd", "features_labels", {
            "": lambda s, r: L.ifvd(s, r["teacher"], r["labels"], num_classes=CLASSES)}),
        Case("cirkd_minibatch", "adapted", {
            "dense": pair(L.cirkd_minibatch, tau=0.1, group_size=2),
            f"block {BLOCK_SIZE}": pair(L.cirkd_minibatch, tau=0.1, group_size=2, block_size=BLOCK_SIZE)}),
        Case("cirkd_memory", "embeddings", {"with update": cirkd_memory()}, stateful=True),
        Case("dist", "logits", {"": pair(L.dist)}),
        Case("attention_transfer", "features", {"": pair(L.attention_transfer)}),
        Case("fitnet", "adapted", {"": pair(L.fitnet)}),
        Case("fakd_kd", "fakd", {"": fakd(L.fakd_kd)}),
        Case("fakd_cwd", "fakd", {"": fakd(L.fakd_cwd, tau=4.0, scratch_bytes=scratch)}),
        Case("cross_entropy", "ce", {"": lambda s, r: L.cross_entropy(s, r["labels"])}),
        Case("bpkd", "logits_regions", {
            "": lambda s, r: L.bpkd(s, r["teacher"], r["labels"], num_classes=CLASSES)}),
        Case("feature_reconstruction", "adapted", {"": pair(L.feature_reconstruction)}),
        Case("omni_contrast", "adapted", {"": pair(L.omni_contrast, groups=16, patch=4, pool=4,
                                                   scratch_bytes=scratch)}),
        Case("cirkd_channel_minibatch", "pooled", {
            "": pair(L.cirkd_channel_minibatch, tau=0.1, group_size=2)}),
        Case("cirkd_channel_mse", "pooled", {"": pair(L.cirkd_channel_mse)}),
        Case("cirkd_channel_memory", "pooled", {"with update": cirkd_channel_memory()}, stateful=True),
    ]


# --------------------------------------------------------------------------------------------------
# kdjax side.

class JaxStep:
    """One compiled forward + backward step; ``__call__`` runs it and returns (value, grad)."""

    def __init__(self, fn, inputs: dict, stateful: bool, max_bytes: float):
        import jax
        import jax.numpy as jnp

        self.stateful = stateful
        self.student = jnp.asarray(inputs["student"])
        self.rest = {k: jnp.asarray(v) for k, v in inputs.items() if k != "student"}
        start = time.perf_counter()
        if stateful:
            self.memory_loss = fn  # a Memory
            self.key = jax.random.PRNGKey(1)
            self.state = fn.init(jax.random.PRNGKey(0), self.student, self.rest)

            def step(memory, student, rest, key):
                key_update, key_loss = jax.random.split(key)
                memory = fn.update(memory, rest, key_update)
                value, grad = jax.value_and_grad(lambda s: fn.loss(s, rest, memory, key_loss))(student)
                return memory, value, grad

            self.compiled = jax.jit(step, donate_argnums=0).lower(
                self.state, self.student, self.rest, self.key).compile()
        else:
            self.compiled = jax.jit(jax.value_and_grad(fn)).lower(self.student, self.rest).compile()
        self.compile_s = time.perf_counter() - start
        stats = self.compiled.memory_analysis()
        self.memory = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
                       "temp": stats.temp_size_in_bytes, "alias": stats.alias_size_in_bytes}
        self.peak_bytes = (self.memory["argument"] + self.memory["output"] + self.memory["temp"]
                           - self.memory["alias"])
        self.runnable = self.peak_bytes <= max_bytes

    def draws(self) -> dict:
        """The memory's random choices of the next step, for the PyTorch check."""
        import jax
        import numpy as np
        import torch

        key_update, key_loss = jax.random.split(self.key)
        draws = self.memory_loss.draws(self.state, self.rest, key_update, key_loss)
        return {name: torch.from_numpy(np.asarray(x).astype(np.int64)) for name, x in draws.items()}

    def memory_state(self) -> dict:
        """A copy of the state's arrays by field name, as PyTorch tensors."""
        import numpy as np
        import torch

        return {name: torch.from_numpy(np.array(value)) for name, value in self.state._asdict().items()}

    def __call__(self):
        import jax

        if self.stateful:
            self.state, value, grad = self.compiled(self.state, self.student, self.rest, self.key)
        else:
            value, grad = self.compiled(self.student, self.rest)
        return jax.block_until_ready((value, grad))


# --------------------------------------------------------------------------------------------------
# PyTorch side.

class CompileTimeout(Exception):
    pass


def compile_torch(loss, inputs, timeout: float):
    """torch.compile of the loss term, first (compiling) call included; (fn, seconds) or (None, why)."""
    import torch

    import torch_losses

    def alarm(*_):
        raise CompileTimeout(f"compile took longer than {timeout:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(timeout)))
    start = time.perf_counter()
    try:
        term = torch.compile(loss.term)
        torch_losses.value_and_grad(loss, inputs, term)
        return term, time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - any compiler failure means 'n/a'
        torch._dynamo.reset()
        return None, f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:160]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def allocator_peak_bytes(call) -> int:
    """The peak, during ``call()``, of the bytes PyTorch's CPU allocator holds above its level at
    the start, from the allocation events of ``torch.profiler``."""
    import itertools

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = []

    def walk(node):
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    return max(max(itertools.accumulate(size for _, size in events), default=0), 0)


def torch_peak_bytes(loss, inputs) -> int:
    """Input tensors + the allocator's peak above its start level during one eager step."""
    import torch

    import torch_losses

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)

    def step():
        torch_losses.value_and_grad(loss, inputs)
        inputs["student"].grad = None

    base = sum(t.untyped_storage().nbytes() for t in tensors(inputs))
    inputs["student"].grad = None
    return base + allocator_peak_bytes(step)


# --------------------------------------------------------------------------------------------------
# One case.

def relative_difference(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def timed(fn):
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def summary(seconds: list[float]) -> dict:
    ms = [1e3 * s for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "reps": len(ms)}


def run_case(case: Case, size: str, args) -> list[dict]:
    import torch_losses

    def log(line):
        print(line, file=sys.stderr, flush=True)

    gc.collect()
    inputs = make_inputs(case.kind, size)
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    loss = torch_losses.losses(FAKD_STRENGTH, CLASSES)[case.loss]
    t_inputs = to_torch(inputs)
    rows = [{"loss": case.loss, "variant": label, "size": size, "shapes": shapes, "status": "ok"}
            for label in case.variants]

    # kdjax: compile every variant; skip running those whose compiled peak exceeds the limit.
    steps = {}
    for row, (label, fn) in zip(rows, case.variants.items()):
        step = JaxStep(fn, inputs, case.stateful, args.max_gb * 2**30)
        row["kdjax"] = {"compile_s": step.compile_s, "peak_mb": step.peak_bytes / 2**20,
                        "memory_analysis": step.memory}
        if step.runnable:
            steps[label] = step
        else:
            row["status"] = (f"skipped: compiled peak {step.peak_bytes / 2**30:.1f} GB "
                             f"> --max_gb {args.max_gb:g}")
    if case.stateful:
        state = steps["with update"].memory_state()
        t_inputs["memory"] = state

    # Check: the same value (and report the gradient difference) before timing anything. These calls
    # are also the warm-up calls, and their times size the repetitions.
    warm = {}
    if case.stateful:
        t_inputs["draws"] = steps["with update"].draws()
    (t_value, t_grad), warm["torch_eager"] = timed(lambda: torch_losses.value_and_grad(loss, t_inputs))
    t_inputs.pop("draws", None)
    t_value = float(t_value)
    t_grad = t_grad.permute(0, 2, 3, 1).numpy()
    for row, label in zip(rows, case.variants):
        if label not in steps:
            continue
        (value, grad), warm[f"kdjax:{label}"] = timed(steps[label])
        value_diff = abs(float(value) - t_value) / max(abs(t_value), 1e-30)
        row["check"] = {"kdjax": float(value), "torch": t_value, "value_rel_diff": value_diff,
                        "grad_rel_diff": relative_difference(grad, t_grad)}
        if value_diff > args.rtol:
            row["status"] = f"mismatch: value differs by {value_diff:.2e} relative (> {args.rtol:g})"
            del steps[label], warm[f"kdjax:{label}"]

    # torch.compile: the first call compiles, the second is checked and sizes the repetitions.
    compiled, compile_info = None, "skipped (--compile off)"
    if args.compile == "on" and warm["torch_eager"] > args.compile_max_step:
        compile_info = (f"skipped (eager step {warm['torch_eager']:.0f} s > --compile_max_step "
                        f"{args.compile_max_step:g} s)")
    elif args.compile == "on":
        compiled, compile_info = compile_torch(loss, t_inputs, args.compile_timeout)
        if compiled is not None:
            (value, _), warm["torch_compile"] = timed(
                lambda: torch_losses.value_and_grad(loss, t_inputs, compiled))
            # CIRKD memory draws new contrast sets every step: its values are not comparable.
            if not case.stateful and abs(float(value) - t_value) > args.rtol * abs(t_value):
                compiled, compile_info = None, f"n/a: compiled value {float(value):.6g} differs"
                del warm["torch_compile"]
        else:
            compile_info = "n/a: " + compile_info
    impls = {f"kdjax:{label}": step for label, step in steps.items()}
    impls["torch_eager"] = lambda: torch_losses.value_and_grad(loss, t_inputs)
    if compiled is not None:
        impls["torch_compile"] = lambda: torch_losses.value_and_grad(loss, t_inputs, compiled)

    # Interleaved repetitions; their number from the budget and the slowest implementation.
    slowest = max(warm.values())
    reps = int(min(args.max_reps, max(args.min_reps, args.budget // max(slowest, 1e-9))))
    times = {name: [] for name in impls}
    order = list(impls)
    for rep in range(reps):
        for name in (order if rep % 2 == 0 else order[::-1]):
            times[name].append(timed(impls[name])[1])

    eager = summary(times["torch_eager"])
    eager["peak_mb"] = torch_peak_bytes(loss, t_inputs) / 2**20
    if compiled is not None:
        compiled_result = {**summary(times["torch_compile"]), "compile_s": compile_info}
    else:
        compiled_result = {"status": compile_info}
    for row, label in zip(rows, case.variants):
        row["torch_eager"] = eager
        row["torch_compile"] = compiled_result
        key = f"kdjax:{label}"
        if key in times:
            row["kdjax"].update(summary(times[key]))
            row["ratio_eager"] = eager["median_ms"] / row["kdjax"]["median_ms"]
            if "median_ms" in compiled_result:
                row["ratio_compile"] = compiled_result["median_ms"] / row["kdjax"]["median_ms"]
        log(f"{size:10s} {case.loss:32s} {label:12s} "
            + (f"kdjax {row['kdjax']['median_ms']:9.2f} ms  torch {eager['median_ms']:9.2f} ms  "
               f"ratio {row['ratio_eager']:5.2f}  reps {reps}" if "ratio_eager" in row else row["status"]))
    del steps, impls, t_inputs
    return rows


# --------------------------------------------------------------------------------------------------
# Report.

def combine_runs(runs: list[list[dict]]) -> list[dict]:
    """One row per case from the rows of several runs of the same cases, in the same order.

    Times: the median of the runs' medians, the min and max over all of them, the repetitions
    summed. Ratios: the median of the runs' ratios, which are kept in ``ratios_eager``. Checks: the
    largest differences. A case that was not measured in every run keeps the first such run's row.
    """
    combined = []
    for rows in zip(*runs):
        failed = [r for r in rows if "ratio_eager" not in r]
        if failed:
            combined.append(failed[0])
            continue
        row = {**rows[0], "ratios_eager": [r["ratio_eager"] for r in rows],
               "ratio_eager": statistics.median(r["ratio_eager"] for r in rows)}
        for side in ("kdjax", "torch_eager", "torch_compile"):
            sides = [r[side] for r in rows]
            if all("median_ms" in x for x in sides):
                row[side] = {**sides[0], "median_ms": statistics.median(x["median_ms"] for x in sides),
                             "min_ms": min(x["min_ms"] for x in sides),
                             "max_ms": max(x["max_ms"] for x in sides),
                             "reps": sum(x["reps"] for x in sides)}
        if all("ratio_compile" in r for r in rows):
            row["ratio_compile"] = statistics.median(r["ratio_compile"] for r in rows)
        else:
            row.pop("ratio_compile", None)
        row["check"] = {**rows[0]["check"],
                        **{key: max(r["check"][key] for r in rows)
                           for key in ("value_rel_diff", "grad_rel_diff")}}
        combined.append(row)
    return combined


def run_case_in_child(loss: str, size: str, args) -> list[dict]:
    """One (loss, size) case in a fresh interpreter, with this run's settings; returns its rows.

    Both libraries take their large buffers from glibc, which serves them from its heap or from a
    fresh ``mmap`` (a page fault per 4 KB page) depending on the sizes freed before. In one shared
    process a case's time would then depend on the cases run before it (up to 4× for PyTorch).
    """
    settings = ["--compile", args.compile, "--compile_timeout", str(args.compile_timeout),
                "--compile_max_step", str(args.compile_max_step), "--budget", str(args.budget),
                "--min_reps", str(args.min_reps), "--max_reps", str(args.max_reps),
                "--max_gb", str(args.max_gb), "--rtol", str(args.rtol)]
    if args.threads:
        settings += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as scratch:
        rows = Path(scratch) / "cases.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--process", "shared",
                   "--sizes", size, "--losses", loss, "--cases_json", str(rows), *settings]
        done = subprocess.run(command)
        if done.returncode != 0:
            raise SystemExit(f"the {size} {loss} case failed (exit code {done.returncode}, its output "
                             f"above); rerun it alone with --process shared --sizes {size} "
                             f"--losses {loss}")
        return json.loads(rows.read_text())


def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 10 else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def timing(d: dict) -> str:
    if "median_ms" not in d:
        return d.get("status", "–")
    return f"{fmt(d['median_ms'])} ({fmt(d['min_ms'])}–{fmt(d['max_ms'])})"


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        BEGIN,
        f"Machine: {cpu_description(m)}, {m['cores']} cores, {m['ram_gb']:g} GB RAM; Python "
        f"{m['python']}, jax {m['jax']}, torch {m['torch']}. Threads: {m['threads']} for both "
        f"(CPU affinity {m['threads']} core{'s' if m['threads'] > 1 else ''}, XLA's thread pool sized from it, "
        f"`torch.set_num_threads({m['torch_threads']})`, OMP/MKL_NUM_THREADS={m['threads']}"
        + (f", OMP_WAIT_POLICY={m['omp_wait_policy']}" if m.get("omp_wait_policy") else "")
        + (f", XLA_FLAGS `{m['xla_flags']}`" if m["xla_flags"] else "")
        + f"). Load average {m['load_average']:.1f} when the run started (the machine is shared).",
        "",
        f"    {result['command']}",
        "",
        "Forward + backward (gradient w.r.t. the student input), float32. kdjax: one jitted step. "
        "PyTorch: eager, and `torch.compile` of the same code. Times in ms: median (min–max) over "
        "interleaved repetitions after one warm-up call; ratio = PyTorch eager / kdjax (> 1: kdjax "
        "faster); 'compiled' = PyTorch compiled / kdjax. Peak memory in MB: kdjax = XLA buffer assignment "
        "(arguments + outputs + temporaries − donated); PyTorch = inputs + allocator peak during the step "
        "(torch.profiler). Every case first checks that both values agree within "
        f"{result['rtol']:g} relative; 'grad diff' is ‖g_kdjax − g_torch‖/‖g_torch‖. PyTorch computes "
        "PFS and CIRKD memory image by image and CIRKD mini-batch pair by pair, back-propagating each "
        "part before forming the next (`benchmarks/torch_losses.py`). BPKD's ground truth has one class "
        f"per {REGION}×{REGION} block of logit pixels. A kdjax variant whose compiled peak "
        f"exceeds {result['settings']['max_gb']:g} GB is not run (its MB column shows that estimate); "
        "torch.compile is not tried when one eager step takes longer than "
        f"{result['settings'].get('compile_max_step', 20):g} s. Repetitions: as many as fit in "
        f"{result['settings']['budget_s']:g} s per implementation, {result['settings']['min_reps']}–"
        f"{result['settings']['max_reps']}. "
        + ("Each (loss, size) case ran in a fresh process."
           if result["settings"].get("process") == "per_case"
           else "All cases ran in one process, one after another.")
        + (f" Every case ran {runs} times, the runs one after another: times are the median of the "
           "runs' medians (min–max over all their repetitions), the ratio is the median of the runs' "
           "ratios, each run's ratio in brackets, and 'reps' counts all runs' repetitions."
           if (runs := result["settings"].get("runs", 1)) > 1 else ""),
    ]
    header = ["loss", "kdjax ms", "PyTorch eager ms", "ratio", "torch.compile ms", "compiled", "kdjax MB",
              "PyTorch MB", "grad diff", "reps"]
    for size in result["sizes"]:
        n, h, w = SIZES[size]
        lines += [
            "", (f"**{size}**: N = {n}, {h}×{w}; logits {CLASSES} classes, features {STUDENT_C} (student) / "
                 f"{TEACHER_C} (teacher) channels, {TEACHER_C} for both where the shapes must match; "
                 f"CIRKDv2 channel losses on the {CHANNEL_POOL}×{CHANNEL_POOL}-pooled "
                 f"{-(-h // CHANNEL_POOL)}×{-(-w // CHANNEL_POOL)} maps."), "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        ]
        for r in (r for r in result["cases"] if r["size"] == size):
            name = r["loss"] + (f" ({r['variant']})" if r["variant"] else "")
            eager = r.get("torch_eager", {})
            torch_mb = fmt(eager["peak_mb"]) if "peak_mb" in eager else "–"
            if r["status"] != "ok":
                cells = [name, r["status"], timing(eager) if eager else "–", "–", "–", "–",
                         fmt(r["kdjax"]["peak_mb"]), torch_mb, "–", "–"]
            else:
                ratio, comp = r["ratio_eager"], r.get("ratio_compile")
                mark = " ✓" if ratio >= TARGET else ""
                if "ratios_eager" in r:
                    mark += " (" + ", ".join(f"{x:.2f}" for x in r["ratios_eager"]) + ")"
                cells = [name, timing(r["kdjax"]), timing(eager), f"{ratio:.2f}{mark}",
                         timing(r["torch_compile"]), f"{comp:.2f}" if comp else "–", fmt(r["kdjax"]["peak_mb"]),
                         torch_mb, f"{r['check']['grad_rel_diff']:.0e}", str(r["kdjax"]["reps"])]
            lines.append("| " + " | ".join(cells) + " |")
    meets, misses = verdict(result)
    lines += ["", f"Target: kdjax forward + backward ≥ {TARGET:g}× faster than PyTorch eager (✓), at every "
              "size run.", f"Met by: {', '.join(meets) or 'none'}.", f"Missed by: {', '.join(misses) or 'none'}.",
              END]
    return "\n".join(lines) + "\n"


def verdict(result: dict) -> tuple[list[str], list[str]]:
    """Losses (variant) meeting the target at every size run, and the others with their worst ratio."""
    worst = {}
    for r in result["cases"]:
        name = r["loss"] + (f" ({r['variant']})" if r["variant"] else "")
        ratio = r.get("ratio_eager")
        if ratio is not None:
            worst[name] = min(worst.get(name, ratio), ratio)
    meets = [name for name, ratio in worst.items() if ratio >= TARGET]
    misses = [f"{name} ({ratio:.2f}×)" for name, ratio in worst.items() if ratio < TARGET]
    return meets, misses


# Replaces the generated part of the 'Losses' section (or appends the section).
write_section = results_file.section_writer(SECTION, BEGIN, END)


# --------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions, no torch.compile: a smoke run")
    parser.add_argument("--sizes", default=None,
                        help=f"comma list of {', '.join(SIZES)} (default: all; quick: small)")
    parser.add_argument("--losses", default="", help="comma list of loss names (default: all)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    parser.add_argument("--compile", choices=("on", "off"), default=None,
                        help="time torch.compile too (default: on, off with --quick)")
    parser.add_argument("--compile_timeout", type=float, default=240.0, help="seconds per torch.compile")
    parser.add_argument("--compile_max_step", type=float, default=20.0,
                        help="do not try torch.compile when one eager step takes longer (seconds)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of repetitions per implementation and case (default 4, quick 0.5)")
    parser.add_argument("--min_reps", type=int, default=None, help="default 3, quick 2")
    parser.add_argument("--max_reps", type=int, default=None, help="default 30, quick 3")
    parser.add_argument("--max_gb", type=float, default=4.0,
                        help="skip running a kdjax variant whose compiled peak exceeds this many GB")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative value agreement required")
    parser.add_argument("--process", choices=("per_case", "shared"), default="per_case",
                        help="run each (loss, size) case in a fresh process (default) or all in this one")
    parser.add_argument("--runs", type=int, default=1,
                        help="measure every case this many times, one run after another (default 1)")
    add_isa_option(parser)
    parser.add_argument("--cases_json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--from_json", default=None, help=results_file.FROM_JSON_HELP)
    args = parser.parse_args(argv)
    if args.from_json:
        return results_file.replay(args.from_json, table, write_section if args.write else None)
    args.compile = args.compile or ("off" if args.quick else "on")
    args.budget = args.budget if args.budget is not None else (0.5 if args.quick else 4.0)
    args.min_reps = args.min_reps or (2 if args.quick else 3)
    args.max_reps = args.max_reps or (3 if args.quick else 30)
    sizes = [s for s in (args.sizes or ("small" if args.quick else ",".join(SIZES))).split(",") if s]
    if unknown := set(sizes) - set(SIZES):
        parser.error(f"unknown sizes {sorted(unknown)}; choose from {list(SIZES)}")
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")

    threads = configure_threads(args.threads)
    limit_isa(args.isa)
    add_cpu_flags()  # the losses compiled as the kdjax command compiles them
    import torch

    torch.set_num_threads(threads)
    all_cases = cases()
    wanted = [s for s in args.losses.split(",") if s]
    if unknown := set(wanted) - {c.loss for c in all_cases}:
        parser.error(f"unknown losses {sorted(unknown)}")
    selected = [c for c in all_cases if not wanted or c.loss in wanted]

    command = "python benchmarks/losses.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"machine": machine_info(threads), "command": command.strip(), "sizes": sizes,
              "rtol": args.rtol, "target_ratio": TARGET, "quick": args.quick,
              "settings": {"compile": args.compile, "compile_max_step": args.compile_max_step,
                           "budget_s": args.budget, "min_reps": args.min_reps,
                           "max_reps": args.max_reps, "max_gb": args.max_gb, "block_size": BLOCK_SIZE,
                           "fakd_strength": FAKD_STRENGTH, "process": args.process,
                           "runs": args.runs},
              "cases": []}
    runs = []
    for _ in range(args.runs):
        rows = []
        for size in sizes:
            for case in selected:
                if args.process == "per_case":
                    rows += run_case_in_child(case.loss, size, args)
                else:
                    rows += run_case(case, size, args)
        runs.append(rows)
    if args.runs == 1:
        result["cases"] = runs[0]
    else:
        result["runs"], result["cases"] = runs, combine_runs(runs)
    if args.cases_json:
        Path(args.cases_json).write_text(json.dumps(result["cases"]))
        return result
    result["meets_target"], result["misses_target"] = verdict(result)
    results_file.emit(result, table(result), json_path=args.json, write=args.write,
                      section=SECTION, begin=BEGIN, end=END)
    return result


if __name__ == "__main__":
    main()
