"""The ``dropblock-inject`` command line (also ``python -m dropblock_inject``).

Subcommands:
    bench op        time the DropBlock op against an elementwise multiply, timm and torchvision.
    bench inject    time plan() and inject() on fresh models.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dropblock_inject import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dropblock-inject",
        description="Paper-faithful DropBlock, injected into timm and torchvision models in one call.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser("bench", help="benchmarks, printed as ratios to a baseline measured in the same run")
    bench_sub = bench.add_subparsers(dest="what", metavar="WHAT", required=True)
    op = bench_sub.add_parser("op", help="the DropBlock op vs an elementwise multiply, timm and torchvision")
    op.add_argument("--repeats", type=_positive_int, default=5, help="interleaved turns per candidate (default 5)")
    op.add_argument("--drop-prob", type=float, default=0.1, help="drop probability (default 0.1)")
    op.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    op.set_defaults(func=_run_bench_op)
    inj = bench_sub.add_parser("inject", help="time plan() and inject() on fresh models")
    inj.add_argument(
        "models",
        nargs="*",
        default=["resnet50", "efficientnet_b0", "convnext_atto", "tv:resnet50"],
        help="timm names or tv:<builder> (default: resnet50 efficientnet_b0 convnext_atto tv:resnet50)",
    )
    inj.add_argument("--repeats", type=_positive_int, default=5)
    inj.set_defaults(func=_run_bench_inject)
    return parser


def _run_bench_inject(args: argparse.Namespace) -> int:
    from dropblock_inject.bench import bench_inject

    bench_inject(args.models, repeats=args.repeats)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _run_bench_op(args: argparse.Namespace) -> int:
    import torch

    from dropblock_inject.bench import bench_op

    if args.threads:
        torch.set_num_threads(args.threads)
    bench_op(drop_prob=args.drop_prob, repeats=args.repeats)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stdout)
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
