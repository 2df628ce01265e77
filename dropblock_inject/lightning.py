"""A PyTorch Lightning callback that drives :class:`~dropblock_inject.DropBlockSchedule`.

Optional: ``pip install dropblock-inject[lightning]``.

Example:
    >>> import lightning
    >>> trainer = lightning.Trainer(callbacks=[DropBlockCallback()], max_epochs=1, logger=False)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("DropBlockCallback needs Lightning: pip install 'dropblock-inject[lightning]'") from e

from dropblock_inject.callbacks import RampCallback

__all__ = ["DropBlockCallback"]


class DropBlockCallback(RampCallback, Callback):
    """Ramp the rate of the model's DropBlocks with the global step, log it, and checkpoint it.

    Args:
        total_steps: Steps of the ramp; default: the trainer's ``estimated_stepping_batches``
            (the whole run, as in the paper).
        warmup_steps: Steps at the start rate before the ramp.
        kind: ``"linear"``, ``"cosine"``, ``"constant"`` or a callable ``step -> progress``.
        start: Drop rate at progress 0.
        log_name: The name the mean drop rate is logged under (None: do not log).
    """

    _pending_state: dict[str, Any] | None = None  # a checkpoint's state, until the schedule exists

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.build_schedule(pl_module, int(trainer.estimated_stepping_batches))
        if self._pending_state is not None:
            self.schedule.load_state_dict(self._pending_state)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Lightning restores the global step of a resumed run after on_fit_start, before on_train_start
        if self.schedule is not None:
            self.schedule.step_update(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.schedule is None:
            return
        self.schedule.step_update(trainer.global_step)
        if self.log_name:
            pl_module.log(self.log_name, self.mean_rate(), on_step=True, prog_bar=False)

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict() if self.schedule is not None else dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
