"""DropBlock in ultralytics training: callbacks that patch the model its trainer builds.

Optional: ``pip install dropblock-inject[ultralytics]`` (ultralytics is AGPL-3.0; this module imports
nothing of it, and the package never imports this module unless you do).

``YOLO.train`` builds a new model from the cfg, so a model patched before ``train`` loses its
DropBlocks. :func:`add_dropblock` registers callbacks instead: they patch the trainer's model
once it is built, ramp the rate per training batch, and keep the EMA copy (which ultralytics
validates and saves as ``best.pt`` / ``last.pt``) plain, so the saved files load without
dropblock_inject.

Example:
    >>> from ultralytics import YOLO  # doctest: +SKIP
    >>> model = YOLO("yolov8n.yaml")  # doctest: +SKIP
    >>> add_dropblock(model, drop_prob=0.1)  # doctest: +SKIP
    >>> model.train(data="coco8.yaml", epochs=100)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from dropblock_inject.api import inject, strip
from dropblock_inject.callbacks import InjectingCallback
from dropblock_inject.op.module import DropBlock

__all__ = ["DropBlockCallbacks", "add_dropblock"]


class DropBlockCallbacks(InjectingCallback):
    """The ultralytics callbacks that :func:`add_dropblock` registers, and the schedule they drive.

    - ``on_pretrain_routine_end``: :func:`~dropblock_inject.inject` into the trainer's model,
      analysed at the training ``imgsz`` unless ``input_size`` or ``example_inputs`` is given, after
      the trainer built its EMA copy (which stays plain); build the schedule over
      ``epochs * batches per epoch`` (or ``total_steps``).
    - ``on_train_epoch_start``: set the step to ``epoch * batches per epoch``, so a resumed run
      (``resume=True``) continues the ramp where the interrupted one was.
    - ``on_train_batch_end``: one step per training batch.
    - ``on_train_epoch_end``: strip any DropBlock from the EMA (a copy of the patched model that
      ultralytics makes when it recovers from NaN), and add the mean rate to ``trainer.lr``, the
      per-epoch values ultralytics logs (``results.csv``, TensorBoard ...), as ``log_name``.

    Args:
        recipe: The rules of :func:`~dropblock_inject.plan`; default ``"auto"``: the model family's recipe.
        **kwargs: Ramp settings in training batches (``total_steps``, default the whole run;
            ``warmup_steps``, ``kind``, ``start``, ``log_name``: see
            :class:`~dropblock_inject.callbacks.RampCallback`) and keyword arguments of
            :func:`~dropblock_inject.inject`.

    Attributes:
        schedule: The :class:`~dropblock_inject.DropBlockSchedule` of the run in this process,
            once training has started (multi-GPU runs train in other processes).

    Example:
        >>> callbacks = DropBlockCallbacks(drop_prob=0.1)
        >>> sorted(callbacks.events())
        ['on_pretrain_routine_end', 'on_train_batch_end', 'on_train_epoch_end', 'on_train_epoch_start']
    """

    def events(self) -> dict[str, Callable[[Any], None]]:
        """The callbacks by ultralytics event name."""
        return {
            "on_pretrain_routine_end": self.on_pretrain_routine_end,
            "on_train_epoch_start": self.on_train_epoch_start,
            "on_train_batch_end": self.on_train_batch_end,
            "on_train_epoch_end": self.on_train_epoch_end,
        }

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        model = _unwrap(trainer.model)
        kwargs = dict(self.inject_kwargs)
        if "input_size" not in kwargs and "example_inputs" not in kwargs:
            kwargs["input_size"] = (_in_channels(model), *_pair(trainer.args.imgsz))
        inject(model, self.recipe, **kwargs)
        self.build_schedule(model, self._run_steps(trainer))

    def on_train_epoch_start(self, trainer: Any) -> None:
        if self.schedule is None:
            return
        if self.total_steps is None:  # the run's length changes with time= and with a smaller batch after an OOM
            self.schedule.total_steps = max(self._run_steps(trainer), self.schedule.warmup_steps + 1)
        self.schedule.step_update(trainer.epoch * len(trainer.train_loader))

    def on_train_batch_end(self, trainer: Any) -> None:
        if self.schedule is not None:
            self.schedule.step()

    def on_train_epoch_end(self, trainer: Any) -> None:
        ema = getattr(getattr(trainer, "ema", None), "ema", None)
        if isinstance(ema, nn.Module) and any(isinstance(m, DropBlock) for m in ema.modules()):
            strip(ema)
        rate = self.mean_rate()
        if rate is not None and self.log_name and isinstance(getattr(trainer, "lr", None), dict):
            trainer.lr[self.log_name] = rate

    @staticmethod
    def _run_steps(trainer: Any) -> int:
        return trainer.epochs * len(trainer.train_loader)


def add_dropblock(model: Any, recipe: Any = "auto", **kwargs: Any) -> DropBlockCallbacks:
    """Add scheduled DropBlock to the model an ultralytics trainer builds and trains.

    Registers the callbacks of :class:`DropBlockCallbacks` on ``model``, an ultralytics
    ``YOLO`` (or other ``Model``) object or trainer: call it before ``model.train(...)``, and again
    on the new ``YOLO("last.pt")`` object that resumes a run. ``best.pt`` and ``last.pt`` stay
    plain: they load with ultralytics alone.

    Args:
        model: A ``YOLO`` object (``YOLO("yolov8n.yaml")``, ``YOLO("best.pt")``) or a trainer.
        recipe: The rules of :func:`~dropblock_inject.plan`; default ``"auto"``: the model family's recipe.
        **kwargs: The schedule settings of :class:`DropBlockCallbacks` (``total_steps``,
            ``warmup_steps``, ``kind``, ``start``, ``log_name``) and keyword arguments of
            :func:`~dropblock_inject.inject` (``drop_prob``, ``stages``, ``block_size`` ...).

    Returns:
        The registered callbacks; ``.schedule`` is the run's schedule once training has started.

    Raises:
        TypeError: ``model`` has no ``add_callback`` (a bare ``nn.Module``: the trainer would
            rebuild it from its cfg; patch a module with :func:`~dropblock_inject.inject`).
        ValueError: A schedule setting out of range.

    Example:
        >>> class Trainer:  # any object with ultralytics' add_callback(event, func)
        ...     def __init__(self):
        ...         self.callbacks = {}
        ...     def add_callback(self, event, func):
        ...         self.callbacks.setdefault(event, []).append(func)
        >>> callbacks = add_dropblock(Trainer(), drop_prob=0.1, warmup_steps=100)
        >>> callbacks.schedule is None  # until training starts
        True
    """
    if not callable(getattr(model, "add_callback", None)):
        hint = " (for a module, call dropblock_inject.inject)" if isinstance(model, nn.Module) else ""
        raise TypeError(
            f"add_dropblock takes an ultralytics YOLO object or trainer, got {type(model).__name__}: the trainer "
            f"rebuilds the nn.Module from its cfg, so DropBlock is added through the trainer's callbacks{hint}"
        )
    callbacks = DropBlockCallbacks(recipe, **kwargs)
    for event, func in callbacks.events().items():
        model.add_callback(event, func)
    return callbacks


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` and DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _in_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def _pair(size: Any) -> tuple[int, int]:
    """ultralytics' ``imgsz``: an int, or ``[h, w]``."""
    if isinstance(size, (list, tuple)):
        return (int(size[0]), int(size[-1]))
    return (int(size), int(size))
