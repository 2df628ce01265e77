"""``DropMeter``: the realised drop rate, counted exactly, only on the sampled steps, per feature size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dropblock_inject as dbi
from dropblock_inject.train.meter import DropMeter, format_realised


def net(inplace: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), dbi.DropBlock(0.2, 3, inplace=inplace), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), dbi.DropBlock(0.3, 2, inplace=inplace), nn.ReLU(),
    )  # fmt: skip


class TestDropMeter:
    @pytest.mark.parametrize("inplace", [False, True])
    def test_counts_exactly_what_was_dropped(self, inplace: bool) -> None:
        model = net(inplace)
        truth: dict[str, list[int]] = {}

        def before(module, args) -> None:
            module.saved = args[0].detach().clone()  # in place: keep what went in

        def after(module, args, out) -> None:
            dropped = int(((out == 0) & (module.saved != 0)).sum())
            size = "x".join(map(str, out.shape[2:]))
            truth.setdefault(size, [0, 0])
            truth[size][0] += dropped
            truth[size][1] += out.numel()

        for m in (model[1], model[4]):
            m.register_forward_pre_hook(before)
            m.register_forward_hook(after)
        meter = DropMeter(model)
        for _ in range(5):
            with meter.watch():
                model(torch.randn(4, 3, 16, 16))
        realised = meter.take()
        assert realised.by_stage == {size: d / n for size, (d, n) in truth.items()}
        assert list(realised.by_stage) == ["16x16", "8x8"]  # execution order
        total = [sum(v) for v in zip(*truth.values())]
        assert realised.overall == total[0] / total[1]
        assert meter.take() == (0.0, {})  # take() starts again

    def test_measures_every_kth_call_and_leaves_no_hook(self) -> None:
        model = net(False)
        meter = DropMeter(model, every=3)
        hooked = []
        for _ in range(7):
            with meter.watch():
                hooked.append(bool(model[1]._forward_hooks))
                model(torch.randn(2, 3, 16, 16))
        assert hooked == [True, False, False, True, False, False, True]
        assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks

    def test_eval_and_no_dropblock_measure_zero(self) -> None:
        model = net(False).eval()
        meter = DropMeter(model)
        with meter.watch():
            model(torch.randn(2, 3, 16, 16))
        assert meter.take() == (0.0, {"16x16": 0.0, "8x8": 0.0})
        plain = DropMeter(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
        with plain.watch():
            pass
        assert plain.take() == (0.0, {}) and plain.modules == []

    def test_follows_the_rate_statistically(self) -> None:
        # 0.2 at block 3 on 16x16: expected drop 0.1812 (the paper's gamma); 40 calls of (8, 8, 16, 16) units in
        # correlated 3x3 blocks: sd of the measured rate 0.0014 (200 repeats), so 4 sd is 0.0056
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), dbi.DropBlock(0.2, 3))
        meter = DropMeter(model)
        for _ in range(40):
            with meter.watch():
                model(torch.randn(8, 3, 16, 16))
        geom = dbi.block_geometry((16, 16), (3, 3))
        expected = geom.expected_drop(geom.seed_rate(0.2, "paper"))
        assert abs(meter.take().overall - expected) < 0.0056

    def test_bad_every(self) -> None:
        with pytest.raises(ValueError, match="every must be a positive int, got 0"):
            DropMeter(nn.Identity(), every=0)

    def test_format(self) -> None:
        assert format_realised({}) == ""
        assert format_realised({"7x7": 0.1}) == "7x7=0.1000"
