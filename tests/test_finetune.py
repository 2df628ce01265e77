"""``finetune``: config validation, checkpoints, a tiny run on the digits, and two ranks on gloo."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from dropblock_inject import DropBlock
from dropblock_inject.errors import DropBlockInjectError, RecipeError
from dropblock_inject.models import create_model
from dropblock_inject.train import (
    CheckpointError,
    ConfigError,
    FinetuneConfig,
    Reporter,
    finetune,
    load_weights,
    plan_for,
    read_checkpoint,
)
from dropblock_inject.train.config import DIGITS_RULES

TINY = "test_finetune:tiny_net"  # importable: pytest puts tests/ on sys.path (and spawn passes it on)


def tiny_net(num_classes: int = 10, width: int = 16) -> nn.Module:
    """Four conv-BN-ReLU (strides 2, 2, 2, 1) and a linear head: 16 px -> 8, 4, 2, 2."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    layers = block(3, width, 2) + block(width, 2 * width, 2) + block(2 * width, 4 * width, 2)
    layers += block(4 * width, 4 * width, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def tiny_config(**changes) -> FinetuneConfig:
    values = {"model": TINY, "input_size": 16, "epochs": 2, "batch_size": 64, "lr": 5e-3, "drop_prob": 0.2}
    return FinetuneConfig(**{**values, **changes})


class Recorder(Reporter):
    """Keeps what ``finetune`` reports instead of printing it."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.steps = 0
        self.models: dict[str, nn.Module] = {}
        self.dropblocks: dict[str, int] = {}

    def message(self, text: str) -> None:
        self.lines.append(text)

    def on_model(self, run: str, model: nn.Module) -> None:
        self.models[run] = model
        self.dropblocks[run] = sum(isinstance(m, DropBlock) for m in model.modules())

    def step(self, run: str, epoch: int, step: int, loss: float) -> None:
        self.steps += 1

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class TestConfig:
    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"epochs": 0}, "epochs must be a positive integer, got 0"),
            ({"batch_size": -1}, "batch_size"),
            ({"lr": -0.1}, "lr must be a positive number"),
            ({"lr": float("nan")}, "lr"),
            ({"drop_prob": 1.0}, r"drop_prob must be in \[0, 1\)"),
            ({"workers": -1}, "workers"),
            ({"input_size": 0}, "input_size"),
            ({"seed": -3}, "seed"),
            ({"optimizer": "adam"}, "optimizer"),
            ({"pretrained": True, "checkpoint": "x.pt"}, "either pretrained or checkpoint"),
        ],
    )
    def test_bad_values(self, changes: dict, message: str) -> None:
        with pytest.raises(ConfigError, match=message) as exc:
            FinetuneConfig(**changes)
        assert isinstance(exc.value, DropBlockInjectError) and isinstance(exc.value, ValueError)

    def test_missing_recipe_file(self, tmp_path: Path) -> None:
        with pytest.raises(RecipeError, match="does not exist"):
            FinetuneConfig(recipe=str(tmp_path / "nope.yaml"))

    def test_dict_round_trip(self) -> None:
        config = FinetuneConfig(epochs=3, compare=True, data="x")
        assert FinetuneConfig.from_dict(config.to_dict()) == config
        with pytest.raises(ConfigError, match="unknown"):
            FinetuneConfig.from_dict({"epoch": 3})
        assert "epochs" in FinetuneConfig.help("epochs")


class TestDefaultDemo:
    """``dropblock-inject finetune`` with no arguments must show DropBlock, not SpatialDropout."""

    def test_every_default_site_drops_blocks_smaller_than_its_map(self) -> None:
        config = FinetuneConfig()
        chosen = plan_for(config, create_model(config.model, num_classes=10))
        assert len(chosen) >= 2
        for site in chosen:
            block = tuple(min(b, f) for b, f in zip(site.block_size, site.feature))  # as the op clips it
            assert all(b < f for b, f in zip(block, site.feature)), (site.conv, site.feature, site.block_size)

    def test_the_digits_rules_apply_only_without_a_recipe_and_on_the_digits(self) -> None:
        assert FinetuneConfig().rules() is DIGITS_RULES
        assert FinetuneConfig(recipe="resnet").rules() == "resnet"
        assert FinetuneConfig(data="images").rules() is None


class TestCheckpoint:
    def test_read_variants(self, tmp_path: Path) -> None:
        state = tiny_net().state_dict()
        for i, obj in enumerate([state, {"model": state, "epoch": 3}, {f"module.{k}": v for k, v in state.items()}]):
            torch.save(obj, tmp_path / f"{i}.pt")
            loaded = read_checkpoint(tmp_path / f"{i}.pt")
            assert loaded.keys() == state.keys()

    def test_unreadable(self, tmp_path: Path) -> None:
        with pytest.raises(CheckpointError, match="does not exist"):
            read_checkpoint(tmp_path / "nope.pt")
        (tmp_path / "junk.pt").write_text("not a checkpoint")
        with pytest.raises(CheckpointError, match="cannot read"):
            read_checkpoint(tmp_path / "junk.pt")
        torch.save([1, 2], tmp_path / "list.pt")
        with pytest.raises(CheckpointError, match="no state_dict"):
            read_checkpoint(tmp_path / "list.pt")

    def test_same_architecture_loads_strictly(self) -> None:
        source, target = tiny_net(), tiny_net()
        assert load_weights(target, source.state_dict()) is None
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))

    def test_other_head_is_reset(self) -> None:
        source, target = tiny_net(num_classes=5), tiny_net(num_classes=10)
        fresh_head = target[-1].weight.clone()
        note = load_weights(target, source.state_dict(), source="ckpt.pt")
        assert "14.weight" in note and "ckpt.pt" in note
        assert torch.equal(target[-1].weight, fresh_head)
        assert torch.equal(target[0].weight, source[0].weight)

    @pytest.mark.parametrize("name", ["tv:mobilenet_v3_small", "resnet10t"])
    def test_real_heads(self, name: str) -> None:
        source, target = create_model(name), create_model(name, num_classes=10)
        note = load_weights(target, source.state_dict())
        head = "classifier.3" if name.startswith("tv:") else "fc"  # the last Linear; timm's pretrained_cfg
        assert f"{head}.weight" in note and f"{head}.bias" in note

    def test_other_architecture_names_keys(self) -> None:
        with pytest.raises(CheckpointError) as exc:
            load_weights(create_model("resnet10t", num_classes=10), create_model("tv:resnet18").state_dict())
        text = str(exc.value)
        assert "does not fit ResNet" in text and "missing keys: conv1.0.weight" in text
        assert "unexpected keys: conv1.weight" in text and "\n" not in text

    def test_shape_mismatch_outside_the_head(self) -> None:
        with pytest.raises(CheckpointError, match=r"shape mismatches: 0\.weight \(32, 3, 3, 3\) vs \(16, 3, 3, 3\)"):
            load_weights(tiny_net(), tiny_net(width=32).state_dict())


class TestFinetune:
    def test_tiny_run_learns_and_writes(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        rec = Recorder()
        result = finetune(tiny_config(limit_train_batches=10, out=str(out)), rec)
        run = result.run("dropblock")
        assert len(run.history) == 2 and run.val_count == 359
        assert run.val_accuracy > 0.5  # chance is 0.1; 0.76 here
        assert run.history[-1]["drop_rate"] == pytest.approx(0.2)
        assert rec.steps == 20
        assert "DropBlock plan for Sequential" in rec.text and "held-out accuracy with DropBlock" in rec.text
        assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json", "model.pt", "notes.txt"]
        assert (out / "notes.txt").read_text() == "mine"
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[-1]["val_acc"]) == run.val_accuracy
        # is it even on? the realised drop per stage, measured in training, printed and written per epoch
        assert [item.split("=")[0] for item in rows[-1]["realised_by_stage"].split()] == ["8x8", "4x4"]
        assert 0.0 < float(rows[0]["realised_drop"]) < float(rows[-1]["realised_drop"])  # the ramp
        assert run.realised.overall == float(rows[-1]["realised_drop"])
        assert "drop 0.200 (realised 8x8=" in rec.text
        doc = json.loads((out / "metrics.json").read_text())
        assert doc["runs"]["dropblock"]["val_accuracy"] == run.val_accuracy and doc["config"]["epochs"] == 2
        assert len(doc["runs"]["dropblock"]["plan"]) > 0

    def test_train_per_class(self) -> None:
        rec = Recorder()
        finetune(tiny_config(epochs=1, train_per_class=5, limit_val_batches=1), rec)
        assert rec.steps == 1  # 50 images: one batch of 64 (kept: not more than one batch)
        assert "5 training images per class (50 in all)" in rec.text

    def test_checkpoint_is_stripped_and_loads_strict(self, tmp_path: Path) -> None:
        rec = Recorder()
        result = finetune(tiny_config(epochs=1, limit_train_batches=2, out=str(tmp_path)), rec)
        assert rec.dropblocks["dropblock"] > 0  # trained with DropBlock
        assert not any(isinstance(m, DropBlock) for m in result.runs[0].model.modules())  # stripped after
        fresh = tiny_net()
        fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
        fresh.eval()
        x = torch.randn(4, 3, 16, 16)
        torch.testing.assert_close(fresh(x), result.runs[0].model.eval()(x))

    def test_same_seed_same_result(self) -> None:
        config = tiny_config(epochs=1, limit_train_batches=3, limit_val_batches=1)
        a, b = finetune(config, Recorder()), finetune(config, Recorder())
        assert a.runs[0].history[0]["train_loss"] == b.runs[0].history[0]["train_loss"]
        assert a.runs[0].val_loss == b.runs[0].val_loss
        c = finetune(tiny_config(epochs=1, limit_train_batches=3, limit_val_batches=1, seed=1), Recorder())
        assert c.runs[0].history[0]["train_loss"] != a.runs[0].history[0]["train_loss"]

    def test_compare_trains_both_from_the_same_start(self, tmp_path: Path) -> None:
        rec = Recorder()
        result = finetune(tiny_config(epochs=1, limit_train_batches=3, compare=True, out=str(tmp_path)), rec)
        assert [r.name for r in result.runs] == ["dropblock", "none"]
        assert result.run("none").history[0]["drop_rate"] == 0.0
        assert "with DropBlock" in rec.text and "without DropBlock" in rec.text
        assert "one seed each: the difference is one draw" in rec.text
        assert (tmp_path / "baseline.pt").is_file()
        assert {r["run"] for r in csv.DictReader((tmp_path / "metrics.csv").open())} == {"dropblock", "none"}
        assert result.run("none").init_hash == result.run("dropblock").init_hash

    def test_starts_from_a_checkpoint_with_another_head(self, tmp_path: Path) -> None:
        torch.manual_seed(123)
        pretrained = tiny_net(num_classes=7)
        torch.save({"model": pretrained.state_dict()}, tmp_path / "pre.pt")
        rec = Recorder()
        config = tiny_config(epochs=1, limit_train_batches=1, lr=1e-9, checkpoint=str(tmp_path / "pre.pt"))
        finetune(config, rec)
        assert "classifier head 14.bias, 14.weight not taken from" in rec.text
        start = rec.models["dropblock"]
        torch.testing.assert_close(start[0].weight, pretrained[0].weight, atol=1e-6, rtol=0)  # lr ~ 0: barely moved

    def test_checkpoint_of_another_architecture(self, tmp_path: Path) -> None:
        torch.save(create_model("resnet10t").state_dict(), tmp_path / "r10.pt")
        with pytest.raises(CheckpointError, match=r"missing keys: 0\.weight"):
            finetune(tiny_config(checkpoint=str(tmp_path / "r10.pt")), Recorder())

    def test_out_is_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "f").write_text("")
        with pytest.raises(ConfigError, match="exists and is not a folder"):
            finetune(tiny_config(epochs=1, limit_train_batches=1, limit_val_batches=1, out=str(tmp_path / "f")))


# -- two ranks on gloo -------------------------------------------------------------------------


class MaskRecorder(Recorder):
    """Hashes the first non-empty mask of the model's last DropBlock."""

    mask_hash: str | None = None
    _input: torch.Tensor | None = None

    def on_model(self, run: str, model: nn.Module) -> None:
        super().on_model(run, model)
        last = [m for m in model.modules() if isinstance(m, DropBlock)][-1]
        last.register_forward_pre_hook(self._keep_input)  # injected DropBlocks work in place
        last.register_forward_hook(self._record)

    def _keep_input(self, module: nn.Module, inputs: tuple) -> None:
        self._input = inputs[0].detach().clone()

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        dropped = (output == 0) & (self._input != 0)
        if self.mask_hash is None and module.training and dropped.any():
            self.mask_hash = hashlib.sha1(dropped.numpy().tobytes()).hexdigest()


def _ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    rec = MaskRecorder()
    config = tiny_config(epochs=1, limit_train_batches=4, drop_prob=0.5, out=os.path.join(folder, "out"))
    result = finetune(config, rec)
    run = result.runs[0]
    torch.save(
        {"state": run.model.state_dict(), "mask": rec.mask_hash, "lines": len(rec.lines), "acc": run.val_accuracy},
        os.path.join(folder, f"rank{rank}.pt"),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
class TestDistributed:
    def test_two_gloo_ranks(self, tmp_path: Path) -> None:
        torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
        r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        assert r0["state"].keys() == r1["state"].keys()
        for key in r0["state"]:
            assert torch.equal(r0["state"][key], r1["state"][key]), key  # identical weights and buffers
        assert r0["mask"] is not None and r1["mask"] is not None
        assert r0["mask"] != r1["mask"]  # each rank draws its own masks
        assert r0["acc"] == r1["acc"]  # the validation metrics are reduced over both shards
        assert r0["lines"] > 0 and r1["lines"] == 0  # only rank 0 reports
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.csv", "metrics.json", "model.pt"]
