"""DropBlock in ultralytics training (optional extra): a real YOLO run on a dataset the test writes."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dropblock_inject as dbi
from dropblock_inject.ultralytics import DropBlockCallbacks, add_dropblock

ultralytics = pytest.importorskip("ultralytics")  # tests/conftest.py points YOLO_CONFIG_DIR at a temporary folder
Image = pytest.importorskip("PIL.Image")

BATCHES = 4  # per epoch: 8 images, batch 2
TRAIN = {"epochs": 2, "imgsz": 64, "batch": 2, "workers": 0, "device": "cpu", "plots": False, "val": False,
         "amp": False, "mosaic": 0.0, "verbose": False, "exist_ok": True, "seed": 0}  # fmt: skip


def write_dataset(root: Path) -> Path:
    """8 64x64 images, each with one bright box and its YOLO label, as train and val; returns data.yaml."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for k in range(8):
            image = np.full((64, 64, 3), 40, np.uint8)
            x, y, w, h = (int(v) for v in rng.integers(8, 28, 4))
            image[y : y + h, x : x + w] = 220
            Image.fromarray(image).save(root / "images" / split / f"{k}.png")
            label = f"0 {(x + w / 2) / 64:.4f} {(y + h / 2) / 64:.4f} {w / 64:.4f} {h / 64:.4f}\n"
            (root / "labels" / split / f"{k}.txt").write_text(label)
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n")
    return data


class Probe:
    """Records each training batch's ``(epoch, mean rate)`` and counts the units the DropBlocks dropped."""

    def __init__(self, model) -> None:
        self.rates: list[tuple[int, float]] = []
        self.dropped = 0
        model.add_callback("on_train_start", self.hook)
        model.add_callback("on_train_batch_start", self.record)

    def hook(self, trainer) -> None:
        for m in trainer.model.modules():
            if isinstance(m, dbi.DropBlock):
                m.register_forward_hook(self.count)

    def record(self, trainer) -> None:
        blocks = [m for m in trainer.model.modules() if isinstance(m, dbi.DropBlock)]
        self.rates.append((trainer.epoch, sum(m.target_rate * m.factor_value for m in blocks) / len(blocks)))

    def count(self, module, inputs, output) -> None:
        if module.training:
            self.dropped += int((output == 0).sum())  # a norm's output is never exactly 0 unless dropped


class RunInterruptedError(Exception):
    """A run killed after its first epoch: last.pt holds epoch 1 of 2 and the optimizer, which resume=True needs."""


def interrupt(trainer) -> None:
    raise RunInterruptedError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-epoch run interrupted after its first epoch, and its resume from last.pt (each: epoch 1 of 2 trained)."""
    root = tmp_path_factory.mktemp("yolo")
    data = write_dataset(root / "data")
    model = ultralytics.YOLO("yolov8n.yaml")
    callbacks, probe = add_dropblock(model, drop_prob=0.2), Probe(model)
    model.add_callback("on_fit_epoch_end", interrupt)
    with pytest.raises(RunInterruptedError):
        model.train(data=str(data), project=str(root / "runs"), name="first", **TRAIN)
    first = (model, callbacks, probe, root / "runs" / "first")
    resumed = ultralytics.YOLO(str(root / "runs" / "first" / "weights" / "last.pt"))
    callbacks, probe = add_dropblock(resumed, drop_prob=0.2), Probe(resumed)
    resumed.train(resume=True)
    return first, (resumed, callbacks, probe, root / "runs" / "first")


class TestAddDropblock:
    def test_drops_during_training_at_a_rate_ramped_per_batch(self, runs) -> None:
        (model, callbacks, probe, _), _ = runs
        hosts = {name: m for name, m in model.trainer.model.named_modules() if isinstance(m, dbi.DropBlock)}
        assert any(".m.0." in name for name in hosts)  # the bottlenecks that C2f loops over
        head = model.trainer.model.model[-1]  # Detect: left out by the yolo recipe
        assert not any(isinstance(m, dbi.DropBlock) for m in head.modules())
        blocks = list(hosts.values())
        assert callbacks.schedule is not None
        target = sum(m.target_rate for m in blocks) / len(blocks)
        assert callbacks.schedule.total_steps == 2 * BATCHES  # the run: epochs x batches per epoch
        assert [epoch for epoch, _ in probe.rates] == [0] * BATCHES
        assert [rate for _, rate in probe.rates] == pytest.approx([target * k / (2 * BATCHES) for k in range(4)])
        assert probe.dropped > 0

    def test_a_resumed_run_continues_the_ramp(self, runs) -> None:
        _, (resumed, callbacks, probe, _) = runs
        blocks = [m for m in resumed.trainer.model.modules() if isinstance(m, dbi.DropBlock)]
        target = sum(m.target_rate for m in blocks) / len(blocks)
        assert [epoch for epoch, _ in probe.rates] == [1] * BATCHES
        # the uninterrupted run's rates: batch k of 8 at target * k / 8
        assert [rate for _, rate in probe.rates] == pytest.approx([target * k / 8 for k in range(4, 8)])
        assert probe.dropped > 0 and callbacks.schedule.rates() == pytest.approx([m.target_rate for m in blocks])

    def test_the_ema_and_the_saved_weights_stay_plain(self, runs) -> None:
        _, (resumed, *_, folder) = runs
        assert not any(isinstance(m, dbi.DropBlock) for m in resumed.trainer.ema.ema.modules())
        code = (
            "import sys; sys.modules['dropblock_inject'] = None\n"  # importing it fails, as where it is not installed
            "import torch\n"
            f"for name in ('best', 'last'):\n"
            f"    ckpt = torch.load({str(folder / 'weights')!r} + f'/{{name}}.pt', weights_only=False)\n"
            "    print(type(ckpt['model']).__name__)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["DetectionModel", "DetectionModel"]

    def test_logs_the_rate_with_each_epoch(self, runs) -> None:
        _, (*_, folder) = runs
        header, *rows = (folder / "results.csv").read_text().splitlines()
        column = header.split(",").index("dropblock/rate")
        assert len(rows) == 2 and float(rows[0].split(",")[column]) < float(rows[1].split(",")[column])

    def test_refuses_a_module(self) -> None:
        with pytest.raises(TypeError, match=r"YOLO object or trainer, got Sequential.*call dropblock_inject.inject"):
            add_dropblock(nn.Sequential(nn.Conv2d(3, 8, 3)))

    def test_bad_settings_fail_when_added(self) -> None:
        with pytest.raises(ValueError, match="start must be"):
            add_dropblock(ultralytics.YOLO("yolov8n.yaml"), start=-0.5)


class TestDropBlockCallbacks:
    def test_injects_inside_a_compiled_model_at_the_training_size(self) -> None:
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        loader = [None] * 5
        trainer = type("Trainer", (), {"model": torch.compile(net), "args": type("Args", (), {"imgsz": 32})(),
                                       "epochs": 3, "train_loader": loader})()  # fmt: skip
        callbacks = DropBlockCallbacks(stages=1)
        callbacks.on_pretrain_routine_end(trainer)
        assert isinstance(net[1].dropblock, dbi.DropBlock) and net[1].dropblock.block_size == (7, 7)
        assert callbacks.schedule is not None and callbacks.schedule.total_steps == 15

    def test_the_callbacks_pickle(self) -> None:
        # ultralytics pickles the trainer's callbacks into each process of a multi-GPU run
        events = pickle.loads(pickle.dumps(DropBlockCallbacks(drop_prob=0.2).events()))
        assert events["on_train_batch_end"].__self__.inject_kwargs == {"drop_prob": 0.2}

    def test_strips_an_ema_copied_from_the_patched_model(self) -> None:
        # ultralytics copies the training model into its EMA when it recovers from a NaN loss
        model = dbi.inject(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), input_size=(3, 16, 16))
        trainer = type("Trainer", (), {"ema": type("EMA", (), {"ema": copy.deepcopy(model).eval()})(), "lr": {}})()
        callbacks = DropBlockCallbacks()
        callbacks.on_train_epoch_end(trainer)
        assert not any(isinstance(m, dbi.DropBlock) for m in trainer.ema.ema.modules())
        assert b"dropblock_inject" not in pickle.dumps(trainer.ema.ema)
        assert any(isinstance(m, dbi.DropBlock) for m in model.modules())  # the training model keeps its own


def test_training_prints_nothing_on_stderr(tmp_path, capfd) -> None:
    model = ultralytics.YOLO("yolov8n.yaml")
    add_dropblock(model)
    data = write_dataset(tmp_path / "data")
    model.train(data=str(data), project=str(tmp_path / "runs"), name="quiet", **{**TRAIN, "epochs": 1})
    assert capfd.readouterr().err == ""
