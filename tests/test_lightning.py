"""The Lightning callback (optional extra): ramps with the global step and survives checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dropblock_inject as dbi

lightning = pytest.importorskip("lightning")
from dropblock_inject.lightning import DropBlockCallback  # noqa: E402


class TinyModule(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))  # fmt: skip
        dbi.inject(self.net, input_size=(3, 16, 16), stages=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader() -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 16, 16), torch.randint(0, 2, (32,)))
    return torch.utils.data.DataLoader(data, batch_size=4)


class RateProbe(lightning.Callback):
    """Records ``(global step, rate of each DropBlock)`` as each training batch starts."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[float]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        blocks = [m for m in pl_module.modules() if isinstance(m, dbi.DropBlock)]
        self.seen.append((trainer.global_step, [m.target_rate * m.factor_value for m in blocks]))


def fit(tmp_path, callbacks: list, max_steps: int, ckpt_path=None, **trainer_kw) -> TinyModule:
    module = TinyModule()
    trainer = lightning.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                                **trainer_kw)  # fmt: skip
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module


class TestDropBlockCallback:
    def test_callback_ramps_over_the_run_and_checkpoints(self, tmp_path) -> None:
        module, callback = TinyModule(), DropBlockCallback()
        trainer = lightning.Trainer(max_epochs=1, callbacks=[callback], default_root_dir=tmp_path, logger=False,
                                    enable_progress_bar=False, enable_model_summary=False,
                                    accelerator="cpu")  # fmt: skip
        trainer.fit(module, loader())
        assert callback.schedule is not None and callback.schedule.last_step == 8
        assert callback.schedule.rates() == pytest.approx([0.1])
        assert callback.state_dict()["last_step"] == 8

    def test_resume_from_a_checkpoint_continues_the_saved_ramp(self, resumed_run) -> None:
        rates, seen, resumed, saved = resumed_run
        assert sorted(rates) == list(range(8))
        assert rates[3] == pytest.approx([0.1 * 3 / 8])  # the ramp runs: not the target from the start
        assert [v["last_step"] for k, v in saved.items() if "DropBlockCallback" in k] == [3]
        assert [step for step, _ in seen] == list(range(3, 12))
        # after the first resumed step: the uninterrupted run's rates, then the target; a ramp
        # over the resumed run's 12 steps would be at 0.1 * 4 / 12 at step 4, not 0.1 * 4 / 8
        for step, got in seen[1:]:
            assert got == pytest.approx(rates.get(step, [0.1])), step
        assert resumed.schedule is not None and resumed.schedule.total_steps == 8
        assert resumed.schedule.last_step == 12

    def test_first_batch_after_a_resume_runs_at_the_saved_step(self, resumed_run) -> None:
        rates, seen, _, _ = resumed_run
        step, got = seen[0]
        assert step == 3
        assert got == pytest.approx(rates[3])


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """An uninterrupted 8-step run with a checkpoint after step 3, and a resume from that checkpoint.

    The resume has a fresh model and callback and a longer run (12 steps): the callback's saved
    state (a ramp over 8 steps, at step 3) must win over this run's estimated_stepping_batches.
    Returns the uninterrupted rates by step, the resumed run's ``(step, rates)``, its callback,
    and the callbacks' state in the checkpoint.
    """
    tmp_path = tmp_path_factory.mktemp("resume")
    saver = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                                        save_top_k=-1)  # fmt: skip
    whole = RateProbe()
    fit(tmp_path, [DropBlockCallback(), whole, saver], max_steps=8, enable_checkpointing=True)
    (ckpt,) = (tmp_path / "ckpt").glob("*step=3.ckpt")
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    probe, resumed = RateProbe(), DropBlockCallback()
    fit(tmp_path, [resumed, probe], max_steps=12, ckpt_path=ckpt, enable_checkpointing=False)
    return dict(whole.seen), probe.seen, resumed, saved
