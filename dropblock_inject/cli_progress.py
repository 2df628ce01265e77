"""Progress on a terminal for the command line (rich): a bar for ``finetune``, one overall bar for ``ablate``.

Off a terminal (a log file, CI) both print plain lines only.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dropblock_inject.train import RUN_LABELS, AblationReporter, Reporter

__all__ = ["rich_ablation_reporter", "rich_finetune_reporter"]


class _Bar:
    """One rich progress bar that the messages print above (nothing on a non-terminal)."""

    def __init__(self) -> None:
        self.console = Console()
        self.progress: Progress | None = None

    def print(self, text: str) -> None:
        if self.progress is None:
            print(text, flush=True)
        else:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def start(self, description: str, total: int, *extra: TextColumn) -> None:
        if not self.console.is_terminal:
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra, TimeRemainingColumn())
        self.progress = Progress(*columns, console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, loss="-")

    def update(self, **changes: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, **changes)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def rich_finetune_reporter() -> Reporter:
    """A bar per run: steps done, the loss, the time left."""

    class RichReporter(Reporter):
        def __init__(self) -> None:
            self.bar = _Bar()

        def message(self, text: str) -> None:
            self.bar.print(text)

        def train_start(self, run: str, epochs: int, steps_per_epoch: int) -> None:
            self.epochs = epochs
            self.bar.start(RUN_LABELS.get(run, run), epochs * steps_per_epoch, TextColumn("loss {task.fields[loss]}"))

        def step(self, run: str, epoch: int, step: int, loss: float) -> None:
            label = f"{RUN_LABELS.get(run, run)}, epoch {epoch}/{self.epochs}"
            self.bar.update(advance=1, description=label, loss=f"{loss:.3f}")

        def train_end(self, run: str) -> None:
            self.bar.stop()

    return RichReporter()


def rich_ablation_reporter() -> AblationReporter:
    """One bar for the whole grid: runs done of the total, the run in progress, the time left."""

    class RichAblationReporter(AblationReporter):
        def __init__(self) -> None:
            super().__init__()
            self.bar = _Bar()

        def message(self, text: str) -> None:
            self.bar.print(text)

        def ablation_start(self, runs: int, finished: int, steps_per_run: int) -> None:
            super().ablation_start(runs, finished, steps_per_run)
            if runs > finished:
                self.bar.start(f"runs 0/{runs - finished}", (runs - finished) * steps_per_run)

        def run_start(self, arm: str, seed: int, index: int, runs: int) -> None:
            self.bar.update(description=f"runs {index - 1}/{runs}: {arm} seed {seed}")

        def step(self, run: str, epoch: int, step: int, loss: float) -> None:
            self.bar.update(advance=1)

        def run_end(self, row: dict[str, Any], index: int, runs: int) -> None:
            super().run_end(row, index, runs)
            self.bar.update(description=f"runs {index}/{runs}")
            if index == runs:
                self.bar.stop()

    return RichAblationReporter()
