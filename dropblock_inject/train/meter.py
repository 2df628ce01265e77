"""Is it even on? The fraction of units a model's DropBlocks really drop, per stage, measured in training.

:class:`DropMeter` watches every DropBlock of a model (ours, timm's and torchvision's) on some
training steps only: on those it counts the non-zero units that go in and come out of each one
(a dropped unit comes out as 0), per feature size, which is what names a stage. Between them it
has no hook on the model, so the training step pays nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from dropblock_inject.pipeline.layers import is_dropblock

__all__ = ["DropMeter", "Realised", "format_realised"]


class DropMeter:
    """The realised drop rate of the DropBlocks in ``model``, by feature size, on every ``every``-th step.

    Args:
        model: The model (DropBlocks are looked up once, now).
        every: Measure on the steps ``0, every, 2 * every, ...`` (counted by :meth:`watch`).

    Example:
        >>> import dropblock_inject as dbi
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), dbi.DropBlock(0.2, 3), nn.ReLU())
        >>> meter = DropMeter(model, every=1)
        >>> for _ in range(20):
        ...     with meter.watch():
        ...         _ = model(torch.randn(16, 3, 12, 12))
        >>> realised = meter.take()
        >>> list(realised.by_stage), 0.15 < realised.overall < 0.25  # 0.2 asked; about 0.19 expected
        (['12x12'], True)
    """

    def __init__(self, model: nn.Module, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.modules = [m for m in model.modules() if is_dropblock(m)]
        self.every = every
        self._calls = 0
        self._before: dict[int, torch.Tensor] = {}
        self._counts: dict[str, list[Any]] = {}  # feature size -> [dropped units (a tensor), units]

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Around one training forward: measured when it is an ``every``-th call, else untouched."""
        measure = bool(self.modules) and self._calls % self.every == 0
        self._calls += 1
        if not measure:
            yield
            return
        handles = [h for m in self.modules for h in (m.register_forward_pre_hook(self._enter),
                                                     m.register_forward_hook(self._leave))]  # fmt: skip
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._before[id(module)] = torch.count_nonzero(args[0].detach())  # before an in-place drop

    def _leave(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        dropped = self._before.pop(id(module)) - torch.count_nonzero(output.detach())
        spatial = output.shape[1:-1] if getattr(module, "channel_dim", 1) == -1 else output.shape[2:]
        counts = self._counts.setdefault("x".join(map(str, spatial)), [0, 0])
        counts[0] = counts[0] + dropped  # stays on the device: read once, in take()
        counts[1] += output.numel()

    def take(self, reduce: Callable[[list[float]], list[float]] | None = None) -> Realised:
        """The realised rates since the last call (then start again); zeros if nothing was measured.

        Args:
            reduce: Sums the counts over processes (``[dropped..., units...]`` in, the sums out).
        """
        sizes = list(self._counts)
        flat = [float(c[0]) for c in self._counts.values()] + [float(c[1]) for c in self._counts.values()]
        self._counts.clear()
        if reduce is not None and flat:
            flat = reduce(flat)
        n = len(sizes)
        dropped, units = flat[:n], flat[n:]
        overall = sum(dropped) / sum(units) if sum(units) else 0.0
        return Realised(overall, {size: d / u for size, d, u in zip(sizes, dropped, units) if u})


class Realised(NamedTuple):
    """The fraction of units dropped over every measured unit, and per feature size (in execution order)."""

    overall: float
    by_stage: dict[str, float]


def format_realised(rates: dict[str, float]) -> str:
    """``"8x8=0.0213 4x4=0.0851"``: the realised rate per feature size, as one CSV cell.

    Example:
        >>> format_realised({"8x8": 0.02134, "4x4": 0.0851})
        '8x8=0.0213 4x4=0.0851'
    """
    return " ".join(f"{size}={rate:.4f}" for size, rate in rates.items())
