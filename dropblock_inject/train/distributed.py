"""Devices and processes for ``finetune``: the device to train on and, under ``torchrun``, the process group.

Every rank starts from the same weights and draws its own DropBlock masks; rank 0 reports and
writes the files. On one process every helper here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dropblock_inject.train.config import ConfigError

__all__ = ["DistContext", "all_sum", "broadcast", "distributed", "resolve_device", "sync_buffers", "wrap"]


@dataclass
class DistContext:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this process joined the group for the run and must leave it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that reports and writes files."""
        return self.rank == 0


@contextlib.contextmanager
def distributed(device_name: str) -> Iterator[tuple[DistContext, torch.device]]:
    """The process group ``torchrun`` describes (if any) and this rank's device, for one run.

    Joins the group unless one is already initialised (gloo on CPU, nccl on GPU) and leaves it
    on exit; on CUDA each rank takes the device of its ``LOCAL_RANK``.

    Raises:
        ConfigError: ``device_name`` is not a device, or CUDA is asked for and absent.
    """
    device = resolve_device(device_name)
    ctx = _join(device)
    try:
        if device.type == "cuda" and ctx.enabled:
            device = torch.device("cuda", ctx.local_rank)
            torch.cuda.set_device(device)
        yield ctx, device
    finally:
        if ctx.owned:
            dist.destroy_process_group()


def _join(device: torch.device) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on GPU)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return DistContext()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, owned=True)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when torch sees it, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def wrap(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when there are several ranks, else itself."""
    if not ctx.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart in the last forward)."""
    if ctx.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


def all_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """``values`` summed over the ranks."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(value: Any, ctx: DistContext) -> Any:
    """Rank 0's ``value`` (a picklable object) on every rank."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
