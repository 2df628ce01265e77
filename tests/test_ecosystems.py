"""The convnets users fine-tune outside timm and torchvision: HF transformers, segmentation_models_pytorch,
ultralytics YOLO; and torchvision detection at the resolution its transform uses.

Each target, built from its config at random init: where ``plan`` puts the sites (how many, in which
part, which stages), then the contract of ``inject`` as a user meets it: eval output bit-identical,
train mode drops, one optimizer step, ``strip`` restores the ``state_dict`` keys, and ``plan`` and
``inject`` print nothing to stderr and raise no warning. HF models are small configs of the real
classes; smp and YOLO are the named models. Tests marked ``slow`` plan the largest common member of
each family. The extras are optional: each class skips without its library.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import pytest
import torch
import torchvision
from torch import nn

import dropblock_inject as dbi
from conftest import output_tensors
from dropblock_inject.pipeline.markers import dropblock_hook
from dropblock_inject.pipeline.rewrite import injected_modules


def check_contract(model: nn.Module, inputs: dict[str, Any], capfd: pytest.CaptureFixture[str], **kw: Any) -> dbi.Plan:
    """Plan and inject ``model`` (rules ``kw``), then hold it to the contract on ``inputs`` (keyword inputs)."""
    with torch.no_grad():
        reference = output_tensors(model.eval()(**inputs))
    keys = list(model.state_dict())
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = dbi.plan(model, **kw)
        dbi.inject(model, plan)
    assert not capfd.readouterr().err, "plan/inject wrote to stderr"
    assert not [str(w.message) for w in caught], "plan/inject warned"
    assert list(model.state_dict()) == keys and len(injected_modules(model)) == len({s.host for s in plan})
    with torch.no_grad():
        ours = output_tensors(model.eval()(**inputs))
    assert len(ours) == len(reference) and all(map(torch.equal, ours, reference)), "eval output changed"
    dropped: list[float] = []
    for db in injected_modules(model):
        db.register_forward_hook(lambda m, a, out: dropped.append(float((out == 0).float().mean())))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    sum(t.float().square().mean() for t in output_tensors(model.train()(**inputs)) if t.is_floating_point()).backward()
    optimizer.step()
    # p=0.1 at the full rate: the maps before a DropBlock have no exact zeros of their own (BN in train mode)
    assert max(dropped) > 0.01, "no DropBlock dropped anything in train mode"
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), "the step changed nothing"
    dbi.strip(model)
    assert list(model.state_dict()) == keys and not injected_modules(model)
    assert not any(hook is dropblock_hook for m in model.modules() for hook in m._forward_hooks.values())
    return plan


def _parts(plan: dbi.Plan, depth: int) -> set[str]:
    """The module-path prefixes (``depth`` names) of the plan's sites."""
    return {".".join(s.host.split(".")[:depth]) for s in plan}


def _last_two(plan: dbi.Plan) -> bool:
    n = len(plan.stages)
    return {s.stage for s in plan} == {n - 2, n - 1}


X64 = {"pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}


class TestTransformers:
    """HF vision models: tiny configs of the real classes (64 px), every target of the issue."""

    @pytest.fixture(autouse=True)
    def _transformers(self) -> None:
        pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

    @staticmethod
    def build(name: str) -> nn.Module:
        import transformers as hf

        convnext = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 2, 1], "image_size": 64}
        out = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
        stages = {"embedding_size": 8, "hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}
        mobilenet = {"image_size": 64, "tf_padding": True, "classifier_dropout_prob": 0.1}
        configs = {
            "ConvNextForImageClassification": hf.ConvNextConfig(**convnext),
            "ConvNextV2ForImageClassification": hf.ConvNextV2Config(**convnext),
            "ConvNextBackbone": hf.ConvNextConfig(**convnext, **out),
            "ConvNextV2Backbone": hf.ConvNextV2Config(**convnext, **out),
            # the hub's tf_padding=True; the default classifier dropout (0.999 in V1) leaves no gradient at batch 2
            "MobileNetV2ForImageClassification": hf.MobileNetV2Config(depth_multiplier=0.35, **mobilenet),
            "MobileNetV1ForImageClassification": hf.MobileNetV1Config(depth_multiplier=0.25, **mobilenet),
            "ResNetForImageClassification": hf.ResNetConfig(**stages, layer_type="basic"),
            "RegNetForImageClassification": hf.RegNetConfig(**stages, groups_width=8),
            "EfficientNetForImageClassification": hf.EfficientNetConfig(  # hidden_dim: the top conv's width
                width_coefficient=0.25, depth_coefficient=0.25, image_size=64, hidden_dim=320
            ),
            "UperNetForSemanticSegmentation": hf.UperNetConfig(
                backbone_config=hf.ConvNextConfig(**convnext, **out), hidden_size=16, auxiliary_channels=8
            ),
        }
        torch.manual_seed(0)
        model = getattr(hf, name)(configs[name])
        for m in model.modules():  # HF's std 0.02: in thin nets the maps vanish into denormals (slow, no gradient)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        return model

    # class: (sites, the parts they lie in, the recipe recipe="auto" picks)
    TARGETS: ClassVar[dict[Any, tuple[Any, ...]]] = {
        "ConvNextForImageClassification": (3, {"convnext.encoder.stages.2", "convnext.encoder.stages.3"}, "convnext"),
        "ConvNextV2ForImageClassification": (
            3, {"convnextv2.encoder.stages.2", "convnextv2.encoder.stages.3"}, "convnext"
        ),
        "ConvNextBackbone": (3, {"encoder.stages.2", "encoder.stages.3"}, "convnext"),
        "ConvNextV2Backbone": (3, {"encoder.stages.2", "encoder.stages.3"}, "convnext"),
        "MobileNetV2ForImageClassification": (22, {"mobilenet_v2.layer", "mobilenet_v2.conv_1x1"}, "mobilenet"),
        "MobileNetV1ForImageClassification": (16, {"mobilenet_v1.layer"}, "mobilenet"),
        "ResNetForImageClassification": (2, {"resnet.encoder.stages.2", "resnet.encoder.stages.3"}, "resnet"),
        "RegNetForImageClassification": (3, {"regnet.encoder.stages.2", "regnet.encoder.stages.3"}, "regnet"),
        "EfficientNetForImageClassification": (
            8, {"efficientnet.encoder.blocks", "efficientnet.encoder.top_bn"}, "efficientnet"
        ),
        "UperNetForSemanticSegmentation": (3, {"backbone.encoder.stages.2", "backbone.encoder.stages.3"}, "convnext"),
    }  # fmt: skip

    @pytest.mark.parametrize("name", TARGETS)
    def test_sites_and_contract(self, name: str, capfd: pytest.CaptureFixture[str]) -> None:
        sites, parts, recipe = self.TARGETS[name]
        model = self.build(name)
        assert dbi.recipe_for(model).name == recipe
        plan = check_contract(model, X64, capfd, recipe="auto", example_inputs=X64)
        assert len(plan) == sites and plan.input_size == (3, 64, 64) and _last_two(plan)
        depth = len(next(iter(parts)).split("."))
        assert _parts(plan, depth) == parts

    def test_a_transformer_has_no_convolution_site_and_says_so(self) -> None:
        import transformers as hf

        config = hf.SwinConfig(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
        with pytest.raises(dbi.NoSitesError, match=r"no convolution sites \(transformer blocks\)") as exc:
            dbi.plan(hf.SwinForImageClassification(config))
        assert "trace" not in str(exc.value)  # its decorated forwards ran: nothing was left unread

    def test_the_default_size_is_config_image_size(self) -> None:
        plan = dbi.plan(self.build("ConvNextForImageClassification"))  # a positional tensor at config.image_size
        assert plan.input_size == (3, 64, 64) and [st.feature for st in plan.stages][-1] == (2, 2)

    def test_tf_padding_mobilenet_is_read_from_one_run_of_its_untraceable_layers(self) -> None:
        from dropblock_inject.pipeline.analyse import analyse

        model = self.build("MobileNetV2ForImageClassification")
        assert model.config.tf_padding
        analysis = analyse(model, (), example_kwargs=X64)
        assert "mobilenet_v2.layer.5.conv_3x3" in analysis.recorded  # int() on a traced shape: not traceable
        assert not analysis.opaque

    @pytest.mark.slow
    @pytest.mark.parametrize("name", ["convnext", "upernet"])
    def test_the_largest_convnext(self, name: str) -> None:
        import transformers as hf

        large = {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3]}
        if name == "convnext":  # facebook/convnext-large-224 at 224 px (config.image_size)
            model, kw = hf.ConvNextForImageClassification(hf.ConvNextConfig(**large)), {}
        else:  # openmmlab/upernet-convnext-large at the 512 px it is trained at
            out = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
            config = hf.UperNetConfig(backbone_config=hf.ConvNextConfig(**large, **out), hidden_size=512)
            model, kw = hf.UperNetForSemanticSegmentation(config), {"input_size": (3, 512, 512)}
        plan = dbi.plan(model, recipe="auto", **kw)
        assert len(plan) == 30 and _last_two(plan)  # fc1 of the 27 + 3 blocks of the last two stages
        assert all(".encoder.stages.2." in s.host or ".encoder.stages.3." in s.host for s in plan)


class TestSmp:
    """segmentation_models_pytorch: by default every site lies in the encoder, in its last two stages."""

    @pytest.fixture(autouse=True)
    def _smp(self) -> None:
        pytest.importorskip("segmentation_models_pytorch", reason="the dev extra: pip install -e '.[dev]'")

    @staticmethod
    def build(arch: str, encoder: str) -> nn.Module:
        import segmentation_models_pytorch as smp

        torch.manual_seed(0)
        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2)

    # (architecture, encoder): (sites at 224 px, the recipe recipe="auto" picks)
    TARGETS: ClassVar[dict[Any, tuple[Any, ...]]] = {
        ("Unet", "resnet34"): (9, "resnet"),
        ("Unet", "efficientnet-b0"): (21, "efficientnet"),
        ("Unet", "tu-convnext_tiny"): (12, "convnext"),
        ("FPN", "resnext50_32x4d"): (17, "resnet"),
        ("DeepLabV3Plus", "resnet50"): (17, "resnet"),
    }

    @pytest.mark.parametrize(("arch", "encoder"), TARGETS, ids=lambda v: v)
    def test_sites_and_contract(self, arch: str, encoder: str, capfd: pytest.CaptureFixture[str]) -> None:
        sites, recipe = self.TARGETS[(arch, encoder)]
        model = self.build(arch, encoder)
        assert dbi.recipe_for(model).name == recipe
        x = {"x": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
        plan = check_contract(model, x, capfd)  # the default rules, at the default 224 px
        assert len(plan) == sites and _parts(plan, 1) == {"encoder"} and _last_two(plan)
        assert len(dbi.plan(model, recipe="auto")) == sites

    def test_the_decoder_when_asked(self) -> None:
        model = self.build("Unet", "resnet34")
        assert _parts(dbi.plan(model, scope="all"), 1) == {"encoder", "decoder"}
        with pytest.raises(dbi.NoSitesError, match="scope 'segmentation_head'"):
            dbi.plan(model, scope="segmentation_head")

    @pytest.mark.slow
    def test_a_big_encoder(self) -> None:
        plan = dbi.plan(self.build("Unet", "efficientnet-b7"), recipe="auto")
        assert plan.rules.source.endswith("efficientnet.yaml")
        assert len(plan) > 50 and _parts(plan, 1) == {"encoder"} and _last_two(plan)


class TestUltralytics:
    """YOLO detection models built from their yaml: sites in the backbone and the neck's C2f / C3k2 blocks,
    the bottlenecks that the blocks loop over included; the head's prediction branches left out."""

    @pytest.fixture(autouse=True)
    def _ultralytics(self, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))  # its settings file
        pytest.importorskip("ultralytics", reason="the ultralytics extra: pip install -e '.[ultralytics]'")

    @staticmethod
    def build(cfg: str) -> nn.Module:
        from ultralytics import YOLO

        torch.manual_seed(0)
        return YOLO(cfg).model

    # cfg: (sites, backbone layers with a site, neck layers with a site, the head's index)
    TARGETS: ClassVar[dict[Any, tuple[Any, ...]]] = {
        "yolov8n.yaml": (28, [5, 6, 7, 8, 9], [12, 16, 18, 19, 21], 22),
        "yolo11n.yaml": (44, [5, 6, 7, 8, 9, 10], [13, 17, 19, 20, 22], 23),
    }

    @pytest.mark.parametrize("cfg", TARGETS)
    def test_sites_and_contract(self, cfg: str, capfd: pytest.CaptureFixture[str]) -> None:
        sites, backbone, neck, head = self.TARGETS[cfg]
        model = self.build(cfg)
        x = {"x": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
        plan = check_contract(model, x, capfd, recipe="auto")
        assert plan.rules.source.endswith("yolo.yaml") and plan.input_size == (3, 640, 640)
        assert len(plan) == sites and _last_two(plan) and [st.stride for st in plan.stages][-2:] == [16, 32]
        layers = sorted({int(s.host.split(".")[1]) for s in plan})
        assert layers == backbone + neck and head not in layers
        looped = {s.host for s in plan if ".m.0." in s.host}  # inside the ModuleList a C2f / C3k2 loops over
        assert {f"model.{neck[-1]}.m.0.cv1.bn", f"model.{neck[-1]}.m.0.cv2.bn"} <= looped

    def test_the_head_is_a_candidate_the_recipe_leaves_out(self) -> None:
        plan = dbi.plan(self.build("yolov8n.yaml"))  # the built-in default rules: the head's branches too
        assert any(s.host.startswith("model.22.cv2.") for s in plan)

    @pytest.mark.slow
    @pytest.mark.parametrize("cfg", ["yolov8x.yaml", "yolo11x.yaml"])
    def test_the_largest(self, cfg: str, capfd: pytest.CaptureFixture[str]) -> None:
        x = {"x": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
        plan = check_contract(self.build(cfg), x, capfd, recipe="auto")
        assert len(plan) > self.TARGETS[cfg.replace("x.", "n.")][0] and _last_two(plan)


class TestTorchvisionDetection:
    def test_fasterrcnn_plans_at_its_transform_size(self) -> None:
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        plan = dbi.plan(model)
        assert plan.input_size == (3, 800, 800) and str(plan).startswith(
            "DropBlock plan for FasterRCNN at input 3x800x800"
        )
        assert [st.stride for st in plan.stages] == [2, 4, 8, 16, 32]
        by_stride = dbi.plan(model, strides=[16, 32])
        assert {s.stride for s in by_stride} == {16, 32} and _parts(by_stride, 3) == {
            "backbone.body.layer3",
            "backbone.body.layer4",
        }
