"""Recipe files: the schema, validation errors, inheritance, auto-selection and timm-compat."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import timm
import torchvision

import dropblock_inject as dbi
from dropblock_inject.recipe import TOP_KEYS


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


class TestShippedRecipes:
    def test_every_shipped_recipe_loads_and_documents_its_reference(self) -> None:
        names = dbi.list_recipes()
        assert len(names) >= 22
        for name in names:
            recipe = dbi.load_recipe(name)
            assert recipe.description, f"{name} has no header comment"
            assert recipe.rules.source.endswith(f"{name}.yaml")

    def test_required_families_have_a_recipe(self) -> None:
        required = ["resnet", "resnet-d", "regnet", "efficientnet", "mobilenet", "mnasnet", "densenet", "vgg", "dla",
                    "hrnet", "cspnet", "dpn", "res2net", "resnest", "convnext", "nfnet", "repvgg", "ghostnet",
                    "rexnet", "inception", "detection", "segmentation", "video", "timm-compat", "default"]  # fmt: skip
        assert set(required) <= set(dbi.list_recipes())

    def test_list_recipes_pattern(self) -> None:
        assert dbi.list_recipes("resnet*") == ["resnet", "resnet-d", "resnet-tf"]

    @pytest.mark.parametrize(
        ("builder", "expected"),
        [
            (lambda: timm.create_model("resnet50"), "resnet"),
            (lambda: timm.create_model("resnet26d"), "resnet-d"),
            (lambda: timm.create_model("resnest14d"), "resnest"),
            (lambda: timm.create_model("tf_efficientnet_b0"), "efficientnet"),
            (lambda: timm.create_model("repvgg_a0"), "repvgg"),
            (lambda: torchvision.models.resnet18(), "resnet"),
            (lambda: torchvision.models.mobilenet_v3_small(), "mobilenet"),
            (lambda: torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None), "segmentation"),
            (lambda: torchvision.models.video.r3d_18(), "video"),
            (lambda: torchvision.models.squeezenet1_0(), "default"),
        ],
    )
    def test_auto_picks_the_family_recipe(self, builder, expected) -> None:
        assert dbi.recipe_for(builder()).name == expected

    def test_auto_by_cli_name(self) -> None:
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        assert dbi.recipe_for(model, "tv:fasterrcnn_resnet50_fpn").name == "detection"

    def test_repvgg_recipe_patches_residual_branches(self) -> None:
        p = dbi.plan(timm.create_model("repvgg_a0"), recipe="auto")
        assert len(p) > 0 and {s.role for s in p} == {"branch"}
        with pytest.raises(dbi.NoSitesError, match="residual_branch"):
            dbi.plan(timm.create_model("repvgg_a0"))

    def test_resnet_tf_adds_bn3_and_shortcut(self) -> None:
        p = dbi.plan(torchvision.models.resnet50(), recipe="resnet-tf")
        assert {s.role for s in p} == {"main", "branch", "shortcut"}
        assert "layer4.0.downsample.1" in {s.host for s in p}

    def test_timm_compat_reproduces_timms_placement(self) -> None:
        reference = timm.create_model("resnet50", drop_block_rate=0.1)
        timm_sites = {
            name: (m.block_size, m.gamma_scale)
            for name, m in reference.named_modules()
            if type(m).__name__ == "DropBlock2d"
        }
        p = dbi.plan(timm.create_model("resnet50"), recipe="timm-compat")
        ours = {s.host: (s.block_size[0], s.gamma_scale) for s in p}
        assert ours == timm_sites
        assert len(ours) == 9


class TestUserRecipes:
    def test_keep_prob_base_and_overrides(self, tmp_path) -> None:
        path = write(
            tmp_path,
            """
            # my recipe
            base: resnet
            keep_prob: 0.8
            stages: {strides: [32]}
            block_size: {size: 5, per_stage: {-1: 3}}
            overrides:
              "layer4.2.*": {drop_prob: 0.3}
            schedule: {kind: cosine, warmup_fraction: 0.1}
            """,
        )
        recipe = dbi.load_recipe(path)
        assert recipe.rules.drop_prob == pytest.approx(0.2)
        assert recipe.schedule == {"kind": "cosine", "warmup_fraction": 0.1}
        assert recipe.description == "my recipe"
        p = dbi.plan(torchvision.models.resnet50(), recipe=path)
        assert {s.stride for s in p} == {32}
        assert {s.block_size for s in p} == {(3, 3)}
        assert {s.drop_prob for s in p if s.host.startswith("layer4.2.")} == {0.3}

    def test_block_fraction(self, tmp_path) -> None:
        path = write(tmp_path, "block_size: {fraction: 0.5}\n")
        p = dbi.plan(torchvision.models.resnet50(), recipe=path)
        assert {s.feature: s.block_size for s in p} == {(14, 14): (7, 7), (7, 7): (3, 3)}

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("drop_probability: 0.1\n", "unknown key"),
            ("drop_prob: high\n", "'drop_prob' must be a number"),
            ("drop_prob: 0.1\nkeep_prob: 0.9\n", "not both"),
            ("stages: {last: 2}\n", "allowed: indices, strides, modules"),
            ("block_size: 0\n", "block_size"),
            ("include: layer3\n", "must be a list of strings"),
            ("schedule: {kind: step}\n", "schedule.kind"),
            ("gamma: exact\n", "gamma"),
            ("base: nonexistent\n", "unknown recipe"),
            ("- a\n- b\n", "a mapping"),
            ("key: [unclosed\n", "not valid YAML"),
        ],
    )
    def test_errors_name_the_file_and_the_key(self, tmp_path, text, message) -> None:
        path = write(tmp_path, text)
        with pytest.raises(dbi.RecipeError, match=message) as exc:
            dbi.load_recipe(path)
        assert "r.yaml" in str(exc.value) or "unknown recipe" in str(exc.value)

    def test_pattern_that_matches_nothing(self, tmp_path) -> None:
        path = write(tmp_path, 'exclude: ["layer9.*"]\n')
        with pytest.raises(dbi.RecipeError, match=r"exclude pattern 'layer9\.\*' matches no site"):
            dbi.plan(torchvision.models.resnet18(), recipe=path)

    def test_stage_that_does_not_exist(self, tmp_path) -> None:
        path = write(tmp_path, "stages: [12]\n")
        with pytest.raises(dbi.RecipeError, match="stage 12 does not exist"):
            dbi.plan(torchvision.models.resnet18(), recipe=path)

    def test_rules_that_select_nothing(self, tmp_path) -> None:
        path = write(tmp_path, 'stages: [0]\nexclude: ["conv1", "bn1"]\n')
        with pytest.raises(dbi.NoSitesError, match="select none"):
            dbi.plan(torchvision.models.resnet18(), recipe=path)

    def test_missing_file_and_unknown_name(self) -> None:
        with pytest.raises(dbi.RecipeError, match="does not exist"):
            dbi.load_recipe("missing.yaml")
        with pytest.raises(dbi.RecipeError, match="shipped recipes"):
            dbi.load_recipe("resnett")

    def test_schema_keys_are_documented(self) -> None:
        readme = (Path(__file__).parents[1] / "recipes" / "README.md").read_text()
        assert all(key in readme for key in TOP_KEYS)
