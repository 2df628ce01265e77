"""``DropBlockSchedule``: the paper's ramp of the drop rate, driven by the global step.

The paper: a fixed keep_prob "does not work well"; ramp the drop rate linearly from 0 to its
target over training. Every :class:`~dropblock_inject.DropBlock` keeps its own target; the
schedule sets each module's ``factor`` buffer so that it drops

    ``rate(step) = start + (target - start) * progress(step)``

where ``progress`` goes from 0 to 1. The step is the global optimizer step, stored in
``state_dict()``, so a resumed run continues at the same rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from dropblock_inject.op.module import DropBlock

__all__ = ["DropBlockSchedule", "check_ramp", "ramp_progress", "run_schedule"]

KINDS = ("linear", "cosine", "constant")


class DropBlockSchedule:
    """Ramp the drop rate of every ``DropBlock`` in a model from ``start`` to its target.

    Progress is 0 for the first ``warmup_steps`` steps, then rises to 1 at ``total_steps``
    (``"linear"``: the paper; ``"cosine"``: a half-cosine; ``"constant"``: 1 at once after the
    warm-up; or a callable ``step -> progress`` in ``[0, 1]``), and stays at 1 afterwards.

    Args:
        model_or_modules: A model (its ``DropBlock`` submodules are found) or an iterable of
            ``DropBlock`` modules.
        total_steps: Step at which every module reaches its target (the paper: the whole run).
        warmup_steps: Steps at rate ``start`` before the ramp begins.
        kind: ``"linear"``, ``"cosine"``, ``"constant"``, or a callable ``step -> progress``.
        start: Drop rate at progress 0, in ``[0, 1]``.

    Raises:
        ValueError: No ``DropBlock`` found, ``total_steps < 1``, ``warmup_steps`` outside
            ``[0, total_steps)``, ``start`` outside ``[0, 1]`` or an unknown ``kind``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), DropBlock(0.1, 3), nn.ReLU())
        >>> sched = DropBlockSchedule(model, total_steps=100)
        >>> for _ in range(50):
        ...     sched.step()
        >>> round(sched.rates()[0], 3)
        0.05
    """

    def __init__(
        self,
        model_or_modules: nn.Module | Iterable[DropBlock],
        total_steps: int,
        *,
        warmup_steps: int = 0,
        kind: str | Callable[[int], float] = "linear",
        start: float = 0.0,
    ) -> None:
        self.modules = _find_modules(model_or_modules)
        check_ramp(total_steps, warmup_steps=warmup_steps, kind=kind, start=start)
        self.total_steps, self.warmup_steps, self.kind, self.start = total_steps, warmup_steps, kind, float(start)
        self.last_step = 0
        self._apply()

    def progress(self, step: int | None = None) -> float:
        """Progress in ``[0, 1]`` at ``step`` (default: the current step)."""
        step = self.last_step if step is None else step
        return ramp_progress(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, kind=self.kind)

    def rates(self) -> list[float]:
        """The drop rate each module applies now, in module order."""
        return [m.target_rate * m.factor_value for m in self.modules]

    def step(self) -> None:
        """Advance one optimizer step."""
        self.step_update(self.last_step + 1)

    def step_update(self, num_updates: int) -> None:
        """Jump to global step ``num_updates`` (timm's scheduler convention)."""
        self.last_step = int(num_updates)
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The global step and the settings.

        A callable ``kind`` is stored by name, with ``kind_is_callable`` set, so that a function
        that happens to be called ``"linear"`` is not read back as the built-in kind.
        """
        is_callable = callable(self.kind)
        kind = getattr(self.kind, "__name__", "callable") if is_callable else self.kind
        return {
            "last_step": self.last_step,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "kind": kind,
            "kind_is_callable": is_callable,
            "start": self.start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step saved by :meth:`state_dict` and re-apply the rate.

        A saved built-in kind replaces this schedule's kind; a saved callable cannot be restored
        from its name, so this schedule keeps the kind it was built with.
        """
        self.total_steps = int(state.get("total_steps", self.total_steps))
        self.warmup_steps = int(state.get("warmup_steps", self.warmup_steps))
        self.start = float(state.get("start", self.start))
        if not _saved_callable(state, self.kind) and state.get("kind") in KINDS:
            self.kind = state["kind"]
        self.step_update(int(state["last_step"]))

    def _apply(self) -> None:
        progress = self.progress()
        for m in self.modules:
            target = m.target_rate
            rate = self.start + (target - self.start) * progress
            m.set_factor(rate / target if target > 0 else 0.0)

    def __repr__(self) -> str:
        kind = self.kind if isinstance(self.kind, str) else "callable"
        return (
            f"{type(self).__name__}(modules={len(self.modules)}, step={self.last_step}/{self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, kind={kind!r}, start={self.start}, progress={self.progress():.3f})"
        )


def ramp_progress(step: int, *, total_steps: int, warmup_steps: int, kind: str | Callable[[int], float]) -> float:
    """The progress in ``[0, 1]`` of a :class:`DropBlockSchedule` at ``step``: 0 during the warm-up,
    then ``kind``'s ramp to 1 at ``total_steps``, and 1 afterwards.

    Example:
        >>> ramp_progress(30, total_steps=100, warmup_steps=20, kind="linear")
        0.125
    """
    if callable(kind):
        value = float(kind(step))
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"the schedule callable must return a progress in [0, 1], got {value} at step {step}")
        return value
    if step < warmup_steps:
        return 0.0
    t = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    return t


def check_ramp(
    total_steps: int | None, *, warmup_steps: int = 0, kind: str | Callable[[int], float] = "linear", start: float = 0.0
) -> None:
    """Raise ``ValueError`` for settings that no :class:`DropBlockSchedule` accepts.

    Trainer callbacks call it when they are built, before the run's length is known
    (``total_steps=None``); the schedule calls it again with the length.

    Example:
        >>> check_ramp(None, warmup_steps=10, kind="cosine")
        >>> check_ramp(100, start=1.5)
        Traceback (most recent call last):
        ...
        ValueError: start must be a drop rate in [0, 1], got 1.5
    """
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
    ):
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    limit = total_steps if total_steps is not None else math.inf
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < limit:
        raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}), got {warmup_steps!r}")
    if not callable(kind) and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or a callable step -> progress, got {kind!r}")
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= start <= 1.0:
        raise ValueError(f"start must be a drop rate in [0, 1], got {start!r}")


def run_schedule(
    model: nn.Module,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    kind: str | Callable[[int], float] = "linear",
    start: float = 0.0,
) -> DropBlockSchedule:
    """A schedule over a trainer's whole run of ``total_steps``; a longer warm-up is cut to fit the run.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), DropBlock(0.1, 3), nn.ReLU())
        >>> run_schedule(model, 4, warmup_steps=10).warmup_steps
        3
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(warmup_steps, total_steps - 1)
    return DropBlockSchedule(model, total_steps, warmup_steps=warmup_steps, kind=kind, start=start)


def _saved_callable(state: dict[str, Any], kind: str | Callable[[int], float]) -> bool:
    """Whether ``state`` was saved from a callable kind.

    States saved before ``kind_is_callable`` existed say so only by name: one whose kind is the
    name of the callable this schedule was built with is taken to come from that callable.
    """
    if "kind_is_callable" in state:
        return bool(state["kind_is_callable"])
    return callable(kind) and getattr(kind, "__name__", None) == state.get("kind")


def _find_modules(model_or_modules: nn.Module | Iterable[DropBlock]) -> list[DropBlock]:
    if isinstance(model_or_modules, nn.Module):
        found = [m for m in model_or_modules.modules() if isinstance(m, DropBlock)]
        where = f"{type(model_or_modules).__name__}"
    else:
        found = list(model_or_modules)
        bad = [m for m in found if not isinstance(m, DropBlock)]
        if bad:
            raise TypeError(f"DropBlockSchedule takes DropBlock modules, got {type(bad[0]).__name__}")
        where = "the given modules"
    if not found:
        raise ValueError(
            f"no DropBlock module in {where}: call dropblock_inject.inject(model) first, or pass the modules"
        )
    return found
