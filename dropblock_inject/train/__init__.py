"""The training side: ``finetune`` (one model with DropBlock) and ``ablate`` (arms x seeds, paired).

Both run the same loop (:mod:`~dropblock_inject.train.loop`) on the same data
(:mod:`~dropblock_inject.train.data`): ``config`` (the settings), ``arms`` (what a run trains
with), ``meter`` (the realised drop rate), ``checkpoints`` (weights in and out), ``distributed``
(``torchrun``), ``report`` (progress and results); for ``ablate`` also ``store`` (the results
folder), ``stats`` (intervals from scipy) and ``summary`` (the table, its files and the plot).
"""

from dropblock_inject.train.ablate import AblationReporter, AblationResult, ablate, report
from dropblock_inject.train.arms import Arm, plan_for
from dropblock_inject.train.checkpoints import CheckpointError, load_weights, read_checkpoint
from dropblock_inject.train.config import (
    ARM_KINDS,
    DEFAULT_ARMS,
    DIGITS_RULES,
    AblationConfig,
    ConfigError,
    FinetuneConfig,
    check_recipe,
)
from dropblock_inject.train.finetune import finetune
from dropblock_inject.train.meter import DropMeter
from dropblock_inject.train.report import (
    RUN_LABELS,
    FinetuneResult,
    Reporter,
    RunResult,
    format_comparison,
    format_epoch,
)

__all__ = [
    "ARM_KINDS",
    "DEFAULT_ARMS",
    "DIGITS_RULES",
    "RUN_LABELS",
    "AblationConfig",
    "AblationReporter",
    "AblationResult",
    "Arm",
    "CheckpointError",
    "ConfigError",
    "DropMeter",
    "FinetuneConfig",
    "FinetuneResult",
    "Reporter",
    "RunResult",
    "ablate",
    "check_recipe",
    "finetune",
    "format_comparison",
    "format_epoch",
    "load_weights",
    "plan_for",
    "read_checkpoint",
    "report",
]
