"""Patched models at run time: what backward keeps, memory, autocast, channels_last, strip, compile.

Speed is measured by ``dropblock-inject bench step`` (ratios, medians, an A/A baseline), never
asserted here; memory is deterministic, so its ratio is.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import timm
import torch
import torchvision
from torch import nn

import dropblock_inject as dbi
from dropblock_inject.bench import step_memory
from dropblock_inject.models import create_model
from dropblock_inject.pipeline.rewrite import injected_modules

# (name, input size, batch): a timm and a torchvision ResNet, EfficientNet, a detection backbone, 3-D
MODELS = [
    ("resnet50", (3, 96, 96), 4),
    ("tv:resnet50", (3, 96, 96), 4),
    ("efficientnet_b0", (3, 96, 96), 4),
    ("tv:fasterrcnn_resnet50_fpn.backbone", (3, 128, 128), 2),
    ("tv:r3d_18", (3, 4, 48, 48), 1),
]


def build(name: str, input_size: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """An unpatched model and a patched copy with the same weights (DropBlocks at full rate)."""
    base = create_model(name)
    return base, dbi.inject(copy.deepcopy(base), input_size=input_size, drop_prob=0.1)


def train_step(model: nn.Module, x: torch.Tensor):
    def step() -> torch.Tensor:
        model.train().zero_grad(set_to_none=True)
        out = model(x)
        parts = out.values() if isinstance(out, dict) else [out]
        loss = sum(p.float().square().mean() for p in parts)
        loss.backward()
        return loss

    return step


class Call(NamedTuple):
    input: torch.Tensor  # a copy taken before the call: injected DropBlocks work in place
    output: torch.Tensor
    grad_fn: object
    identity: bool  # the module returned its input unchanged (the very object, values untouched)
    module: dbi.DropBlock


def record_dropblocks(model: nn.Module) -> list[Call]:
    """Every call of an injected DropBlock on the following forwards."""
    seen: list[Call] = []
    before: list[tuple[torch.Tensor, int]] = []

    def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        before.append((args[0].detach().clone(), args[0]._version))

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inp, version = before.pop()
        identity = out is args[0] and out._version == version
        seen.append(Call(inp, out.detach().clone(), out.grad_fn, identity, module))

    for m in injected_modules(model):
        m.register_forward_pre_hook(pre_hook)
        m.register_forward_hook(hook)
    return seen


class TestInPlaceSites:
    @pytest.mark.parametrize(("name", "input_size", "batch"), MODELS[:3] + MODELS[4:])  # slot, hook, fused, 3-D
    def test_in_place_sites_give_the_out_of_place_loss_and_gradients(self, name, input_size, batch) -> None:
        _, patched = build(name, input_size)
        modules = injected_modules(patched)
        assert modules and all(m.inplace for m in modules)
        x = torch.randn(batch, *input_size)
        results = []
        for inplace in (True, False):
            for m in modules:
                m.inplace = inplace
            torch.manual_seed(5)
            loss = train_step(patched, x)()
            results.append((loss.item(), [p.grad.clone() for p in patched.parameters() if p.grad is not None]))
        (loss_in, grads_in), (loss_out, grads_out) = results
        assert loss_in == loss_out and len(grads_in) == len(grads_out)
        assert all(torch.equal(a, b) for a, b in zip(grads_in, grads_out))


class TestBackwardKeepsNoFloatTensor:
    def test_each_dropblock_node_saves_seeds_or_a_byte_mask(self) -> None:
        _, model = build("resnet50", (3, 96, 96))
        seen = record_dropblocks(model)
        model.train()(torch.randn(2, 3, 96, 96))
        assert seen
        for call in seen:
            saved = call.grad_fn.saved_tensors
            assert len(saved) == 1 and saved[0].dtype in (torch.int64, torch.bool)
            per_unit = saved[0].numel() * saved[0].element_size() / call.input.numel()
            assert per_unit <= 1.0

    @pytest.mark.slow
    @pytest.mark.parametrize(("name", "input_size", "batch"), MODELS, ids=[m[0] for m in MODELS])
    def test_training_step_memory_ratio(self, name, input_size, batch) -> None:
        base, patched = build(name, input_size)
        x = torch.randn(batch, *input_size)
        peak_base, saved_base = step_memory(train_step(base, x))
        peak_patched, saved_patched = step_memory(train_step(patched, x))
        assert saved_patched / saved_base <= 1.03
        if peak_base is not None:  # the profiler's timeline (a private API) may be unavailable
            assert peak_patched / peak_base <= 1.03


class TestAutocastAndChannelsLast:
    @pytest.mark.parametrize(("name", "input_size", "batch"), MODELS, ids=[m[0] for m in MODELS])
    def test_dtype_and_memory_format_match_the_unpatched_model(self, name, input_size, batch) -> None:
        base, patched = build(name, input_size)
        fmt = torch.channels_last_3d if len(input_size) == 4 else torch.channels_last
        x = torch.randn(batch, *input_size).to(memory_format=fmt)
        base, patched = base.to(memory_format=fmt), patched.to(memory_format=fmt)
        seen = record_dropblocks(patched)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref, out = base.train()(x), patched.train()(x)
        for a, b in zip(_tensors(ref), _tensors(out)):
            assert a.dtype == b.dtype and a.shape == b.shape
            if a.dim() == x.dim():
                assert a.is_contiguous(memory_format=fmt) == b.is_contiguous(memory_format=fmt)
        assert seen
        for inp, res, *_ in seen:  # every site keeps its input's dtype and layout
            assert res.dtype == inp.dtype
            assert res.is_contiguous(memory_format=fmt) == inp.is_contiguous(memory_format=fmt)
        sum(t.float().sum() for t in _tensors(out)).backward()
        assert all(p.grad is not None for p in patched.parameters() if p.requires_grad)

    def test_bf16_masks_are_whole_blocks_at_the_rate_and_rescaled_once(self) -> None:
        model = timm.create_model("resnet18")
        model = dbi.inject(model, input_size=(3, 224, 224), drop_prob=0.2, block_size=3, gamma="calibrated")
        seen = record_dropblocks(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.train()(torch.randn(8, 3, 224, 224))
        assert seen
        for inp, res, *_, module in seen:
            assert inp.dtype == res.dtype == torch.bfloat16
            dropped = (res == 0) & (inp != 0)
            assert dropped.float().mean().item() == pytest.approx(module.target_rate, abs=0.03)
            kept = inp != 0
            kept &= ~dropped
            ratio = res[kept].float() / inp[kept].float()
            # one float32 factor numel / kept, applied in float32 and rounded once to bf16
            assert ratio.median().item() == pytest.approx(1 / (1 - dropped.float().mean().item()), rel=1e-2)
            assert (ratio - ratio.median()).abs().max().item() < 1.6e-2


class TestEvalAndStrip:
    def test_strip_gives_back_the_very_same_code(self) -> None:
        original = torchvision.models.resnet50()
        patched = dbi.inject(copy.deepcopy(original))
        dbi.strip(patched)
        assert repr(patched) == repr(original)
        assert torch.fx.symbolic_trace(patched).code == torch.fx.symbolic_trace(original).code
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in patched.modules())

    def test_eval_is_the_identity_at_every_site(self) -> None:
        _, model = build("resnet50", (3, 96, 96))
        seen = record_dropblocks(model)
        with torch.no_grad():
            model.eval()(torch.randn(2, 3, 96, 96))
        assert seen and all(call.identity for call in seen)


@pytest.mark.slow
class TestCompile:
    def test_dropblock_adds_no_graph_break(self) -> None:
        base, patched = build("resnet50", (3, 64, 64))
        x = torch.randn(2, 3, 64, 64)
        torch._dynamo.reset()
        ref = torch._dynamo.explain(base.train())(x)
        torch._dynamo.reset()
        got = torch._dynamo.explain(patched.train())(x)
        assert got.graph_break_count == ref.graph_break_count == 0
        assert got.graph_count == ref.graph_count == 1

    def test_schedule_changes_do_not_recompile_a_timm_model(self) -> None:
        from torch._dynamo.testing import CompileCounterWithBackend

        _, patched = build("resnet18", (3, 64, 64))
        schedule = dbi.DropBlockSchedule(patched, total_steps=4, warmup_steps=1)
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(patched, backend=counter)
        x = torch.randn(2, 3, 64, 64)
        for _ in range(4):
            compiled(x).sum().backward()
            schedule.step()
        assert counter.frame_count == 1

    def test_inductor_trains_a_patched_model(self) -> None:
        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        net = nn.Sequential(*stage(3, 16), *stage(16, 32), *stage(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model = dbi.inject(net, input_size=(3, 64, 64), drop_prob=0.3, block_size=3)
        assert injected_modules(model)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        x = torch.randn(4, 3, 64, 64)
        for _ in range(2):
            assert torch.isfinite(train_step(compiled, x)())
        assert all(p.grad is not None for p in model.parameters())
        model.train()
        with torch.no_grad():
            assert not torch.equal(compiled(x), compiled(x))  # fresh masks on every call
        model.eval()
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), atol=1e-4)


def _tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in (out.values() if isinstance(out, dict) else out) if isinstance(t, torch.Tensor)]


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: on a machine with a CUDA GPU, run `bash .ci/gpu-check`",
)
class TestCuda:
    def test_eager_op_rate_and_rescale(self) -> None:
        x = torch.ones(32, 256, 14, 14, device="cuda")
        y = dbi.drop_block(x, 0.1, 7, gamma="calibrated")
        assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.01)
        assert y.mean().item() == pytest.approx(1.0, abs=1e-4)

    def test_compiled_op_rate_and_rescale(self) -> None:
        torch._dynamo.reset()
        m = torch.compile(dbi.DropBlock(0.1, 7, gamma="calibrated").cuda(), fullgraph=True)
        x = torch.ones(32, 256, 14, 14, device="cuda")
        y = m(x)
        assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.01)
        assert y.mean().item() == pytest.approx(1.0, abs=1e-4)

    def test_fp16_autocast_and_channels_last(self) -> None:
        base, patched = build("resnet50", (3, 96, 96))
        x = torch.randn(4, 3, 96, 96, device="cuda").to(memory_format=torch.channels_last)
        base, patched = (m.cuda().to(memory_format=torch.channels_last).train() for m in (base, patched))
        with torch.autocast("cuda", dtype=torch.float16):
            ref, out = base(x), patched(x)
        assert out.dtype == ref.dtype
        out.float().sum().backward()
        assert all(p.grad is not None for p in patched.parameters())
