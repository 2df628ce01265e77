"""The arms of an ablation: what a run trains with. Only the kind of drop differs between them.

Every arm that drops at the sites drops at the sites the rules choose (the plan ``finetune``
prints), under the same schedule (the recipe's, else the paper's linear ramp over the run):

- ``none``: nothing;
- ``dropblock``: the plan as it is;
- ``dropblock-fixed``: the plan at its full rate from the first step (no ramp);
- ``spatial-dropout``: every block covers its map (whole channels dropped);
- ``dropout``: blocks of one unit;
- ``cutout``: no drop at the sites; torchvision's ``RandomErasing`` on each training image;
- ``timm``: timm's own ``drop_block_rate`` (timm's sites and op), ramped by the same schedule.

A rate sweep (``drop_probs``) gives every arm but ``none`` and ``cutout`` one arm per rate, and a
block sweep (``block_sizes``) the two ``dropblock`` arms one per block size too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dropblock_inject.api import inject, plan
from dropblock_inject.models import create_model
from dropblock_inject.op.module import DropBlock
from dropblock_inject.pipeline.layers import is_dropblock
from dropblock_inject.pipeline.plan import Plan
from dropblock_inject.recipe import load_recipe, recipe_for
from dropblock_inject.schedule import DropBlockSchedule, ramp_progress
from dropblock_inject.train.config import AblationConfig, FinetuneConfig

__all__ = ["Arm", "Regulariser", "attach", "expand_arms", "model_kwargs", "plan_for", "unavailable_reason"]

_PLAN_KINDS = ("dropblock", "dropblock-fixed", "spatial-dropout", "dropout")
_BLOCK_SWEPT = ("dropblock", "dropblock-fixed")


@dataclass(frozen=True)
class Arm:
    """One arm: a kind (see the module's docstring) and, in a sweep, its rate and block size.

    Example:
        >>> Arm("dropblock").name, Arm("dropblock", drop_prob=0.05, block_size=3).name
        ('dropblock', 'dropblock[p=0.05,b=3]')
    """

    kind: str
    drop_prob: float | None = None  # None: the config's drop_prob
    block_size: int | None = None  # None: the rules' block per site

    @property
    def name(self) -> str:
        """The arm's name in tables and files: the kind, and the swept settings in brackets."""
        swept = [f"{k}={v:g}" for k, v in (("p", self.drop_prob), ("b", self.block_size)) if v is not None]
        return f"{self.kind}[{','.join(swept)}]" if swept else self.kind

    def rate(self, config: FinetuneConfig) -> float:
        """The target drop rate (before per-stage scales); 0 for ``none`` and ``cutout``."""
        if self.kind in ("none", "cutout"):
            return 0.0
        return config.drop_prob if self.drop_prob is None else self.drop_prob


def expand_arms(config: AblationConfig) -> list[Arm]:
    """The arms of ``config``, sweeps expanded, in the order given.

    Example:
        >>> config = AblationConfig(arms=["none", "dropblock", "dropout"], drop_probs=[0.1, 0.2], block_sizes=[3])
        >>> [a.name for a in expand_arms(config)]
        ['none', 'dropblock[p=0.1,b=3]', 'dropblock[p=0.2,b=3]', 'dropout[p=0.1]', 'dropout[p=0.2]']
    """
    arms = []
    for kind in config.arms:
        rates = config.drop_probs if kind not in ("none", "cutout") and config.drop_probs else (None,)
        blocks = config.block_sizes if kind in _BLOCK_SWEPT and config.block_sizes else (None,)
        arms += [Arm(kind, p, b) for p in rates for b in blocks]
    return arms


def model_kwargs(arm: Arm, config: FinetuneConfig) -> dict[str, Any]:
    """What the model builder takes for ``arm``: timm's ``drop_block_rate`` for the ``timm`` arm."""
    return {"drop_block_rate": arm.rate(config)} if arm.kind == "timm" else {}


def unavailable_reason(arm: Arm, config: FinetuneConfig) -> str | None:
    """Why ``arm`` cannot run on ``config.model`` (None when it can): only the ``timm`` arm can be unavailable."""
    if arm.kind != "timm":
        return None
    if ":" in config.model:
        return f"{config.model} is not a timm model (the timm arm is timm's own drop_block_rate)"
    try:
        with torch.device("meta"):
            model = create_model(config.model, **model_kwargs(arm, config))
    except TypeError as e:
        return f"timm's {config.model} takes no drop_block_rate ({' '.join(str(e).split())})"
    if not any(is_dropblock(m) and getattr(m, "drop_prob", 0.0) > 0 for m in model.modules()):
        return f"timm's {config.model} accepts drop_block_rate but places no DropBlock with it"
    return None


def plan_for(config: FinetuneConfig, model: nn.Module, drop_prob: float | None = None) -> Plan:
    """The DropBlock sites ``finetune`` patches in ``model`` (built for ``config``), at its input size.

    Example:
        >>> config = FinetuneConfig()
        >>> [(s.feature, s.block_size) for s in plan_for(config, create_model(config.model, num_classes=10))]
        [((8, 8), (5, 5)), ((4, 4), (3, 3))]
    """
    size = (3, config.input_size, config.input_size)
    rate = config.drop_prob if drop_prob is None else drop_prob
    return plan(model, config.rules(), drop_prob=rate, input_size=size, model_name=config.model)


@dataclass
class Regulariser:
    """What an arm adds to a run: the plan it injected, the schedule to step, a transform of the inputs."""

    plan: Plan | None = None
    schedule: DropBlockSchedule | _ForeignRamp | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    rate: float = 0.0  # the target rate, reached at the end of the schedule

    def scheduled_rate(self) -> float:
        """The rate the schedule asks for now."""
        return self.rate * self.schedule.progress() if self.schedule is not None else 0.0


def attach(arm: Arm, config: FinetuneConfig, model: nn.Module, total_steps: int) -> Regulariser:
    """Regularise ``model`` (just built, not yet trained) as ``arm`` says, for a run of ``total_steps``."""
    rate = arm.rate(config)
    if arm.kind == "cutout":
        return Regulariser(transform=_EraseEach())
    if arm.kind == "timm":
        foreign = [m for m in model.modules() if is_dropblock(m) and not isinstance(m, DropBlock)]
        return Regulariser(schedule=_ForeignRamp(foreign, **_ramp(config, model, total_steps, arm)), rate=rate)
    if arm.kind not in _PLAN_KINDS:
        return Regulariser()
    chosen = _arm_plan(arm, plan_for(config, model, rate))
    inject(model, chosen)  # the printed plan, applied as it is (no second analysis)
    return Regulariser(chosen, DropBlockSchedule(model, **_ramp(config, model, total_steps, arm)), rate=rate)


def _arm_plan(arm: Arm, chosen: Plan) -> Plan:
    if arm.kind == "spatial-dropout":
        return chosen.with_blocks(lambda s: s.feature)
    if arm.kind == "dropout":
        return chosen.with_blocks(lambda s: (1,) * len(s.feature))
    if arm.block_size is not None:
        return chosen.with_blocks(lambda s: (arm.block_size,) * len(s.feature))
    return chosen


def _ramp(config: FinetuneConfig, model: nn.Module, total_steps: int, arm: Arm) -> dict[str, Any]:
    """The schedule's settings: the recipe's ``schedule:`` (kind, warm-up as a fraction of the run),
    without a recipe the paper's linear ramp over the whole run; ``dropblock-fixed`` the full rate at once."""
    if arm.kind == "dropblock-fixed":
        return {"total_steps": total_steps, "warmup_steps": 0, "kind": "constant"}
    if config.recipe is None:
        return {"total_steps": total_steps, "warmup_steps": 0, "kind": "linear"}
    recipe = recipe_for(model, config.model) if config.recipe == "auto" else load_recipe(config.recipe)
    warmup = int(recipe.schedule["warmup_fraction"] * total_steps)  # < total_steps: the fraction is < 1
    return {"total_steps": total_steps, "warmup_steps": warmup, "kind": recipe.schedule["kind"]}


class _ForeignRamp:
    """Ramps the ``drop_prob`` of another library's DropBlocks (timm's) as :class:`DropBlockSchedule` ramps ours."""

    def __init__(self, modules: list[nn.Module], *, total_steps: int, warmup_steps: int, kind: str) -> None:
        self.targets = [(m, float(m.drop_prob)) for m in modules]
        self.settings = {"total_steps": total_steps, "warmup_steps": warmup_steps, "kind": kind}
        self.last_step = 0
        self._apply()

    def progress(self) -> float:
        return ramp_progress(self.last_step, **self.settings)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        progress = self.progress()
        for module, target in self.targets:
            module.drop_prob = target * progress


class _EraseEach:
    """torchvision's ``RandomErasing`` (its defaults: p=0.5, 2-33 % of the image) on each image of a batch."""

    def __init__(self) -> None:
        from torchvision.transforms import RandomErasing

        self.erase = RandomErasing()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.erase(image) for image in x])
