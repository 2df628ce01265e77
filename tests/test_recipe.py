"""Recipe files: the schema, validation errors, inheritance, auto-selection, timm-compat, and the
schedule section as finetune applies it."""

from __future__ import annotations

import itertools
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace as Namespace

import pytest
import timm
import torchvision
from torch import nn

import dropblock_inject as dbi
from dropblock_inject.finetune import FinetuneConfig, Reporter, finetune
from dropblock_inject.recipe import TOP_KEYS, model_names


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

    @pytest.mark.parametrize(
        ("module", "attributes", "names", "expected"),
        [("transformers.models.convnext.modeling_convnext", {"config": Namespace(model_type="convnextv2")},
          ["hf:convnextv2"], "convnext"),
         ("transformers.models.upernet.modeling_upernet",
          {"config": Namespace(model_type="upernet", backbone_config=Namespace(model_type="resnet"))},
          ["hf:upernet", "hf:resnet"], "resnet"),
         ("transformers.models.mobilenet_v1.modeling_mobilenet_v1", {"config": Namespace(model_type="mobilenet_v1")},
          ["hf:mobilenet_v1"], "mobilenet"),
         ("segmentation_models_pytorch.decoders.unet.model", {"name": "u-efficientnet-b0"},
          ["smp:u-efficientnet-b0"], "efficientnet"),
         ("segmentation_models_pytorch.decoders.fpn.model", {"name": "fpn-tu-convnext_tiny"},
          ["smp:fpn-tu-convnext_tiny"], "convnext"),
         ("my_models", {"name": "u-resnet34", "config": Namespace(model_type="resnet")}, [], "default")],
    )  # fmt: skip
    def test_auto_by_hf_model_type_and_smp_encoder(self, module, attributes, names, expected) -> None:
        model = type("Model", (nn.Module,), {"__module__": module})()
        for key, value in attributes.items():
            setattr(model, key, value)
        assert model_names(model) == names
        assert dbi.recipe_for(model).name == expected

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


class TestBasesAndUnreadableFiles:
    def test_a_recipe_that_extends_itself(self, tmp_path) -> None:
        (tmp_path / "abs").mkdir()
        by_name = write(tmp_path, "base: self.yaml\n", "self.yaml")
        by_path = write(tmp_path, f"base: {tmp_path / 'abs' / 'self.yaml'}\n", "abs/self.yaml")
        for path in (by_name, by_path):
            with pytest.raises(dbi.RecipeError, match=rf"{path}: a recipe cannot extend itself"):
                dbi.load_recipe(path)

    @pytest.mark.parametrize(
        "chain",
        [["a", "b", "a"], ["a", "b", "c", "a"], ["top", "a", "b", "a"]],
        ids=["two", "three", "below-the-root"],
    )
    def test_base_cycles_are_errors_not_endless_recursion(self, tmp_path, chain) -> None:
        for name, base in itertools.pairwise(chain):
            write(tmp_path, f"base: {tmp_path / base}.yaml\ndrop_prob: 0.2\n", f"{name}.yaml")
        with pytest.raises(dbi.RecipeError, match=r"\.yaml: 'base' recipes form a cycle"):
            dbi.load_recipe(tmp_path / f"{chain[0]}.yaml")

    def test_a_cycle_through_relative_and_absolute_spellings_is_found(self, tmp_path) -> None:
        (tmp_path / "sub").mkdir()
        write(tmp_path, "base: sub/b.yaml\n", "a.yaml")
        write(tmp_path, "base: ../a.yaml\n", "sub/b.yaml")
        with pytest.raises(dbi.RecipeError, match=r"\.yaml: 'base' recipes form a cycle"):
            dbi.load_recipe(tmp_path / "a.yaml")

    def test_a_chain_of_bases_is_inherited_nearest_first(self, tmp_path) -> None:
        write(tmp_path, "drop_prob: 0.3\nstages: 1\nblock_size: 3\n", "c.yaml")
        write(tmp_path, f"base: {tmp_path / 'c.yaml'}\nkeep_prob: 0.8\nblock_size: 5\n", "b.yaml")
        recipe = dbi.load_recipe(write(tmp_path, "base: b.yaml\nblock_size: 7\n", "a.yaml"))
        assert recipe.rules.drop_prob == pytest.approx(0.2)  # b's keep_prob replaces c's drop_prob
        assert (recipe.rules.stages, recipe.rules.block_size) == (1, 7)

    def test_relative_bases_are_found_next_to_the_file_that_names_them(self, tmp_path) -> None:
        (tmp_path / "family").mkdir()
        write(tmp_path, "drop_prob: 0.3\n", "family/root.yaml")
        write(tmp_path, "base: root.yaml\nstages: 1\n", "family/mid.yaml")
        recipe = dbi.load_recipe(write(tmp_path, "base: family/mid.yaml\n", "leaf.yaml"))
        assert (recipe.rules.drop_prob, recipe.rules.stages) == (0.3, 1)

    @pytest.mark.parametrize(
        ("text", "message"),
        [("drop_prob: 0.1\n\tstages: 2\n", "not valid YAML"), ("stages: [1, 2\n", "not valid YAML")],
    )
    def test_invalid_yaml_through_plan(self, tmp_path, text, message) -> None:
        path = write(tmp_path, text, "broken.yaml")
        with pytest.raises(dbi.RecipeError, match=rf"broken\.yaml: {message}"):
            dbi.plan(torchvision.models.resnet18(), recipe=path)

    def test_a_folder_a_missing_path_and_a_missing_base(self, tmp_path) -> None:
        (tmp_path / "folder.yaml").mkdir()
        for path in (tmp_path / "folder.yaml", tmp_path):
            with pytest.raises(dbi.RecipeError, match=rf"recipe file '{path}' is a folder: give a YAML file in it"):
                dbi.load_recipe(path)
        with pytest.raises(dbi.RecipeError, match=rf"recipe file '{tmp_path / 'missing.yaml'}' does not exist"):
            dbi.load_recipe(tmp_path / "missing.yaml")
        with pytest.raises(dbi.RecipeError, match=rf"recipe file '{tmp_path / 'gone.yaml'}' does not exist"):
            dbi.load_recipe(write(tmp_path, f"base: {tmp_path / 'gone.yaml'}\n", "child.yaml"))
        with pytest.raises(dbi.RecipeError, match="unknown recipe 'no_such_family'"):
            dbi.load_recipe(write(tmp_path, "base: no_such_family\n", "child2.yaml"))

    def test_a_file_that_is_not_utf8(self, tmp_path) -> None:
        path = tmp_path / "latin1.yaml"
        path.write_bytes("# r\xe9glages\ndrop_prob: 0.1\n".encode("latin-1"))
        with pytest.raises(dbi.RecipeError, match=r"latin1\.yaml: not UTF-8 text \(byte 3\): save the file as UTF-8"):
            dbi.load_recipe(path)

    def test_a_file_edited_between_loads_is_read_again(self, tmp_path) -> None:
        path = write(tmp_path, "drop_prob: 0.1\n")
        base = write(tmp_path, "stages: 1\n", "base.yaml")
        child = write(tmp_path, "base: base.yaml\n", "child.yaml")
        assert dbi.load_recipe(path).rules.drop_prob == 0.1
        assert dbi.load_recipe(child).rules.stages == 1
        for edited, text in ((path, "drop_prob: 0.25\n"), (base, "stages: 2\n")):
            edited.write_text(text)
            stamp = edited.stat().st_mtime_ns + 10**9  # a later time, whatever the file system's resolution
            os.utime(edited, ns=(stamp, stamp))
        assert dbi.load_recipe(path).rules.drop_prob == 0.25
        assert dbi.load_recipe(child).rules.stages == 2  # an edited base is seen through the file naming it

    def test_a_loaded_recipe_is_the_callers_own(self, tmp_path) -> None:
        path = write(tmp_path, "overrides:\n  'layer4.*': {drop_prob: 0.2}\n")
        first = dbi.load_recipe(path)
        first.rules.overrides["layer4.*"]["drop_prob"] = 0.9
        first.rules.include.append("layer3.*")
        second = dbi.load_recipe(path)
        assert second.rules.overrides == {"layer4.*": {"drop_prob": 0.2}} and second.rules.include == []


class RateProbe(Reporter):
    """Records, at each training forward of the DropBlocks, their schedule factor (the progress)."""

    def __init__(self) -> None:
        self.factors: list[list[float]] = []

    def message(self, text: str) -> None:
        pass

    def on_model(self, run: str, model: nn.Module) -> None:
        blocks = [m for m in model.modules() if isinstance(m, dbi.DropBlock)]
        assert blocks

        def record(module: nn.Module, args: object) -> None:
            if module is blocks[0] and module.training:
                self.factors.append([m.factor_value for m in blocks])

        for m in blocks:
            m.register_forward_pre_hook(record)


class TestScheduleSection:
    """A recipe's ``schedule:`` drives the DropBlock schedule of ``finetune`` (the command's loop)."""

    @pytest.mark.parametrize(
        ("schedule", "progress"),
        [
            (None, [0.0, 0.25, 0.5, 0.75]),  # no recipe: the paper's linear ramp over the run's 4 steps
            ("", [0.0, 0.25, 0.5, 0.75]),  # a recipe without the section: the same
            ("auto", [0.0, 0.25, 0.5, 0.75]),  # the shipped default recipe's: linear, no warm-up
            ("schedule: {kind: constant}", [1.0] * 4),
            ("schedule: {kind: linear, warmup_fraction: 0.5}", [0.0, 0.0, 0.0, 0.5]),
            ("schedule: {kind: cosine, warmup_fraction: 0.25}", [0.0, 0.0, 0.25, 0.75]),  # 2 of 3 steps: 3/4
        ],
    )
    def test_finetune_ramps_as_the_recipe_says(self, tmp_path, schedule, progress) -> None:
        recipe = schedule if schedule in (None, "auto") else str(write(tmp_path, f"drop_prob: 0.2\n{schedule}\n"))
        probe = RateProbe()
        config = FinetuneConfig(model="test_finetune:tiny_net", input_size=16, epochs=2, batch_size=32,
                                limit_train_batches=2, limit_val_batches=1, recipe=recipe)  # fmt: skip
        finetune(config, probe)
        assert len(probe.factors) == 4  # one training forward per step
        for step, (factors, expected) in enumerate(zip(probe.factors, progress)):
            assert factors == pytest.approx([expected] * len(factors)), step
