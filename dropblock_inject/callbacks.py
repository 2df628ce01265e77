"""What the trainer integrations (lightning, hf, ultralytics) share: the ramp, its schedule, what to inject."""

from __future__ import annotations

from typing import Any

from torch import nn

from dropblock_inject.schedule import DropBlockSchedule, check_ramp, run_schedule

__all__ = ["InjectingCallback", "RampCallback"]


class RampCallback:
    """Ramp settings, checked when built, and the schedule that a trainer callback builds for its run.

    Args:
        total_steps: Steps of the ramp; default: the whole run (the paper).
        warmup_steps: Steps at the start rate before the ramp (cut to fit a shorter run).
        kind: ``"linear"``, ``"cosine"``, ``"constant"`` or a callable ``step -> progress``.
        start: Drop rate at progress 0.
        log_name: The name the mean rate is logged under (``None``: do not log it).

    Raises:
        ValueError: A ramp setting out of range.
        TypeError: ``log_name`` is not a string or None.

    Example:
        >>> RampCallback(warmup_steps=-1)
        Traceback (most recent call last):
        ...
        ValueError: warmup_steps must be an int in [0, total_steps=None), got -1
    """

    def __init__(
        self,
        total_steps: int | None = None,
        *,
        warmup_steps: int = 0,
        kind: Any = "linear",
        start: float = 0.0,
        log_name: str | None = "dropblock/rate",
    ) -> None:
        check_ramp(total_steps, warmup_steps=warmup_steps, kind=kind, start=start)
        if log_name is not None and not isinstance(log_name, str):
            raise TypeError(f"log_name must be a str or None, got {type(log_name).__name__}")
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
        return {**ramp, "start": self.start, "log_name": self.log_name}

    def mean_rate(self) -> float | None:
        """The mean rate of the schedule's DropBlocks now (None before the run)."""
        if self.schedule is None:
            return None
        rates = self.schedule.rates()
        return sum(rates) / len(rates)


class InjectingCallback(RampCallback):
    """A :class:`RampCallback` that also injects: the rules and keyword arguments of ``inject``.

    Args:
        recipe: The rules of :func:`~dropblock_inject.plan`; default ``"auto"``: the model family's recipe.
        **kwargs: The ramp settings of :class:`RampCallback` (``total_steps``, ``warmup_steps``,
            ``kind``, ``start``, ``log_name``); the others are keyword arguments of
            :func:`~dropblock_inject.inject` (``drop_prob``, ``input_size``, ``stages`` ...).

    Example:
        >>> callback = InjectingCallback("resnet", drop_prob=0.1, warmup_steps=100)
        >>> callback.inject_kwargs, callback.warmup_steps
        ({'drop_prob': 0.1}, 100)
    """

    def __init__(self, recipe: Any = "auto", **kwargs: Any) -> None:
        ramp = {k: kwargs.pop(k) for k in RAMP_SETTINGS if k in kwargs}
        super().__init__(**ramp)
        self.recipe, self.inject_kwargs = recipe, kwargs

    def settings(self) -> dict[str, Any]:
        return {"recipe": self.recipe, **super().settings(), **self.inject_kwargs}


RAMP_SETTINGS = ("total_steps", "warmup_steps", "kind", "start", "log_name")
