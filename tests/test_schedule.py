"""``DropBlockSchedule``: the ramps, the global step and checkpoints."""

from __future__ import annotations

import math

import pytest
from torch import nn

from dropblock_inject import DropBlock, DropBlockSchedule


def model() -> nn.Sequential:
    """Two DropBlocks with different targets (0.1, and 0.4 * 0.5 = 0.2), so a mix-up shows."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), DropBlock(0.1, 3), nn.ReLU(), DropBlock(0.4, 3, gamma_scale=0.5))


def full_after(step: int) -> float:
    """A callable schedule: no drop before step 3, the target from step 3 on."""
    return 0.0 if step < 3 else 1.0


class TestDropBlockSchedule:
    def test_linear_ramp_from_zero_to_each_target(self) -> None:
        net = model()
        sched = DropBlockSchedule(net, total_steps=10)
        assert sched.rates() == [0.0, 0.0]
        for _ in range(5):
            sched.step()
        assert sched.rates() == pytest.approx([0.05, 0.1])
        for _ in range(20):
            sched.step()
        assert sched.rates() == pytest.approx([0.1, 0.2])  # constant after total_steps

    def test_warmup_and_start(self) -> None:
        sched = DropBlockSchedule(model(), total_steps=20, warmup_steps=10, start=0.02)
        sched.step_update(5)
        assert sched.rates() == pytest.approx([0.02, 0.02])
        sched.step_update(15)  # half-way: start + (target - start) / 2
        assert sched.rates() == pytest.approx([0.06, 0.11])

    def test_cosine_constant_and_callable(self) -> None:
        cos = DropBlockSchedule(model(), total_steps=10, kind="cosine")
        cos.step_update(5)
        assert cos.progress() == pytest.approx(0.5)
        cos.step_update(2)
        assert cos.progress() == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.2)))
        const = DropBlockSchedule(model(), total_steps=10, kind="constant")
        assert const.rates() == pytest.approx([0.1, 0.2])
        custom = DropBlockSchedule(model(), total_steps=10, kind=lambda step: min(step / 4, 1.0))
        custom.step_update(2)
        assert custom.rates() == pytest.approx([0.05, 0.1])

    def test_callable_out_of_range(self) -> None:
        with pytest.raises(ValueError, match="progress"):
            DropBlockSchedule(model(), total_steps=10, kind=lambda step: 2.0)

    def test_state_dict_resumes_at_the_same_rate(self) -> None:
        sched = DropBlockSchedule(model(), total_steps=100)
        for _ in range(30):
            sched.step()
        state = sched.state_dict()
        fresh_model = model()
        resumed = DropBlockSchedule(fresh_model, total_steps=100)
        resumed.load_state_dict(state)
        assert resumed.last_step == 30
        assert resumed.rates() == pytest.approx([0.03, 0.06])
        assert resumed.rates() == pytest.approx(sched.rates())

    def test_state_dict_of_a_callable_kind_stores_its_name_and_a_resume_keeps_the_callable(self) -> None:
        sched = DropBlockSchedule(model(), total_steps=10, kind=full_after)
        sched.step_update(4)
        state = sched.state_dict()
        assert state == {"last_step": 4, "total_steps": 10, "warmup_steps": 0, "kind": "full_after",
                         "kind_is_callable": True, "start": 0.0}  # fmt: skip
        assert DropBlockSchedule(model(), total_steps=10, kind=lambda step: 0.0).state_dict()["kind"] == "<lambda>"
        # a function cannot be restored from its name: the resumed schedule keeps the callable it
        # was built with, and continues at the saved step
        resumed = DropBlockSchedule(model(), total_steps=10, kind=full_after)
        resumed.load_state_dict(state)
        assert resumed.kind is full_after and resumed.last_step == 4
        assert resumed.rates() == pytest.approx([0.1, 0.2])
        resumed.step_update(2)
        assert resumed.rates() == [0.0, 0.0]
        # settings of a built-in kind saved before are taken over by a fresh schedule
        builtin = DropBlockSchedule(model(), total_steps=50, kind="constant", warmup_steps=5, start=0.01)
        builtin.load_state_dict({**state, "kind": "cosine", "kind_is_callable": False})
        assert (builtin.kind, builtin.total_steps, builtin.warmup_steps, builtin.start) == ("cosine", 10, 0, 0.0)
        assert builtin.rates() == pytest.approx([0.1 * 0.5 * (1 - math.cos(math.pi * 0.4)),
                                                 0.2 * 0.5 * (1 - math.cos(math.pi * 0.4))])  # fmt: skip

    def test_a_callable_named_like_a_built_in_kind_survives_a_resume(self) -> None:
        def constant(step: int) -> float:  # a user's own schedule that happens to be called "constant"
            return min(step / 10, 1.0)

        resumed = DropBlockSchedule(model(), total_steps=10, kind=constant)
        resumed.load_state_dict(DropBlockSchedule(model(), total_steps=10, kind=constant).state_dict())
        assert resumed.kind is constant
        # nor does its name replace the built-in kind of a schedule built without it
        linear = DropBlockSchedule(model(), total_steps=10, kind="linear")
        linear.load_state_dict(DropBlockSchedule(model(), total_steps=10, kind=constant).state_dict())
        assert linear.kind == "linear"

    def test_a_state_saved_without_kind_is_callable_is_read_by_name(self) -> None:
        def cosine(step: int) -> float:
            return min(step / 10, 1.0)

        old = {"last_step": 3, "total_steps": 10, "warmup_steps": 0, "kind": "cosine", "start": 0.0}
        own = DropBlockSchedule(model(), total_steps=10, kind=cosine)
        own.load_state_dict(old)  # the name of the callable it was built with: saved from that callable
        assert own.kind is cosine
        builtin = DropBlockSchedule(model(), total_steps=10, kind="linear")
        builtin.load_state_dict(old)
        assert builtin.kind == "cosine"

    def test_step_is_the_global_step_not_forward_calls(self) -> None:
        import torch

        net = model()
        sched = DropBlockSchedule(net, total_steps=10)
        for _ in range(7):
            net(torch.randn(1, 3, 8, 8))
        assert sched.rates() == [0.0, 0.0]

    def test_accepts_modules_and_validates(self) -> None:
        blocks = [DropBlock(0.1, 3)]
        assert DropBlockSchedule(blocks, total_steps=5).modules == blocks
        with pytest.raises(ValueError, match="no DropBlock"):
            DropBlockSchedule(nn.Conv2d(1, 1, 1), total_steps=5)
        with pytest.raises(TypeError, match="DropBlock"):
            DropBlockSchedule([nn.ReLU()], total_steps=5)
        with pytest.raises(ValueError, match="total_steps"):
            DropBlockSchedule(blocks, total_steps=0)
        with pytest.raises(ValueError, match="warmup_steps"):
            DropBlockSchedule(blocks, total_steps=5, warmup_steps=5)
        with pytest.raises(ValueError, match="kind"):
            DropBlockSchedule(blocks, total_steps=5, kind="step")
        with pytest.raises(ValueError, match="start"):
            DropBlockSchedule(blocks, total_steps=5, start=1.5)

    def test_repr(self) -> None:
        assert "step=0/10" in repr(DropBlockSchedule(model(), total_steps=10))
