"""One training run, the loop ``finetune`` and ``ablate`` share: build, regularise, train, evaluate.

A run is an :class:`~dropblock_inject.train.arms.Arm` and a seed. The seed fixes the initial
weights, the data order and the augmentation, whatever the arm: the data and an arm's own input
transform (cutout) draw from random streams of their own, so an arm's DropBlock draws never shift
another arm's data. Under ``torchrun`` every rank starts from the same weights and draws its own
masks and augmentation; rank 0 reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dropblock_inject.api import strip
from dropblock_inject.models import create_model
from dropblock_inject.train.arms import Arm, Regulariser, attach, model_kwargs
from dropblock_inject.train.checkpoints import initial_weights, load_weights
from dropblock_inject.train.config import ConfigError, FinetuneConfig
from dropblock_inject.train.data import Splits, load_splits
from dropblock_inject.train.distributed import DistContext, all_sum, sync_buffers, wrap
from dropblock_inject.train.meter import DropMeter, Realised, format_realised
from dropblock_inject.train.report import Reporter, RunResult

__all__ = ["MEASURES_PER_EPOCH", "RngStreams", "Setup", "prepare", "steps_per_epoch", "train_run", "weights_hash"]

MEASURES_PER_EPOCH = 4  # training steps per epoch on which the DropMeter counts dropped units


@dataclass
class Setup:
    """What every run of one job shares: its settings, data, device, processes and starting weights."""

    config: FinetuneConfig
    reporter: Reporter
    splits: Splits
    device: torch.device
    ctx: DistContext
    weights: dict[str, torch.Tensor] | None
    weights_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.ctx.main


def prepare(config: FinetuneConfig, reporter: Reporter, device: torch.device, ctx: DistContext) -> Setup:
    """Load the data and the starting weights once for all runs, and say what they are (rank 0)."""
    if config.out and os.path.exists(config.out) and not os.path.isdir(config.out):
        raise ConfigError(f"out {config.out!r} exists and is not a folder")
    splits = load_splits(config.data, config.input_size, config.train_per_class)
    weights, source = initial_weights(config)
    setup = Setup(config, reporter, splits, device, ctx, weights, source)
    if setup.main:
        reporter.message(f"data: {splits.source}")
        where = f"{ctx.world} processes" if ctx.enabled else str(device)
        reporter.message(f"model: {config.model} ({source}), {config.input_size}px, on {where}")
    return setup


class RngStreams:
    """Named streams of torch's CPU random numbers, each seeded from the run's seed and its name.

    ``with streams.use("data"):`` draws from the ``data`` stream (and leaves it where it got to)
    instead of the global one, so what one stream draws never moves another.

    Example:
        >>> a, b = RngStreams(0, ["data"]), RngStreams(0, ["data"])
        >>> with a.use("data"):
        ...     x = torch.rand(2)
        >>> _ = torch.rand(5)  # draws elsewhere do not move the stream
        >>> with b.use("data"):
        ...     torch.equal(x, torch.rand(2))
        True
    """

    def __init__(self, seed: int, names: list[str]) -> None:
        self._states = {name: torch.Generator().manual_seed(_derive(seed, name)).get_state() for name in names}

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        outer = torch.get_rng_state()
        torch.set_rng_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _derive(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def weights_hash(model: nn.Module) -> str:
    """A short hash of every tensor of ``model.state_dict()`` (names, shapes, dtypes and values).

    Example:
        >>> torch.manual_seed(0); a = nn.Linear(2, 2)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> torch.manual_seed(0); b = nn.Linear(2, 2)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> weights_hash(a) == weights_hash(b) != weights_hash(nn.Linear(2, 2))
        True
    """
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def build_model(setup: Setup, seed: int, **kwargs: Any) -> nn.Module:
    """The model for ``seed``: the same weights on every rank and in every arm (seeded init, then the
    starting weights)."""
    torch.manual_seed(seed)
    model = create_model(setup.config.model, num_classes=len(setup.splits.classes), **kwargs)
    if setup.weights is not None:
        note = load_weights(model, setup.weights, source=setup.weights_source.removeprefix("weights from "))
        if note and note not in setup.notes:
            setup.notes.append(note)
            if setup.main:
                setup.reporter.message(note)
    return model


def train_run(setup: Setup, arm: Arm, seed: int) -> RunResult:
    """Train ``arm`` from ``seed`` and evaluate on the held-out split after every epoch."""
    cfg, ctx, reporter = setup.config, setup.ctx, setup.reporter
    model = build_model(setup, seed, **model_kwargs(arm, cfg))
    init_hash = weights_hash(model)
    train_loader, val_loader = _loaders(setup, seed)
    steps = steps_per_epoch(setup)
    reg = attach(arm, cfg, model, cfg.epochs * steps)
    if setup.main and reg.plan is not None:
        reporter.on_plan(arm.name, reg.plan)
    model.to(setup.device)
    reporter.on_model(arm.name, model)
    torch.manual_seed(seed + ctx.rank)  # every rank its own DropBlock masks
    streams = RngStreams(seed + ctx.rank, ["data", "inputs"])
    meter = DropMeter(model, every=max(1, steps // MEASURES_PER_EPOCH))
    loop = _Loop(setup, arm.name, wrap(model, ctx, setup.device), reg, meter, streams, steps)
    if setup.main:
        reporter.train_start(arm.name, cfg.epochs, steps)
    history, start = [], time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        history.append(loop.epoch(epoch, train_loader, val_loader, model))
        if setup.main:
            reporter.epoch_end(arm.name, history[-1])
    if setup.main:
        reporter.train_end(arm.name)
    if reg.plan is not None:
        strip(model)
    last = history[-1]
    return RunResult(arm.name, history, last["val_acc"], last["val_loss"], last["val_correct"], last["val_count"],
                     time.perf_counter() - start, model, reg.plan.to_dicts() if reg.plan else [], seed=seed,
                     init_hash=init_hash, realised=loop.realised)  # fmt: skip


@dataclass
class _Loop:
    """The epochs of one run."""

    setup: Setup
    run: str
    model: nn.Module  # wrapped in DistributedDataParallel under torchrun
    reg: Regulariser
    meter: DropMeter
    streams: RngStreams
    steps: int
    realised: Realised = field(default_factory=lambda: Realised(0.0, {}))

    def __post_init__(self) -> None:
        cfg = self.setup.config
        self.opt = _optimizer(self.model, cfg)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _warmup_cosine(cfg.epochs * self.steps))

    def epoch(self, epoch: int, train_loader: DataLoader, val_loader: DataLoader, bare: nn.Module) -> dict[str, Any]:
        """Train one epoch, then evaluate ``bare`` (the unwrapped model); the epoch's row."""
        cfg, ctx, t0 = self.setup.config, self.setup.ctx, time.perf_counter()
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        train_loss = self._train(epoch, self._batches(train_loader))
        sync_buffers(bare, ctx)
        val_loss, correct, count = _evaluate(bare, val_loader, self.setup)
        self.realised = self.meter.take(lambda values: all_sum(values, ctx, self.setup.device))
        return {
            "run": self.run, "epoch": epoch, "epochs": cfg.epochs, "train_loss": train_loss, "val_loss": val_loss,
            "val_acc": correct / max(count, 1), "val_correct": correct, "val_count": count,
            "drop_rate": self.reg.scheduled_rate(), "realised_drop": self.realised.overall,
            "realised_by_stage": format_realised(self.realised.by_stage), "lr": self.opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }  # fmt: skip

    def _batches(self, loader: DataLoader) -> Iterator[Any]:
        """At most ``steps`` batches, loaded (and augmented, in this process) from the ``data`` stream."""
        with self.streams.use("data"):
            it = iter(loader)
        for _ in range(self.steps):
            with self.streams.use("data"):
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    def _train(self, epoch: int, batches: Iterator[Any]) -> float:
        setup, reg = self.setup, self.reg
        self.model.train()
        total, count = 0.0, 0
        for i, (x, y) in enumerate(batches, start=1):
            if reg.transform is not None:
                with self.streams.use("inputs"):
                    x = reg.transform(x)
            x, y = x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
            with self.meter.watch():
                loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.lr_sched.step()
            if reg.schedule is not None:
                reg.schedule.step()
            value = loss.item()
            total, count = total + value * len(y), count + len(y)
            if setup.main:
                setup.reporter.step(self.run, epoch, i, value)
        total, count = all_sum([total, count], setup.ctx, setup.device)
        return total / max(count, 1)


def steps_per_epoch(setup: Setup) -> int:
    """Optimizer steps per epoch: the full batches of this rank's share of the training set (one batch
    when the share fits in one), at most ``limit_train_batches``."""
    share = math.ceil(len(setup.splits.train) / setup.ctx.world)
    batch = setup.config.batch_size
    steps = share // batch if _drops_last(share, batch) else math.ceil(share / batch)
    return min(steps, setup.config.limit_train_batches or steps)


def _drops_last(share: int, batch: int) -> bool:
    return share > batch  # a last batch of one image would break BatchNorm


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


def _loaders(setup: Setup, seed: int) -> tuple[DataLoader, DataLoader]:
    cfg, ctx, splits = setup.config, setup.ctx, setup.splits
    workers = cfg.workers if cfg.workers is not None else (0 if cfg.data is None else min(4, os.cpu_count() or 1))
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": setup.device.type == "cuda"}
    drop_last = _drops_last(math.ceil(len(splits.train) / ctx.world), cfg.batch_size)
    if ctx.enabled:
        sampler = DistributedSampler(splits.train, ctx.world, ctx.rank, shuffle=True, seed=seed)
        train = DataLoader(splits.train, cfg.batch_size, sampler=sampler, drop_last=drop_last, **common)
    else:
        gen = torch.Generator().manual_seed(seed)
        train = DataLoader(splits.train, cfg.batch_size, shuffle=True, generator=gen, drop_last=drop_last, **common)
    val_indices = list(range(ctx.rank, len(splits.val), ctx.world))  # no padding: exact counts
    val = DataLoader(splits.val, 2 * cfg.batch_size, sampler=val_indices, **common)
    if len(train) == 0 or len(splits.val) == 0:
        raise ConfigError(f"no training or validation images in {splits.source}")
    return train, val


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, setup: Setup) -> tuple[float, int, int]:
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
    loss_sum, correct, count = all_sum([loss_sum, correct, count], setup.ctx, setup.device)
    return loss_sum / max(count, 1), int(correct), int(count)
