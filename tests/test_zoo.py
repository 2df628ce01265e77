"""Every convnet of both zoos: inject works, or the model is reported as having no site.

``pytest -m zoo`` runs every torchvision model and one smallest variant of every timm family
with a convolution (``zoo_timm_families.txt``); the default run takes a sample that covers each
kind of model. Each check: ``inject`` succeeds (or raises ``NoSitesError`` with its reason),
eval output is bit-identical to the unpatched model, a train forward + backward gives a
gradient to every parameter that had one, ``state_dict`` keys are unchanged, and ``strip``
leaves no DropBlock and no hook. Where torch.fx traces the unpatched model, the patched model
traces to the same eval output. The sampled models' outcomes are pinned (``EXPECTED``), and their
``plan`` and ``inject`` write nothing to stderr. A summary table is printed at the end and written as CSV to
``$DROPBLOCK_ZOO_CSV`` (default: ``zoo_results.csv`` in pytest's temporary folder).
"""

from __future__ import annotations

import copy
import csv
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.fx as fx
import torchvision
from torch import nn

import dropblock_inject as dbi
from conftest import output_tensors
from dropblock_inject.pipeline.rewrite import injected_modules

TIMM_FAMILIES = [
    line.strip()
    for line in (Path(__file__).parent / "zoo_timm_families.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
TV_SKIP = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32"}  # too large for a 2-core CI machine


@dataclass
class Case:
    name: str
    source: str  # "tv" or "timm"

    @property
    def kind(self) -> str:
        if self.source == "timm":
            return "timm"
        for kind in ("detection", "segmentation", "video", "optical_flow", "quantization"):
            if self.name in torchvision.models.list_models(module=getattr(torchvision.models, kind)):
                return kind
        return "classification"

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        if self.source == "timm":
            return timm.create_model(self.name, pretrained=False)
        extra: dict[str, Any] = {}
        if self.kind in ("detection", "segmentation"):
            extra["weights_backbone"] = None
        if self.kind == "detection" and not self.name.startswith("ssd"):
            extra.update(min_size=128, max_size=128)
        if self.name.startswith("inception") or self.name == "googlenet":
            extra["aux_logits"] = False
            extra["init_weights"] = False
        return torchvision.models.get_model(self.name, weights=None, **extra)

    def inputs(self, model: nn.Module) -> tuple[Any, ...]:
        if self.kind == "detection":
            return ([torch.rand(3, 128, 128), torch.rand(3, 128, 128)],)
        if self.kind == "video":
            return (torch.randn(2, 3, 16, 112, 112) if self.name.startswith(("mvit", "s3d", "swin3d")) else
                    torch.randn(2, 3, 8, 64, 64),)  # fmt: skip
        if self.kind == "optical_flow":
            return (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = cfg.get("fixed_input_size") and cfg.get("input_size")
        if self.source == "tv" and self.name.startswith(("vit", "swin", "maxvit")):
            size = (3, 224, 224)
        return (torch.randn(2, *(size or (3, 96, 96))),)


def _all_cases() -> list[Case]:
    tv = [Case(n, "tv") for n in torchvision.models.list_models() if n not in TV_SKIP]
    return tv + [Case(n, "timm") for n in TIMM_FAMILIES]


SAMPLED = [
    Case("squeezenet1_0", "tv"), Case("shufflenet_v2_x0_5", "tv"), Case("googlenet", "tv"),
    Case("mnasnet0_5", "tv"), Case("vgg11_bn", "tv"), Case("alexnet", "tv"), Case("swin_t", "tv"),
    Case("lraspp_mobilenet_v3_large", "tv"), Case("ssdlite320_mobilenet_v3_large", "tv"),
    Case("r2plus1d_18", "tv"), Case("raft_small", "tv"),
    Case("ghostnet_050", "timm"), Case("rexnet_100", "timm"), Case("dpn48b", "timm"), Case("resnest14d", "timm"),
    Case("repvgg_b0", "timm"), Case("mobileone_s1", "timm"), Case("vit_tiny_patch16_224", "timm"),
    Case("inception_v3", "timm"), Case("darknet17", "timm"), Case("res2next50", "timm"),
    Case("densenetblur121d", "timm"), Case("vovnet39a", "timm"), Case("mixnet_s", "timm"),
    # Larger members whose blocks differ from the family's smallest (Linear MLPs on NHWC maps), and
    # a model whose analysis takes torch's fake-tensor fallback paths (LeViT).
    Case("convnext_tiny", "timm"), Case("convnext_tiny", "tv"), Case("convnextv2_tiny", "timm"),
    Case("edgenext_small", "timm"), Case("mambaout_tiny", "timm"), Case("levit_128s", "timm"),
]  # fmt: skip


# What the sampled models must give under recipe="auto": the number of sites, or the reason for none.
# A model that loses its sites (or gains unexpected ones) fails here.
EXPECTED: dict[str, int | str] = {
    "tv:squeezenet1_0": 16, "tv:shufflenet_v2_x0_5": 26, "tv:googlenet": 42, "tv:mnasnet0_5": 20,
    "tv:vgg11_bn": 4, "tv:alexnet": 4, "tv:swin_t": "goes to permute, not an activation",
    "tv:lraspp_mobilenet_v3_large": 18, "tv:ssdlite320_mobilenet_v3_large": 6, "tv:r2plus1d_18": 6,
    "tv:raft_small": 28, "timm:ghostnet_050": 21, "timm:rexnet_100": 11, "timm:dpn48b": 17,
    "timm:resnest14d": 4, "timm:repvgg_b0": 34, "timm:mobileone_s1": 33,
    "timm:vit_tiny_patch16_224": "goes to flatten, not an activation", "timm:inception_v3": 66,
    "timm:darknet17": 6, "timm:res2next50": 35, "timm:densenetblur121d": 40, "timm:vovnet39a": 24,
    "timm:mixnet_s": 6, "timm:convnext_tiny": 12, "tv:convnext_tiny": 12, "timm:convnextv2_tiny": 12,
    "timm:edgenext_small": 12, "timm:mambaout_tiny": 12, "timm:levit_128s": 2,
}  # fmt: skip


def _train_loss(case: Case, model: nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    model.train()
    if case.kind == "detection":
        targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])} for _ in range(2)]
        for target in targets:
            if "keypoint" in case.name:
                target["keypoints"] = torch.rand(1, 17, 3) * 60
            if "mask" in case.name:
                target["masks"] = torch.zeros(1, 128, 128, dtype=torch.uint8)
        return sum(_train_losses(model(*inputs, targets)))
    return sum(t.float().square().mean() for t in output_tensors(model(*inputs)) if t.is_floating_point())


def _train_losses(out: Any) -> list[torch.Tensor]:
    return list(out.values()) if isinstance(out, dict) else output_tensors(out)


def check(case: Case, capfd: pytest.CaptureFixture[str] | None = None) -> dict[str, Any]:
    """Run every check on one model; returns a result row (raises on a failed check).

    With ``capfd``: ``plan`` and ``inject`` write nothing to stderr and raise no warning.
    """
    model = case.build()
    inputs = case.inputs(model)
    example = None if case.kind in ("classification", "timm", "segmentation", "video") else inputs
    row: dict[str, Any] = {"model": case.name, "source": case.source, "kind": case.kind}
    reference = copy.deepcopy(model).eval()
    keys = list(model.state_dict())
    t0 = time.perf_counter()
    if capfd is not None:
        capfd.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            name = f"tv:{case.name}" if case.source == "tv" else case.name
            plan = dbi.plan(model, "auto", example_inputs=example, model_name=name)
            dbi.inject(model, plan.rules, example_inputs=example)
    except dbi.NoSitesError as e:
        return {**row, "outcome": "no site", "sites": 0, "stages": "", "seconds": time.perf_counter() - t0,
                "reason": str(e).split(": ", 1)[-1][:160]}  # fmt: skip
    if capfd is not None:
        assert not capfd.readouterr().err, "plan/inject wrote to stderr"
        assert not [str(w.message) for w in caught], "plan/inject warned"
    row.update(outcome="injected", sites=len(plan), seconds=time.perf_counter() - t0, reason="",
               stages=",".join(str(s) for s in sorted({s.stage for s in plan})) + f"/{len(plan.stages)}")  # fmt: skip
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        ours, theirs = output_tensors(model.eval()(*inputs)), output_tensors(reference(*inputs))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), "eval output changed"
    _check_fx(case, model, reference, inputs)
    _train_loss(case, reference, inputs).backward()
    _train_loss(case, model, inputs).backward()
    had = {n for n, p in reference.named_parameters() if p.grad is not None}
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert had <= got, f"parameters lost their gradient: {sorted(had - got)[:5]}"
    dbi.strip(model)
    assert not injected_modules(model) and not any(m._forward_hooks for m in model.modules())
    return row


def _check_fx(case: Case, model: nn.Module, reference: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Where torch.fx traces the unpatched model, it traces the patched one to the same eval graph."""
    if case.kind not in ("classification", "timm"):
        return
    try:
        traced_reference = fx.symbolic_trace(reference.eval())
    except Exception:
        return  # not traceable before inject either
    with torch.no_grad():
        assert torch.equal(fx.symbolic_trace(model.eval())(*inputs), traced_reference(*inputs))


@pytest.fixture(scope="session")
def zoo_report(tmp_path_factory: pytest.TempPathFactory) -> Any:
    rows: list[dict[str, Any]] = []
    yield rows
    if not rows:
        return
    path = Path(os.environ.get("DROPBLOCK_ZOO_CSV") or tmp_path_factory.getbasetemp() / "zoo_results.csv")
    fields = ["model", "source", "kind", "outcome", "sites", "stages", "seconds", "reason"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    _print_summary(rows, path)


def _print_summary(rows: list[dict[str, Any]], path: Path) -> None:
    lines = [f"\nzoo: {len(rows)} models -> {path}", f"{'model':<36} {'kind':<15} {'outcome':<9} sites stages   s"]
    for r in rows:
        lines.append(f"{r['model']:<36} {r['kind']:<15} {r['outcome']:<9} {r['sites']:>5} {r['stages']:<8} "
                     f"{r['seconds']:4.1f} {r['reason'][:60]}")  # fmt: skip
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines.append("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("\n".join(lines))


def _run(case: Case, zoo_report: list[dict[str, Any]], capfd: pytest.CaptureFixture[str] | None = None) -> None:
    row = check(case, capfd)
    zoo_report.append(row)
    expected = EXPECTED.get(f"{case.source}:{case.name}")
    if isinstance(expected, int):
        assert (row["outcome"], row["sites"]) == ("injected", expected)
    elif expected is not None:
        assert row["outcome"] == "no site" and expected in row["reason"], row["reason"]


@pytest.mark.parametrize("case", SAMPLED, ids=lambda c: f"{c.source}:{c.name}")
def test_sampled_zoo(case: Case, zoo_report: list[dict[str, Any]], capfd: pytest.CaptureFixture[str]) -> None:
    _run(case, zoo_report, capfd)


@pytest.mark.zoo
@pytest.mark.parametrize("case", _all_cases(), ids=lambda c: f"{c.source}:{c.name}")
def test_zoo(case: Case, zoo_report: list[dict[str, Any]]) -> None:
    _run(case, zoo_report)
