"""Stage 3, plan: stages, rules and the printable :class:`Plan` of sites.

Stages: candidates in execution order at the training resolution, split wherever the feature
size or the convolution dilation changes (1x1 convolutions inherit the dilation of their stage),
a stage being one (feature size, dilation) pair, numbered by first appearance. By default the
last two stages get DropBlock, the second-to-last at a quarter of the rate (TF reference). On
ResNet-50 these are the paper's groups 3 and 4, except the first 1x1 convolution of each group,
which still runs at the previous resolution (select by module name to include it).

Rules apply with one precedence: global < stage < module-name pattern < exact name; exclusions
win over everything.
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dropblock_inject.errors import NoSitesError, RecipeError
from dropblock_inject.op.functional import _as_block_tuple, validate_args
from dropblock_inject.op.geometry import block_geometry
from dropblock_inject.pipeline.analyse import Analysis, Candidate

__all__ = ["Plan", "Rules", "Site", "make_plan"]

SITE_SETTINGS = ("drop_prob", "block_size", "gamma_scale")
_OUT_OF_SCOPE = -1  # the stage of an included site outside the scope


@dataclass
class Rules:
    """Which sites get DropBlock and with which settings.

    Attributes:
        drop_prob: Target drop rate of every site (before ``gamma_scale``).
        stages: ``None`` (the last two stages), an int N (the last N stages) or a list of stage
            indices (negative ones count from the end).
        block_size: Block size for every site, clipped to each feature map.
        stage_gamma_scale: Rate scale per stage index (negative: from the end).
        stage_block_size: Block size per stage index (negative: from the end).
        gamma: ``"paper"`` or ``"calibrated"``.
        shared_channels: One mask per sample shared by all channels.
        include: Module-path patterns (fnmatch on the site's conv, norm or host path) selected on
            top of the stage rule.
        exclude: Module-path patterns never patched (they win over everything).
        overrides: Module-path pattern or exact path -> settings (``drop_prob``, ``block_size``,
            ``gamma_scale``); exact paths beat patterns.
        scope: The part of the model whose sites form the stages: ``"auto"`` (the ``backbone``
            submodule when the model has one, as torchvision's detection and segmentation models
            do, else everything), ``"all"``, or a module path. Sites outside it are patched only
            through ``include``.

    Example:
        >>> Rules(drop_prob=0.2, stages=[-1], exclude=["layer4.2.*"]).drop_prob
        0.2
    """

    drop_prob: float = 0.1
    stages: int | list[int] | None = None
    block_size: int | tuple[int, ...] = 7
    stage_gamma_scale: dict[int, float] = field(default_factory=lambda: {-2: 0.25})
    stage_block_size: dict[int, int | tuple[int, ...]] = field(default_factory=dict)
    gamma: str = "paper"
    shared_channels: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    scope: str = "auto"

    def __post_init__(self) -> None:
        validate_args(self.drop_prob, self.block_size, 1.0, self.gamma, "valid")
        if self.stages is not None and not isinstance(self.stages, int):
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.stages):
                raise RecipeError(f"stages must be None, an int or a list of ints, got {self.stages!r}")
            self.stages = list(self.stages)
        elif isinstance(self.stages, int) and self.stages < 1:
            raise RecipeError(f"stages as an int is the number of last stages (>= 1), got {self.stages}")
        for size in self.stage_block_size.values():
            _as_block_tuple(size)
        for pattern, settings in self.overrides.items():
            unknown = set(settings) - set(SITE_SETTINGS)
            if unknown:
                raise RecipeError(f"override {pattern!r} has unknown keys {sorted(unknown)}; allowed: {SITE_SETTINGS}")

    def replace(self, **changes: Any) -> Rules:
        """A copy with ``changes`` applied (``None`` values are ignored)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in changes.items() if v is not None})
        return Rules(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Site:
    """One call site in a :class:`Plan`: where, at which stage, with which settings.

    ``status`` is ``"new"`` (inject adds a DropBlock), ``"patched"`` (ours is there already)
    or ``"covered"`` (another library's DropBlock is there; left as it is).
    """

    conv: str
    norm: str | None
    act: str
    host: str
    kind: str
    call: int
    stage: int
    stride: int
    feature: tuple[int, ...]
    channels: int
    dilation: int
    block_size: tuple[int, ...]
    gamma_scale: float
    drop_prob: float
    expected_drop: float
    status: str

    @property
    def rate(self) -> float:
        """The target rate: ``drop_prob * gamma_scale``."""
        return self.drop_prob * self.gamma_scale


class Plan(Sequence[Site]):
    """The sites ``inject`` patches (a dry run); prints as a table with a per-stage summary.

    Attributes:
        model: The model's class name.
        input_size: The input size used for feature sizes, ``(C, H, W)`` or ``(C, D, H, W)``.
        stages: One ``(feature size, dilation, candidate count)`` per stage, in order.
        rules: The rules that chose the sites.
        rejected: How many convolutions were not sites, by reason.
        candidates: Number of candidate sites in all stages.
    """

    def __init__(
        self,
        sites: list[Site],
        *,
        model: str,
        input_size: tuple[int, ...],
        stages: list[tuple[tuple[int, ...], int, int]],
        rules: Rules,
        rejected: Counter[str],
        candidates: int,
        gamma: str,
        shared_channels: bool,
    ) -> None:
        self._sites = sites
        self.model, self.input_size, self.stages, self.rules = model, input_size, stages, rules
        self.rejected, self.candidates = rejected, candidates
        self.gamma, self.shared_channels = gamma, shared_channels

    def __len__(self) -> int:
        return len(self._sites)

    def __getitem__(self, i: Any) -> Any:
        return self._sites[i]

    def __iter__(self) -> Iterator[Site]:
        return iter(self._sites)

    def to_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per site (JSON-ready)."""
        return [asdict(s) for s in self._sites]

    def __repr__(self) -> str:
        return f"Plan(model={self.model}, sites={len(self)}, stages={sorted({s.stage for s in self})})"

    def __str__(self) -> str:
        return _format_plan(self)


def make_plan(analysis: Analysis, rules: Rules, *, model: str, input_size: tuple[int, ...], scope: str = "") -> Plan:
    """Assign stages, apply ``rules`` and build the :class:`Plan`.

    Args:
        analysis: The candidates, in execution order.
        rules: The rules.
        model: The model's name, for messages.
        input_size: The input size of the analysis.
        scope: Module-path prefix of the candidates that form the stages ("" for all).

    Raises:
        NoSitesError: The model has no candidate site, or the rules select none.
    """
    rejected = Counter(r.reason for r in analysis.rejected)
    if not analysis.candidates:
        raise NoSitesError(_no_candidates_message(model, analysis, rejected))
    in_scope = [c for c in analysis.candidates if not scope or c.conv.startswith(scope + ".")]
    stage_of, stages = _assign_stages(in_scope or analysis.candidates)
    chosen = _chosen_stages(rules, len(stages))
    sites = []
    for cand in analysis.candidates:
        site = _site(cand, stage_of.get(cand.order, -1), stages, chosen, rules)
        if site is not None:
            sites.append(site)
    sites = _whole_hosts(sites, analysis.candidates, stage_of, stages, rules)
    if not sites:
        raise NoSitesError(
            f"the rules select none of the {len(analysis.candidates)} candidate sites of {model} "
            f"(stages: {_stage_list(stages)}; chosen: {sorted(chosen)}). Pick stages=[...] or include=[...] patterns."
        )
    return Plan(
        sites,
        model=model,
        input_size=input_size,
        stages=stages,
        rules=rules,
        rejected=rejected,
        candidates=len(analysis.candidates),
        gamma=rules.gamma,
        shared_channels=rules.shared_channels,
    )


def _assign_stages(candidates: list[Candidate]) -> tuple[dict[int, int], list[tuple[tuple[int, ...], int, int]]]:
    """Stage index of each candidate (by ``order``) and the stage list ``(feature, dilation, count)``."""
    keys: dict[tuple[tuple[int, ...], int], int] = {}
    counts: Counter[int] = Counter()
    last_dilation: dict[tuple[int, ...], int] = {}
    stage_of = {}
    for c in candidates:
        dilation = c.dilation if c.dilation is not None else last_dilation.get(c.feature, 1)
        last_dilation[c.feature] = dilation
        stage = keys.setdefault((c.feature, dilation), len(keys))
        stage_of[c.order] = stage
        counts[stage] += 1
    stages = [(feature, dilation, counts[i]) for (feature, dilation), i in keys.items()]
    return stage_of, stages


def _chosen_stages(rules: Rules, n: int) -> set[int]:
    if rules.stages is None:
        return set(range(max(n - 2, 0), n))
    if isinstance(rules.stages, int):
        return set(range(max(n - rules.stages, 0), n))
    chosen = set()
    for s in rules.stages:
        if not -n <= s < n:
            raise RecipeError(f"stage {s} does not exist: the model has {n} stages (0..{n - 1}, or -{n}..-1)")
        chosen.add(s % n)
    return chosen


def _site(cand: Candidate, stage: int, stages: list, chosen: set[int], rules: Rules) -> Site | None:
    paths = [p for p in (cand.conv, cand.norm, cand.host) if p]
    if any(fnmatch.fnmatchcase(p, pat) for p in paths for pat in rules.exclude):
        return None
    included = any(fnmatch.fnmatchcase(p, pat) for p in paths for pat in rules.include)
    if stage not in chosen and not included:
        return None
    settings = _settings_for(cand, stage, len(stages), rules)
    dilation = stages[stage][1] if stage >= 0 else (cand.dilation or 1)
    block = _as_block_tuple(settings["block_size"])
    block = block * len(cand.feature) if len(block) == 1 else block
    geom = block_geometry(cand.feature, block, "valid")
    rate = settings["drop_prob"] * settings["gamma_scale"]
    expected = geom.expected_drop(geom.seed_rate(min(rate, 1.0), rules.gamma))
    status = "new" if cand.existing is None else ("patched" if cand.existing == "ours" else "covered")
    stage = stage if stage >= 0 else _OUT_OF_SCOPE
    return Site(
        **{
            k: getattr(cand, k)
            for k in ("conv", "norm", "act", "host", "kind", "call", "stride", "feature", "channels")
        },
        stage=stage,
        dilation=dilation,
        block_size=block,
        gamma_scale=settings["gamma_scale"],
        drop_prob=settings["drop_prob"],
        expected_drop=expected,
        status=status,
    )


def _settings_for(cand: Candidate, stage: int, n_stages: int, rules: Rules) -> dict[str, Any]:
    """global < stage < module-name pattern < exact name."""
    settings: dict[str, Any] = {"drop_prob": rules.drop_prob, "block_size": rules.block_size, "gamma_scale": 1.0}
    for key, table in (("gamma_scale", rules.stage_gamma_scale), ("block_size", rules.stage_block_size)):
        for s, value in table.items():
            if stage >= 0 and s % n_stages == stage and -n_stages <= s < n_stages:
                settings[key] = value
    paths = [p for p in (cand.conv, cand.norm, cand.host) if p]
    exact = {k: v for k, v in rules.overrides.items() if k in paths}
    patterns = {k: v for k, v in rules.overrides.items() if k not in exact}
    for pattern, values in patterns.items():
        if any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            settings.update(values)
    for values in exact.values():
        settings.update(values)
    return settings


def _whole_hosts(sites: list[Site], candidates: list[Candidate], stage_of, stages, rules: Rules) -> list[Site]:
    """A hooked module applies its DropBlock at every call: keep a host's calls all or none."""
    selected_hosts = {s.host for s in sites}
    calls = Counter(c.host for c in candidates)
    kept = [s for s in sites if calls[s.host] == sum(1 for t in sites if t.host == s.host)]
    dropped_hosts = selected_hosts - {s.host for s in kept}
    if dropped_hosts:
        import warnings

        warnings.warn(
            f"skipped {sorted(dropped_hosts)}: these modules are called at several places and the rules select only "
            f"some of them (a DropBlock on a module applies at every call)",
            stacklevel=3,
        )
    return kept


def _stage_list(stages: list[tuple[tuple[int, ...], int, int]]) -> str:
    return ", ".join(f"{i}: {_size(f)} d{d} ({n})" for i, (f, d, n) in enumerate(stages))


def _size(feature: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in feature)


def _no_candidates_message(model: str, analysis: Analysis, rejected: Counter[str]) -> str:
    if not rejected:
        what = "no spatial convolution was found (a transformer or MLP model?)"
    else:
        reasons = "; ".join(f"{reason} x{n}" for reason, n in rejected.most_common(4))
        what = (f"none of its {sum(rejected.values())} convolutions reaches an activation through norm layers "
                f"only: {reasons}")  # fmt: skip
    hint = " Pre-activation nets (norm -> act -> conv) and conv -> act -> norm nets have no such site."
    if analysis.opaque:
        hint += (f" Could not trace or run {analysis.opaque[:3]}: pass example_inputs=(...) or "
                 f"leaf_modules=[...] for their untraceable parts.")  # fmt: skip
    return f"no DropBlock site in {model}: {what}.{hint}"


def _format_plan(plan: Plan) -> str:
    header = ("#", "DropBlock after", "before", "stage", "stride", "feature", "ch", "block", "scale", "p",
              "exp.drop", "status")  # fmt: skip
    rows = [
        (str(i), s.host if s.kind != "fused" else f"{s.host}.drop", _act_label(s), str(s.stage), str(s.stride),
         _size(s.feature), str(s.channels), _size(tuple(min(b, f) for b, f in zip(s.block_size, s.feature))),
         f"{s.gamma_scale:g}", f"{s.rate:.3f}", f"{s.expected_drop:.3f}", s.status)
        for i, s in enumerate(plan)
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"DropBlock plan for {plan.model} at input {'x'.join(map(str, plan.input_size))} "
             f"(gamma={plan.gamma}{', shared channels' if plan.shared_channels else ''})"]  # fmt: skip
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append("stages (feature, dilation, candidates -> patched):")
    per_stage = Counter(s.stage for s in plan)
    for i, (feature, dilation, n) in enumerate(plan.stages):
        mark = f"{per_stage[i]} sites" if per_stage[i] else "-"
        lines.append(f"  {i}: {_size(feature):>9} d{dilation}  {n:3d} candidates -> {mark}")
    if plan.rejected:
        reasons = ", ".join(f"{r} x{n}" for r, n in plan.rejected.most_common(3))
        lines.append(f"not sites: {sum(plan.rejected.values())} convolutions ({reasons})")
    lines.append(f"mean expected drop over patched units: {_weighted_drop(plan):.3f}")
    return "\n".join(lines)


def _act_label(site: Site) -> str:
    """The activation, relative to the host's parent when it shares one; ``#k`` for the k-th call."""
    parent = site.host.rpartition(".")[0]
    act = site.act[len(parent) + 1 :] if parent and site.act.startswith(parent + ".") else site.act
    return f"{act}#{site.call}" if site.call else act


def _weighted_drop(plan: Plan) -> float:
    weights = [math.prod(s.feature) * s.channels for s in plan]
    total = sum(weights) or 1
    return sum(w * s.expected_drop for w, s in zip(weights, plan)) / total


def rules_from_mapping(values: Mapping[str, Any]) -> Rules:
    """Rules from a plain mapping, naming unknown keys."""
    known = {f.name for f in fields(Rules)}
    unknown = set(values) - known
    if unknown:
        raise RecipeError(f"unknown rule keys {sorted(unknown)}; allowed: {sorted(known)}")
    return Rules(**values)
