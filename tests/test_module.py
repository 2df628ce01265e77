"""``DropBlock``: settings, eval identity, the schedule buffer, torch.fx and torch.compile."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.fx as fx
from torch import nn

from conftest import drop_fraction, is_union_of_blocks
from dropblock_inject import DropBlock
from dropblock_inject.op.geometry import block_geometry
from dropblock_inject.op.sampling import uniform53


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, DropBlock) or super().is_leaf_module(m, qualname)


class TestDropBlockModule:
    def test_extra_repr(self) -> None:
        assert repr(DropBlock(0.1, 7)) == "DropBlock(drop_prob=0.1, block_size=7)"
        text = repr(DropBlock(0.2, (3, 5), gamma_scale=0.25, shared_channels=True, gamma="calibrated"))
        assert "block_size=(3, 5)" in text and "gamma_scale=0.25" in text
        assert "shared_channels=True" in text and "gamma='calibrated'" in text

    def test_eval_and_zero_rate_return_the_input_object(self) -> None:
        x = torch.randn(2, 4, 8, 8)
        assert DropBlock(0.1, 3).eval()(x) is x
        assert DropBlock(0.0, 3)(x) is x
        m = DropBlock(0.1, 3)
        m.factor.fill_(0.0)
        assert m(x) is x

    def test_factor_scales_the_rate_and_adds_no_state(self) -> None:
        m = DropBlock(0.2, 5, gamma="calibrated")
        assert m.state_dict() == {}
        assert "factor" in dict(m.named_buffers())
        x = torch.ones(32, 64, 14, 14)
        full = sum(drop_fraction(m(x)) for _ in range(5)) / 5
        m.factor.fill_(0.5)
        half = sum(drop_fraction(m(x)) for _ in range(5)) / 5
        assert full == pytest.approx(0.2, rel=0.05)
        assert half == pytest.approx(0.1, rel=0.05)

    def test_set_factor_keeps_a_host_copy_that_follows_the_buffer(self, monkeypatch) -> None:
        m = DropBlock(0.2, 5)
        m.set_factor(0.25)
        assert m.factor.item() == 0.25
        reads = []
        monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t) or t.item())
        assert m.factor_value == 0.25 and not reads  # the host copy: no device read
        m.factor.fill_(0.5)  # changed in place elsewhere: read back once
        assert m.factor_value == 0.5 and m.factor_value == 0.5 and len(reads) == 1
        clone = copy.deepcopy(m)
        clone.factor.fill_(0.75)
        assert clone.factor_value == 0.75 and m.factor_value == 0.5
        moved = m.to(torch.float64)  # a new buffer tensor
        moved.factor.fill_(0.125)
        assert moved.factor_value == 0.125

    def test_geometry_follows_the_input_shape_and_the_block_size(self, monkeypatch) -> None:
        from dropblock_inject.op import module

        made = []
        monkeypatch.setattr(module, "block_geometry", lambda *args: made.append(args) or block_geometry(*args))
        m = DropBlock(0.3, 3)
        x = torch.ones(2, 4, 14, 14)
        for _ in range(3):
            m(x)
        assert made == [((14, 14), (3, 3), "valid")]  # worked out once for a shape
        m.block_size = 5  # a setting changed after the first call still applies
        torch.manual_seed(0)
        dropped = (m(x) == 0).float().flatten(0, 1)
        assert is_union_of_blocks(dropped, (5, 5)) and not is_union_of_blocks(dropped, (6, 6))
        assert m(torch.ones(2, 4, 9, 9)).shape == (2, 4, 9, 9)
        assert made[1:] == [((14, 14), (5, 5), "valid"), ((9, 9), (5, 5), "valid")]
        with pytest.raises(ValueError, match="4-D"):
            m(torch.ones(2, 4, 9))

    def test_validates_its_settings(self) -> None:
        with pytest.raises(ValueError, match="drop_prob"):
            DropBlock(1.5, 3)
        with pytest.raises(TypeError, match="block_size"):
            DropBlock(0.1, 2.0)
        with pytest.raises(ValueError, match="gamma"):
            DropBlock(0.1, 3, gamma="nope")

    def test_5d(self) -> None:
        out = DropBlock(0.1, (3, 5, 5))(torch.ones(2, 8, 8, 14, 14))
        assert out.shape == (2, 8, 8, 14, 14)

    def test_deepcopy_pickle_and_to(self) -> None:
        m = DropBlock(0.1, 5)
        m.factor.fill_(0.3)
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert clone.factor.item() == pytest.approx(0.3)
            assert clone.drop_prob == 0.1
        assert m.to(torch.float64).factor.dtype == torch.float64

    def test_traces_as_a_single_leaf_node(self) -> None:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), DropBlock(0.1, 3), nn.ReLU())
        graph = LeafTracer().trace(model)
        targets = [n.target for n in graph.nodes if n.op == "call_module"]
        assert targets == ["0", "1", "2"]
        gm = fx.GraphModule(model, graph)
        x = torch.randn(2, 3, 12, 12)
        assert torch.equal(gm.eval()(x), model.eval()(x))


@pytest.mark.slow
class TestCompile:
    def _model(self) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), DropBlock(0.1, 5), nn.ReLU())

    def test_fullgraph_train_and_eval_without_recompiling_when_the_rate_changes(self) -> None:
        from torch._dynamo.testing import CompileCounterWithBackend

        torch._dynamo.reset()
        model = self._model()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        x = torch.randn(4, 8, 14, 14, requires_grad=True)
        compiled(x).sum().backward()
        for factor in (0.5, 0.25, 1.0):
            model[1].factor.fill_(factor)
            compiled(x).sum().backward()
        assert counter.frame_count == 1
        model.eval()
        assert torch.equal(compiled(x), model(x))

    @pytest.mark.parametrize(
        ("shape", "block"),
        [
            ((2, 8, 2, 2), 3),
            ((2, 8, 4, 4), 3),
            ((2, 8, 7, 7), 3),
            ((2, 8, 7, 7), 7),
            ((2, 8, 14, 14), 7),
            ((2, 4, 4, 6, 6), 3),
        ],
    )
    def test_forward_and_backward_trace_at_every_row_width(self, shape, block) -> None:
        torch._dynamo.reset()  # narrow rows take the grouped-table path, whose views once broke aot tracing
        m = DropBlock(0.3, block)
        x = torch.randn(shape, requires_grad=True)
        torch.compile(m, backend="aot_eager", fullgraph=True)(x).sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape

    @pytest.mark.parametrize(
        ("block", "shapes"),
        [
            (5, [(4, 64, 14, 14), (3, 64, 14, 14), (4, 64, 14, 14), (2, 64, 14, 14)]),
            (7, [(4, 256, 7, 7), (3, 256, 7, 7), (6, 256, 7, 7)]),  # whole planes: >= 512 of them
            (3, [(2, 64, 4, 6, 6), (3, 64, 4, 6, 6)]),
        ],
        ids=["blocks", "whole planes", "3-D"],
    )
    def test_a_new_batch_size_traces_with_dynamic_shapes(self, block, shapes) -> None:
        from torch._dynamo.testing import CompileCounterWithBackend

        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(DropBlock(0.2, block), backend=counter)
        for shape in shapes:
            x = torch.ones(shape, requires_grad=True)
            out = compiled(x)
            out.sum().backward()
            assert out.shape == x.shape and 0.05 < drop_fraction(out.detach()) < 0.4
            assert out.detach().mean().item() == pytest.approx(1.0, abs=1e-4)
            assert torch.equal(x.grad, out.detach())  # the gradient of sum is the rescaled mask
        assert counter.frame_count == 2  # the first shape, then one dynamic graph

    def test_inductor_draws_53_bit_uniforms_for_the_seed_gaps(self) -> None:
        torch._dynamo.reset()  # Inductor's own float64 rand has only float32's 24 bits
        u = torch.compile(lambda: uniform53(4096, device="cpu"), fullgraph=True)()
        assert u.dtype == torch.float64 and u.min().item() >= 0.0 and u.max().item() < 1.0
        below_float32 = (u * 2**24 % 1 != 0).float().mean().item()
        assert below_float32 > 0.99
        assert u.mean().item() == pytest.approx(0.5, abs=0.03)

    @pytest.mark.parametrize(
        ("shape", "block"),
        # whole planes: 5 x 12,288 planes, so that 5 % of the rate 0.1 is 4 standard deviations
        [((32, 64, 14, 14), 5), ((64, 192, 7, 7), 7)],
        ids=["blocks", "whole planes"],
    )
    def test_inductor_drops_the_scheduled_rate(self, shape, block) -> None:
        torch._dynamo.reset()
        m = DropBlock(0.2, block, gamma="calibrated")
        compiled = torch.compile(m, fullgraph=True)
        x = torch.ones(shape)
        assert sum(drop_fraction(compiled(x)) for _ in range(5)) / 5 == pytest.approx(0.2, rel=0.05)
        m.factor.fill_(0.5)
        assert sum(drop_fraction(compiled(x)) for _ in range(5)) / 5 == pytest.approx(0.1, rel=0.05)
        out = compiled(x)
        assert out.mean().item() == pytest.approx(1.0, abs=1e-4)
