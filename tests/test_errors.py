"""The exceptions of ``dropblock_inject.errors``, each raised by a real cause through the public API.

``VerificationError`` (and the rollback it promises), ``TraceError`` (where users meet it), and the
``RecipeError`` of ``Rules`` validation. Recipe files' errors are in ``test_recipe.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
from torch import nn

import dropblock_inject as dbi
from dropblock_inject.pipeline.trace import trace


def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def small_net() -> nn.Sequential:
    """Three stages (32 -> 16 -> 8 -> 4 px at a 32 px input), two conv-bn-relu blocks each."""
    stages = [nn.Sequential(conv_bn_relu(cin, cout, 2), conv_bn_relu(cout, cout, 1))
              for cin, cout in ((3, 8), (8, 16), (16, 32))]  # fmt: skip
    return nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


SIZE = (3, 32, 32)


class TestVerificationError:
    def test_a_host_with_an_attribute_named_dropblock_is_refused_and_the_model_restored(self) -> None:
        model = small_net().eval()
        sites = [s for s in dbi.plan(model, input_size=SIZE) if s.status == "new"]
        assert len(sites) >= 3 and sites[-1].kind == "hook"
        host = model.get_submodule(sites[-1].host)
        host.dropblock = 0.5  # the user's own attribute, not a DropBlock: the last site cannot be hooked
        x = torch.randn(2, *SIZE)
        with torch.no_grad():
            before = model(x)
        modules = [(name, id(m)) for name, m in model.named_modules()]
        keys = list(model.state_dict())
        with pytest.raises(dbi.VerificationError, match=rf"{sites[-1].host} already has an attribute 'dropblock'"):
            dbi.inject(model, input_size=SIZE)
        # the sites before it were patched, then rolled back
        assert [(name, id(m)) for name, m in model.named_modules()] == modules
        assert not any(isinstance(m, dbi.DropBlock) for m in model.modules())
        assert not any(m._forward_hooks for m in model.modules())
        assert list(model.state_dict()) == keys and host.dropblock == 0.5
        with torch.no_grad():
            assert torch.equal(model.eval()(x), before)
        assert isinstance(dbi.VerificationError("x"), RuntimeError)

    def test_a_host_with_another_module_named_dropblock_is_refused(self) -> None:
        model = small_net()
        host = model.get_submodule(dbi.plan(model, input_size=SIZE)[-1].host)
        host.dropblock = nn.Dropout2d(0.1)
        with pytest.raises(dbi.VerificationError, match="already has an attribute 'dropblock'"):
            dbi.inject(model, input_size=SIZE)


class DataDependent(nn.Module):
    """conv -> bn -> relu behind a branch on the input's values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn_relu(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.block(x)
        return self.block(-x)


class FourChannels(nn.Module):
    """Checks its input's channels before any child runs: neither traceable nor runnable at 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 4:
            raise ValueError(f"expected 4 channels, got {x.shape[1]}")
        return self.act(self.bn(self.conv(x)))


class TestTraceError:
    def test_trace_names_the_module_the_cause_and_the_remedy(self) -> None:
        model = nn.Sequential(conv_bn_relu(3, 3, 1), DataDependent())
        with pytest.raises(dbi.TraceError) as exc:
            trace(model[1], path="1")
        message = str(exc.value)
        assert message.startswith("could not trace 1 (DataDependent): TraceError: ")
        assert "control flow" in message and "Pass leaf_modules=[...]" in message
        assert isinstance(exc.value.__cause__, torch.fx.proxy.TraceError)
        assert isinstance(exc.value, RuntimeError) and isinstance(exc.value, dbi.DropBlockInjectError)
        with pytest.raises(dbi.TraceError, match=r"could not trace Sequential \(Sequential\)"):
            trace(model)
        # the remedy the message gives: the module kept opaque, by class or by path
        for leaf in (DataDependent, "1"):
            gm = trace(model, leaf_modules=[leaf])
            assert [n.target for n in gm.graph.nodes if n.op == "call_module"][-1] == "1"

    def test_plan_goes_around_an_untraceable_module_and_names_one_it_cannot_run(self) -> None:
        # plan() never raises TraceError: it runs an untraceable module and analyses its children
        model = nn.Sequential(conv_bn_relu(3, 3, 1), conv_bn_relu(3, 3, 2), DataDependent(), nn.Flatten())
        with pytest.raises(dbi.TraceError):
            trace(model)
        assert [s.host for s in dbi.plan(model, input_size=(3, 16, 16), stages=1)] == ["1.1", "2.block.1"]
        # a module that neither traces nor runs at the given input is named, with what to pass
        model = nn.Sequential(FourChannels())
        with pytest.raises(dbi.NoSitesError, match=r"Could not trace or run \['0'\]: pass example_inputs"):
            dbi.plan(model, input_size=SIZE)


class TestRulesValidation:
    @pytest.mark.parametrize(
        ("rules", "message"),
        [
            ({"drop_prob": 1.5}, "drop_prob must be in [0, 1], got 1.5"),
            ({"drop_prob": -0.1}, "drop_prob must be in [0, 1], got -0.1"),
            ({"drop_prob": math.nan}, "drop_prob must be in [0, 1], got nan"),
            ({"drop_prob": "0.1"}, "drop_prob must be a float in [0, 1], got '0.1'"),
            ({"block_size": 0}, "block_size must be >= 1 in every dimension, got 0"),
            ({"block_size": (3, 0)}, "block_size must be >= 1 in every dimension, got (3, 0)"),
            ({"block_size": 2.5}, "block_size must be an int or a tuple of ints, got 2.5"),
            ({"stage_block_size": {-1: -2}}, "block_size must be >= 1 in every dimension, got -2"),
            ({"stages": 0}, "stages as an int is the number of last stages (>= 1), got 0"),
            ({"stages": True}, "stages as an int is the number of last stages (>= 1), got True"),
            ({"stages": [1, "2"]}, "stages must be an int or a list of ints, got [1, '2']"),
            ({"strides": [16, 0]}, "strides must be positive ints, got [16, 0]"),
            ({"block_fraction": 0.0}, "block_fraction must be in (0, 1], got 0.0"),
            ({"block_fraction": 1.5}, "block_fraction must be in (0, 1], got 1.5"),
            ({"overrides": {"2.*": {"keep_prob": 0.9}}}, "override '2.*' has unknown keys ['keep_prob']"),
            ({"gamma": "exact"}, "gamma must be one of ('paper', 'calibrated'), got 'exact'"),
        ],
    )
    def test_bad_rules_name_the_value(self, rules, message) -> None:
        with pytest.raises(dbi.RecipeError) as exc:
            dbi.Rules(**rules)
        assert str(exc.value).startswith(f"arguments: {message}")  # the source, the key and the value
        # the same check through plan()'s keyword arguments
        with pytest.raises(dbi.RecipeError, match="arguments: "):
            dbi.plan(small_net(), input_size=SIZE, **rules)

    def test_a_recipe_file_is_named_as_the_source(self, tmp_path) -> None:
        path = tmp_path / "mine.yaml"
        path.write_text("block_size: {fraction: 1.5}\n")
        with pytest.raises(dbi.RecipeError, match=r"mine\.yaml: block_fraction must be in \(0, 1\], got 1\.5"):
            dbi.load_recipe(path)

    @pytest.mark.parametrize(
        ("override", "message"),
        [
            ({"drop_prob": 5.0}, "drop_prob must be in [0, 1], got 5.0"),
            ({"block_size": 0}, "block_size must be >= 1 in every dimension, got 0"),
            ({"gamma_scale": -1.0}, "gamma_scale must be a non-negative number, got -1.0"),
        ],
        ids=["p", "block", "scale"],
    )
    def test_bad_override_values_name_the_pattern(self, override, message) -> None:
        with pytest.raises(dbi.RecipeError) as exc:
            dbi.plan(small_net(), dbi.Rules(overrides={"2.*": override}), input_size=SIZE)
        assert str(exc.value) == f"arguments: override '2.*': {message}"

    def test_a_bad_stage_gamma_scale_names_the_stage(self) -> None:
        with pytest.raises(dbi.RecipeError, match=r"^arguments: stage -2: gamma_scale must be a non-negative"):
            dbi.Rules(stage_gamma_scale={-2: -0.25})

    def test_a_bad_override_in_a_recipe_file_names_the_file_and_the_pattern(self, tmp_path) -> None:
        path = tmp_path / "mine.yaml"
        path.write_text("overrides:\n  'layer4.*': {drop_prob: 5.0}\n")
        with pytest.raises(dbi.RecipeError) as exc:
            dbi.load_recipe(path)
        assert str(exc.value) == f"{path}: override 'layer4.*': drop_prob must be in [0, 1], got 5.0"
