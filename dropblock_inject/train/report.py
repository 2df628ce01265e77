"""What a training run reports: the :class:`Reporter` it sends progress to, and the results it returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from dropblock_inject.pipeline.plan import Plan
from dropblock_inject.train.config import FinetuneConfig
from dropblock_inject.train.meter import Realised

__all__ = ["RUN_LABELS", "FinetuneResult", "Reporter", "RunResult", "format_comparison", "format_epoch"]

RUN_LABELS = {"dropblock": "with DropBlock", "none": "without DropBlock"}


class Reporter:
    """Where :func:`~dropblock_inject.train.finetune` sends its progress; the default prints lines.

    Subclass to redirect. ``run`` is the run's arm (``"dropblock"``, ``"none"``, ...). Only rank 0
    receives ``message``, ``on_plan``, ``train_start``, ``step``, ``epoch_end`` and ``train_end``;
    ``on_model`` is called on every rank, with the model ready to train (DropBlock injected, on its
    device, not yet wrapped in ``DistributedDataParallel``).
    """

    def message(self, text: str) -> None:
        print(text, flush=True)

    def on_plan(self, run: str, plan: Plan) -> None:
        """The sites ``run`` patches, before it trains."""
        self.message(str(plan))

    def on_model(self, run: str, model: nn.Module) -> None:
        """The model of ``run``, ready to train."""

    def train_start(self, run: str, epochs: int, steps_per_epoch: int) -> None:
        """Before the first step of ``run``."""

    def step(self, run: str, epoch: int, step: int, loss: float) -> None:
        """After each optimizer step (``step`` counts from 1 in each epoch)."""

    def epoch_end(self, run: str, row: dict[str, Any]) -> None:
        self.message(format_epoch(row))

    def train_end(self, run: str) -> None:
        """After the last epoch of ``run``."""


@dataclass
class RunResult:
    """One training run: ``name`` is its arm (``"dropblock"``, ``"none"``, ...).

    ``model`` is the trained model, DropBlock stripped (the architecture as built); the metrics are
    the last epoch's; ``init_hash`` is a hash of the initial weights (equal in every arm of a seed);
    ``realised`` the fraction of units the DropBlocks really dropped in the last epoch.
    """

    name: str
    history: list[dict[str, Any]]
    val_accuracy: float
    val_loss: float
    val_correct: int
    val_count: int
    seconds: float
    model: nn.Module | None = field(repr=False)
    plan: list[dict[str, Any]] = field(default_factory=list, repr=False)
    seed: int = 0
    init_hash: str = ""
    realised: Realised = field(default_factory=lambda: Realised(0.0, {}))


@dataclass
class FinetuneResult:
    """What ``finetune`` returns: the runs (DropBlock first) and the files written."""

    config: FinetuneConfig
    classes: list[str]
    data: str
    runs: list[RunResult]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def run(self, name: str) -> RunResult:
        return next(r for r in self.runs if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        runs = {r.name: {f.name: _plain(getattr(r, f.name)) for f in fields(r) if f.name != "model"} for r in self.runs}
        return {
            "config": self.config.to_dict(),
            "data": self.data,
            "classes": self.classes,
            "notes": self.notes,
            "runs": runs,
        }


def _plain(value: Any) -> Any:
    return value._asdict() if isinstance(value, Realised) else value


def format_epoch(row: Mapping[str, Any]) -> str:
    """One line per epoch.

    Example:
        >>> format_epoch({"run": "dropblock", "epoch": 2, "epochs": 5, "train_loss": 0.5, "val_loss": 0.25,
        ...               "val_acc": 0.9, "drop_rate": 0.04, "realised_by_stage": "8x8=0.0098 4x4=0.0372",
        ...               "lr": 1e-3, "seconds": 12.0})
        'epoch 2/5  train loss 0.5000  val loss 0.2500  val acc 90.00%  drop 0.040 (realised 8x8=0.0098 \
4x4=0.0372)  lr 1.00e-03  12.0 s'
    """
    realised = f" (realised {row['realised_by_stage']})" if row.get("realised_by_stage") else ""
    return (
        f"epoch {row['epoch']}/{row['epochs']}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
        f"val acc {100 * row['val_acc']:.2f}%  drop {row['drop_rate']:.3f}{realised}  lr {row['lr']:.2e}  "
        f"{row['seconds']:.1f} s"
    )


def format_comparison(runs: list[RunResult]) -> str:
    """The final metrics of each run side by side."""
    lines = [f"{'':18}  {'val acc':>8}  {'val loss':>8}  {'train loss':>10}  {'time':>7}"]
    for r in runs:
        last = r.history[-1]
        lines.append(
            f"{RUN_LABELS.get(r.name, r.name):18}  {100 * r.val_accuracy:7.2f}%  {r.val_loss:8.4f}  "
            f"{last['train_loss']:10.4f}  {r.seconds:6.1f}s"
        )
    return "\n".join(lines)
