"""The tape of one forward: what it records, the graph it gives, and the sites found through it.

Toy modules stand for the forwards torch.fx gives up on: a Python loop over a container with
data-dependent control flow (ultralytics), a ``**kwargs`` forward behind a decorator (HF encoders),
``int()`` on a shape before the convolution (HF MobileNet's TF padding).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import dropblock_inject as dbi
from dropblock_inject.pipeline.analyse import analyse
from dropblock_inject.pipeline.rewrite import injected_modules
from dropblock_inject.pipeline.tape import frame_graph, record
from dropblock_inject.pipeline.trace import trace


def conv_bn_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class Looped(nn.Module):
    """A Python loop over an ``nn.Sequential`` with a data-dependent step in between (untraceable)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(conv_bn_act(3, 8, 2), conv_bn_act(8, 16, 2), conv_bn_act(16, 16), Gate(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
            if int(x.shape[-1]) % 2:  # int() on a traced value: torch.fx stops here
                x = F.pad(x, (0, 1, 0, 1))
        return self.head(x)


class Gate(nn.Module):
    """conv -> bn read twice (a gate), a residual add, and a concat: none of them a site."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gate_conv, self.gate_bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.res_conv, self.res_bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.cat_conv = nn.Conv2d(c, c // 2, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_bn(self.gate_conv(x))
        x = x * torch.sigmoid(g) + g
        x = self.act(self.res_bn(self.res_conv(x)) + x)
        return torch.cat([self.cat_conv(x), x[:, : x.shape[1] // 2]], 1)


def passthrough(fn: Any) -> Any:
    """A decorator that hides the signature, as HF's output capturing does."""

    @functools.wraps(fn)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)

    return wrapper


class Encoder(nn.Module):
    """An HF-style encoder: a decorated ``**kwargs`` forward looping over a ``ModuleList`` of stages."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList([conv_bn_act(3, 8, 2), conv_bn_act(8, 16, 2), conv_bn_act(16, 32, 2)])
        self.cache: torch.Tensor | None = None

    @passthrough
    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
        hidden = pixel_values
        for stage in self.stages:
            hidden = stage(hidden)
        self.cache = hidden  # a forward that caches a tensor on the module (ultralytics' anchors)
        return {"last_hidden_state": hidden, "pooled": hidden.mean((2, 3))}


class TfPadding(nn.Module):
    """HF MobileNet's conv layer: a padding computed with ``int()`` from the input's shape, then conv -> norm -> act."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 3, stride, bias=False)
        self.normalization, self.activation = nn.BatchNorm2d(cout), nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, stride = int(x.shape[-1]), self.convolution.stride[0]
        pad = max((-(-size // stride) - 1) * stride + 3 - size, 0)  # TF "same": the output is ceil(size / stride)
        x = self.convolution(F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)))
        return self.activation(self.normalization(x))


def tf_net() -> nn.Sequential:
    return nn.Sequential(TfPadding(3, 8, 2), TfPadding(8, 16, 2), TfPadding(16, 16, 1), TfPadding(16, 32, 2))


X = torch.randn(2, 3, 32, 32)


class TestRecord:
    def test_calls_are_grouped_by_the_module_call_they_ran_in(self) -> None:
        model = Looped()
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        tape = record(model, (fake_mode.from_tensor(X),), {}, fake_mode)
        assert not tape.error
        targets = [c.target for c in tape.root.calls if c.op == "call_module"]
        # the Sequential is transparent: its members' leaves are in the root's frame, the Gate has its own
        assert targets[:3] == ["layers.0.0", "layers.0.1", "layers.0.2"] and "layers.3" in targets
        gate = next(c for c in tape.root.calls if c.target == "layers.3")
        assert [c.target for c in gate.frame.calls if c.op == "call_module"][:2] == [
            "layers.3.gate_conv",
            "layers.3.gate_bn",
        ]
        assert all(isinstance(c.output, torch.Tensor) for c in tape.root.calls)

    def test_the_module_is_left_as_it_was(self) -> None:
        model = Encoder().train()
        hook_calls: list[int] = []
        model.stages[0].register_forward_hook(lambda *_: hook_calls.append(1))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        record(model, (), {"pixel_values": fake_mode.from_tensor(X)}, fake_mode)
        assert model.cache is None and model.training and all(m.training for m in model.modules())
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert not any(h for m in model.modules() for h in m._forward_pre_hooks.values())
        assert len(model.stages[0]._forward_hooks) == 1 and len(hook_calls) == 1  # the user's hook ran, and stays
        model(X)
        assert len(hook_calls) == 2

    def test_one_fake_run_and_a_real_one_only_where_fake_tensors_stop_it_early(self) -> None:
        runs: list[str] = []  # what each call of forward got, besides torch.fx's proxies

        def kind(x: Any) -> str:
            return "fake" if isinstance(x, FakeTensor) else "real" if isinstance(x, torch.Tensor) else "proxy"

        class Counted(Looped):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                runs.append(kind(x))
                return super().forward(x)

        class DataDependentFirst(Looped):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                runs.append(kind(x))
                if x.sum() > 0:  # before any submodule: fake tensors stop here
                    x = x * 1.0
                return super().forward(x)

        assert len(dbi.plan(Counted(), input_size=(3, 32, 32))) > 0
        assert [r for r in runs if r != "proxy"] == ["fake"]
        runs.clear()
        assert len(dbi.plan(DataDependentFirst(), input_size=(3, 32, 32))) > 0
        assert [r for r in runs if r != "proxy"] == ["fake", "real"]  # the fake run stopped at the branch

    def test_untraceable_modules_inside_one_are_read_from_the_same_run(self) -> None:
        runs: list[str] = []

        class Counted(TfPadding):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                runs.append(type(x).__name__)
                return super().forward(x)

        model = nn.Sequential(Counted(3, 8, 2), Counted(8, 16, 2), Counted(16, 32, 2))
        assert len(dbi.plan(model, input_size=(3, 32, 32))) == 2
        assert [r for r in runs if r != "Proxy"] == ["FakeTensor"] * 3  # each layer ran once, in the model's run


class TestFrameGraph:
    def test_edges_follow_tensor_identity_and_name_ops_as_a_trace_does(self) -> None:
        model = Looped()
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        tape = record(model, (fake_mode.from_tensor(X),), {}, fake_mode)
        gate = next(c for c in tape.root.calls if c.target == "layers.3")
        graph = frame_graph(gate.frame).graph
        ops = [(n.op, n.target) for n in graph.nodes]
        assert ("call_method", "mul") in ops and ("call_function", torch.cat) in ops
        assert ("call_function", operator.getitem) in ops  # x[:, :c]
        bn = next(n for n in graph.nodes if n.target == "layers.3.gate_bn")
        assert [u.target for u in bn.users] == [torch.sigmoid, "add"]  # read twice: the gate
        assert list(graph.nodes)[-1].op == "output"

    def test_the_same_graph_as_a_trace_where_both_work(self) -> None:
        model = nn.Sequential(conv_bn_act(3, 8, 2), conv_bn_act(8, 8, 1))
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        taped = frame_graph(record(model, (fake_mode.from_tensor(X),), {}, fake_mode).root).graph
        traced = trace(model).graph
        assert [(n.op, n.target) for n in taped.nodes][1:] == [(n.op, n.target) for n in traced.nodes][1:]


class TestSites:
    def test_a_looped_container_and_its_chains(self) -> None:
        with pytest.raises(dbi.TraceError):
            trace(Looped())
        analysis = analyse(Looped(), (X,))
        main = [c for c in analysis.candidates if c.role == "main"]
        assert [(c.conv, c.host, c.act) for c in main] == [
            (f"layers.{i}.0", f"layers.{i}.1", f"layers.{i}.2") for i in range(3)
        ]
        assert [(c.feature, c.stride, c.channels) for c in main] == [((16, 16), 2, 8), ((8, 8), 4, 16), ((8, 8), 4, 16)]
        assert [c.conv for c in analysis.candidates if c.role != "main"] == ["layers.3.res_conv"]  # conv -> bn -> add
        reasons = {r.conv: r.reason for r in analysis.rejected}
        assert reasons["layers.3.gate_conv"] == "output has 2 users (fan-out)"
        assert reasons["layers.3.cat_conv"] == "goes to cat, not an activation"
        # the loop's frame is read from the run; the Gate it calls traces, and is analysed as a traced graph
        assert analysis.recorded == ["<model>"] and analysis.roots == ["layers.3"]

    def test_keyword_inputs_and_a_decorated_forward(self) -> None:
        p = dbi.plan(Encoder(), example_inputs={"pixel_values": X})
        assert [s.host for s in p] == ["stages.1.1", "stages.2.1"]
        assert p.input_size == (3, 32, 32)
        assert [s.host for s in dbi.plan(Encoder(), example_kwargs={"pixel_values": X})] == ["stages.1.1", "stages.2.1"]

    def test_a_conv_called_by_an_untraceable_parent(self) -> None:
        p = dbi.plan(tf_net(), input_size=(3, 32, 32))
        assert [(s.conv, s.host, s.act) for s in p] == [
            (f"{i}.convolution", f"{i}.normalization", f"{i}.activation") for i in (1, 2, 3)
        ]
        assert [s.feature for s in p] == [(8, 8), (8, 8), (4, 4)]  # TF "same" padding: ceil(size / stride)

    @pytest.mark.parametrize("make", [Looped, tf_net, Encoder], ids=["looped", "tf_padding", "kwargs"])
    def test_inject_train_eval_step_strip(self, make: Any, capfd: pytest.CaptureFixture[str]) -> None:
        model = make()
        keys = list(model.state_dict())
        reference = make()
        reference.load_state_dict(model.state_dict())
        dbi.inject(model, drop_prob=0.5, input_size=(3, 32, 32))
        assert not capfd.readouterr().err
        assert len(injected_modules(model)) >= 2
        with torch.no_grad():
            assert _equal(model.eval()(X), reference.eval()(X))
        dropped = []
        for db in injected_modules(model):
            db.register_forward_hook(lambda m, a, out: dropped.append(float((out == 0).float().mean())))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        _loss(model.train()(X)).backward()
        optimizer.step()
        assert max(dropped) > 0.05  # p=0.5 at its full rate; without drops the maps have no exact zeros
        dbi.strip(model)
        assert list(model.state_dict()) == keys and not injected_modules(model)
        assert not any(m._forward_hooks for m in model.modules())


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def _loss(out: Any) -> torch.Tensor:
    return sum(v.square().mean() for v in out.values()) if isinstance(out, dict) else out.square().mean()
