"""The settings of ``finetune`` and ``ablate``: :class:`FinetuneConfig` and :class:`AblationConfig`,
checked when they are built."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dropblock_inject.errors import DropBlockInjectError
from dropblock_inject.pipeline.rules import Rules
from dropblock_inject.recipe import load_recipe

__all__ = ["ARM_KINDS", "DEFAULT_ARMS", "DIGITS_RULES", "AblationConfig", "ConfigError", "FinetuneConfig",
           "check_recipe", "parse_shard"]  # fmt: skip

ARM_KINDS = ("none", "dropblock", "dropblock-fixed", "spatial-dropout", "dropout", "cutout", "timm")
"""The kinds of arm an ablation trains (see :mod:`dropblock_inject.train.arms`)."""
DEFAULT_ARMS = ("none", "dropblock", "spatial-dropout", "dropout")
"""The paper's comparison: no drop, DropBlock, whole channels, single units, at the same sites."""

DIGITS_RULES = Rules(stages=[-3, -2], block_fraction=0.5, stage_gamma_scale={-3: 0.25}, source="the digits' rules")
"""The rules on the embedded digits when no recipe is given.

At 64 px a ResNet's last two stages have 4x4 and 2x2 maps, where any block covers the whole map
(SpatialDropout, not DropBlock). These take the two stages before the last (8x8 and 4x4 at
64 px) with blocks of half the map's side (5x5 and 3x3), a quarter of the rate in the first.
"""


class ConfigError(DropBlockInjectError, ValueError):
    """A fine-tuning setting is out of range (the message names it and the value)."""


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class FinetuneConfig:
    """Settings of :func:`~dropblock_inject.train.finetune`; the defaults train on the embedded digits.

    Example:
        >>> FinetuneConfig(epochs=3).to_dict()["epochs"]
        3
        >>> FinetuneConfig(epochs=0)
        Traceback (most recent call last):
        ...
        dropblock_inject.train.config.ConfigError: epochs must be a positive integer, got 0
    """

    model: str = _opt("resnet10t", "timm name, tv:<torchvision builder> or package.module:callable")
    data: str | None = _opt(None, "image folder with train/ and val/, or one folder split 80/20 (default: digits)")
    checkpoint: str | None = _opt(None, "state_dict file to start from (a classifier head of another size is reset)")
    pretrained: bool = _opt(False, "start from the hub's weights (needs network access)")
    epochs: int = _opt(4, "training epochs")
    batch_size: int = _opt(64, "images per optimizer step (per process under torchrun)")
    lr: float = _opt(2e-3, "peak learning rate (cosine decay after a 5 % warm-up)")
    optimizer: str = _opt("adamw", "adamw or sgd (momentum 0.9, Nesterov)")
    weight_decay: float = _opt(0.05, "weight decay")
    drop_prob: float = _opt(0.1, "DropBlock target drop rate, reached at the end of the linear ramp")
    recipe: str | None = _opt(
        None,
        "recipe name, YAML file or 'auto' (default: the built-in rules; on the digits, the two stages before "
        "the last, 8x8 and 4x4 at 64 px, with blocks of half the map's side)",
    )
    seed: int = _opt(0, "seed of the weights, the data order and the DropBlock masks")
    compare: bool = _opt(False, "also train without DropBlock from the same seed and compare")
    out: str | None = _opt(None, "folder for metrics.csv, metrics.json and model.pt (created if needed)")
    input_size: int | None = _opt(None, "side of the square training images in px (default: 64 digits, 224 folder)")
    workers: int | None = _opt(None, "DataLoader workers (default: 0 for the digits, up to 4 for a folder)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    limit_train_batches: int | None = _opt(None, "at most N training batches per epoch (smoke tests)")
    limit_val_batches: int | None = _opt(None, "at most N validation batches (smoke tests)")
    train_per_class: int | None = _opt(None, "train on N images per class only (a low-data setting; the same images "
                                       "in every run; the validation split stays whole)")  # fmt: skip

    def __post_init__(self) -> None:
        if self.input_size is None:
            self.input_size = 64 if self.data is None else 224
        if self.train_per_class is not None:
            _check_int("train_per_class", self.train_per_class, minimum=1)
        for name in ("epochs", "batch_size", "input_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("limit_train_batches", "limit_val_batches"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.workers is not None:
            _check_int("workers", self.workers, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (isinstance(self.drop_prob, (int, float)) and 0.0 <= self.drop_prob < 1.0):
            raise ConfigError(f"drop_prob must be in [0, 1), got {self.drop_prob}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.pretrained and self.checkpoint:
            raise ConfigError("give either pretrained or checkpoint, not both")
        check_recipe(self.recipe)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rules(self) -> str | Rules | None:
        """What :func:`~dropblock_inject.plan` takes as its recipe: ``recipe``, else on the
        embedded digits :data:`DIGITS_RULES`, else None (the built-in rules)."""
        return DIGITS_RULES if self.recipe is None and self.data is None else self.recipe

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        """The config from :meth:`to_dict`'s output; unknown keys are an error."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown finetune settings {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def help(cls, name: str) -> str:
        """The help string of field ``name`` (the command line shows it)."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


def check_recipe(recipe: str | None) -> None:
    """Raise :class:`~dropblock_inject.RecipeError` now if ``recipe`` is an unknown name or a bad file."""
    if recipe is not None and recipe != "auto":
        load_recipe(recipe)


@dataclass
class AblationConfig(FinetuneConfig):
    """Settings of :func:`~dropblock_inject.train.ablate`: every ``finetune`` setting, the arms and the seeds.

    The defaults train ``resnet10t`` on 20 embedded digits per class (a low-data setting, where a
    regulariser can matter) under the paper's four arms, 5 seeds each.

    Example:
        >>> config = AblationConfig(arms=["none", "dropblock"], seeds=3)
        >>> config.arms, config.seed_list(), config.train_per_class
        (('none', 'dropblock'), [0, 1, 2], 20)
        >>> AblationConfig(arms=["none", "dropconnect"])
        Traceback (most recent call last):
        ...
        dropblock_inject.train.config.ConfigError: unknown arm 'dropconnect'; the arms are none, dropblock, \
dropblock-fixed, spatial-dropout, dropout, cutout, timm
    """

    epochs: int = _opt(15, "training epochs of each run")
    seed: int = _opt(0, "the first seed: the runs use seed, seed + 1, ... (seeds of them)")
    train_per_class: int | None = _opt(
        None,
        "train on N images per class only (the same images in every run; the "
        "validation split stays whole) (default: 20 on the digits, all of a folder)",
    )
    batch_size: int = _opt(32, "images per optimizer step (per process under torchrun)")
    out: str | None = _opt("runs/ablation", "folder for runs.csv, curves.csv, summary.* and ablation.png; "
                           "a second run with the same settings skips the finished runs")  # fmt: skip
    arms: tuple[str, ...] = _opt(DEFAULT_ARMS, f"what each run trains with: {', '.join(ARM_KINDS)}")
    seeds: int = _opt(5, "seeds per arm (at least 2); seed s gives every arm the same initial weights, data order "
                      "and augmentation")  # fmt: skip
    drop_probs: tuple[float, ...] | None = _opt(None, "rates to sweep, for every arm but none and cutout "
                                                "(default: drop_prob alone)")  # fmt: skip
    block_sizes: tuple[int, ...] | None = _opt(None, "block sizes to sweep for the dropblock arms (default: the "
                                               "rules' per site)")  # fmt: skip
    shard: str | None = _opt(None, "i/n: run the i-th of n shares of the grid (1 <= i <= n), e.g. one per job of a "
                             "SLURM array; merge with --report")  # fmt: skip

    def __post_init__(self) -> None:
        if self.train_per_class is None and self.data is None:
            self.train_per_class = 20
        super().__post_init__()
        if self.compare:
            raise ConfigError("compare is a finetune setting; an ablation compares its arms (the 'none' arm)")
        if not self.out:
            raise ConfigError("an ablation needs an out folder: its runs are written there as they finish")
        self.arms = _arm_kinds(self.arms)
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 2:
            raise ConfigError(f"seeds must be at least 2 (an interval over seeds needs two), got {self.seeds!r}")
        if self.drop_probs is not None:
            self.drop_probs = tuple(_check_rate("drop_probs", p) for p in self.drop_probs) or None
        if self.block_sizes is not None:
            for b in self.block_sizes:
                _check_int("block_sizes", b, minimum=1)
            self.block_sizes = tuple(self.block_sizes) or None
        if self.shard is not None:
            parse_shard(self.shard)

    def seed_list(self) -> list[int]:
        """The seeds of the runs: ``seed``, ``seed + 1``, ... (``seeds`` of them)."""
        return list(range(self.seed, self.seed + self.seeds))


def _arm_kinds(arms: Any) -> tuple[str, ...]:
    names = arms.split(",") if isinstance(arms, str) else list(arms)
    kinds = tuple(dict.fromkeys(str(a).strip() for a in names if str(a).strip()))
    for kind in kinds:
        if kind not in ARM_KINDS:
            raise ConfigError(f"unknown arm {kind!r}; the arms are {', '.join(ARM_KINDS)}")
    if not kinds:
        raise ConfigError(f"arms must name at least one of {', '.join(ARM_KINDS)}")
    return kinds


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ConfigError(f"{name} must be rates in (0, 1), got {value!r}")
    return float(value)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` as ``(i, n)``: the i-th of n shares of an ablation's grid, counted from 1.

    Example:
        >>> parse_shard("2/4")
        (2, 4)
        >>> parse_shard("0/4")
        Traceback (most recent call last):
        ...
        dropblock_inject.train.config.ConfigError: shard must be i/n with 1 <= i <= n (e.g. 2/4), got '0/4'
    """
    i, slash, n = str(text).partition("/")
    if slash and i.strip().isdigit() and n.strip().isdigit() and 1 <= int(i) <= int(n):
        return int(i), int(n)
    raise ConfigError(f"shard must be i/n with 1 <= i <= n (e.g. 2/4), got {text!r}")
