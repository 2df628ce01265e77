"""``finetune``: train a timm or torchvision classifier with DropBlock injected and ramped.

The loop the command ``dropblock-inject finetune`` runs, usable from Python::

    result = finetune(FinetuneConfig(model="resnet18", data="path/to/images", epochs=10))
    print(result.runs[0].val_accuracy)

It builds the model (random weights, the hub's with ``pretrained``, or a ``checkpoint`` file whose
classifier head may have another number of classes), injects DropBlock with
:func:`dropblock_inject.inject`, ramps it with :class:`dropblock_inject.DropBlockSchedule` over
the whole run (the paper's schedule, or the ``schedule:`` of the ``recipe``), and trains with
AdamW or SGD under a cosine learning rate.
``compare`` trains the same model without DropBlock from the same seed. Under ``torchrun`` it
trains with ``DistributedDataParallel``: every rank starts from the same weights and draws its
own DropBlock masks; rank 0 reports and writes the files.

Nothing here prints directly: progress goes to a :class:`Reporter` (the command line passes one
that draws progress bars).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dropblock_inject.api import plan, strip
from dropblock_inject.data import Splits, load_splits
from dropblock_inject.errors import DropBlockInjectError
from dropblock_inject.models import create_model
from dropblock_inject.pipeline.rewrite import apply_plan
from dropblock_inject.recipe import load_recipe, recipe_for
from dropblock_inject.schedule import DropBlockSchedule

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FinetuneConfig",
    "FinetuneResult",
    "Reporter",
    "RunResult",
    "finetune",
    "format_comparison",
    "format_epoch",
    "load_weights",
    "read_checkpoint",
]

OUTPUT_FILES = {"metrics_csv": "metrics.csv", "metrics_json": "metrics.json"}
CHECKPOINT_FILES = {"dropblock": "model.pt", "baseline": "baseline.pt"}
RUN_LABELS = {"dropblock": "with DropBlock", "baseline": "without DropBlock"}


class ConfigError(DropBlockInjectError, ValueError):
    """A fine-tuning setting is out of range (the message names it and the value)."""


class CheckpointError(DropBlockInjectError, ValueError):
    """A checkpoint cannot be read or does not fit the model (the message names the keys)."""


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune`; the defaults train on the embedded digits in under 2 minutes on 2 CPU cores.

    Example:
        >>> FinetuneConfig(epochs=3).to_dict()["epochs"]
        3
        >>> FinetuneConfig(epochs=0)
        Traceback (most recent call last):
        ...
        dropblock_inject.finetune.ConfigError: epochs must be a positive integer, got 0
    """

    model: str = _opt("resnet10t", "timm name, tv:<torchvision builder> or package.module:callable")
    data: str | None = _opt(None, "image folder with train/ and val/, or one folder split 80/20 (default: digits)")
    checkpoint: str | None = _opt(None, "state_dict file to start from (a classifier head of another size is reset)")
    pretrained: bool = _opt(False, "start from the hub's weights (needs network access)")
    epochs: int = _opt(4, "training epochs")
    batch_size: int = _opt(64, "images per optimizer step (per process under torchrun)")
    lr: float = _opt(2e-3, "peak learning rate (cosine decay after a 5 % warm-up)")
    optimizer: str = _opt("adamw", "adamw or sgd (momentum 0.9, Nesterov)")
    weight_decay: float = _opt(0.05, "weight decay")
    drop_prob: float = _opt(0.1, "DropBlock target drop rate, reached at the end of the linear ramp")
    recipe: str | None = _opt(None, "recipe name, YAML file or 'auto' (default: the built-in rules)")
    seed: int = _opt(0, "seed of the weights, the data order and the DropBlock masks")
    compare: bool = _opt(False, "also train without DropBlock from the same seed and compare")
    out: str | None = _opt(None, "folder for metrics.csv, metrics.json and model.pt (created if needed)")
    input_size: int | None = _opt(None, "side of the square training images in px (default: 64 digits, 224 folder)")
    workers: int | None = _opt(None, "DataLoader workers (default: 0 for the digits, up to 4 for a folder)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    limit_train_batches: int | None = _opt(None, "at most N training batches per epoch (smoke tests)")
    limit_val_batches: int | None = _opt(None, "at most N validation batches (smoke tests)")

    def __post_init__(self) -> None:
        if self.input_size is None:
            self.input_size = 64 if self.data is None else 224
        for name in ("epochs", "batch_size", "input_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("limit_train_batches", "limit_val_batches"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.workers is not None:
            _check_int("workers", self.workers, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (isinstance(self.drop_prob, (int, float)) and 0.0 <= self.drop_prob < 1.0):
            raise ConfigError(f"drop_prob must be in [0, 1), got {self.drop_prob}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.pretrained and self.checkpoint:
            raise ConfigError("give either pretrained or checkpoint, not both")
        check_recipe(self.recipe)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        """The config from :meth:`to_dict`'s output; unknown keys are an error."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown finetune settings {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def help(cls, name: str) -> str:
        """The help string of field ``name`` (the command line shows it)."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


def check_recipe(recipe: str | None) -> None:
    """Raise :class:`~dropblock_inject.RecipeError` now if ``recipe`` is an unknown name or a bad file."""
    if recipe is not None and recipe != "auto":
        load_recipe(recipe)


class Reporter:
    """Where :func:`finetune` sends its progress; the default prints lines. Subclass to redirect.

    Only rank 0 receives ``message``, ``train_start``, ``step``, ``epoch_end`` and ``train_end``;
    ``on_model`` is called on every rank, with the model ready to train (DropBlock injected,
    on its device, not yet wrapped in ``DistributedDataParallel``).
    """

    def message(self, text: str) -> None:
        print(text, flush=True)

    def on_model(self, run: str, model: nn.Module) -> None:
        """``run`` is ``"dropblock"`` or ``"baseline"``."""

    def train_start(self, run: str, epochs: int, steps_per_epoch: int) -> None:
        """Before the first step of ``run``."""

    def step(self, run: str, epoch: int, step: int, loss: float) -> None:
        """After each optimizer step (``step`` counts from 1 in each epoch)."""

    def epoch_end(self, run: str, row: dict[str, Any]) -> None:
        self.message(format_epoch(row))

    def train_end(self, run: str) -> None:
        """After the last epoch of ``run``."""


@dataclass
class RunResult:
    """One training run: ``name`` is ``"dropblock"`` or ``"baseline"``.

    ``model`` is the trained model, DropBlock stripped (the architecture as built).
    """

    name: str
    history: list[dict[str, Any]]
    val_accuracy: float
    val_loss: float
    val_correct: int
    val_count: int
    seconds: float
    model: nn.Module = field(repr=False)
    plan: list[dict[str, Any]] = field(default_factory=list, repr=False)


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the runs (DropBlock first) and the files written."""

    config: FinetuneConfig
    classes: list[str]
    data: str
    runs: list[RunResult]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def run(self, name: str) -> RunResult:
        return next(r for r in self.runs if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        runs = {r.name: {f.name: getattr(r, f.name) for f in fields(r) if f.name != "model"} for r in self.runs}
        return {
            "config": self.config.to_dict(),
            "data": self.data,
            "classes": self.classes,
            "notes": self.notes,
            "runs": runs,
        }


def format_epoch(row: Mapping[str, Any]) -> str:
    """One line per epoch.

    Example:
        >>> format_epoch({"run": "dropblock", "epoch": 2, "epochs": 5, "train_loss": 0.5, "val_loss": 0.25,
        ...               "val_acc": 0.9, "drop_rate": 0.04, "lr": 1e-3, "seconds": 12.0})
        'epoch 2/5  train loss 0.5000  val loss 0.2500  val acc 90.00%  drop 0.040  lr 1.00e-03  12.0 s'
    """
    return (
        f"epoch {row['epoch']}/{row['epochs']}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
        f"val acc {100 * row['val_acc']:.2f}%  drop {row['drop_rate']:.3f}  lr {row['lr']:.2e}  {row['seconds']:.1f} s"
    )


def format_comparison(runs: list[RunResult]) -> str:
    """The final metrics of each run side by side."""
    lines = [f"{'':18}  {'val acc':>8}  {'val loss':>8}  {'train loss':>10}  {'time':>7}"]
    for r in runs:
        last = r.history[-1]
        lines.append(
            f"{RUN_LABELS.get(r.name, r.name):18}  {100 * r.val_accuracy:7.2f}%  {r.val_loss:8.4f}  "
            f"{last['train_loss']:10.4f}  {r.seconds:6.1f}s"
        )
    return "\n".join(lines)


# -- checkpoints -------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in ``path`` (``torch.load(weights_only=True)``).

    Accepts a bare state_dict or one under ``"state_dict"``, ``"model"`` or ``"model_state_dict"``;
    a ``"module."`` prefix on every key (``DistributedDataParallel``) is removed.

    Raises:
        CheckpointError: The file is missing, unreadable, or holds no state_dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path!r}: {_first_line(e)}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path!r} holds no state_dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> str | None:
    """Load ``state`` into ``model`` strictly, except the classifier head when its size differs.

    The head (timm's ``pretrained_cfg["classifier"]``, else the last ``nn.Linear``) keeps the
    model's fresh initialisation when the checkpoint's head has another shape or is absent.

    Returns:
        A note saying that the head was re-initialised, or None.

    Raises:
        CheckpointError: Other keys are missing, unexpected or of another shape (named).
    """
    own = model.state_dict()
    head = _head_keys(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    reset = sorted(head & (set(missing) | set(mismatched)))
    if reset:
        reset = sorted(head)
        missing, mismatched = [k for k in missing if k not in head], [k for k in mismatched if k not in head]
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(model, source, missing, unexpected, mismatched, own, state))
    model.load_state_dict({k: v for k, v in state.items() if k not in reset}, strict=not reset)
    if not reset:
        return None
    return f"classifier head {', '.join(reset)} not taken from {source} (other shape or absent): initialised fresh"


def _head_keys(model: nn.Module) -> set[str]:
    cfg = getattr(model, "pretrained_cfg", None)
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if not names:
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        names = linear[-1:]
    prefixes = tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))
    return {k for k in model.state_dict() if prefixes and k.startswith(prefixes)}


def _mismatch_message(model, source, missing, unexpected, mismatched, own, state) -> str:
    def some(keys: list[str], show=str) -> str:
        head = ", ".join(show(k) for k in keys[:3])
        return head + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {some(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {some(unexpected)}")
    if mismatched:
        shapes = lambda k: f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)} in the model"  # noqa: E731
        parts.append(f"shape mismatches: {some(mismatched, shapes)}")
    return f"{source} does not fit {type(model).__name__}: " + "; ".join(parts) + " (another architecture?)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# -- distributed -------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this call initialised the process group and must destroy it

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _init_distributed(device: torch.device) -> _Dist:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on GPU)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), local_rank)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return _Dist()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owned=True)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def _sync_buffers(model: nn.Module, ctx: _Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart in the last forward)."""
    if ctx.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


def _all_sum(values: list[float], ctx: _Dist, device: torch.device) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# -- the loop ----------------------------------------------------------------------------------


@dataclass
class _Setup:
    config: FinetuneConfig
    reporter: Reporter
    splits: Splits
    device: torch.device
    ctx: _Dist
    weights: dict[str, torch.Tensor] | None
    weights_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.ctx.rank == 0


def finetune(config: FinetuneConfig | None = None, reporter: Reporter | None = None) -> FinetuneResult:
    """Train ``config.model`` with DropBlock (and without it, with ``config.compare``).

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) it joins the process group,
    shards the data with ``DistributedSampler`` and trains with ``DistributedDataParallel``.

    Args:
        config: The settings (default: the embedded digits, ``resnet10t`` at 64 px).
        reporter: Receives progress and the lines to print (default: :class:`Reporter`, prints).

    Returns:
        The runs' metrics and models, and the files written to ``config.out`` (rank 0).

    Raises:
        DropBlockInjectError: Unknown model, unusable data or checkpoint, no DropBlock site.

    Example:
        >>> config = FinetuneConfig(model="tv:resnet18", input_size=32, epochs=1, batch_size=16,
        ...                         limit_train_batches=2, limit_val_batches=1)
        >>> result = finetune(config)  # doctest: +ELLIPSIS
        data: embedded digits (UCI, CC BY 4.0): 1438 train / 359 val images, 8x8 -> 32x32
        ...
        held-out accuracy with DropBlock: ...% (.../32 images)
        >>> run = result.runs[0]
        >>> run.name, len(run.history), run.val_count, hasattr(run.model.layer3[0].bn1, "dropblock")
        ('dropblock', 1, 32, False)
    """
    config = config or FinetuneConfig()
    reporter = reporter or Reporter()
    device = _resolve_device(config.device)
    ctx = _init_distributed(device)
    try:
        if device.type == "cuda" and ctx.enabled:
            device = torch.device("cuda", ctx.local_rank)
            torch.cuda.set_device(device)
        return _finetune(config, reporter, device, ctx)
    finally:
        if ctx.owned:
            dist.destroy_process_group()


def _finetune(config: FinetuneConfig, reporter: Reporter, device: torch.device, ctx: _Dist) -> FinetuneResult:
    if config.out and os.path.exists(config.out) and not os.path.isdir(config.out):
        raise ConfigError(f"out {config.out!r} exists and is not a folder")
    splits = load_splits(config.data, config.input_size)
    weights, source = _initial_weights(config)
    setup = _Setup(config, reporter, splits, device, ctx, weights, source)
    if setup.main:
        reporter.message(f"data: {splits.source}")
        where = f"{ctx.world} processes" if ctx.enabled else str(device)
        reporter.message(f"model: {config.model} ({source}), {config.input_size}px, on {where}")
    runs = [_train_run(setup, "dropblock")]
    if config.compare:
        runs.append(_train_run(setup, "baseline"))
    result = FinetuneResult(config, splits.classes, splits.source, runs, notes=setup.notes)
    if setup.main:
        if config.compare:
            reporter.message(format_comparison(runs))
        for r in runs:
            label = RUN_LABELS[r.name]
            reporter.message(
                f"held-out accuracy {label}: {100 * r.val_accuracy:.2f}% ({r.val_correct}/{r.val_count} images)"
            )
        if config.out:
            result.files = _write_outputs(result)
            reporter.message(f"wrote {', '.join(result.files)}")
    if ctx.enabled:
        dist.barrier()
    return result


def _initial_weights(config: FinetuneConfig) -> tuple[dict[str, torch.Tensor] | None, str]:
    if config.checkpoint:
        return read_checkpoint(config.checkpoint), f"weights from {config.checkpoint}"
    if not config.pretrained:
        return None, "random weights"
    try:
        hub = create_model(config.model, pretrained=True)
    except DropBlockInjectError:
        raise
    except Exception as e:  # network and hub errors come in many types
        raise CheckpointError(f"cannot get pretrained weights for {config.model!r}: {_first_line(e)}") from e
    return hub.state_dict(), "pretrained weights from the hub"


def _build_model(setup: _Setup) -> nn.Module:
    """The same weights on every rank and in every run: seeded init, then the initial weights."""
    torch.manual_seed(setup.config.seed)
    model = create_model(setup.config.model, num_classes=len(setup.splits.classes))
    if setup.weights is not None:
        note = load_weights(model, setup.weights, source=setup.weights_source.removeprefix("weights from "))
        if note and note not in setup.notes:
            setup.notes.append(note)
            if setup.main:
                setup.reporter.message(note)
    return model


def _inject(setup: _Setup, model: nn.Module) -> list[dict[str, Any]]:
    cfg = setup.config
    size = (3, cfg.input_size, cfg.input_size)
    kwargs: dict[str, Any] = {"drop_prob": cfg.drop_prob, "input_size": size, "model_name": cfg.model}
    chosen = plan(model, cfg.recipe, **kwargs)
    if setup.main:
        setup.reporter.message(str(chosen))
    apply_plan(model, chosen)  # what inject does, without tracing and analysing the model again
    return chosen.to_dicts()


def _train_run(setup: _Setup, run: str) -> RunResult:
    cfg, ctx, reporter = setup.config, setup.ctx, setup.reporter
    model = _build_model(setup)
    sites = _inject(setup, model) if run == "dropblock" else []
    model.to(setup.device)
    reporter.on_model(run, model)
    torch.manual_seed(cfg.seed + ctx.rank)  # every rank its own DropBlock masks and augmentation
    train_loader, val_loader = _loaders(setup)
    steps = min(len(train_loader), cfg.limit_train_batches or len(train_loader))
    wrapped = _wrap(model, setup)
    opt = _optimizer(model, cfg)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(cfg.epochs * steps))
    db_sched = _dropblock_schedule(model, cfg, cfg.epochs * steps) if sites else None
    if setup.main:
        reporter.train_start(run, cfg.epochs, steps)
    history, start = [], time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        batches = _limit(train_loader, steps)
        train_loss = _train_epoch(setup, run, epoch, wrapped, batches, opt, lr_sched, db_sched)
        _sync_buffers(model, ctx)
        val_loss, correct, count = _evaluate(model, val_loader, setup)
        row = {
            "run": run, "epoch": epoch, "epochs": cfg.epochs, "train_loss": train_loss, "val_loss": val_loss,
            "val_acc": correct / max(count, 1), "drop_rate": cfg.drop_prob * db_sched.progress() if db_sched else 0.0,
            "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
        }  # fmt: skip
        history.append(row)
        if setup.main:
            reporter.epoch_end(run, row)
    if setup.main:
        reporter.train_end(run)
    if sites:
        strip(model)
    seconds = time.perf_counter() - start
    return RunResult(run, history, row["val_acc"], val_loss, int(correct), int(count), seconds, model, sites)


def _dropblock_schedule(model: nn.Module, cfg: FinetuneConfig, total_steps: int) -> DropBlockSchedule:
    """The recipe's ``schedule:`` (kind, warm-up as a fraction of the run); without a recipe, the
    paper's linear ramp over the whole run."""
    if cfg.recipe is None:
        return DropBlockSchedule(model, total_steps=total_steps)
    recipe = recipe_for(model, cfg.model) if cfg.recipe == "auto" else load_recipe(cfg.recipe)
    warmup = int(recipe.schedule["warmup_fraction"] * total_steps)  # < total_steps: the fraction is < 1
    return DropBlockSchedule(model, total_steps=total_steps, warmup_steps=warmup, kind=recipe.schedule["kind"])


def _wrap(model: nn.Module, setup: _Setup) -> nn.Module:
    if not setup.ctx.enabled:
        return model
    ids = [setup.device.index] if setup.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # norms and biases: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _warmup_cosine(total: int):
    warmup = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def _loaders(setup: _Setup) -> tuple[DataLoader, DataLoader]:
    cfg, ctx, splits = setup.config, setup.ctx, setup.splits
    workers = cfg.workers if cfg.workers is not None else (0 if cfg.data is None else min(4, os.cpu_count() or 1))
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": setup.device.type == "cuda"}
    shard = math.ceil(len(splits.train) / ctx.world)
    drop_last = shard > cfg.batch_size  # a last batch of one image would break BatchNorm
    if ctx.enabled:
        sampler = DistributedSampler(splits.train, ctx.world, ctx.rank, shuffle=True, seed=cfg.seed)
        train = DataLoader(splits.train, cfg.batch_size, sampler=sampler, drop_last=drop_last, **common)
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        train = DataLoader(splits.train, cfg.batch_size, shuffle=True, generator=gen, drop_last=drop_last, **common)
    val_indices = list(range(ctx.rank, len(splits.val), ctx.world))  # no padding: exact counts
    val = DataLoader(splits.val, 2 * cfg.batch_size, sampler=val_indices, **common)
    if len(train) == 0 or len(splits.val) == 0:
        raise ConfigError(f"no training or validation images in {splits.source}")
    return train, val


def _limit(loader: DataLoader, n: int) -> Iterator[Any]:
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield batch


def _train_epoch(setup, run, epoch, model, batches, opt, lr_sched, db_sched) -> float:
    model.train()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(batches, start=1):
        x, y = x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if db_sched is not None:
            db_sched.step()
        value = loss.item()
        total, count = total + value * len(y), count + len(y)
        if setup.main:
            setup.reporter.step(run, epoch, i, value)
    total, count = _all_sum([total, count], setup.ctx, setup.device)
    return total / max(count, 1)


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, setup: _Setup) -> tuple[float, int, int]:
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if setup.config.limit_val_batches is not None and i >= setup.config.limit_val_batches:
            break
        x, y = x.to(setup.device), y.to(setup.device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    loss_sum, correct, count = _all_sum([loss_sum, correct, count], setup.ctx, setup.device)
    return loss_sum / max(count, 1), int(correct), int(count)


# -- outputs -----------------------------------------------------------------------------------


def _write_outputs(result: FinetuneResult) -> list[str]:
    """Write metrics and checkpoints into ``config.out``; touch no other file there."""
    out = result.config.out
    assert out is not None
    os.makedirs(out, exist_ok=True)
    rows = [row for r in result.runs for row in r.history]
    files = [_write(out, OUTPUT_FILES["metrics_csv"], _csv_text(rows).encode())]
    text = json.dumps(result.to_dict(), indent=2, default=_json_default)
    files.append(_write(out, OUTPUT_FILES["metrics_json"], text.encode()))
    for r in result.runs:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in r.model.state_dict().items()}, buf)
        files.append(_write(out, CHECKPOINT_FILES[r.name], buf.getvalue()))
    return files


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write(folder: str, name: str, data: bytes) -> str:
    """Write ``data`` to ``folder/name`` through a temporary file, so a crash leaves no half file."""
    path = os.path.join(folder, name)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
