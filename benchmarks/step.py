"""Train step: kdjax's whole distillation step against the same step in PyTorch, same networks, batch
and resolution.

    python benchmarks/step.py [--quick] [--size H W] [--batch N] [--reps R] [--student NAME]
                              [--teacher NAME] [--dtypes float32,bfloat16] [--threads N]
                              [--json FILE] [--write] [--no-torch] [--demo] [--kernels K]
                              [--isa ISA]
    python benchmarks/step.py --from_json FILE [--write]     # the table of a saved run

Three cases, each timed as one full call:

1. ``teacher_forward``: the frozen teacher (default DeepLabV3-ResNet101) on the batch in inference
   mode. kdjax: a jitted forward of the experiment's teacher (``training.experiment.teacher_tensors``, as the
   train step calls it), returning logits, aux logits and the head feature. PyTorch: ``eval()`` and
   ``torch.inference_mode()``, the same three outputs.
2. ``student_alone``: the student's (default DeepLabV3-ResNet18) train step: forward in train mode,
   CE + 0.4·aux CE on the logits upsampled bilinearly (align_corners=True) to the label size,
   backward, SGD (momentum 0.9, coupled L2 weight decay 1e-4, lr 0.01 on the poly schedule).
   kdjax: the compiled step of an experiment without distillation terms.
3. ``distill``: the teacher forward, the student step and channel-wise divergence on the logits
   (weight 3, τ = 4; the ``cwd_logits`` recipe). kdjax: the compiled step with those terms.

Method:

- kdjax runs jitted, PyTorch eager (``tests/torch_reference``'s CIRKD networks, whose parameters are
  those of kdjax's, and ``benchmarks/torch_losses.py``'s CWD). Random weights on both sides (the cost
  of a step does not depend on them); the two students must have the same parameter count. Inputs:
  random N×H×W×3 images (the same values as N×3×H×W for PyTorch) and random labels in [0, 19).
- Both libraries get the same number of threads (``losses.configure_threads``).
- Each implementation gets one untimed warm-up call, then the repetitions are interleaved (kdjax
  case 1, PyTorch case 1, kdjax case 2, …, then the reverse order), so load from other jobs falls on
  both alike. Reported: median and min–max ms per step, images/s from the median, and the ratio
  PyTorch / kdjax (> 1: kdjax faster). kdjax's setup and compile time is reported apart.
- FLOPs per step: kdjax from the compiled executable's ``cost_analysis()``, PyTorch from
  ``torch.utils.flop_counter.FlopCounterMode`` over one step. XLA counts a convolution's kernel taps
  only where they fall inside the input, FlopCounterMode also where they fall on the zero padding;
  with the ASPP's dilation rates 12/24/36 on small feature maps most taps are padding, so the
  PyTorch count uses XLA's rule for convolutions (its own count, padding included, is kept as
  ``gflop_with_padding``). Each side's share of the CPU's peak is its FLOPs / median time / the
  CPU's peak, the faster of the two libraries' float32 matmul rates (a 2048×2048 product, median of
  several; a library's own rate can sit far below the CPU's, as PyTorch's at 190 against XLA's 404
  GFLOP/s on an AVX-512 host, while its convolutions run near the higher one).
- Memory: kdjax = XLA's buffer assignment of the compiled call, arguments + outputs + temporaries −
  donated; PyTorch = the tensors held when the call starts (weights, momentum buffers, batch) plus
  the allocator's peak above that during the call (``torch.profiler`` allocation events).
- Distillation overhead per side: (distill − teacher_forward − student_alone) / student_alone, the
  cost of the distillation losses with the teacher's forward taken out; the target is ≤ 5 %.
- XLA flags: the environment's ``XLA_FLAGS`` plus ``kdjax.runtime.cpu_flags.CPU_FLAGS``, which the ``kdjax``
  command sets too.
- Host memory: freed memory is kept for reuse (``kdjax.runtime.host_memory``), as the ``kdjax`` command has
  it, for both libraries (they share the process). ``--default-allocator`` keeps glibc's defaults,
  under which every step's fresh buffers fault their pages in again.
- ``--dtypes float32,bfloat16`` adds a bfloat16 block: the kdjax networks compute in bfloat16
  (parameters stay float32), PyTorch runs under ``torch.autocast('cpu', dtype=torch.bfloat16)``.

``--quick``: 64×64, batch 2, 2 repetitions, DeepLabV3-ResNet18 as student and teacher (a smoke run).
``--demo``: the networks, crop and batch of ``configs/demo.py`` (kdjax only). ``--kernels``: the
convolution and batch-norm forms, 'cpu' or 'gpu' against 'xla' (``kdjax/ops/kernels.py``). ``--isa AVX2``:
XLA generates code for at most that instruction set (``--xla_cpu_max_isa``), so an AVX-512 host
measures what an AVX2 one runs; PyTorch keeps its own kernels.
``--no-torch``: kdjax only. ``--write`` puts each dtype's table into benchmarks/RESULTS.md, between
its own markers: float32 in the 'Train step' section, bfloat16 in its 'bfloat16 compute'
subsection. A run of one dtype leaves the other's table as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Sibling modules (losses, results_file, torch_losses) and the repository root (tests.torch_reference).
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import losses  # noqa: E402
from kdjax.runtime.cpu_flags import add_cpu_flags  # noqa: E402
from kdjax.runtime.host_memory import keep_freed_memory  # noqa: E402
import results_file  # noqa: E402

SECTION = "## Train step"
BEGIN, END = "<!-- step.py: begin -->", "<!-- step.py: end -->"
# Each dtype's table has its own place in RESULTS.md, so that a run of one dtype leaves the other's
# table as it was: float32 in 'Train step', bfloat16 in its subsection.
BFLOAT16_SECTION = "### bfloat16 compute"
MARKERS = {"float32": (BEGIN, END),
           "bfloat16": ("<!-- step.py bfloat16: begin -->", "<!-- step.py bfloat16: end -->")}

CASES = ("teacher_forward", "student_alone", "distill")
SIDES = ("kdjax", "torch")
CLASSES, IGNORE = 19, 255
AUX_WEIGHT = 0.4
CWD_WEIGHT, CWD_TAU = 3.0, 4.0
LR, MOMENTUM, WEIGHT_DECAY, POLY_POWER, TOTAL_STEPS = 0.01, 0.9, 1e-4, 0.9, 40000
TEACHER_OUTPUTS = ("logits", "aux_logits", "head")   # what the PyTorch model's forward returns
MATMUL_N = 2048
OVERHEAD_TARGET = 5.0      # percent of the student-alone step
STEP_TARGET = 1.0          # distill: PyTorch time / kdjax time
QUICK = {"size": (64, 64), "batch": 2, "reps": 2, "student": "deeplabv3_resnet18",
         "teacher": "deeplabv3_resnet18"}


@dataclass
class Impl:
    """One case on one side: a call that runs a whole step and waits for it, and what is known
    about it before timing (FLOPs, memory, compile time)."""

    call: Callable[[], object]
    flops: float = 0.0
    peak_bytes: int = 0
    extra: dict = field(default_factory=dict)
    # The state and metrics of the latest call, for callers that check the values (not reported).
    last: dict = field(default_factory=dict)
    # The compiled executable, where there is one (its optimized HLO for profiles; not reported).
    compiled: object = None


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_batch(args, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = args.size
    return {"image": rng.standard_normal((args.batch, h, w, 3)).astype(np.float32),
            "label": rng.integers(0, CLASSES, (args.batch, h, w)).astype(np.int32)}


# --------------------------------------------------------------------------------------------------
# kdjax side.

def demo_networks() -> dict:
    """The teacher and student sections of ``configs/demo.py`` (names, widths, heads), its crop,
    batch, and its CWD terms (which resize the teacher's logits to the student's stride)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", Path(__file__).parents[1] / "configs/demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config()
    return {"teacher": config.teacher.to_dict(), "student": config.student.to_dict(),
            "size": tuple(config.data.crop_size), "batch": config.train.batch_size,
            "terms": config.methods.cwd_logits}


def kdjax_config(args, dtype: str, distill: bool):
    from kdjax.config.defaults import base_config
    from kdjax.config.recipes import method_terms

    config = base_config()
    config.data.name = "cityscapes"          # 19 classes; only its metadata is read
    config.data.crop_size = tuple(args.size)
    terms = method_terms("cwd_logits")
    if args.demo:
        networks = demo_networks()
        config.teacher.update(networks["teacher"])
        config.student.update(networks["student"])
        terms = networks["terms"]
    config.student.name, config.teacher.name = args.student, args.teacher
    config.student.kernels = config.teacher.kernels = args.kernels
    config.teacher.checkpoint = "random"
    config.student.dtype = config.teacher.dtype = dtype
    config.train.batch_size = args.batch
    config.train.learning_rate = LR
    config.train.momentum, config.train.weight_decay = MOMENTUM, WEIGHT_DECAY
    config.train.poly_power, config.train.steps = POLY_POWER, TOTAL_STEPS
    config.train.aux_weight = AUX_WEIGHT
    if distill:
        config.distill.terms = terms
    return config


def compiled_costs(compiled) -> tuple[int, dict]:
    """(peak bytes, memory analysis) of a compiled executable."""
    stats = compiled.memory_analysis()
    memory = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
              "temp": stats.temp_size_in_bytes, "alias": stats.alias_size_in_bytes}
    peak = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    return peak, memory


def kdjax_train_step(args, dtype: str, distill: bool, batch: dict):
    """The compiled train step of a kdjax experiment; (Impl, experiment, student parameter count)."""
    import jax

    from kdjax import training as train
    from kdjax.runtime import sharding

    mesh = sharding.make_mesh(jax.devices()[:1])
    start = time.perf_counter()
    exp = train.setup(kdjax_config(args, dtype, distill), mesh=mesh)
    state = exp.init_state()
    params = sum(x.size for x in jax.tree.leaves(state.student.params))
    batch = sharding.global_batch(batch, mesh)
    teacher = exp.teacher_inputs()
    # The experiment's own step, compiled once here so its costs can be read; the state is
    # donated, as in training.
    compiled = exp.compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def call():
        holder["state"], holder["metrics"] = compiled(holder["state"], teacher, batch)
        jax.block_until_ready(holder)

    peak, memory = compiled_costs(compiled)
    impl = Impl(call, exp.step_flops(), peak, {"compile_s": compile_s, "memory_analysis": memory},
                last=holder, compiled=compiled)
    return impl, exp, params


def kdjax_teacher_forward(exp, batch: dict) -> Impl:
    """A jitted inference forward of the experiment's frozen teacher."""
    import jax

    from kdjax.ops.cost import traced_flops
    from kdjax.runtime import sharding
    from kdjax.training.experiment import teacher_tensors

    def forward(variables, images):
        tensors = teacher_tensors(exp.teacher, variables, images)
        return {name: tensors[name] for name in TEACHER_OUTPUTS if name in tensors}

    images = sharding.global_batch({"image": batch["image"]}, exp.mesh)["image"]
    variables = exp.teacher_inputs()
    start = time.perf_counter()
    traced = jax.jit(forward).trace(variables, images)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    peak, memory = compiled_costs(compiled)
    return Impl(lambda: jax.block_until_ready(compiled(variables, images)), traced_flops(traced),
                peak, {"compile_s": compile_s, "memory_analysis": memory})


def param_count(module, kind) -> int:
    import jax
    from flax import nnx

    return sum(x.size for x in jax.tree.leaves(nnx.state(module, kind)))


def kdjax_impls(args, dtype: str, batch: dict) -> tuple[dict, dict]:
    """The three kdjax cases and the parameter counts of its networks."""
    from flax import nnx

    distill, exp, _ = kdjax_train_step(args, dtype, True, batch)
    alone, _, student_params = kdjax_train_step(args, dtype, False, batch)
    teacher = kdjax_teacher_forward(exp, batch)
    counts = {"student": student_params, "teacher": param_count(exp.teacher.merge(), nnx.Param)}
    return {"teacher_forward": teacher, "student_alone": alone, "distill": distill}, counts


# --------------------------------------------------------------------------------------------------
# PyTorch side.

def torch_task_loss(logits, aux_logits, labels):
    """CE + 0.4·aux CE on the logits upsampled to the label size, as kdjax.distill.objective.task_loss."""
    import torch.nn.functional as F

    size = labels.shape[1:]

    def ce(x):
        up = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return F.cross_entropy(up, labels, ignore_index=IGNORE)

    return ce(logits) + AUX_WEIGHT * ce(aux_logits)


class TorchSide:
    """The PyTorch networks, optimizer and batch; one method per case."""

    def __init__(self, args, dtype: str, batch: dict):
        import numpy as np
        import torch
        import torch_losses

        from tests.torch_reference import build_cirkd

        torch.manual_seed(0)
        self.images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(batch["label"].astype(np.int64))
        self.student = build_cirkd(args.student, num_classes=CLASSES).train()
        self.teacher = build_cirkd(args.teacher, num_classes=CLASSES).eval().requires_grad_(False)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=LR, momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.PolynomialLR(
            self.optimizer, total_iters=TOTAL_STEPS, power=POLY_POWER)
        self.bf16 = dtype == "bfloat16"
        self.cwd = torch_losses.channel_wise_divergence

    def autocast(self):
        import torch

        if self.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def teacher_forward(self):
        import torch

        with torch.inference_mode(), self.autocast():
            return self.teacher(self.images)

    def train_step(self, distill: bool):
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            if distill:
                with torch.inference_mode():
                    teacher_logits = self.teacher(self.images)[0]
            logits, aux_logits, _ = self.student(self.images)
            loss = torch_task_loss(logits, aux_logits, self.labels)
            if distill:
                loss = loss + CWD_WEIGHT * self.cwd(logits, teacher_logits, CWD_TAU)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def calls(self) -> dict:
        return {"teacher_forward": self.teacher_forward,
                "student_alone": lambda: self.train_step(False),
                "distill": lambda: self.train_step(True)}

    def held_tensors(self, case: str):
        """The tensors a case's call finds in memory when it starts (gradients excluded: a step
        starts without them, as kdjax's step holds none between steps)."""
        import torch

        modules = [self.teacher] if case == "teacher_forward" else [self.student]
        if case == "distill":
            modules.append(self.teacher)
        yield self.images
        for module in modules:
            yield from module.parameters()
            yield from module.buffers()
        if case != "teacher_forward":
            yield self.labels
            for state in self.optimizer.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def torch_peak_bytes(call, held) -> int:
    """Held tensors + the allocator's peak above its start level during one call (as
    ``losses.torch_peak_bytes`` measures a loss)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    return sum(storages.values()) + losses.allocator_peak_bytes(call)


def valid_taps(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """(output position, kernel tap) pairs of one spatial axis whose input index is inside the input,
    not in the zero padding."""
    out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    return sum(1 for o in range(out) for k in range(kernel) if 0 <= o * stride - pad + k * dilation < size)


def conv_flops(x_shape, w_shape, _bias, stride, padding, dilation, transposed, *args, out_shape=None,
               **kwargs) -> int:
    """Convolution FLOPs over the kernel taps that fall inside the input, as XLA's cost analysis
    and `kdjax.ops.cost` count them. FlopCounterMode's own formula also counts the taps on the
    zero padding, which matters for the dilated ASPP convolutions (rates 12/24/36) on small
    feature maps."""
    from torch.utils.flop_counter import conv_flop_count

    if transposed or isinstance(padding, str):
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=transposed)
    c_out, c_in_per_group, *kernel = w_shape
    taps = 1
    for size, k, st, p, d in zip(x_shape[2:], kernel, stride, padding, dilation):
        taps *= valid_taps(size, k, st, p, d)
    return 2 * x_shape[0] * c_out * c_in_per_group * taps


def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """The input gradient and the weight gradient each cost what the forward costs."""
    forward = conv_flops(x_shape, w_shape, bias, stride, padding, dilation, transposed,
                         out_shape=grad_out_shape)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def torch_flops(call) -> tuple[float, float]:
    """FLOPs of one call: (convolutions counted over valid taps, FlopCounterMode's own count)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    valid = {aten.convolution: conv_flops, aten._convolution: conv_flops,
             aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=valid) as counter:
        call()
    with FlopCounterMode(display=False) as nominal:
        call()
    return float(counter.get_total_flops()), float(nominal.get_total_flops())


def torch_impls(args, dtype: str, batch: dict) -> tuple[dict, dict]:
    """The three PyTorch cases (after their warm-up) and the parameter counts of its networks."""
    side = TorchSide(args, dtype, batch)
    impls = {}
    for case, call in side.calls().items():
        call()                      # first call: allocator and kernel caches warmed up
        flops, nominal = torch_flops(call)
        # The memory call starts without gradients, as kdjax's step, which keeps none between steps.
        side.optimizer.zero_grad(set_to_none=True)
        impls[case] = Impl(call, flops=flops,
                           peak_bytes=torch_peak_bytes(call, list(side.held_tensors(case))),
                           extra={"gflop_with_padding": nominal / 1e9})
    counts = {name: sum(p.numel() for p in net.parameters())
              for name, net in (("student", side.student), ("teacher", side.teacher))}
    return impls, counts


# --------------------------------------------------------------------------------------------------
# Matmul peak.

def matmul_peaks(reps: int, with_torch: bool) -> dict:
    """float32 GFLOP/s of an N×N @ N×N product in each library: the CPU's practical peak."""
    import jax
    import numpy as np

    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((MATMUL_N, MATMUL_N)).astype(np.float32) for _ in range(2))
    ja, jb = jax.device_put(a), jax.device_put(b)
    product = jax.jit(lambda x, y: x @ y).lower(ja, jb).compile()
    calls = {"kdjax": lambda: jax.block_until_ready(product(ja, jb))}
    if with_torch:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        calls["torch"] = lambda: torch.mm(ta, tb)
    times = interleaved(calls, reps)
    flops = 2.0 * MATMUL_N**3
    return {side: flops / statistics.median(t) / 1e9 for side, t in times.items()}


# --------------------------------------------------------------------------------------------------
# Timing.

def interleaved(calls: dict, reps: int) -> dict:
    """One untimed warm-up call each, then ``reps`` timed rounds, every other round reversed."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    order = list(calls)
    for rep in range(reps):
        for name in (order if rep % 2 == 0 else order[::-1]):
            times[name].append(timed(calls[name]))
    return times


def side_summary(seconds: list[float], impl: Impl, batch: int) -> dict:
    median = statistics.median(seconds)
    return {"median_ms": 1e3 * median, "min_ms": 1e3 * min(seconds), "max_ms": 1e3 * max(seconds),
            "reps": len(seconds), "images_per_s": batch / median, "gflop": impl.flops / 1e9,
            "peak_mb": impl.peak_bytes / 2**20, **impl.extra}


def peak_percent(side: dict, cpu_peak_gflops: float) -> float:
    """The share of the CPU's peak that a side's step achieves: GFLOP / median time / peak."""
    return 100.0 * side["gflop"] / (side["median_ms"] / 1e3) / cpu_peak_gflops


def overhead(cases: dict, side: str) -> float:
    """(distill − teacher_forward − student_alone) / student_alone, in percent."""
    ms = {case: cases[case][side]["median_ms"] for case in CASES}
    return 100.0 * (ms["distill"] - ms["teacher_forward"] - ms["student_alone"]) / ms["student_alone"]


def run_dtype(args, dtype: str, log) -> tuple[dict, dict]:
    """One dtype block: every case on every side, interleaved; (block, parameter counts)."""
    import gc

    batch = make_batch(args)
    impls = {}
    kd, counts = kdjax_impls(args, dtype, batch)
    impls.update({(case, "kdjax"): impl for case, impl in kd.items()})
    compiled = ", ".join(f"{case} {impl.extra['compile_s']:.0f} s" for case, impl in kd.items())
    log(f"{dtype}: kdjax setup + compile: {compiled}")
    if args.torch:
        th, torch_counts = torch_impls(args, dtype, batch)
        impls.update({(case, "torch"): impl for case, impl in th.items()})
        counts = {name: {"kdjax": counts[name], "torch": torch_counts[name]} for name in counts}
        for name, c in counts.items():    # the same architectures on both sides
            if c["kdjax"] != c["torch"]:
                raise SystemExit(f"the {name}s differ: kdjax {c['kdjax']:,} parameters, "
                                 f"PyTorch {c['torch']:,}")
    else:
        counts = {name: {"kdjax": n} for name, n in counts.items()}
    log(f"{dtype}: parameters " + "; ".join(
        f"{name} " + ", ".join(f"{side} {n:,}" for side, n in c.items()) for name, c in counts.items()))

    ordered = {(case, side): impls[case, side] for case in CASES for side in SIDES
               if (case, side) in impls}
    times = interleaved({key: impl.call for key, impl in ordered.items()}, args.reps)
    cases = {case: {} for case in CASES}
    for (case, side), impl in ordered.items():
        cases[case][side] = side_summary(times[case, side], impl, args.batch)
    for case, row in cases.items():
        if "torch" in row:
            row["ratio"] = row["torch"]["median_ms"] / row["kdjax"]["median_ms"]
        log(f"{dtype} {case:16s} " + "  ".join(f"{side} {r['median_ms']:9.1f} ms" for side, r in row.items()
                                               if isinstance(r, dict)))
    sides = [side for side in SIDES if side in cases["distill"]]
    over = {side: overhead(cases, side) for side in sides}
    block = {"dtype": dtype, "cases": cases, "overhead_percent": over,
             "overhead_target_met": {side: over[side] <= OVERHEAD_TARGET for side in sides},
             "step_target_met": (cases["distill"]["ratio"] >= STEP_TARGET
                                 if "ratio" in cases["distill"] else None)}
    del impls, ordered, kd
    gc.collect()
    return block, counts


# --------------------------------------------------------------------------------------------------
# Report.

def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 10 else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def timing(d: dict | None) -> str:
    return f"{fmt(d['median_ms'])} ({fmt(d['min_ms'])}–{fmt(d['max_ms'])})" if d else "–"


def machine_line(m: dict) -> str:
    with_torch = bool(m.get("torch"))
    torch_part = f", torch {m['torch']}" if with_torch else ""
    threads = (f"Threads: {m['threads']}{' for both' if with_torch else ''} (CPU affinity {m['threads']} "
               f"core{'s' if m['threads'] > 1 else ''}, XLA's thread pool sized from it"
               + (f", `torch.set_num_threads({m['torch_threads']})`, OMP/MKL_NUM_THREADS={m['threads']}"
                  if with_torch else "")
               + (f", OMP_WAIT_POLICY={m['omp_wait_policy']}" if with_torch and m.get("omp_wait_policy") else "")
               + (f", XLA_FLAGS `{m['xla_flags']}`" if m["xla_flags"] else "") + ")")
    return (f"Machine: {losses.cpu_description(m)}, {m['cores']} cores, {m['ram_gb']:g} GB RAM; Python "
            f"{m['python']}, jax {m['jax']}{torch_part}. {threads}. Load average "
            f"{m['load_average']:.1f} when the run started (the machine may be shared).")


HOST_MEMORY = {
    "kept": "Host memory: freed memory kept for reuse in both libraries' process (`kdjax.runtime.host_memory`, "
            "as the `kdjax` command has it).",
    "glibc default": "Host memory: glibc's defaults (`--default-allocator`): each step's fresh "
                     "buffers fault their pages in again.",
    "environment": "Host memory: the allocator as the environment sets it (an allocator setting "
                   "of its own, or a C library other than glibc, so `kdjax.runtime.host_memory` left it).",
}


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    """``--default-allocator``, read by :func:`set_host_memory`."""
    parser.add_argument("--default-allocator", dest="keep_freed_memory", action="store_false",
                        help="keep glibc's allocator defaults (default: freed memory kept for reuse, "
                             "as the kdjax command has it)")


def set_host_memory(args) -> str:
    """Keeps freed memory for reuse unless ``--default-allocator``; the ``HOST_MEMORY`` key of what
    the process got."""
    if not args.keep_freed_memory:
        return "glibc default"
    return "kept" if keep_freed_memory() else "environment"


def table(result: dict) -> str:
    """One table per dtype block of ``result``, each between that dtype's ``MARKERS``."""
    return "\n".join(dtype_table(result, block) for block in result["blocks"])


def dtype_table(result: dict, block: dict) -> str:
    """The table, notes and targets of one dtype block, between the dtype's ``MARKERS``."""
    begin, end = MARKERS[block["dtype"]]
    s = result["settings"]
    h, w = s["size"]
    header = ["case", "dtype", "kdjax ms", "PyTorch ms", "kdjax img/s", "PyTorch img/s", "ratio",
              "kdjax GFLOP", "PyTorch GFLOP", "kdjax % of peak", "PyTorch % of peak", "kdjax MB",
              "PyTorch MB"]
    lines = [
        begin, machine_line(result["machine"]), "", f"    {result['command']}", "",
        f"Teacher {s['teacher']}, student {s['student']}, {s['classes']} classes, batch {s['batch']} "
        f"of {h}×{w}, random weights and inputs. kdjax: jitted (the experiment's compiled train step; "
        "the teacher forward jitted alone). PyTorch: eager, the same CIRKD networks. "
        "teacher_forward = the teacher in inference mode; student_alone = student forward + backward "
        f"with CE + {AUX_WEIGHT:g}·aux CE (logits upsampled to the labels) and the SGD update; "
        f"distill = both + CWD on the logits (weight {CWD_WEIGHT:g}, τ = {CWD_TAU:g}). Times in ms per "
        f"step: median (min–max) of {s['reps']} interleaved repetitions after one warm-up call; "
        "ratio = PyTorch / kdjax (> 1: kdjax faster). GFLOP per step: kdjax from `kdjax.ops.cost`, "
        "PyTorch from `FlopCounterMode` with convolutions counted over the kernel taps inside the "
        "input, as XLA counts them; % of peak = GFLOP / time / the CPU's peak, the faster "
        "library's float32 matmul rate. MB: kdjax = XLA buffer assignment (arguments + outputs + temporaries − donated); "
        "PyTorch = tensors held at the start + allocator peak during the step (torch.profiler). "
        + HOST_MEMORY[s.get("host_memory", "glibc default")],
        "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    cpu_peak = max(result["matmul_peak_gflops"].values())
    cases, dtype = block["cases"], block["dtype"]
    for case in CASES:
        k, t = cases[case]["kdjax"], cases[case].get("torch")
        ratio = cases[case].get("ratio")
        cells = [case, dtype, timing(k), timing(t), fmt(k["images_per_s"]),
                 fmt(t["images_per_s"]) if t else "–", f"{ratio:.2f}" if ratio else "–",
                 fmt(k["gflop"]), fmt(t["gflop"]) if t else "–", fmt(peak_percent(k, cpu_peak)),
                 fmt(peak_percent(t, cpu_peak)) if t else "–", fmt(k["peak_mb"]),
                 fmt(t["peak_mb"]) if t else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    compile_s = ", ".join(f"{case} {cases[case]['kdjax']['compile_s']:.0f} s" for case in CASES)
    lines.append(f"- kdjax setup + compile ({dtype}, not in the timings): {compile_s} "
                 "(teacher_forward: compile only).")
    if "torch" in cases["distill"]:
        padded = ", ".join(f"{case} {fmt(cases[case]['torch']['gflop_with_padding'])}" for case in CASES)
        lines.append(f"- PyTorch GFLOP with the taps on the zero padding counted too "
                     f"(FlopCounterMode's default, {dtype}): {padded}.")
    peaks = result["matmul_peak_gflops"]
    lines.append(f"- float32 {MATMUL_N}×{MATMUL_N} matmul peak: "
                 + ", ".join(f"{'PyTorch' if side == 'torch' else side} {fmt(v)} GFLOP/s"
                             for side, v in peaks.items()) + ".")
    parts = [f"{'PyTorch' if side == 'torch' else side} {pct:+.1f}% "
             f"({'met' if block['overhead_target_met'][side] else 'missed'})"
             for side, pct in block["overhead_percent"].items()]
    lines.append(f"- Distillation overhead ({dtype}), (distill − teacher_forward − "
                 f"student_alone) / student_alone, target ≤ {OVERHEAD_TARGET:g}%: {', '.join(parts)}.")
    met = block["step_target_met"]
    verdict = "not measured (no PyTorch)" if met is None else (
        f"{'met' if met else 'missed'} (ratio {cases['distill']['ratio']:.2f})")
    lines.append(f"- Step target ({dtype}), distill ratio ≥ {STEP_TARGET:g}: {verdict}.")
    lines.append(end)
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Writes each dtype's table of ``text`` (the output of :func:`table`) between its markers in
    RESULTS.md and leaves the rest of the file, the other dtype's table included, as it was."""
    for dtype, (begin, end) in MARKERS.items():
        if begin in text:
            part = text[text.index(begin):text.index(end) + len(end)] + "\n"
            if dtype == "float32":
                _write_float32(part)
            else:
                results_file.write_generated(BFLOAT16_SECTION, begin, end, part)


def _write_float32(text: str) -> None:
    """Replaces the generated part of the 'Train step' section. A section written before the markers
    existed gives its whole body to the markers; without the section it is appended."""
    import re

    old = results_file.RESULTS.read_text() if results_file.RESULTS.exists() else ""
    if BEGIN not in old and SECTION in old:
        pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
        match = pattern.search(old)
        tail = "" if match.end() == len(old) else "\n"
        results_file.RESULTS.write_text(old[:match.start()] + f"{SECTION}\n\n{text}{tail}"
                                        + old[match.end():])
        return
    results_file.write_generated(SECTION, BEGIN, END, text)


# --------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="64×64, batch 2, 2 repetitions, ResNet-18 student and teacher: a smoke run")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="crop size (default 256 256)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 8)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    parser.add_argument("--student", default=None, help="default deeplabv3_resnet18")
    parser.add_argument("--teacher", default=None, help="default deeplabv3_resnet101")
    parser.add_argument("--demo", action="store_true",
                        help="the networks, crop and batch of configs/demo.py (kdjax only: "
                             "PyTorch's reference networks are full width)")
    parser.add_argument("--kernels", choices=("auto", "xla", "cpu", "gpu"), default="auto",
                        help="kdjax's convolution and batch-norm forms (kdjax/ops/kernels.py)")
    losses.add_isa_option(parser)
    parser.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")
    parser.add_argument("--write", action="store_true",
                        help="write each dtype's table into benchmarks/RESULTS.md")
    parser.add_argument("--no-torch", dest="torch", action="store_false",
                        help="kdjax only (for machines without PyTorch)")
    add_allocator_option(parser)
    parser.add_argument("--from_json", default=None, help=results_file.FROM_JSON_HELP)
    args = parser.parse_args(argv)
    if args.from_json:
        return results_file.replay(args.from_json, table, write_section if args.write else None)
    defaults = QUICK if args.quick else {"size": (256, 256), "batch": 8, "reps": 5,
                                         "student": "deeplabv3_resnet18", "teacher": "deeplabv3_resnet101"}
    if args.demo:
        networks = demo_networks()
        defaults = dict(defaults, size=networks["size"], batch=networks["batch"],
                        student=networks["student"]["name"], teacher=networks["teacher"]["name"])
        args.torch = False
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if unknown := set(dtypes) - {"float32", "bfloat16"}:
        parser.error(f"unknown dtypes {sorted(unknown)}; choose from float32, bfloat16")

    threads = losses.configure_threads(args.threads)
    losses.limit_isa(args.isa)
    add_cpu_flags()  # as the kdjax command does: the train step compiled as training compiles it
    host_memory = set_host_memory(args)
    if args.torch:
        import torch

        torch.set_num_threads(threads)

    def log(line):
        print(line, file=sys.stderr, flush=True)

    command = "python benchmarks/step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"machine": losses.machine_info(threads, args.torch), "command": command.strip(), "quick": args.quick,
              "settings": {"size": list(args.size), "batch": args.batch, "reps": args.reps,
                           "student": args.student, "teacher": args.teacher, "classes": CLASSES,
                           "dtypes": dtypes, "torch": args.torch, "demo": args.demo,
                           "kernels": args.kernels, "learning_rate": LR,
                           "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "aux_weight": AUX_WEIGHT,
                           "cwd_weight": CWD_WEIGHT, "cwd_tau": CWD_TAU, "host_memory": host_memory},
              "overhead_target_percent": OVERHEAD_TARGET, "step_target_ratio": STEP_TARGET}
    # The peaks first, before the networks take memory; the same number of rounds as the steps.
    result["matmul_peak_gflops"] = matmul_peaks(max(args.reps, 3), args.torch)
    log("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in result["matmul_peak_gflops"].items()))
    result["blocks"] = []
    for dtype in dtypes:
        block, result["parameters"] = run_dtype(args, dtype, log)
        result["blocks"].append(block)
    text = table(result)
    results_file.emit(result, text, json_path=args.json, write=False, section=SECTION, begin=BEGIN, end=END)
    if args.write:
        write_section(text)
    return result


if __name__ == "__main__":
    main()
