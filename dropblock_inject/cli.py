"""The ``dropblock-inject`` command line (also ``python -m dropblock_inject``).

Subcommands:
    bench op        time the DropBlock op against an elementwise multiply, timm and torchvision.
    bench inject    time plan() and inject() on fresh models.
    bench step      training-step and eval time, patched vs unpatched (and timm's own DropBlock).
    viz             sample masks of each patched stage and the schedule curve, as a PNG.
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
    step = bench_sub.add_parser("step", help="training-step and eval time, patched vs unpatched vs timm's own")
    step.add_argument("model", help="timm name, tv:<builder> or module:callable")
    step.add_argument("--batch-size", type=_positive_int, default=8)
    step.add_argument("--input-size", type=_positive_int, nargs="+", default=[3, 224, 224], metavar="N")
    step.add_argument("--repeats", type=_positive_int, default=5)
    step.add_argument("--recipe", default=None, help="recipe name or YAML path (default: built-in rules)")
    step.add_argument("--drop-prob", type=float, default=0.1)
    step.set_defaults(func=_run_bench_step)
    viz = sub.add_parser("viz", help="sample masks per patched stage and the schedule, as a PNG")
    viz.add_argument("model", help="timm name, tv:<builder> or module:callable")
    viz.add_argument("--out", required=True, help="the PNG file to write")
    viz.add_argument("--recipe", default="auto", help="recipe name or YAML path (default: auto)")
    viz.add_argument("--drop-prob", type=float, default=None)
    viz.add_argument("--input-size", type=_positive_int, nargs="+", default=None, metavar="N")
    viz.add_argument("--channels", type=_positive_int, default=16)
    viz.add_argument("--seed", type=int, default=0)
    viz.set_defaults(func=_run_viz)
    return parser


def _run_bench_step(args: argparse.Namespace) -> int:
    from dropblock_inject.bench import bench_step

    bench_step(args.model, batch_size=args.batch_size, input_size=args.input_size, repeats=args.repeats,
               recipe=args.recipe, drop_prob=args.drop_prob)  # fmt: skip
    return 0


def _run_viz(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dropblock_inject.api import plan
    from dropblock_inject.models import create_model
    from dropblock_inject.viz import render_plan

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise SystemExit(f"dropblock-inject viz: --out must be a .png file, got {args.out}")
    size = tuple(args.input_size) if args.input_size else None
    chosen = plan(create_model(args.model), args.recipe, model_name=args.model, drop_prob=args.drop_prob,
                  input_size=size)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    render_plan(chosen, channels=args.channels, seed=args.seed).save(out)
    print(f"wrote {out}")
    return 0


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
