"""inject / strip on the real timm and torchvision architectures the injector must cover.

Every model is built with ``pretrained=False``. Forward checks run at a small input (64 px, 3-D:
8x32x32); plans use each model's training resolution (224 px, 3-D: 16x112x112).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import torch
import torchvision
from torch import nn

import dropblock_inject as dbi
from dropblock_inject.pipeline.rewrite import injected_modules

tv = torchvision.models

MODELS: dict[str, Callable[[], nn.Module]] = {
    "tv_resnet18": lambda: tv.resnet18(),
    "tv_resnet50": lambda: tv.resnet50(),
    "tv_resnext50_32x4d": lambda: tv.resnext50_32x4d(),
    "tv_mobilenet_v3_large": lambda: tv.mobilenet_v3_large(),
    "tv_efficientnet_b0": lambda: tv.efficientnet_b0(),
    "tv_regnet_y_400mf": lambda: tv.regnet_y_400mf(),
    "tv_densenet121": lambda: tv.densenet121(),
    "tv_deeplabv3_resnet50": lambda: tv.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None),
    "tv_r3d_18": lambda: tv.video.r3d_18(),
    "timm_resnet50": lambda: timm.create_model("resnet50", zero_init_last=False),
    "timm_resnet50_drop_block_rate": lambda: timm.create_model("resnet50", drop_block_rate=0.1),
    "timm_seresnext26d_32x4d": lambda: timm.create_model("seresnext26d_32x4d"),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "timm_tf_efficientnet_b0": lambda: timm.create_model("tf_efficientnet_b0"),
    "timm_mobilenetv3_large_100": lambda: timm.create_model("mobilenetv3_large_100"),
    "timm_regnety_016": lambda: timm.create_model("regnety_016"),
    "timm_cspresnet50": lambda: timm.create_model("cspresnet50"),
    "timm_dla34": lambda: timm.create_model("dla34"),
    "timm_hrnet_w18_small": lambda: timm.create_model("hrnet_w18_small"),
    "timm_convnext_atto": lambda: timm.create_model("convnext_atto"),
    "timm_nfnet_l0": lambda: timm.create_model("nfnet_l0"),
}


def small_input(model: nn.Module) -> torch.Tensor:
    if any(isinstance(m, nn.Conv3d) for m in model.modules()):
        return torch.randn(2, 3, 8, 32, 32)
    return torch.randn(2, 3, 64, 64)


def output_tensor(out: object) -> torch.Tensor:
    return out["out"] if isinstance(out, dict) else out


@pytest.mark.parametrize("name", list(MODELS))
def test_inject_keeps_the_contract(name: str) -> None:
    model = MODELS[name]()
    x = small_input(model)
    reference = copy.deepcopy(model).eval()
    cls, keys, params = type(model), list(model.state_dict()), list(model.parameters())
    plan = dbi.plan(model)
    assert len(plan) > 0
    dbi.inject(model)
    assert type(model) is cls
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    with torch.no_grad():
        assert torch.equal(output_tensor(model.eval()(x)), output_tensor(reference(x)))
    # every parameter that gets a gradient in the unpatched model gets one in the patched model
    for m in (reference, model):
        m.train()
        output_tensor(m(x)).float().square().mean().backward()
    had = {n for n, p in reference.named_parameters() if p.grad is not None}
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert had, "the unpatched model got no gradient"
    assert had <= got, f"parameters lost their gradient: {sorted(had - got)[:5]}"
    dbi.strip(model)
    assert not any(isinstance(m, dbi.DropBlock) and getattr(m, "injected", False) for m in model.modules())


def test_plan_and_inject_names_and_stages() -> None:
    p = dbi.plan(tv.resnet50())
    # the paper's groups 3 and 4, minus layer3.0.conv1 which still runs at 28x28
    assert len(p) == 17
    assert [st.feature for st in p.stages][-2:] == [(14, 14), (7, 7)]
    assert {s.gamma_scale for s in p if s.feature == (14, 14)} == {0.25}
    assert {s.act for s in p} == {f"layer{i}.{j}.relu" for i, n in ((3, 6), (4, 3)) for j in range(n)}
    assert {s.call for s in p if s.norm.endswith("bn2")} == {1}  # the shared relu, second call


def test_timm_drop_block_rate_sites_are_covered_not_doubled() -> None:
    model = timm.create_model("resnet50", drop_block_rate=0.1)
    p = dbi.plan(model)
    assert sum(s.status == "covered" for s in p) == 9
    dbi.inject(model)
    assert len(injected_modules(model)) == 8
    assert type(model.layer4[0].drop_block).__name__ == "DropBlock2d"  # timm's own, left in place
    dbi.inject(model)
    assert len(injected_modules(model)) == 8


def test_timm_identity_slot_is_filled_and_restored() -> None:
    model = dbi.inject(timm.create_model("resnet50"))
    assert isinstance(model.layer4[0].drop_block, dbi.DropBlock)
    assert isinstance(model.layer4[0].bn1.dropblock, dbi.DropBlock)
    dbi.strip(model)
    assert isinstance(model.layer4[0].drop_block, nn.Identity)


def test_fused_batchnormact_drop_slot() -> None:
    model = dbi.inject(timm.create_model("efficientnet_b0"))
    assert isinstance(model.blocks[6][0].bn1.drop, dbi.DropBlock)
    assert {s.kind for s in dbi.plan(model)} == {"fused"}


def test_densenet_finds_the_bottleneck_convs_only() -> None:
    p = dbi.plan(tv.densenet121())
    # pre-activation: concat -> norm1 -> relu1 -> conv1 is not a site; conv1 -> norm2 -> relu2 is
    assert {s.norm.rsplit(".", 1)[-1] for s in p} == {"norm2"}


CONVNEXT_STYLE = {
    # name: (constructor, the end of every site's host path): fc1 is a Linear on the (N, H, W, C) map
    "tv_convnext_tiny": (lambda: tv.convnext_tiny(), "block.3"),
    "timm_convnext_tiny": (lambda: timm.create_model("convnext_tiny"), "mlp.fc1"),
    "timm_convnextv2_tiny": (lambda: timm.create_model("convnextv2_tiny"), "mlp.fc1"),
    "timm_edgenext_x_small": (lambda: timm.create_model("edgenext_x_small"), "mlp.fc1"),
    "timm_mambaout_femto": (lambda: timm.create_model("mambaout_femto"), "fc1"),
}


@pytest.mark.parametrize("name", CONVNEXT_STYLE)
def test_convnext_style_blocks_get_fc1_sites(name: str) -> None:
    build, host_end = CONVNEXT_STYLE[name]
    torch.manual_seed(0)
    plain = build()
    model = copy.deepcopy(plain)
    p = dbi.plan(model, "auto", model_name=name.removeprefix("timm_").replace("tv_", "tv:"))
    assert "convnext.yaml" in p.rules.source
    assert p and all(s.host.endswith(host_end) and s.channel_dim == -1 for s in p)
    assert {s.stage for s in p} == {len(p.stages) - 2, len(p.stages) - 1}  # the last two stages
    dbi.inject(model, p.rules)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.eval()(x), plain.eval()(x))
    dropped = []
    for db in injected_modules(model):  # each DropBlock sees (N, H, W, C) and drops whole (H, W) blocks
        db.register_forward_hook(lambda m, args, out: dropped.append((out == 0).flatten(1, 2).all(1).any()))
    model.train()(x)
    assert dropped and all(dropped)


def test_a_linear_on_a_channels_last_map_is_a_site_only_in_a_conv_block() -> None:
    class Block(nn.Module):  # ConvNeXt's block with or without its depthwise conv
        def __init__(self, conv: bool) -> None:
            super().__init__()
            self.conv = nn.Conv2d(64, 64, 7, padding=3, groups=64) if conv else nn.Identity()
            self.norm, self.act = nn.LayerNorm(64), nn.GELU()
            self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(self.conv(x).permute(0, 2, 3, 1))
            return x + self.fc2(self.act(self.fc1(y))).permute(0, 3, 1, 2)

    for conv in (True, False):
        model = nn.Sequential(nn.Conv2d(3, 64, 4, stride=4), Block(conv), Block(conv))
        if conv:
            assert [s.host for s in dbi.plan(model, input_size=(3, 64, 64))] == ["1.fc1", "2.fc1"]
        else:  # a transformer's MLP on a token grid (Swin) is not a site
            with pytest.raises(dbi.NoSitesError):
                dbi.plan(model, input_size=(3, 64, 64))


def test_conv_mlp_convnext_keeps_its_1x1_conv_sites() -> None:
    # timm's convnext_atto uses a conv MLP: fc1 (1x1 conv) -> GELU are its sites, with no norm
    assert {(s.norm, s.channel_dim) for s in dbi.plan(timm.create_model("convnext_atto"))} == {(None, 1)}


def test_deeplabv3_keeps_its_dilated_stages() -> None:
    p = dbi.plan(tv.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None))
    assert {s.dilation for s in p} == {2, 4}
    assert all(s.host.startswith("backbone.") and s.feature == (28, 28) for s in p)


def test_r3d_gets_3d_dropblock() -> None:
    model = dbi.inject(tv.video.r3d_18(), drop_prob=0.5, block_size=3)
    assert all(len(s.feature) == 3 for s in dbi.plan(model))
    x = torch.randn(2, 3, 8, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))


def test_nfnet_sites_inside_normfree_blocks() -> None:
    p = dbi.plan(timm.create_model("nfnet_l0"))
    assert all(s.norm is None for s in p)  # norm-free: conv -> act inside timm's opaque NormFreeBlock
    assert all(s.conv.startswith("stages.") or s.conv == "final_conv" for s in p)


def test_fasterrcnn_backbone_is_patched_and_losses_computed() -> None:
    model = tv.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=128, max_size=128)
    cls = type(model)
    p = dbi.plan(model, input_size=(3, 128, 128))
    assert all(s.host.startswith("backbone.body.layer") for s in p)
    dbi.inject(model, input_size=(3, 128, 128))
    assert type(model) is cls
    model.train()
    images = [torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])}]
    losses = model(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg"}
    sum(losses.values()).backward()


def test_gradient_checkpointing_stays_active() -> None:
    model = dbi.inject(timm.create_model("resnet18"), input_size=(3, 64, 64))
    model.set_grad_checkpointing(True)
    calls = []
    db = model.layer4[0].drop_block  # BasicBlock: timm's identity slot after bn1
    db.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert len(calls) == 2  # forward, then the recomputation in backward


def test_methods_and_attributes_survive() -> None:
    model = dbi.inject(timm.create_model("resnet50"))
    assert model.pretrained_cfg["architecture"] == "resnet50"
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape[1] == 2048
    model.reset_classifier(5)
    assert model.layer3[0].downsample is not None
