"""The rules that pick sites and their settings; a recipe file is these rules written down.

One precedence, like ``QConfigMapping`` and PEFT's ``target_modules``: global < stage <
module-name pattern < exact module name, and exclusions win over everything. Patterns are
``fnmatch`` patterns over a site's module paths (its convolution, norm or host).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dropblock_inject.errors import RecipeError
from dropblock_inject.op.functional import _as_block_tuple, validate_args

__all__ = ["AUTO_SCOPES", "SITE_SETTINGS", "Rules"]

SITE_SETTINGS = ("drop_prob", "block_size", "gamma_scale")
# What scope="auto" takes, the first found among the model's children: the feature extractor of an
# encoder-decoder model (torchvision detection and segmentation, HF UperNet: backbone; smp: encoder).
AUTO_SCOPES = ("backbone", "encoder")


@dataclass
class Rules:
    """Which sites get DropBlock and with which settings.

    Stage selection is the union of ``stages``, ``strides`` and ``modules`` (the last two stages
    when none is given), plus ``include``, minus ``exclude``.

    Attributes:
        drop_prob: Target drop rate of every site (before ``gamma_scale``).
        stages: ``None``, an int N (the last N stages) or a list of stage indices (negative ones
            count from the end).
        strides: Select the stages at these output strides (e.g. ``[16, 32]``).
        modules: Select sites by module-path pattern instead of by stage.
        block_size: Block size for every site, clipped to each feature map.
        block_fraction: When set, the global block side is this fraction of each feature map's
            smaller side, rounded to the nearest odd number (at least 1), in place of
            ``block_size``; stage and module-path block sizes still beat it.
        stage_gamma_scale: Rate scale per stage index (negative: from the end).
        stage_block_size: Block size per stage index (negative: from the end).
        gamma: ``"paper"`` or ``"calibrated"``.
        shared_channels: One mask per sample shared by all channels.
        residual_branch: Also drop on the residual branch's last conv -> norm before the sum
            (``conv -> norm -> add -> act``; the TF reference, and how RepVGG-style nets reach
            their activation).
        shortcut: Also drop on projection shortcuts (``downsample`` conv -> norm -> add).
        include: Module-path patterns selected on top of the stage selection.
        exclude: Module-path patterns never patched.
        overrides: Module-path pattern or exact path -> settings (``drop_prob``, ``block_size``,
            ``gamma_scale``); exact paths beat patterns.
        scope: The part of the model whose sites form the stages (numbered inside it) and get
            DropBlock: ``"auto"`` (the first child named in ``AUTO_SCOPES``: the ``backbone`` of
            torchvision's detection and segmentation models and HF's UperNet, the ``encoder`` of
            segmentation_models_pytorch's models and of HF's ``*Backbone`` classes; else
            everything), ``"all"``, or a module path. A scope without a candidate site is an error.
        source: Where the rules come from (a recipe file), for error messages.

    Example:
        >>> Rules(drop_prob=0.2, stages=[-1], exclude=["layer4.2.*"]).drop_prob
        0.2
    """

    drop_prob: float = 0.1
    stages: int | list[int] | None = None
    strides: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    block_size: int | tuple[int, ...] = 7
    block_fraction: float | None = None
    stage_gamma_scale: dict[int, float] = field(default_factory=lambda: {-2: 0.25})
    stage_block_size: dict[int, int | tuple[int, ...]] = field(default_factory=dict)
    gamma: str = "paper"
    shared_channels: bool = False
    residual_branch: bool = False
    shortcut: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    scope: str = "auto"
    source: str = field(default="arguments", compare=False)

    def __post_init__(self) -> None:
        self._check_settings("", drop_prob=self.drop_prob, block_size=self.block_size)
        for size in self.stage_block_size.values():
            self._check_settings("", block_size=size)
        for stage, scale in self.stage_gamma_scale.items():
            self._check_settings(f"stage {stage}: ", gamma_scale=scale)
        self._check_stages()
        if self.block_fraction is not None and not 0.0 < self.block_fraction <= 1.0:
            raise RecipeError(f"{self.source}: block_fraction must be in (0, 1], got {self.block_fraction}")
        for pattern, settings in self.overrides.items():
            unknown = set(settings) - set(SITE_SETTINGS)
            if unknown:
                raise RecipeError(
                    f"{self.source}: override {pattern!r} has unknown keys {sorted(unknown)}; allowed: {SITE_SETTINGS}"
                )
            self._check_settings(f"override {pattern!r}: ", **settings)

    def _check_settings(
        self, where: str, *, drop_prob: Any = 0.0, block_size: Any = 1, gamma_scale: Any = 1.0
    ) -> None:
        """Check site settings with the op's own validation; ``where`` prefixes the message."""
        try:
            validate_args(drop_prob, block_size, gamma_scale, self.gamma, "valid")
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{self.source}: {where}{e}") from e

    def _check_stages(self) -> None:
        if isinstance(self.stages, bool) or (isinstance(self.stages, int) and self.stages < 1):
            raise RecipeError(f"{self.source}: stages as an int is the number of last stages (>= 1), got {self.stages}")
        if self.stages is not None and not isinstance(self.stages, int):
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.stages):
                raise RecipeError(f"{self.source}: stages must be an int or a list of ints, got {self.stages!r}")
            self.stages = list(self.stages)
        if not all(isinstance(s, int) and s >= 1 for s in self.strides):
            raise RecipeError(f"{self.source}: strides must be positive ints, got {self.strides!r}")

    def replace(self, **changes: Any) -> Rules:
        """A copy with ``changes`` applied (``None`` values are ignored); names unknown keys."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise RecipeError(f"unknown rule keys {sorted(unknown)}; allowed: {sorted(known - {'source'})}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in changes.items() if v is not None})
        return Rules(**values)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the rules (the inverse of ``Rules(**d)``)."""
        return {k: v for k, v in asdict(self).items() if k != "source"}

    @property
    def patterns(self) -> dict[str, list[str]]:
        """Every module-path pattern, by the key it came from (for "matches nothing" checks)."""
        return {"include": self.include, "exclude": self.exclude, "modules": self.modules,
                "overrides": list(self.overrides)}  # fmt: skip

    def chosen_stages(self, strides: list[int]) -> set[int]:
        """Stage indices selected by ``stages`` and ``strides``, given each stage's stride."""
        n = len(strides)
        if self.stages is None and not self.strides and not self.modules:
            return set(range(max(n - 2, 0), n))
        chosen = {i for i, s in enumerate(strides) if s in self.strides}
        if isinstance(self.stages, int):
            chosen |= set(range(max(n - self.stages, 0), n))
        for s in self.stages if isinstance(self.stages, list) else []:
            if not -n <= s < n:
                raise RecipeError(
                    f"{self.source}: stage {s} does not exist: the model has {n} stages (0..{n - 1}, or -{n}..-1)"
                )
            chosen.add(s % n)
        missing = set(self.strides) - set(strides)
        if missing:
            raise RecipeError(
                f"{self.source}: strides {sorted(missing)} do not exist; the stages' strides are {strides}"
            )
        return chosen

    def settings_for(self, paths: list[str], stage: int, n_stages: int, feature: tuple[int, ...]) -> dict[str, Any]:
        """``drop_prob``, ``block_size`` and ``gamma_scale`` of a site whose map is ``feature``.

        One order, the later winning: global (``block_size``, or ``block_fraction`` of the map when
        set) < stage (``stage_gamma_scale``, ``stage_block_size``) < module-path pattern < exact
        module path. ``block_size`` comes back with one side per spatial dimension.
        """
        block = self.block_size if self.block_fraction is None else _fraction_block(feature, self.block_fraction)
        settings: dict[str, Any] = {"drop_prob": self.drop_prob, "block_size": block, "gamma_scale": 1.0}
        if stage >= 0:
            for key, table in (("gamma_scale", self.stage_gamma_scale), ("block_size", self.stage_block_size)):
                for s, value in table.items():
                    if -n_stages <= s < n_stages and s % n_stages == stage:
                        settings[key] = value
        exact = {k: v for k, v in self.overrides.items() if k in paths}
        for pattern, values in self.overrides.items():
            if pattern not in exact and matches(paths, [pattern]):
                settings.update(values)
        for values in exact.values():
            settings.update(values)
        sides = _as_block_tuple(settings["block_size"])
        settings["block_size"] = sides * len(feature) if len(sides) == 1 else sides
        return settings


def _fraction_block(feature: tuple[int, ...], fraction: float) -> int:
    """The odd number nearest ``fraction`` of the map's smaller side, at least 1, at most that side."""
    side = min(feature)
    odd = 2 * math.floor((fraction * side - 1) / 2 + 0.5) + 1
    return max(1, min(odd, side if side % 2 else side - 1))


def matches(paths: list[str], patterns: list[str]) -> bool:
    """True when any path matches any fnmatch pattern."""
    return any(fnmatch.fnmatchcase(p, pat) for p in paths for pat in patterns)
