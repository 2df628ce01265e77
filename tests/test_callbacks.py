"""What the trainer integrations share: settings checked when built, the run's schedule, no import of a trainer."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

import dropblock_inject as dbi
from dropblock_inject.callbacks import InjectingCallback, RampCallback


def patched() -> nn.Module:
    """Two DropBlocks, at targets 0.1 and 0.3."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), dbi.DropBlock(0.1, 3), nn.ReLU(), dbi.DropBlock(0.3, 3))


class TestRampCallback:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [({"start": 2.0}, "start must be"), ({"kind": "step"}, "kind must be"), ({"warmup_steps": -1}, "warmup_steps"),
         ({"total_steps": 0}, "total_steps must be"), ({"warmup_steps": 5, "total_steps": 5}, "warmup_steps"),
         ({"log_name": 3}, "log_name must be")],
    )  # fmt: skip
    def test_bad_settings_fail_when_built(self, kwargs, message) -> None:
        with pytest.raises((ValueError, TypeError), match=message):
            RampCallback(**kwargs)

    def test_the_schedule_runs_over_the_run_unless_told(self) -> None:
        callback = RampCallback(warmup_steps=50)
        assert callback.mean_rate() is None
        schedule = callback.build_schedule(patched(), 20)
        assert callback.schedule is schedule and (schedule.total_steps, schedule.warmup_steps) == (20, 19)
        schedule.step_update(20)
        assert callback.mean_rate() == pytest.approx(0.2)
        assert RampCallback(total_steps=100).build_schedule(patched(), 20).total_steps == 100


class TestInjectingCallback:
    def test_splits_ramp_settings_from_inject_arguments(self) -> None:
        callback = InjectingCallback("resnet", drop_prob=0.1, stages=[3], warmup_steps=10, log_name=None)
        assert (callback.recipe, callback.inject_kwargs) == ("resnet", {"drop_prob": 0.1, "stages": [3]})
        assert (callback.warmup_steps, callback.log_name) == (10, None)
        assert callback.settings() == {"recipe": "resnet", "total_steps": None, "warmup_steps": 10, "kind": "linear",
                                       "start": 0.0, "log_name": None, "drop_prob": 0.1, "stages": [3]}  # fmt: skip

    def test_bad_ramp_settings_fail_when_built(self) -> None:
        with pytest.raises(ValueError, match="start must be"):
            InjectingCallback(drop_prob=0.1, start=-1.0)


def test_importing_the_package_imports_no_trainer_library() -> None:
    libraries = ("transformers", "ultralytics", "lightning")
    code = f"import sys, dropblock_inject; print(*(m in sys.modules for m in {libraries}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
