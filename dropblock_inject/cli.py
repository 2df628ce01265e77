"""The ``dropblock-inject`` command line (also ``python -m dropblock_inject``).

Subcommands:
    bench op        time the DropBlock op against an elementwise multiply, timm and torchvision.
    bench host      CPU time per eager call of the fused (CUDA) dispatch path, kernel launches stubbed.
    bench inject    time plan() and inject() on fresh models.
    bench step      training-step and eval time, patched vs unpatched (and timm's own DropBlock).
    viz             sample masks of each patched stage and the schedule curve, as a PNG.
    plan MODEL      dry run: the sites inject() would patch, as a table or JSON.
    finetune        train a classifier with DropBlock (default: the embedded digits).
    ablate          the same model under several arms x seeds, paired: does DropBlock help, with intervals.
"""

from __future__ import annotations

import argparse
import os
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
    op.add_argument("--compile", action="store_true", help="also torch.compile of DropBlock vs a compiled floor")
    op.add_argument(
        "--shape", type=_positive_int, nargs="+", default=None, metavar="N",
        help="one input shape N C H W (or N C D H W) instead of the three defaults",
    )  # fmt: skip
    op.add_argument("--block", type=_positive_int, default=7, help="block size with --shape (default 7)")
    op.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    op.add_argument("--fresh-heap", action="store_true", help=_FRESH_HEAP_HELP)
    op.set_defaults(func=_run_bench_op)
    host = bench_sub.add_parser("host", help="CPU us per eager call of the fused (CUDA) path, launches stubbed")
    host.add_argument("--repeats", type=_positive_int, default=7, help="interleaved turns per candidate (default 7)")
    host.add_argument("--number", type=_positive_int, default=100, help="calls per timed sample (default 100)")
    host.add_argument("--drop-prob", type=float, default=0.1, help="drop probability (default 0.1)")
    host.add_argument(
        "--shape", type=_positive_int, nargs="+", default=None, metavar="N",
        help="one input shape N C H W (or N C D H W) instead of the three defaults",
    )  # fmt: skip
    host.add_argument("--block", type=_positive_int, default=7, help="block size with --shape (default 7)")
    host.add_argument("--fresh-heap", action="store_true", help=_FRESH_HEAP_HELP)
    host.set_defaults(func=_run_bench_host)
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
    step.add_argument("--batch-size", type=_positive_int, default=16)
    step.add_argument("--input-size", type=_positive_int, nargs="+", default=[3, 224, 224], metavar="N")
    step.add_argument("--repeats", type=_positive_int, default=5)
    step.add_argument("--recipe", default=None, help="recipe name or YAML path (default: built-in rules)")
    step.add_argument("--drop-prob", type=float, default=0.1)
    step.add_argument("--channels-last", action="store_true", help="models and input in channels_last")
    step.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="run the step under torch.autocast")
    step.add_argument("--compile", action="store_true", help="torch.compile every model (compiled in the warm-up)")
    step.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    step.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    step.add_argument("--fresh-heap", action="store_true", help=_FRESH_HEAP_HELP)
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
    _add_plan_parser(sub)
    _add_finetune_parser(sub)
    _add_ablate_parser(sub)
    return parser


_FRESH_HEAP_HELP = "leave glibc's allocator as it is (default: keep freed memory, so page faults are not timed)"


def _heap_for(args: argparse.Namespace) -> None:
    from dropblock_inject.bench import steady_heap

    note = "" if args.fresh_heap else steady_heap()
    if note:
        print(note)


def _run_bench_step(args: argparse.Namespace) -> int:
    from dropblock_inject.bench import bench_step

    _heap_for(args)
    bench_step(args.model, batch_size=args.batch_size, input_size=args.input_size, repeats=args.repeats,
               recipe=args.recipe, drop_prob=args.drop_prob, channels_last=args.channels_last, amp=args.amp,
               compiled=args.compile, memory=not args.no_memory, device=args.device)  # fmt: skip
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
    shapes = _bench_shapes(args, "op")
    _heap_for(args)
    bench_op(shapes, drop_prob=args.drop_prob, repeats=args.repeats, compiled=args.compile, device=args.device)
    return 0


def _run_bench_host(args: argparse.Namespace) -> int:
    from dropblock_inject.bench import bench_host

    shapes = _bench_shapes(args, "host")
    _heap_for(args)
    bench_host(shapes, drop_prob=args.drop_prob, repeats=args.repeats, number=args.number)
    return 0


def _bench_shapes(args: argparse.Namespace, what: str) -> list[tuple[tuple[int, ...], int]]:
    """``--shape`` with ``--block``, else the default shapes of ``bench op``."""
    from dropblock_inject.bench import OP_SHAPES

    if args.shape is None:
        return list(OP_SHAPES)
    if len(args.shape) not in (4, 5):
        raise SystemExit(f"bench {what}: --shape takes 4 or 5 sizes (N C H W or N C D H W), got {args.shape}")
    return [(tuple(args.shape), args.block)]


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="dry run: the sites inject() would patch in MODEL, as a table or JSON")
    p.add_argument("model", help="timm name, tv:<builder> or package.module:callable")
    p.add_argument("--recipe", default=None, help="recipe name, YAML file or 'auto' (default: the built-in rules)")
    p.add_argument("--input-size", type=int, nargs="+", default=None, metavar="N", help="C H W (default: the model's)")
    p.add_argument("--drop-prob", type=float, default=None, help="target drop rate (default: the recipe's)")
    p.add_argument("--json", action="store_true", help="print the sites and stages as JSON")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    import json

    from dropblock_inject.api import plan
    from dropblock_inject.train import ConfigError, check_recipe

    if args.drop_prob is not None and not 0.0 <= args.drop_prob < 1.0:
        raise ConfigError(f"--drop-prob must be in [0, 1), got {args.drop_prob}")
    check_recipe(args.recipe)  # before building the model
    size = tuple(args.input_size) if args.input_size else None
    chosen = plan(_model_for_planning(args.model), args.recipe, model_name=args.model, drop_prob=args.drop_prob,
                  input_size=size)  # fmt: skip
    if not args.json:
        print(chosen)
        return 0
    doc = {"model": args.model, "class": chosen.model, "input_size": list(chosen.input_size),
           "sites": chosen.to_dicts(), "stages": [_jsonable(s) for s in chosen.stages]}  # fmt: skip
    print(json.dumps(doc, indent=2, default=str))
    return 0


def _model_for_planning(name: str):  # -> nn.Module
    """``name`` built on the meta device (no memory, no init FLOPs), else on the CPU."""
    import torch

    from dropblock_inject.errors import DropBlockInjectError
    from dropblock_inject.models import create_model

    try:
        with torch.device("meta"):
            return create_model(name)
    except DropBlockInjectError:
        raise
    except Exception:  # some builders compute on their weights; build those for real
        return create_model(name)


def _jsonable(value: object) -> object:
    if hasattr(value, "_asdict"):
        return {k: _jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


_DATA_DEFAULTS = ("input_size", "train_per_class")  # their defaults depend on --data: the help says so
_TRAINING_NUMBERS = (("epochs", int), ("batch_size", int), ("lr", float), ("drop_prob", float), ("seed", int))
_TRAINING_FIELDS = ("model", "data", "checkpoint", "pretrained", "epochs", "batch_size", "lr", "optimizer",
                    "weight_decay", "drop_prob", "recipe", "seed", "out", "workers", "device",
                    "limit_train_batches", "limit_val_batches", "train_per_class")  # fmt: skip


def _add_training_options(p: argparse.ArgumentParser, config_class: type) -> None:
    """The options of ``finetune`` and ``ablate``: one per field of ``config_class``, its help and default."""
    defaults = config_class()

    def h(name: str) -> str:
        default = getattr(defaults, name)
        shown = f" (default {default})" if default not in (None, False) and name not in _DATA_DEFAULTS else ""
        return config_class.help(name).replace("%", "%%") + shown

    p.add_argument("--model", default=defaults.model, help=h("model"))
    p.add_argument("--data", default=None, metavar="PATH", help=h("data"))
    p.add_argument("--checkpoint", default=None, metavar="FILE", help=h("checkpoint"))
    p.add_argument("--pretrained", action="store_true", help=h("pretrained"))
    for name, kind in _TRAINING_NUMBERS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name), help=h(name))
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=defaults.optimizer, help=h("optimizer"))
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help=h("weight_decay"))
    p.add_argument("--recipe", default=None, help=h("recipe"))
    p.add_argument("--out", default=defaults.out, metavar="DIR", help=h("out"))
    p.add_argument(
        "--input-size", type=int, nargs="+", default=None, metavar="N", help="S or 3 S S: " + h("input_size")
    )
    p.add_argument("--train-per-class", type=int, default=None, metavar="N", help=h("train_per_class"))
    p.add_argument("--workers", type=int, default=None, help=h("workers"))
    p.add_argument("--device", default=defaults.device, help=h("device"))
    p.add_argument("--limit-train-batches", type=int, default=None, metavar="N", help=h("limit_train_batches"))
    p.add_argument("--limit-val-batches", type=int, default=None, metavar="N", help=h("limit_val_batches"))


def _training_values(args: argparse.Namespace) -> dict[str, object]:
    """The config fields that the training options give, ``--input-size`` checked."""
    from dropblock_inject.train import ConfigError

    size = args.input_size or [None]
    if not (len(size) == 1 or (len(size) == 3 and size[0] == 3 and size[1] == size[2])):
        raise ConfigError(f"--input-size takes S or 3 S S (square RGB images), got {' '.join(map(str, size))}")
    return {**{name: getattr(args, name) for name in _TRAINING_FIELDS}, "input_size": size[-1]}


def _add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    from dropblock_inject.train import FinetuneConfig

    p = sub.add_parser("finetune", help="train a classifier with DropBlock (default: the embedded digits)")
    _add_training_options(p, FinetuneConfig)
    p.add_argument("--compare", action="store_true", help=FinetuneConfig.help("compare"))
    p.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from dropblock_inject.cli_progress import rich_finetune_reporter
    from dropblock_inject.train import FinetuneConfig, finetune

    finetune(FinetuneConfig(**_training_values(args), compare=args.compare), rich_finetune_reporter())
    return 0


def _add_ablate_parser(sub: argparse._SubParsersAction) -> None:
    from dropblock_inject.train import ARM_KINDS, AblationConfig

    defaults = AblationConfig()
    p = sub.add_parser(
        "ablate",
        help="does DropBlock help? the same model under several arms x seeds, paired, with confidence intervals",
        description="Train the same model under several arms for several seeds (seed s: the same initial weights, "
        "data order and augmentation in every arm) and compare each arm with 'none': paired differences with "
        "confidence intervals, and a verdict that claims no more than they support. Finished runs are kept in "
        "--out: running again skips them.",
    )  # fmt: skip
    _add_training_options(p, AblationConfig)
    arms = ",".join(defaults.arms)
    p.add_argument("--arms", default=arms, metavar="A,B,...", help=f"from {', '.join(ARM_KINDS)} (default {arms})")
    p.add_argument("--seeds", type=int, default=defaults.seeds,
                   help=f"{AblationConfig.help('seeds')} (default {defaults.seeds})")  # fmt: skip
    p.add_argument("--drop-probs", default=None, metavar="P,Q,...", help=AblationConfig.help("drop_probs"))
    p.add_argument("--block-sizes", default=None, metavar="B,C,...", help=AblationConfig.help("block_sizes"))
    p.add_argument("--shard", default=None, metavar="I/N", help=AblationConfig.help("shard"))
    report = "train nothing: summarise the finished runs in DIR (all shards'), print and write the table"
    p.add_argument("--report", default=None, metavar="DIR", help=report)
    p.set_defaults(func=_run_ablate)


def _run_ablate(args: argparse.Namespace) -> int:
    from dropblock_inject.cli_progress import rich_ablation_reporter
    from dropblock_inject.train import AblationConfig, ablate, report

    if args.report:
        report(args.report, rich_ablation_reporter())
        return 0
    config = AblationConfig(**_training_values(args), arms=args.arms, seeds=args.seeds, shard=args.shard,
                            drop_probs=_numbers(args.drop_probs, float, "--drop-probs"),
                            block_sizes=_numbers(args.block_sizes, int, "--block-sizes"))  # fmt: skip
    ablate(config, rich_ablation_reporter())
    return 0


def _numbers(text: str | None, kind: type, flag: str) -> tuple | None:
    """``"0.05,0.1"`` as numbers of ``kind``; None when not given."""
    from dropblock_inject.train import ConfigError

    if text is None:
        return None
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError as e:
        raise ConfigError(f"{flag} takes comma-separated {kind.__name__}s, got {text!r}") from e


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's (bad name, path, file or value): one line, exit status 2."""
    import yaml

    from dropblock_inject.errors import DropBlockInjectError

    return (DropBlockInjectError, OSError, yaml.YAMLError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stdout)
        return 0
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `dropblock-inject plan ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except _user_error_types() as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"dropblock-inject {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dropblock-inject: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
