"""Stage 3, plan: stages, rules and the printable :class:`Plan` of sites.

Stages: candidates in execution order at the training resolution, split wherever the feature
size or the convolution dilation changes (1x1 convolutions inherit the dilation of their stage),
a stage being one (feature size, dilation) pair, numbered by first appearance. By default the
last two stages get DropBlock, the second-to-last at a quarter of the rate (TF reference). On
ResNet-50 these are the paper's groups 3 and 4, except the first 1x1 convolution of each group,
which still runs at the previous resolution (select by module name to include it).

The rules (:mod:`~dropblock_inject.pipeline.rules`) pick sites and settings with one precedence:
global < stage < module-name pattern < exact name; exclusions win over everything.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

from dropblock_inject.errors import NoSitesError, RecipeError
from dropblock_inject.op.geometry import block_geometry
from dropblock_inject.pipeline.analyse import Analysis, Candidate
from dropblock_inject.pipeline.rules import Rules, matches

__all__ = ["Plan", "Site", "Stage", "Status", "make_plan"]

_OUT_OF_SCOPE = -1  # the stage of an included site outside the scope


class Stage(NamedTuple):
    """One stage: a (feature size, dilation) pair, its output stride and its candidate count."""

    feature: tuple[int, ...]
    dilation: int
    stride: int
    candidates: int


Status = Literal["new", "patched", "covered"]


@dataclass
class Site:
    """One call site in a :class:`Plan`: the analysis's :class:`Candidate` and what the rules chose for it.

    ``status`` is ``"new"`` (inject adds a DropBlock), ``"patched"`` (ours is there already)
    or ``"covered"`` (another library's DropBlock is there; left as it is). Where the site is
    (``conv``, ``host``, ``feature``, ``role`` ...) is read from the candidate.

    Attributes:
        candidate: Where the site is, from the analysis.
        stage: Its stage (-1: an included site outside the scope's stages).
        dilation: The stage's dilation.
        block_size: One side per spatial dimension, as the DropBlock gets it (clipped to the map
            at run time).
        gamma_scale: The rate's multiplier.
        drop_prob: The target rate before ``gamma_scale``.
        expected_drop: The expected fraction of dropped units at the full rate.
        status: ``"new"``, ``"patched"`` or ``"covered"``.
    """

    candidate: Candidate
    stage: int
    dilation: int
    block_size: tuple[int, ...]
    gamma_scale: float
    drop_prob: float
    expected_drop: float
    status: Status

    conv = property(lambda self: self.candidate.conv, doc="Path of the convolution (or channels-last Linear).")
    norm = property(lambda self: self.candidate.norm, doc="Path of the last norm of the chain, or None.")
    act = property(lambda self: self.candidate.act, doc="The activation: a module path or a function name.")
    host = property(lambda self: self.candidate.host, doc="The module that gets (or is) the DropBlock.")
    kind = property(lambda self: self.candidate.kind, doc='``"hook"``, ``"slot"`` or ``"fused"``.')
    call = property(lambda self: self.candidate.call, doc="Which call of the activation module.")
    stride = property(lambda self: self.candidate.stride, doc="Input size / feature size.")
    feature = property(lambda self: self.candidate.feature, doc="Spatial size of the map.")
    channels = property(lambda self: self.candidate.channels, doc="Channels of the map.")
    role = property(lambda self: self.candidate.role, doc='``"main"``, ``"branch"`` or ``"shortcut"``.')
    channel_dim = property(lambda self: self.candidate.channel_dim, doc="1 (N, C, H, W) or -1 (N, H, W, C).")

    @property
    def rate(self) -> float:
        """The target rate: ``drop_prob * gamma_scale``."""
        return self.drop_prob * self.gamma_scale

    def to_dict(self) -> dict[str, Any]:
        """The site as one flat, JSON-ready dict."""
        where = {k: v for k, v in asdict(self.candidate).items() if k not in ("dilation", "existing", "order")}
        return {**where, **{k: v for k, v in asdict(self).items() if k != "candidate"}}


class Plan(Sequence[Site]):
    """The sites ``inject`` patches (a dry run); prints as a table with a per-stage summary.

    Attributes:
        model: The model's class name.
        input_size: The input size used for feature sizes, ``(C, H, W)`` or ``(C, D, H, W)``.
        stages: One :class:`Stage` per stage, in order.
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
        stages: list[Stage],
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
        return [s.to_dict() for s in self._sites]

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
        NoSitesError: The model has no candidate site, the scope holds none, or the rules select none.
        RecipeError: A pattern of the rules matches no site, or a stage does not exist.
    """
    rejected = Counter(r.reason for r in analysis.rejected)
    enabled = [c for c in analysis.candidates if _role_enabled(c.role, rules)]
    if not enabled:
        raise NoSitesError(_no_candidates_message(model, analysis, rejected))
    _check_patterns(rules, enabled, model)
    in_scope = [c for c in enabled if not scope or c.conv.startswith(scope + ".")]
    if not in_scope:
        parts = sorted({c.conv.split(".")[0] for c in enabled})
        raise NoSitesError(
            f"scope {scope!r} of {model} holds none of its {len(enabled)} candidate sites (they lie in {parts}); "
            f"pass scope='all' or the path of the part that should get DropBlock"
        )
    stage_of, stages = _assign_stages(in_scope)
    chosen = rules.chosen_stages([s.stride for s in stages])
    sites = [site for c in enabled if (site := _site(c, stage_of.get(c.order, _OUT_OF_SCOPE), stages, chosen, rules))]
    sites = _whole_hosts(sites, enabled)
    if not sites:
        raise NoSitesError(
            f"the rules ({rules.source}) select none of the {len(enabled)} candidate sites of {model} "
            f"(stages: {_stage_list(stages)}; chosen: {sorted(chosen)}). Pick stages=[...] or include=[...] patterns."
        )
    return Plan(
        sites,
        model=model,
        input_size=input_size,
        stages=stages,
        rules=rules,
        rejected=rejected,
        candidates=len(enabled),
        gamma=rules.gamma,
        shared_channels=rules.shared_channels,
    )


def _role_enabled(role: str, rules: Rules) -> bool:
    return role == "main" or (role == "branch" and rules.residual_branch) or (role == "shortcut" and rules.shortcut)


def _paths(c: Candidate) -> list[str]:
    return [p for p in (c.conv, c.norm, c.host) if p]


def _check_patterns(rules: Rules, candidates: list[Candidate], model: str) -> None:
    all_paths = [p for c in candidates for p in _paths(c)]
    for key, patterns in rules.patterns.items():
        for pattern in patterns:
            if not matches(all_paths, [pattern]):
                example = ", ".join(sorted({c.host for c in candidates})[:3])
                raise RecipeError(
                    f"{rules.source}: {key} pattern {pattern!r} matches no site of {model} "
                    f"(sites are named like {example})"
                )


def _assign_stages(candidates: list[Candidate]) -> tuple[dict[int, int], list[Stage]]:
    """Stage index of each candidate (by ``order``) and the stages, by first appearance."""
    keys: dict[tuple[tuple[int, ...], int], int] = {}
    counts: Counter[int] = Counter()
    strides: dict[int, int] = {}
    last_dilation: dict[tuple[int, ...], int] = {}
    stage_of = {}
    for c in candidates:
        dilation = c.dilation if c.dilation is not None else last_dilation.get(c.feature, 1)
        last_dilation[c.feature] = dilation
        stage = keys.setdefault((c.feature, dilation), len(keys))
        strides.setdefault(stage, c.stride)
        stage_of[c.order] = stage
        counts[stage] += 1
    stages = [Stage(feature, dilation, strides[i], counts[i]) for (feature, dilation), i in keys.items()]
    return stage_of, stages


def _site(cand: Candidate, stage: int, stages: list[Stage], chosen: set[int], rules: Rules) -> Site | None:
    paths = _paths(cand)
    if matches(paths, rules.exclude):
        return None
    if stage not in chosen and not matches(paths, rules.include + rules.modules):
        return None
    settings = rules.settings_for(paths, stage, len(stages), cand.feature)
    block = settings["block_size"]
    geom = block_geometry(cand.feature, block, "valid")
    rate = min(settings["drop_prob"] * settings["gamma_scale"], 1.0)
    status: Status = "new" if cand.existing is None else ("patched" if cand.existing == "ours" else "covered")
    return Site(
        cand,
        stage=stage,
        dilation=stages[stage].dilation if stage >= 0 else (cand.dilation or 1),
        block_size=block,
        gamma_scale=settings["gamma_scale"],
        drop_prob=settings["drop_prob"],
        expected_drop=geom.expected_drop(geom.seed_rate(rate, rules.gamma)),
        status=status,
    )


def _whole_hosts(sites: list[Site], candidates: list[Candidate]) -> list[Site]:
    """A hooked module applies its DropBlock at every call: keep a host's calls all or none."""
    calls = Counter(c.host for c in candidates)
    selected = Counter(s.host for s in sites)
    partial = sorted(h for h in selected if selected[h] != calls[h])
    if partial:
        warnings.warn(
            f"skipped {partial}: these modules are called at several places and the rules select only some of "
            f"them (a DropBlock on a module applies at every call)",
            stacklevel=3,
        )
    return [s for s in sites if s.host not in partial]


def _stage_list(stages: list[Stage]) -> str:
    return ", ".join(f"{i}: {_size(s.feature)} d{s.dilation} ({s.candidates})" for i, s in enumerate(stages))


def _size(feature: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in feature)


def _no_candidates_message(model: str, analysis: Analysis, rejected: Counter[str]) -> str:
    residual = Counter(c.role for c in analysis.candidates if c.role != "main")
    if residual:
        return (
            f"no DropBlock site in {model} with these rules: its {sum(residual.values())} conv -> norm outputs reach "
            f"an activation only through a residual sum ({dict(residual)}); pass residual_branch=True (and/or "
            f"shortcut=True), as the repvgg recipe does."
        )
    if not rejected and not analysis.model_convs:
        what = "it has no Conv2d/Conv3d (a transformer or MLP model?)"
    elif not rejected:
        size = "x".join(map(str, analysis.input_spatial))
        what = (
            f"the analysis reached none of its {analysis.model_convs} convolutions at input {size} "
            f"(pass input_size=... or example_inputs=...)"
        )
    else:
        reasons = "; ".join(f"{reason} x{n}" for reason, n in rejected.most_common(4))
        what = (f"none of its {sum(rejected.values())} convolutions reaches an activation through norm layers "
                f"only: {reasons}")  # fmt: skip
    if analysis.model_attention:
        what = f"no convolution sites (transformer blocks); {what}"
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
    lines.append("stages (feature, dilation, stride, candidates -> patched):")
    per_stage = Counter(s.stage for s in plan)
    for i, st in enumerate(plan.stages):
        mark = f"{per_stage[i]} sites" if per_stage[i] else "-"
        lines.append(
            f"  {i}: {_size(st.feature):>9} d{st.dilation}  /{st.stride:<3} {st.candidates:3d} candidates -> {mark}"
        )
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
