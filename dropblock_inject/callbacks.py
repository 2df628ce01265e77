"""What the trainer integrations (``hf``, ``ultralytics``) share: what to inject and how to ramp it."""

from __future__ import annotations

from typing import Any

from torch import nn

from dropblock_inject.schedule import DropBlockSchedule, check_ramp, run_schedule

__all__ = ["InjectingCallback"]


class InjectingCallback:
    """Injection arguments and ramp settings, checked when built; the schedule of the run.

    Args:
        recipe: The rules of :func:`~dropblock_inject.plan` (``None``: the default rules).
        total_steps: Steps of the ramp; default: the whole run (the paper).
        warmup_steps: Steps at the start rate before the ramp (cut to fit a shorter run).
        kind: ``"linear"``, ``"cosine"``, ``"constant"`` or a callable ``step -> progress``.
        start: Drop rate at progress 0.
        log_name: The name the mean rate is logged under (``None``: do not log it).
        **inject_kwargs: Keyword arguments of :func:`~dropblock_inject.inject` (``drop_prob``,
            ``input_size``, ``stages`` ...).

    Raises:
        ValueError: A ramp setting out of range.
        TypeError: ``log_name`` is not a string or None.

    Example:
        >>> InjectingCallback(drop_prob=0.1, warmup_steps=-1)
        Traceback (most recent call last):
        ...
        ValueError: warmup_steps must be an int in [0, total_steps=None), got -1
    """

    def __init__(
        self,
        recipe: Any = None,
        *,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        kind: Any = "linear",
        start: float = 0.0,
        log_name: str | None = "dropblock/rate",
        **inject_kwargs: Any,
    ) -> None:
        check_ramp(total_steps, warmup_steps=warmup_steps, kind=kind, start=start)
        if log_name is not None and not isinstance(log_name, str):
            raise TypeError(f"log_name must be a str or None, got {type(log_name).__name__}")
        self.recipe, self.inject_kwargs = recipe, inject_kwargs
        self.total_steps, self.warmup_steps, self.kind, self.start = total_steps, warmup_steps, kind, start
        self.log_name = log_name
        self.schedule: DropBlockSchedule | None = None

    def build_schedule(self, model: nn.Module, run_steps: int) -> DropBlockSchedule:
        """The schedule over ``total_steps``, else the run's ``run_steps``; kept as ``self.schedule``."""
        self.schedule = run_schedule(model, self.total_steps or run_steps, warmup_steps=self.warmup_steps,
                                     kind=self.kind, start=self.start)  # fmt: skip
        return self.schedule

    def settings(self) -> dict[str, Any]:
        """The arguments this callback was built with."""
        ramp = {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "kind": self.kind}
        return {"recipe": self.recipe, **ramp, "start": self.start, "log_name": self.log_name, **self.inject_kwargs}

    def mean_rate(self) -> float | None:
        """The mean rate of the schedule's DropBlocks now (None before the run)."""
        if self.schedule is None:
            return None
        rates = self.schedule.rates()
        return sum(rates) / len(rates)
