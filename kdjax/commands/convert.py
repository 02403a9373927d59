"""``kdjax convert``: a PyTorch segmentor state dict in, a kdjax model directory out.

    kdjax convert --model=deeplabv3_resnet101 --num-classes=19 --torch=teacher.pth --out=teachers/r101

A config can then name the output directory as its teacher.
"""

from __future__ import annotations

import argparse
import sys

from kdjax.convert.checkpoint import load_torch_checkpoint
from kdjax.convert.importer import SEGMENTOR_SOURCES, from_torch
from kdjax.io.model_dir import save_model
from kdjax.models.resnet import VARIANTS
from kdjax.models.segmentor import count_params


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``convert`` subcommand to the ``kdjax`` command's subparsers; returns its parser."""
    parser = subparsers.add_parser(
        "convert", help="import a PyTorch segmentor state dict into a kdjax model directory",
        description="Import a PyTorch (CIRKD-layout) segmentor state dict into a kdjax model "
                    "directory that a config can name as its teacher.")
    parser.add_argument("--model", required=True, choices=SEGMENTOR_SOURCES, metavar="NAME",
                        help=f"the checkpoint's architecture: {', '.join(SEGMENTOR_SOURCES)}")
    parser.add_argument("--num-classes", type=int, default=None, metavar="K",
                        help="class count; checked against the checkpoint (default: read from it)")
    parser.add_argument("--torch", required=True, metavar="PATH",
                        help="the torch.save file (a state dict, possibly under 'state_dict' or "
                             "'model')")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    parser.add_argument("--variant", choices=VARIANTS, default=None,
                        help="ResNet stem layout (default: cirkd, the deep stem)")
    parser.add_argument("--output-stride", type=int, choices=(8, 16), default=None,
                        help="backbone output stride (default: 8, as CIRKD)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Converts ``args.torch`` to ``args.out``; prints a summary line. Returns the exit status:
    0, or 2 after printing what is wrong to stderr."""
    options = {key: value for key, value in (("variant", args.variant),
                                             ("output_stride", args.output_stride))
               if value is not None}
    try:
        state_dict = load_torch_checkpoint(args.torch)
        model = from_torch(args.model, state_dict, num_classes=args.num_classes, **options)
        save_model(args.out, model, overwrite=args.overwrite)
    except FileExistsError as error:
        print(f"kdjax convert: error: {error} (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    # CheckpointError and TorchCheckpointError are ValueErrors, as are bad option values.
    except (OSError, ImportError, ValueError) as error:
        print(f"kdjax convert: error: {error}", file=sys.stderr)
        return 2
    print(f"converted {args.model}: {count_params(model):,} parameters, {model.spec['num_classes']} "
          f"classes -> {args.out}")
    return 0
