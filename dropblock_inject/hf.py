"""A Hugging Face ``transformers.TrainerCallback`` that injects DropBlock and ramps its rate.

Optional: ``pip install dropblock-inject[hf]`` (``transformers`` and ``accelerate``, which the
``Trainer`` needs).

Example:
    >>> from transformers import Trainer
    >>> callback = DropBlockCallback(drop_prob=0.1)  # the arguments of dropblock_inject.inject
    >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("dropblock_inject.hf needs transformers: pip install 'dropblock-inject[hf]'") from e

from torch import nn

from dropblock_inject.api import inject
from dropblock_inject.callbacks import InjectingCallback
from dropblock_inject.op.module import DropBlock

__all__ = ["DropBlockCallback"]


class DropBlockCallback(InjectingCallback, TrainerCallback, ExportableState):
    """Inject DropBlock when training begins, ramp its rate per optimizer step, log it, and resume it.

    At ``on_train_begin`` the callback patches the trainer's model with
    :func:`~dropblock_inject.inject` (``recipe`` and ``inject_kwargs``), or takes the DropBlocks
    of a model patched before the ``Trainer`` was built (then give no injection arguments). It
    builds a :class:`~dropblock_inject.DropBlockSchedule` over ``state.max_steps`` and sets it to
    ``state.global_step`` after every optimizer step, so gradient accumulation counts one step per
    update. The mean rate is added to every log the trainer writes (``state.log_history`` and
    the console) as ``log_name``.

    The schedule is saved with each checkpoint (in ``trainer_state.json``, as ``transformers``
    saves the state of its callbacks). A run resumed with ``resume_from_checkpoint`` continues the
    saved ramp: its first step runs at the rate the uninterrupted run had at that step, even when
    the resumed run is longer. With ``restore_callback_states_from_checkpoint=True`` the
    ``Trainer`` rebuilds this callback from its JSON-safe arguments; one built with others (an
    ``example_inputs`` tensor, a :class:`~dropblock_inject.Recipe` object, a callable ``kind``)
    then raises: patch the model before building the ``Trainer`` instead.

    Args:
        recipe: The rules of :func:`~dropblock_inject.plan`; default ``"auto"``: the model family's recipe.
        **kwargs: Ramp settings (``total_steps``, default the run's ``max_steps``;
            ``warmup_steps``, ``kind``, ``start``, ``log_name``: see
            :class:`~dropblock_inject.callbacks.RampCallback`) and keyword arguments of
            :func:`~dropblock_inject.inject` (``drop_prob``, ``input_size``, ``stages`` ...).

    Raises:
        ValueError: A schedule setting out of range (at once); at ``on_train_begin``, a model
            that already holds DropBlocks while injection arguments were given.

    Example:
        >>> import torch
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> model = ResNetForImageClassification(ResNetConfig(hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1]))
        >>> callback = DropBlockCallback(drop_prob=0.1, input_size=(3, 64, 64))
        >>> # Trainer(model, args, train_dataset=..., callbacks=[callback]).train() calls:
        >>> from transformers import TrainerControl, TrainerState, TrainingArguments
        >>> args, state = TrainingArguments("out", report_to="none", use_cpu=True), TrainerState(max_steps=100)
        >>> callback.on_train_begin(args, state, TrainerControl(), model=model)
        >>> state.global_step = 50
        >>> callback.on_step_end(args, state, TrainerControl(), model=model)
        >>> [round(r, 3) for r in callback.schedule.rates()]
        [0.013, 0.013, 0.05]
    """

    unsaved_args: tuple[str, ...] = ()  # set on a callback that the Trainer rebuilt from a checkpoint
    _patched: nn.Module | None = None  # the model this callback patched

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> None:
        if model is None:
            raise ValueError("DropBlockCallback needs the model: the Trainer passes it to its callbacks")
        if self.unsaved_args:
            raise ValueError(
                f"the Trainer rebuilt DropBlockCallback from a checkpoint (restore_callback_states_from_checkpoint"
                f"=True), but its arguments {self.unsaved_args} are not JSON and were not saved: inject the model "
                f"before building the Trainer, or resume with restore_callback_states_from_checkpoint=False"
            )
        self._patch(model)
        self.build_schedule(model, state.max_steps)
        saved = _saved_schedule(state, type(self).__name__) if state.global_step > 0 else None
        if saved is not None:
            self.schedule.load_state_dict(saved)  # the resumed run keeps the saved ramp
        self.schedule.step_update(state.global_step)
        # a checkpoint saved without this callback has no entry for it, and the Trainer's next save needs one
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.schedule is not None:
            self.schedule.step_update(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        rate = self.mean_rate()
        if rate is None or self.log_name is None or logs is None or "loss" not in logs:
            return
        logs[self.log_name] = rate
        record = state.log_history[-1] if state.log_history else None
        if record is not None and record.get("step") == state.global_step and "loss" in record:
            record[self.log_name] = logs[self.log_name]  # the Trainer copied logs into its history before on_log

    def state(self) -> dict[str, Any]:
        """What ``transformers`` saves in ``trainer_state.json``: the JSON-safe arguments and the schedule."""
        saved = {k: _plain(v) for k, v in self.settings().items()}
        unsaved = sorted(k for k, v in saved.items() if v is _NOT_JSON)
        schedule = self.schedule.state_dict() if self.schedule is not None else None
        return {
            "args": {k: v for k, v in saved.items() if v is not _NOT_JSON},
            "attributes": {"saved_schedule": schedule, "unsaved_args": unsaved},
        }

    def _patch(self, model: nn.Module) -> None:
        has_blocks = any(isinstance(m, DropBlock) for m in model.modules())
        asked = self.recipe != "auto" or bool(self.inject_kwargs)  # the default recipe alone asks nothing
        if has_blocks and asked and self._patched is not model:
            raise ValueError(
                "the model already holds DropBlocks: build DropBlockCallback without injection arguments to use "
                "them, or strip(model) first to inject with these arguments"
            )
        if not has_blocks:
            inject(model, self.recipe, **self.inject_kwargs)
            self._patched = model


_NOT_JSON = object()


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it (a path as a string), else the marker ``_NOT_JSON``."""
    if isinstance(value, Path):
        return str(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return _NOT_JSON
    return value


def _saved_schedule(state: Any, name: str) -> dict[str, Any] | None:
    """The schedule that the checkpoint being resumed saved, if any."""
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(name)
    if isinstance(saved, list):  # several callbacks of this class: transformers appends one state per save
        saved = saved[-1] if saved else None
    return (saved or {}).get("attributes", {}).get("saved_schedule")
