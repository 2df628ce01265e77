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


def test_callback_ramps_over_the_run_and_checkpoints(tmp_path) -> None:
    module, callback = TinyModule(), DropBlockCallback()
    trainer = lightning.Trainer(max_epochs=1, callbacks=[callback], default_root_dir=tmp_path, logger=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, loader())
    assert callback.schedule is not None and callback.schedule.last_step == 8
    assert callback.schedule.rates() == pytest.approx([0.1])
    state = callback.state_dict()
    resumed = DropBlockCallback()
    resumed.load_state_dict(state)
    assert resumed.state_dict()["last_step"] == 8
