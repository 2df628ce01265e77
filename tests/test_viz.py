"""``viz``: the picture of a plan, and how it labels each stage's block."""

from __future__ import annotations

import pytest
import torchvision
from torch import nn

import dropblock_inject as dbi
from dropblock_inject.viz import block_label, render_plan


def two_stages() -> nn.Sequential:
    """conv-bn-relu at stride 2 then 4: 8x8 and 4x4 maps at a 16 px input."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 8), *block(8, 8))


class TestBlockLabel:
    @pytest.mark.parametrize(
        ("block_size", "labels"),
        [
            (3, ["3x3", "3x3"]),
            (5, ["5x5", "4x4 (5x5 clipped; the whole map)"]),
            (4, ["4x4", "4x4 (the whole map)"]),
        ],
    )
    def test_the_label_is_the_block_the_op_applies(self, block_size, labels) -> None:
        chosen = dbi.plan(two_stages(), input_size=(3, 16, 16), block_size=block_size)
        assert [s.feature for s in chosen] == [(8, 8), (4, 4)]
        assert [block_label(s) for s in chosen] == labels


class TestRenderPlan:
    def test_one_panel_per_stage_and_the_schedule(self) -> None:
        one = render_plan(dbi.plan(two_stages(), input_size=(3, 16, 16), stages=1), channels=2)
        two = render_plan(dbi.plan(two_stages(), input_size=(3, 16, 16)), channels=2)
        assert two.height > one.height > 0

    def test_a_real_model(self) -> None:
        assert render_plan(dbi.plan(torchvision.models.resnet18()), channels=2).width > 0
