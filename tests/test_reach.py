"""Where users take a patched model next: torch.fx tools, feature extraction, export, ONNX, TorchScript.

Each model here stands for one way a DropBlock is attached: torchvision ``resnet18`` (a forward
hook on the norm), timm ``resnet18`` (its ``drop_block`` identity slot) and timm
``efficientnet_b0`` (the ``.drop`` of its fused ``BatchNormAct2d``). ``pytest -m zoo`` runs the
same checks over the coverage list (tests/test_zoo.py).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from itertools import product

import pytest
import timm
import torch
import torch.fx as fx
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import dropblock_inject as dbi
from dropblock_inject import DropBlock
from dropblock_inject.pipeline.markers import injected_modules

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    # name: (constructor, a node whose output a feature extractor returns)
    "tv_resnet18": (lambda: torchvision.models.resnet18(), "layer4"),
    "timm_resnet18": (lambda: timm.create_model("resnet18"), "layer4"),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), "blocks.6"),
}


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    """(unpatched, patched) copies of one model in train mode, same weights."""
    torch.manual_seed(0)
    plain = MODELS[name][0]()
    for m in plain.modules():  # timm zero-inits each residual branch's last norm: nothing it drops would show
        if isinstance(m, nn.modules.batchnorm._NormBase):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    patched = dbi.inject(copy.deepcopy(plain), drop_prob=0.3, input_size=(3, 64, 64))
    return plain, patched


def _seeded(fn: Callable[[], torch.Tensor | dict], seed: int = 3) -> torch.Tensor | dict:
    torch.manual_seed(seed)
    return fn()


def _set_factor(model: nn.Module, value: float) -> None:
    for m in injected_modules(model):
        m.set_factor(value)


def _same(a: torch.Tensor | dict, b: torch.Tensor | dict) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("name", MODELS)
class TestTorchFx:
    def test_symbolic_trace_of_a_train_model_drops_what_the_model_drops(self, name: str) -> None:
        plain, patched = _pair(name)
        gm = fx.symbolic_trace(patched)
        # Same module objects, same draws: the graph drops exactly the blocks the model drops.
        assert torch.equal(_seeded(lambda: gm(X)), _seeded(lambda: copy.deepcopy(patched)(X)))
        assert not torch.equal(_seeded(lambda: gm(X)), _seeded(lambda: plain(X)))

    def test_the_traced_rate_follows_the_schedule(self, name: str) -> None:
        plain, patched = _pair(name)
        gm = fx.symbolic_trace(patched)  # traced at the full rate
        _set_factor(patched, 0.0)  # the schedule's warm-up start: nothing dropped
        assert torch.equal(_seeded(lambda: gm(X)), _seeded(lambda: plain(X)))
        dbi.DropBlockSchedule(patched, total_steps=10, warmup_steps=0).step_update(10)
        assert not torch.equal(_seeded(lambda: gm(X)), _seeded(lambda: plain(X)))

    def test_symbolic_trace_in_eval_computes_the_unpatched_model(self, name: str) -> None:
        plain, patched = _pair(name)
        assert torch.equal(fx.symbolic_trace(patched.eval())(X), plain.eval()(X))

    def test_feature_extractor_train_and_eval_graphs(self, name: str) -> None:
        plain, patched = _pair(name)
        node = MODELS[name][1]
        assert get_graph_node_names(patched) == get_graph_node_names(plain)
        fe, fe_plain = create_feature_extractor(patched, [node]), create_feature_extractor(plain, [node])
        assert _same(fe.eval()(X), fe_plain.eval()(X))
        assert not _same(_seeded(lambda: fe.train()(X)), _seeded(lambda: fe_plain.train()(X)))
        # The train graph calls the DropBlocks, so the rate is read at run time, not trace time.
        _set_factor(patched, 0.0)
        assert _same(_seeded(lambda: fe(X)), _seeded(lambda: fe_plain(X)))


class TestTimmFeatureExtraction:
    def test_features_only_fx(self) -> None:
        torch.manual_seed(0)
        plain = timm.create_model("resnet18", features_only=True, feature_cls="fx", out_indices=(3, 4))
        patched = dbi.inject(copy.deepcopy(plain), drop_prob=0.3, input_size=(3, 64, 64))
        assert len(injected_modules(patched)) > 0
        assert all(torch.equal(a, b) for a, b in zip(patched.eval()(X), plain.eval()(X), strict=True))

    def test_feature_graph_net_of_a_patched_model(self) -> None:
        plain, patched = _pair("timm_resnet18")
        features = timm.models.FeatureGraphNet(patched, out_indices=(3, 4))
        reference = timm.models.FeatureGraphNet(plain, out_indices=(3, 4))
        assert all(torch.equal(a, b) for a, b in zip(features.eval()(X), reference.eval()(X), strict=True))
        train = _seeded(lambda: features.train()(X))
        assert not torch.equal(train[-1], _seeded(lambda: reference.train()(X))[-1])


class TestDropBlockIsOneLeaf:
    """Any DropBlock a user places, in any tracer."""

    def test_a_submodule_is_one_call_module_node_in_train_and_eval(self) -> None:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), DropBlock(0.2, 3), nn.ReLU())
        for mode in (True, False):
            graph = fx.symbolic_trace(model.train(mode)).graph
            assert [(n.op, n.target) for n in graph.nodes][1:4] == [("call_module", str(i)) for i in range(3)]

    def test_a_zero_rate_is_still_a_node(self) -> None:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), DropBlock(0.0, 3))
        assert ("call_module", "1") in [(n.op, n.target) for n in fx.symbolic_trace(model).graph.nodes]

    def test_traced_as_the_root(self) -> None:
        db = DropBlock(0.3, 3)
        x = torch.ones(4, 8, 12, 12)
        gm = fx.symbolic_trace(db)
        assert [n.op for n in gm.graph.nodes] == ["placeholder", "get_attr", "call_function", "output"]
        assert (gm(x) == 0).any()
        db.set_factor(0.0)  # the root's factor is read by the graph at run time
        assert torch.equal(gm(x), x)
        assert torch.equal(fx.symbolic_trace(db.eval())(x), x)
        assert len(fx.symbolic_trace(gm).graph.nodes) == 4  # a traced graph traces again


class _Wrapper(nn.Module):
    """torchvision's ``DropBlockWrapper`` (test/test_ops.py)."""

    def __init__(self, obj: nn.Module) -> None:
        super().__init__()
        self.layer = obj
        self.n_inputs = 1

    def forward(self, a: torch.Tensor) -> None:
        self.layer(a)


class TestTorchvisionDropBlockTests:
    """torchvision's ``TestDropBlock`` (test/test_ops.py), run against ``dbi.DropBlock``."""

    @staticmethod
    def _input(dim: int) -> torch.Tensor:
        return torch.ones((5, 3) + (11,) * dim)

    @pytest.mark.parametrize(("seed", "dim", "p", "block_size", "inplace"),
                             list(product(range(10), [2, 3], [0, 0.5], [5, 11], [True, False])))  # fmt: skip
    def test_drop_block(self, seed: int, dim: int, p: float, block_size: int, inplace: bool) -> None:
        torch.manual_seed(seed)
        x = self._input(dim)
        out = DropBlock(p, block_size, inplace=inplace)(x if not inplace else x.clone())
        if p == 0:
            assert out.equal(x)
        if block_size == 11:  # the block covers the map: each plane is kept or dropped whole
            for b, c in product(range(5), range(3)):
                assert out[b, c].count_nonzero() in (0, 11**dim)

    @pytest.mark.parametrize(("seed", "dim", "p"), list(product(range(10), [2, 3], [0.1, 0.2])))
    def test_drop_block_random(self, seed: int, dim: int, p: float) -> None:
        # torchvision's bound: |rate - p| / p < 0.15 over 250 draws. Paper-gamma rates at 11x11, block 3
        # (3,000 draws each): 0.951p / 0.900p (2-D, p = 0.1 / 0.2), 0.938p / 0.884p (3-D); the 250-draw
        # mean's sd is 0.013p / 0.008p / 0.007p / 0.004p: the bound is 6.1 to 13.5 sd away.
        torch.manual_seed(seed)
        x, layer = self._input(dim), DropBlock(p, 3)
        with torch.no_grad():
            dropped = sum(int((layer(x) == 0).sum()) for _ in range(250))
        assert abs(p - dropped / (250 * x.numel())) / p < 0.15

    @pytest.mark.parametrize(("dim", "p", "block_size", "inplace"),
                             list(product([2, 3], [0, 1], [5, 7], [True, False])))  # fmt: skip
    def test_is_leaf_node(self, dim: int, p: float, block_size: int, inplace: bool) -> None:
        del dim  # one module serves both; kept for torchvision's parametrisation
        op_obj = _Wrapper(DropBlock(p, block_size, inplace=inplace))
        graph_node_names = get_graph_node_names(op_obj)
        assert len(graph_node_names) == 2
        assert len(graph_node_names[0]) == len(graph_node_names[1])
        assert len(graph_node_names[0]) == 1 + op_obj.n_inputs


@pytest.mark.parametrize("name", MODELS)
class TestExport:
    def test_train_export_keeps_dropblock_and_eval_export_is_the_unpatched_model(self, name: str) -> None:
        plain, patched = _pair(name)
        sites = len(injected_modules(patched))
        train = torch.export.export(copy.deepcopy(patched).train(), (X,))
        draws = [n for n in train.graph.nodes if n.target is torch.ops.aten.randint.low]
        assert len(draws) == sites  # one seed draw per DropBlock
        evaluated = torch.export.export(patched.eval(), (X,))
        assert not any(n.target is torch.ops.aten.randint.low for n in evaluated.graph.nodes)
        assert torch.equal(evaluated.module()(X), plain.eval()(X))


class TestOnnx:
    def test_a_patched_eval_model_runs_in_onnxruntime_with_the_unpatched_outputs(self) -> None:
        pytest.importorskip("onnxscript", reason="the ONNX test extra: pip install -e '.[export]'")
        ort = pytest.importorskip("onnxruntime", reason="the ONNX test extra: pip install -e '.[export]'")
        plain, patched = _pair("tv_resnet18")
        outputs = []
        for model in (plain.eval(), patched.eval()):
            program = torch.onnx.export(model, (X,), dynamo=True, verbose=False)
            buffer = io.BytesIO()
            program.save(buffer)
            session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
            outputs.append(session.run(None, {session.get_inputs()[0].name: X.numpy()})[0])
        assert (outputs[0] == outputs[1]).all()


class TestTorchScript:
    def test_script_says_to_strip_first_and_works_after_strip(self) -> None:
        plain, patched = _pair("tv_resnet18")
        with pytest.raises(RuntimeError, match=r"strip\(model\)"):
            torch.jit.script(patched.eval())
        scripted = torch.jit.script(dbi.strip(patched).eval())
        assert torch.equal(scripted(X), plain.eval()(X))
