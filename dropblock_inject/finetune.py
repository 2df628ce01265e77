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

This module is the training loop; its parts live beside it, and every public name is importable
from here: ``finetune_config`` (:class:`FinetuneConfig` and its checks), ``finetune_checkpoints``
(weights in and out), ``finetune_distributed`` (device and process group) and ``finetune_report``
(the :class:`Reporter` and the results).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dropblock_inject.api import inject, plan, strip
from dropblock_inject.data import Splits, load_splits
from dropblock_inject.finetune_checkpoints import (
    CheckpointError,
    initial_weights,
    load_weights,
    read_checkpoint,
    write_outputs,
)
from dropblock_inject.finetune_config import ConfigError, FinetuneConfig, check_recipe
from dropblock_inject.finetune_distributed import DistContext, all_sum, distributed, sync_buffers, wrap
from dropblock_inject.finetune_report import (
    RUN_LABELS,
    FinetuneResult,
    Reporter,
    RunResult,
    format_comparison,
    format_epoch,
)
from dropblock_inject.models import create_model
from dropblock_inject.pipeline.plan import Plan
from dropblock_inject.recipe import load_recipe, recipe_for
from dropblock_inject.schedule import DropBlockSchedule

__all__ = [
    "RUN_LABELS",
    "CheckpointError",
    "ConfigError",
    "FinetuneConfig",
    "FinetuneResult",
    "Reporter",
    "RunResult",
    "check_recipe",
    "finetune",
    "format_comparison",
    "format_epoch",
    "load_weights",
    "plan_for",
    "read_checkpoint",
]


@dataclass
class _Setup:
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
    with distributed(config.device) as (ctx, device):
        return _finetune(config, reporter or Reporter(), device, ctx)


def _finetune(config: FinetuneConfig, reporter: Reporter, device: torch.device, ctx: DistContext) -> FinetuneResult:
    if config.out and os.path.exists(config.out) and not os.path.isdir(config.out):
        raise ConfigError(f"out {config.out!r} exists and is not a folder")
    splits = load_splits(config.data, config.input_size)
    weights, source = initial_weights(config)
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
            result.files = write_outputs(result)
            reporter.message(f"wrote {', '.join(result.files)}")
    if ctx.enabled:
        dist.barrier()
    return result


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


def plan_for(config: FinetuneConfig, model: nn.Module) -> Plan:
    """The DropBlock sites ``finetune`` patches in ``model`` (built for ``config``), at its input size.

    Example:
        >>> config = FinetuneConfig()
        >>> [(s.feature, s.block_size) for s in plan_for(config, create_model(config.model, num_classes=10))]
        [((8, 8), (5, 5)), ((4, 4), (3, 3))]
    """
    size = (3, config.input_size, config.input_size)
    return plan(model, config.rules(), drop_prob=config.drop_prob, input_size=size, model_name=config.model)


def _inject(setup: _Setup, model: nn.Module) -> list[dict[str, Any]]:
    chosen = plan_for(setup.config, model)
    if setup.main:
        setup.reporter.message(str(chosen))
    inject(model, chosen)  # the printed plan, applied as it is (no second analysis)
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
    wrapped = wrap(model, ctx, setup.device)
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
        sync_buffers(model, ctx)
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
    total, count = all_sum([total, count], setup.ctx, setup.device)
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
    loss_sum, correct, count = all_sum([loss_sum, correct, count], setup.ctx, setup.device)
    return loss_sum / max(count, 1), int(correct), int(count)
