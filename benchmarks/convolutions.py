"""Where the train step's time goes: every distinct convolution of a segmentor, forward and
forward + backward, in XLA against PyTorch (oneDNN) on the same shapes.

    python benchmarks/convolutions.py [--model NAME] [--size H W] [--batch N] [--reps R]
                                      [--threads N] [--default-allocator] [--json FILE] [--write]
    python benchmarks/convolutions.py --from_json FILE [--write]     # the table of a saved run

The convolutions are read off the PyTorch model (``tests/torch_reference``'s CIRKD networks, the
ones ``step.py`` times) with forward hooks during one train-mode forward: input shape, kernel,
stride, padding, dilation and groups. Equal configurations are merged and counted. Each one is then
timed in isolation:

- ``fwd``: the convolution alone. kdjax: ``kdjax.ops.cpu.convolution.conv2d`` in NHWC/HWIO, jitted,
  as ``layers.Conv2d`` calls it. PyTorch: ``F.conv2d`` in NCHW, eager, under ``torch.no_grad``.
- ``fwd+bwd``: the convolution and its gradients with respect to input and kernel for a random
  output cotangent (the stem would need the kernel gradient only, but both sides compute both).
  kdjax: one jitted ``jax.vjp``; PyTorch: ``backward`` on the output. The column 'XLA autodiff'
  is the same for a plain ``lax.conv_general_dilated``, differentiated by XLA: what kdjax's
  convolution replaces.

Repetitions are interleaved with one warm-up call each (``step.interleaved``); medians are reported.
Columns: how often the configuration occurs, its forward GFLOP counted on taps that fall inside the
input (XLA's rule, ``step.conv_flops``), median ms per side and the ratio PyTorch / kdjax (> 1:
kdjax faster). The totals weigh each row by its count, which is the convolution share of a
student train step (forward + backward) or teacher forward. ``XLA_FLAGS`` from the environment
apply (the table names them), so ``XLA_FLAGS=--xla_cpu_use_onednn=true python ...`` measures
XLA's oneDNN path on the same rows.

Freed host memory is kept for reuse, as in ``step.py`` and the ``kdjax`` command, unless
``--default-allocator``: Winograd's transformed tiles are fresh buffers of 4× the input on every call.

``--write`` puts the table into the 'Convolutions' section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import losses  # noqa: E402
import results_file  # noqa: E402
import step  # noqa: E402

SECTION = "## Convolutions"
BEGIN, END = "<!-- convolutions.py: begin -->", "<!-- convolutions.py: end -->"


def model_convolutions(name: str, size: tuple[int, int], batch: int) -> Counter:
    """(N, C, H, W, O, kh, kw, stride, padding, dilation, groups) → how many of the model's
    convolutions have it, from one train-mode forward of the PyTorch model."""
    import torch

    from tests.torch_reference import build_cirkd

    model = build_cirkd(name, num_classes=step.CLASSES).train()
    found: Counter = Counter()

    def record(module, inputs, _output):
        n, c, h, w = inputs[0].shape
        o, _, kh, kw = module.weight.shape
        found[(n, c, h, w, o, kh, kw, module.stride[0], module.padding[0], module.dilation[0],
               module.groups)] += 1

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            if module.stride[0] != module.stride[1] or module.padding[0] != module.padding[1] or \
                    module.dilation[0] != module.dilation[1]:
                raise SystemExit(f"non-square convolution options in {module}: not supported here")
            module.register_forward_hook(record)
    with torch.no_grad():
        model(torch.zeros(batch, 3, *size))
    return found


def forward_gflop(config) -> float:
    n, c, h, w, o, kh, kw, stride, pad, dilation, groups = config
    return step.conv_flops((n, c, h, w), (o, c // groups, kh, kw), None, (stride, stride),
                           (pad, pad), (dilation, dilation), False, groups) / 1e9


def kdjax_calls(config):
    import jax
    import numpy as np

    from kdjax.ops.cpu.convolution import conv2d

    n, c, h, w, o, kh, kw, stride, pad, dilation, groups = config
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((n, h, w, c)).astype(np.float32))
    k = jax.device_put(rng.standard_normal((kh, kw, c // groups, o)).astype(np.float32) * 0.05)

    def conv(x, k):
        return conv2d(x, k, stride=(stride, stride), padding=(pad, pad),
                      dilation=(dilation, dilation), groups=groups)

    def xla_conv(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (stride, stride), [(pad, pad), (pad, pad)], rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)

    forward = jax.jit(conv).lower(x, k).compile()
    y = forward(x, k)
    cotangent = jax.device_put(rng.standard_normal(y.shape).astype(np.float32))

    def compiled_forward_backward(fn):
        def forward_backward(x, k, g):
            out, vjp = jax.vjp(fn, x, k)
            return out, vjp(g)
        compiled = jax.jit(forward_backward).lower(x, k, cotangent).compile()
        return lambda: jax.block_until_ready(compiled(x, k, cotangent))

    return (lambda: jax.block_until_ready(forward(x, k)), compiled_forward_backward(conv),
            compiled_forward_backward(xla_conv))


def torch_calls(config):
    import numpy as np
    import torch
    import torch.nn.functional as F

    n, c, h, w, o, kh, kw, stride, pad, dilation, groups = config
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n, c, h, w)).astype(np.float32)).requires_grad_()
    k = torch.from_numpy(rng.standard_normal((o, c // groups, kh, kw)).astype(np.float32) * 0.05)
    k.requires_grad_()

    def conv(x, k):
        return F.conv2d(x, k, stride=stride, padding=pad, dilation=dilation, groups=groups)

    with torch.no_grad():
        cotangent = torch.randn_like(conv(x, k))

    def forward():
        with torch.no_grad():
            conv(x, k)

    def forward_backward():
        x.grad = k.grad = None
        conv(x, k).backward(cotangent)

    return forward, forward_backward


def measure(args) -> dict:
    threads = losses.configure_threads(args.threads)
    host_memory = step.set_host_memory(args)
    configs = model_convolutions(args.model, tuple(args.size), args.batch)
    rows = []
    for config, count in sorted(configs.items(), key=lambda item: -forward_gflop(item[0]) * item[1]):
        kdjax_fwd, kdjax_both, xla_both = kdjax_calls(config)
        torch_fwd, torch_both = torch_calls(config)
        times = step.interleaved({"kdjax_fwd": kdjax_fwd, "torch_fwd": torch_fwd,
                                  "kdjax_both": kdjax_both, "torch_both": torch_both,
                                  "xla_both": xla_both}, args.reps)
        median = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        rows.append({"config": list(config), "count": count, "gflop": forward_gflop(config),
                     **{f"{name}_ms": ms for name, ms in median.items()}})
        print(f"{describe(config)} ×{count}: " + ", ".join(
            f"{name} {ms:.1f} ms" for name, ms in median.items()), file=sys.stderr)
    totals = {key: sum(row[key] * row["count"] for row in rows)
              for key in ("kdjax_fwd_ms", "torch_fwd_ms", "kdjax_both_ms", "torch_both_ms",
                          "xla_both_ms", "gflop")}
    return {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "model": args.model,
            "size": list(args.size), "batch": args.batch, "reps": args.reps, "threads": threads,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_average": round(os.getloadavg()[0], 2), "host_memory": host_memory, "rows": rows,
            "totals": totals}


def describe(config) -> str:
    n, c, h, w, o, kh, kw, stride, pad, dilation, groups = config
    text = f"{c}→{o} {kh}×{kw} on {h}×{w}"
    if stride > 1:
        text += f" s{stride}"
    if dilation > 1:
        text += f" d{dilation}"
    if groups > 1:
        text += f" g{groups}"
    return text


def table(result: dict) -> str:
    h, w = result["size"]
    flags = f"`XLA_FLAGS={result['xla_flags']}`" if result["xla_flags"] else "default XLA flags"
    lines = [BEGIN,
             f"Every distinct convolution of {result['model']} in a train-mode forward at {h}×{w}, "
             f"batch {result['batch']}; {flags}, {result['threads']} threads, median of "
             f"{result['reps']} interleaved repetitions; load average {result['load_average']} at "
             "the end. Times in ms; ratio = PyTorch / kdjax (> 1: kdjax faster). "
             + step.HOST_MEMORY[result.get("host_memory", "glibc default")], "",
             f"    python benchmarks/{result['command']}", "",
             "| convolution | count | GFLOP fwd | kdjax fwd | PyTorch fwd | ratio | kdjax fwd+bwd | "
             "PyTorch fwd+bwd | ratio | XLA autodiff fwd+bwd | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"] + [{"config": None, "count": None, **result["totals"]}]:
        name = describe(row["config"]) if row["config"] else "**all × count**"
        count = row["count"] if row["count"] else ""
        lines.append(
            f"| {name} | {count} | {row['gflop']:.2f} | {row['kdjax_fwd_ms']:.1f} | "
            f"{row['torch_fwd_ms']:.1f} | {row['torch_fwd_ms'] / row['kdjax_fwd_ms']:.2f} | "
            f"{row['kdjax_both_ms']:.1f} | {row['torch_both_ms']:.1f} | "
            f"{row['torch_both_ms'] / row['kdjax_both_ms']:.2f} | {row['xla_both_ms']:.1f} | "
            f"{row['torch_both_ms'] / row['xla_both_ms']:.2f} |")
    return "\n".join(lines + [END]) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplabv3_resnet18")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    parser.add_argument("--write", action="store_true")
    step.add_allocator_option(parser)
    parser.add_argument("--from_json", default=None, help=results_file.FROM_JSON_HELP)
    args = parser.parse_args(argv)
    if args.from_json:
        writer = results_file.section_writer(SECTION, BEGIN, END) if args.write else None
        return results_file.replay(args.from_json, table, writer)
    result = measure(args)
    results_file.emit(result, table(result), json_path=args.json, write=args.write,
                      section=SECTION, begin=BEGIN, end=END)
    return result


if __name__ == "__main__":
    main()
