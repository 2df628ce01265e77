"""plan / inject / strip on toy modules, one per failure class of DESIGN.md §6, and the contract
that must hold after every rewrite."""

from __future__ import annotations

import copy
import io
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import dropblock_inject as dbi
from dropblock_inject.pipeline.rewrite import injected_modules


class Block(nn.Module):
    """conv -> bn -> relu twice, with a residual add (the second conv goes to the add)."""

    def __init__(self, c: int, norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)
        self.relu = nn.ReLU(inplace=True)
        self.stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class Net(nn.Module):
    def __init__(self, norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), norm(8), nn.ReLU())
        self.stage1 = nn.Sequential(Block(8, norm), nn.Conv2d(8, 16, 3, stride=2, padding=1))
        self.stage2 = nn.Sequential(Block(16, norm), Block(16, norm), nn.Conv2d(16, 32, 3, stride=2, padding=1))
        self.stage3 = nn.Sequential(Block(32, norm), Block(32, norm))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def run(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(x)


class TestPlan:
    def test_default_rules_pick_the_last_two_stages(self) -> None:
        p = dbi.plan(Net(), input_size=(3, 64, 64))
        assert [st.feature for st in p.stages] == [(32, 32), (16, 16), (8, 8)]
        assert {s.stage for s in p} == {1, 2}
        assert all(s.status == "new" for s in p)
        second_last = [s for s in p if s.stage == 1]
        assert {s.gamma_scale for s in second_last} == {0.25}
        text = str(p)
        assert "stages (feature, dilation" in text and "stage2.0.bn1" in text

    def test_sites_are_conv_norm_act_chains_only(self) -> None:
        p = dbi.plan(Net(), input_size=(3, 64, 64), stages=3)
        assert all(s.norm.endswith("bn1") or s.norm.startswith("stem") for s in p)
        # conv2 -> bn2 -> add -> relu is a site only when asked for (the TF reference does it)
        residual = dbi.plan(Net(), input_size=(3, 64, 64), stages=3, residual_branch=True)
        assert {s.role for s in residual} == {"main", "branch"}
        assert {s.norm for s in residual if s.role == "branch"} >= {"stage3.1.bn2", "stage1.0.bn2"}

    def test_projection_shortcut_role(self) -> None:
        import torchvision

        p = dbi.plan(torchvision.models.resnet50(), residual_branch=True, shortcut=True)
        roles = {s.conv: s.role for s in p}
        assert roles["layer4.0.downsample.0"] == "shortcut"
        assert roles["layer4.0.conv3"] == "branch"
        assert roles["layer4.0.conv2"] == "main"

    def test_overrides_follow_the_precedence(self) -> None:
        p = dbi.plan(
            Net(),
            input_size=(3, 64, 64),
            drop_prob=0.2,
            stage_block_size={-1: 5},
            overrides={"stage3.*": {"block_size": 3}, "stage3.1.bn1": {"drop_prob": 0.3}},
            exclude=["stage2.1.*"],
        )
        by_norm = {s.norm: s for s in p}
        assert "stage2.1.bn1" not in by_norm  # exclusion wins
        assert by_norm["stage3.0.bn1"].block_size == (3, 3)  # pattern beats stage
        assert by_norm["stage3.1.bn1"].drop_prob == 0.3  # exact beats pattern
        assert by_norm["stage2.0.bn1"].drop_prob == 0.2  # global

    def test_block_fraction_is_the_global_block_and_stage_and_pattern_sizes_beat_it(self) -> None:
        p = dbi.plan(Net(), input_size=(3, 64, 64), stages=3, block_fraction=0.5,
                     stage_block_size={-2: 1}, overrides={"stage3.1.*": {"block_size": (3, 1)}})  # fmt: skip
        assert {s.host: s.block_size for s in p} == {
            "stem.1": (17, 17), "stage1.0.bn1": (17, 17),  # global: the odd side nearest half of 32
            "stage2.0.bn1": (1, 1), "stage2.1.bn1": (1, 1),  # stage beats the fraction
            "stage3.0.bn1": (5, 5),  # global again: the odd side nearest half of 8
            "stage3.1.bn1": (3, 1),  # pattern beats the fraction
        }  # fmt: skip

    def test_stage_indices_and_include(self) -> None:
        p = dbi.plan(Net(), input_size=(3, 64, 64), stages=[0], include=["stage3.1.*"])
        assert {s.norm for s in p} == {"stem.1", "stage1.0.bn1", "stage3.1.bn1"}
        with pytest.raises(dbi.RecipeError, match="stage 9 does not exist"):
            dbi.plan(Net(), input_size=(3, 64, 64), stages=[9])

    def test_meta_device_model(self) -> None:
        with torch.device("meta"):
            model = torchvision.models.resnet18()
        p = dbi.plan(model)
        assert len(p) == 4

    def test_plan_does_not_touch_the_model(self) -> None:
        model = Net()
        before = copy.deepcopy(model.state_dict())
        dbi.plan(model)
        assert not injected_modules(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class EncoderDecoder(nn.Module):
    """An encoder (a ``Net`` body: 32, 16, 8 px at 64 px) and a decoder that upsamples back to 16 and 32 px,
    with a head that has no site; the encoder's children are named as in segmentation_models_pytorch."""

    def __init__(self, encoder_name: str = "encoder") -> None:
        super().__init__()
        net = Net()
        self.add_module(encoder_name, nn.Sequential(net.stem, net.stage1, net.stage2, net.stage3))
        self.encoder_name = encoder_name
        self.decoder = nn.Sequential(nn.Upsample(scale_factor=2), Block(32), nn.Upsample(scale_factor=2), Block(32))
        self.head = nn.Conv2d(32, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(getattr(self, self.encoder_name)(x)))


class TestScope:
    def test_auto_takes_the_encoder_and_numbers_its_stages(self) -> None:
        p = dbi.plan(EncoderDecoder(), input_size=(3, 64, 64))
        assert {s.host.split(".")[0] for s in p} == {"encoder"}
        assert [st.feature for st in p.stages] == [(32, 32), (16, 16), (8, 8)]  # the decoder's maps are not stages
        assert {s.stage for s in p} == {1, 2}
        whole = dbi.plan(EncoderDecoder(), input_size=(3, 64, 64), scope="all")
        assert {s.host.split(".")[0] for s in whole} == {"encoder", "decoder"}

    def test_backbone_comes_first_and_a_path_scopes_to_that_part(self) -> None:
        assert {s.host.split(".")[0] for s in dbi.plan(EncoderDecoder("backbone"), input_size=(3, 64, 64))} == {
            "backbone"
        }
        p = dbi.plan(EncoderDecoder(), input_size=(3, 64, 64), scope="decoder")
        assert {s.host.split(".")[0] for s in p} == {"decoder"}
        assert [st.feature for st in p.stages] == [(16, 16), (32, 32)]

    def test_a_scope_that_matches_no_module_or_holds_no_site_is_named(self) -> None:
        with pytest.raises(dbi.DropBlockInjectError, match=r"scope 'encodr' is not a submodule .*encoder, decoder"):
            dbi.plan(EncoderDecoder(), input_size=(3, 64, 64), scope="encodr")
        with pytest.raises(dbi.NoSitesError, match=r"scope 'head' of EncoderDecoder holds none of its \d+ candidate"):
            dbi.plan(EncoderDecoder(), input_size=(3, 64, 64), scope="head")
        model = EncoderDecoder()
        model.encoder = nn.Sequential(nn.Conv2d(3, 32, 3, stride=8, padding=1))  # no site in the encoder
        with pytest.raises(dbi.NoSitesError, match=r"scope 'encoder' .*\(they lie in \['decoder'\]\)"):
            dbi.inject(model, input_size=(3, 64, 64))
        assert not injected_modules(model)


class KeywordNet(Net):
    """A forward that takes its image by keyword only, behind ``**kwargs`` (as HF models are called)."""

    def forward(self, *, pixel_values: torch.Tensor, **kwargs: object) -> torch.Tensor:  # type: ignore[override]
        return super().forward(pixel_values)


class TestInputs:
    def test_keyword_inputs_as_a_dict_or_example_kwargs(self) -> None:
        x = torch.randn(2, 3, 48, 48)
        for p in (dbi.plan(KeywordNet(), example_inputs={"pixel_values": x}),
                  dbi.plan(KeywordNet(), example_kwargs={"pixel_values": x})):  # fmt: skip
            assert p.input_size == (3, 48, 48) and str(p).startswith("DropBlock plan for KeywordNet at input 3x48x48")
            assert [st.feature for st in p.stages] == [(24, 24), (12, 12), (6, 6)]
        with pytest.raises(TypeError, match="not both"):
            dbi.plan(KeywordNet(), example_inputs={"pixel_values": x}, example_kwargs={"pixel_values": x})
        with pytest.raises(TypeError, match=r"keyword inputs must be a dict keyed by parameter names, got \[0\]"):
            dbi.plan(KeywordNet(), example_kwargs={0: x})

    @pytest.mark.parametrize(
        ("attribute", "value", "size"),
        [("config", SimpleNamespace(image_size=48), (3, 48, 48)),  # HF
         ("config", SimpleNamespace(image_size=[48, 40]), (3, 48, 40)),
         ("transform", SimpleNamespace(min_size=(32, 40)), (3, 40, 40)),  # torchvision detection: the eval size
         ("args", {"imgsz": 96}, (3, 96, 96)),  # ultralytics
         ("pretrained_cfg", {"input_size": (3, 56, 56)}, (3, 56, 56))],  # timm
    )  # fmt: skip
    def test_the_default_size_is_the_one_the_model_states(self, attribute: str, value: object, size: tuple) -> None:
        model = Net()
        setattr(model, attribute, value)
        p = dbi.plan(model)
        assert p.input_size == size
        assert p.stages[0].feature == (size[1] // 2, size[2] // 2)
        assert f"at input {'x'.join(map(str, size))} " in str(p)


class TestInject:
    def test_contract_after_inject(self) -> None:
        model = Net()
        params = list(model.parameters())
        keys = list(model.state_dict())
        x = torch.randn(2, 3, 64, 64)
        ref = run(model, x, train=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = dbi.inject(model, input_size=(3, 64, 64))
        assert out is model and type(model) is Net
        assert isinstance(model.stage3[0], Block) and model.stage3[0].stride == 1
        assert list(model.parameters()) == params and all(a is b for a, b in zip(model.parameters(), params))
        assert list(model.state_dict()) == keys
        assert torch.equal(run(model, x, train=False), ref)  # eval: bit-identical
        model.train()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()  # an optimizer built before injection still trains the model
        assert all(p.grad is not None for p in params)

    def test_zero_rate_in_train_equals_unpatched_train(self) -> None:
        model = Net()
        patched = dbi.inject(copy.deepcopy(model), input_size=(3, 64, 64), drop_prob=0.0)
        x = torch.randn(4, 3, 64, 64)
        assert torch.equal(run(patched, x, train=True), run(model, x, train=True))

    def test_dropblock_changes_training_output(self) -> None:
        model = dbi.inject(Net(), input_size=(3, 64, 64), drop_prob=0.5, block_size=3)
        x = torch.randn(4, 3, 64, 64)
        assert not torch.equal(run(model, x, train=True), run(model, x, train=True))

    def test_inject_twice_and_strip_inject_are_idempotent(self) -> None:
        model = Net()
        dbi.inject(model, input_size=(3, 64, 64))
        hosts = sorted(s.host for s in dbi.plan(model, input_size=(3, 64, 64)))
        n = len(injected_modules(model))
        dbi.inject(model, input_size=(3, 64, 64))
        assert len(injected_modules(model)) == n
        assert {s.status for s in dbi.plan(model, input_size=(3, 64, 64))} == {"patched"}
        dbi.strip(model)
        assert not any(isinstance(m, dbi.DropBlock) for m in model.modules())
        assert not any(m._forward_hooks for m in model.modules())
        dbi.inject(model, input_size=(3, 64, 64))
        assert sorted(s.host for s in dbi.plan(model, input_size=(3, 64, 64))) == hosts

    def test_frozen_batchnorm_is_a_norm(self) -> None:
        p = dbi.plan(Net(norm=FrozenBatchNorm2d), input_size=(3, 64, 64))
        assert len(p) > 0 and all(s.norm for s in p)

    def test_group_norm(self) -> None:
        p = dbi.plan(Net(norm=lambda c: nn.GroupNorm(4, c)), input_size=(3, 64, 64))
        assert len(p) > 0

    def test_block_larger_than_the_map(self) -> None:
        model = dbi.inject(Net(), input_size=(3, 32, 32), block_size=9)
        out = run(model, torch.randn(2, 3, 32, 32), train=True)
        assert torch.isfinite(out).all()

    def test_schedule_finds_injected_modules(self) -> None:
        model = dbi.inject(Net(), input_size=(3, 64, 64))
        sched = dbi.DropBlockSchedule(model, total_steps=10)
        assert len(sched.modules) == len(injected_modules(model))

    def test_checkpoint_loads_strict_both_ways(self) -> None:
        patched = dbi.inject(Net(), input_size=(3, 64, 64))
        plain = Net()
        plain.load_state_dict(patched.state_dict(), strict=True)
        patched.load_state_dict(plain.state_dict(), strict=True)

    def test_deepcopy_pickle_and_torch_save_keep_the_dropblocks(self) -> None:
        model = dbi.inject(Net(), input_size=(3, 64, 64), drop_prob=0.5, block_size=3)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)]
        x = torch.randn(2, 3, 64, 64)
        for clone in copies:
            assert len(injected_modules(clone)) == len(injected_modules(model))
            assert not torch.equal(run(clone, x, train=True), run(clone, x, train=True))
            dbi.strip(clone)  # strip works on a copy, and leaves the original patched
            assert not injected_modules(clone) and not any(m._forward_hooks for m in clone.modules())
        assert len(injected_modules(model)) > 0

    def test_half_channels_last_and_autocast(self) -> None:
        model = dbi.inject(Net(), input_size=(3, 64, 64))
        x = torch.randn(2, 3, 64, 64)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last).train()
        cl(x.to(memory_format=torch.channels_last)).sum().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.train()(x).dtype == torch.bfloat16
        half = copy.deepcopy(model).to(torch.bfloat16).train()
        assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16

    def test_inplace_activation_after_the_dropblock(self) -> None:
        model = dbi.inject(Net(), input_size=(3, 64, 64), drop_prob=0.3, block_size=3)
        x = torch.randn(2, 3, 64, 64, requires_grad=True)
        model.train()(x).sum().backward()  # Block.relu is in place
        assert x.grad is not None

    def test_train_only_branch_and_data_dependent_top_level(self) -> None:
        class Weird(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = Net()
                self.aux = nn.Conv2d(3, 3, 1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if x.sum() > 0:  # untraceable: the children are analysed instead
                    x = x * 1.0
                if self.training:
                    x = x + self.aux(x)
                return self.body(x)

        model = Weird()
        x = torch.randn(2, 3, 64, 64)
        ref = run(model, x, train=False)
        dbi.inject(model, input_size=(3, 64, 64))
        assert injected_modules(model)
        assert torch.equal(run(model, x, train=False), ref)
        run(model, x, train=True)


class TestNoSites:
    def test_linear_model(self) -> None:
        with pytest.raises(dbi.NoSitesError, match="no Conv2d"):
            dbi.plan(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), input_size=(3, 2, 2))

    def test_conv_act_norm_is_not_a_site(self) -> None:
        convmixer = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.BatchNorm2d(8))
        with pytest.raises(dbi.NoSitesError, match="act -> norm"):
            dbi.plan(convmixer, input_size=(3, 16, 16))

    def test_pre_activation_is_not_a_site(self) -> None:
        preact = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 8, 3), nn.Flatten())
        with pytest.raises(dbi.NoSitesError) as exc:
            dbi.plan(preact, input_size=(3, 16, 16))
        assert isinstance(exc.value, ValueError) and isinstance(exc.value, dbi.DropBlockInjectError)

    def test_model_is_unchanged_after_an_error(self) -> None:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten())
        with pytest.raises(dbi.NoSitesError):
            dbi.inject(model, input_size=(3, 16, 16))
        assert not any(m._forward_hooks for m in model.modules())


class TestRollback:
    def test_a_failure_midway_leaves_nothing_behind(self, monkeypatch) -> None:
        from dropblock_inject.pipeline import rewrite

        model = Net()
        calls = {"n": 0}
        original = rewrite._insert

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom")
            return original(*args, **kwargs)

        monkeypatch.setattr(rewrite, "_insert", flaky)
        with pytest.raises(RuntimeError, match="boom"):
            dbi.inject(model, input_size=(3, 64, 64))
        assert not injected_modules(model)
        assert not any(m._forward_hooks for m in model.modules())

    def test_bad_arguments(self) -> None:
        with pytest.raises(TypeError, match=r"nn\.Module"):
            dbi.plan("resnet50")
        with pytest.raises(ValueError, match="drop_prob"):
            dbi.plan(Net(), drop_prob=2.0)
        with pytest.raises(dbi.DropBlockInjectError, match="input_size"):
            dbi.plan(Net(), input_size=(64, 64))


class TestStrip:
    @pytest.mark.parametrize("thing", ["resnet50", None, [nn.Conv2d(3, 8, 3)], nn.Conv2d], ids=str)
    def test_strip_takes_a_module(self, thing) -> None:
        with pytest.raises(TypeError, match=rf"strip\(\) takes an nn\.Module, got {type(thing).__name__}"):
            dbi.strip(thing)

    def test_strip_of_an_unpatched_model_leaves_it_alone(self) -> None:
        model = Net()
        own = model.stage3[0].bn1.dropblock = dbi.DropBlock(0.1, 3)  # the user's own, not injected
        modules = [(name, id(m)) for name, m in model.named_modules()]
        assert dbi.strip(model) is model
        assert [(name, id(m)) for name, m in model.named_modules()] == modules
        assert model.stage3[0].bn1.dropblock is own


@pytest.mark.slow
def test_compiled_patched_model_trains_and_evaluates() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = dbi.inject(Net(), input_size=(3, 64, 64), drop_prob=0.3, block_size=3)
    sched = dbi.DropBlockSchedule(model, total_steps=4)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(3):
        compiled(x).sum().backward()
        sched.step()
    assert counter.frame_count == 1
    model.eval()
    assert torch.allclose(compiled(x), model(x))
    _ = F  # keep the import used


@pytest.mark.slow
def test_compiled_patched_model_takes_a_smaller_last_batch() -> None:
    # a new batch size recompiles once with dynamic shapes; the seed draws must trace with a
    # symbolic size (torch.rand with generator=None did not), and later batches reuse that graph
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = dbi.inject(Net(), input_size=(3, 64, 64), drop_prob=0.3, block_size=3)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for batch in (4, 3, 4, 3, 2):
        compiled(torch.randn(batch, 3, 64, 64)).sum().backward()
    assert counter.frame_count == 2


class TestInjectAPlan:
    def test_the_printed_plan_is_what_gets_patched(self) -> None:
        model = Net()
        p = dbi.plan(model, input_size=(3, 64, 64), stages=[-1])
        assert dbi.inject(model, p) is model
        assert sorted(s.host for s in dbi.plan(model, input_size=(3, 64, 64), stages=[-1])) == sorted(
            s.host for s in p
        )
        assert {s.status for s in dbi.plan(model, input_size=(3, 64, 64), stages=[-1])} == {"patched"}

    def test_a_plan_with_overrides_or_for_another_model_is_refused(self) -> None:
        p = dbi.plan(Net(), input_size=(3, 64, 64))
        with pytest.raises(TypeError, match="pass them to plan"):
            dbi.inject(Net(), p, drop_prob=0.3)
        other = torchvision.models.resnet18()
        with pytest.raises(dbi.DropBlockInjectError, match="made for a Net, not for this ResNet"):
            dbi.inject(other, p)
        assert not injected_modules(other)
