"""The ``kdjax`` command: parses arguments and dispatches to the library.

    kdjax train   --config=FILE[:local] --workdir=DIR [--config.key=value ...]
    kdjax eval    --config=FILE --workdir=DIR [--config.key=value ...]
    kdjax compare --config=FILE --workdir=DIR [--config.key=value ...]
    kdjax convert --model=NAME --torch=PATH --out=DIR [--num-classes=K]
    kdjax data show --config=FILE --out=grid.png
    kdjax loss-demo
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys

import kdjax
from kdjax.runtime import platform
from kdjax.runtime.preemption import StopRequested

CONFIG_PREFIX = "--config."


def _add_config_args(parser: argparse.ArgumentParser, *, workdir: bool = True) -> None:
    parser.add_argument("--config", required=True,
                        help="experiment file with get_config(), optionally FILE:local for a "
                             "small CPU run; override fields with --config.key=value")
    if workdir:
        parser.add_argument("--workdir", required=True,
                            help="run directory: checkpoints, logs, results (resumed if present)")


def build_parser() -> argparse.ArgumentParser:
    from kdjax.commands.convert import add_convert_parser

    parser = argparse.ArgumentParser(
        prog="kdjax", description="Knowledge distillation for semantic segmentation in JAX.")
    parser.add_argument("--version", action="version", version=f"kdjax {kdjax.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_config_args(commands.add_parser(
        "train", help="train a model; with a teacher and distillation terms, distil"))
    _add_config_args(commands.add_parser(
        "eval", help="evaluate a run's reported checkpoint and write PNG overlays"))
    _add_config_args(commands.add_parser(
        "compare", help="teacher, student alone and every listed method under one recipe"))
    add_convert_parser(commands)
    data = commands.add_parser("data", help="inspect the input pipeline")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    show = data_commands.add_parser("show", help="write a grid of augmented training samples")
    _add_config_args(show, workdir=False)
    show.add_argument("--out", required=True, help="PNG file to write")
    demo = commands.add_parser(
        "loss-demo", help="distil random teacher maps into random student maps with every loss")
    demo.add_argument("--steps", type=int, default=60, help="gradient steps per loss")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the maps")
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.key=value`` items (also ``--config.key value``) from the rest."""
    rest, overrides = [], []
    items = iter(argv)
    for item in items:
        if item.startswith(CONFIG_PREFIX):
            body = item[len(CONFIG_PREFIX):]
            if "=" not in body:
                body = f"{body}={next(items, '')}"
            overrides.append(body)
        else:
            rest.append(item)
    return rest, overrides


def _load(args, overrides):
    from kdjax.config.loading import check_known_keys, parse_config_spec
    from kdjax.config.defaults import base_config
    from kdjax.runtime.compilation import use_persistent_cache
    from kdjax.runtime.distributed import initialize_distributed

    config = parse_config_spec(args.config, overrides)
    check_known_keys(config, base_config())
    d = config.distributed
    initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
    platform.report()
    use_persistent_cache()
    return config


def _run(args, overrides) -> int:
    if args.command == "convert":
        from kdjax.commands.convert import run_convert
        return run_convert(args)
    if args.command == "loss-demo":
        from kdjax.commands.loss_demo import run_loss_demo
        run_loss_demo(steps=args.steps, seed=args.seed)
        return 0
    config = _load(args, overrides)
    if getattr(args, "workdir", None):
        from kdjax.io.paths import ensure_reachable
        ensure_reachable(args.workdir)
    if args.command == "data":
        from kdjax.data.show import show_command
        show_command(config, args.out)
        print(f"wrote {args.out}")
    elif args.command == "train":
        from kdjax.commands.train import run_train
        run_train(config, args.workdir)
    elif args.command == "eval":
        from kdjax.commands.evaluate import run_eval
        run_eval(config, args.workdir)
    elif args.command == "compare":
        from kdjax.commands.compare import run_compare
        run_compare(config, args.workdir)
    return 0


DEBUG_ENV = "KDJAX_DEBUG"


def _show_kdjax_logs() -> None:
    """kdjax's own INFO messages (start-up, resume, platform) on stderr. The root logger is left
    alone: an import has usually configured it already, and at INFO it would print every
    library's progress notes (Orbax's, for one)."""
    logger = logging.getLogger("kdjax")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the input (config, data, checkpoints, a diverging run): kdjax raises
    them with a message that says what to change, so they are reported without a traceback.
    ``ValueError`` is kdjax's validation error throughout (unknown names, bad shapes)."""
    from kdjax.runtime.coordination import LeaderFailedError
    from kdjax.runtime.distributed import DistributedStartError
    from kdjax.training.step import NonFiniteLossError
    return (ValueError, NonFiniteLossError, FileNotFoundError, DistributedStartError,
            LeaderFailedError)


def main(argv: list[str] | None = None) -> int:
    # TensorFlow (the input pipeline only) would otherwise print C++ start-up notices.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    platform.configure_process()
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_overrides(argv)
    args = build_parser().parse_args(rest)
    _show_kdjax_logs()
    try:
        return _run(args, overrides)
    except StopRequested as stop:
        resume = shlex.join(["kdjax", *argv])
        print(f"kdjax {args.command}: {stop}. Resume with the same command:\n  {resume}",
              file=sys.stderr)
        return 128 + signal.Signals[stop.signal_name]
    except KeyboardInterrupt:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"kdjax {args.command}: interrupted. Checkpoints already written are kept: the same "
              "command resumes from the last one.", file=sys.stderr)
        return 130
    except _user_errors() as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"kdjax {args.command}: error: {err}\n(set {DEBUG_ENV}=1 for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
