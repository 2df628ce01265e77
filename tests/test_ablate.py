"""``ablate``: arms, pairing, resume, shards, a changed config, torn rows, verdicts, and the command."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from test_finetune import TINY

from dropblock_inject.cli import main
from dropblock_inject.models import create_model
from dropblock_inject.train import AblationConfig, AblationReporter, ConfigError, ablate, plan_for, report
from dropblock_inject.train.ablate import _grid
from dropblock_inject.train.arms import Arm, attach, expand_arms, unavailable_reason
from dropblock_inject.train.report import RunResult
from dropblock_inject.train.store import AblationStore


class Quiet(AblationReporter):
    """Keeps the lines instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def tiny(out, **changes) -> AblationConfig:
    values = {"model": TINY, "input_size": 16, "epochs": 2, "batch_size": 32, "lr": 5e-3, "drop_prob": 0.2,
              "train_per_class": 10, "seeds": 2, "arms": ["none", "dropblock"], "out": str(out)}  # fmt: skip
    return AblationConfig(**{**values, **changes})


class StubRun:
    """Stands in for training: accuracy = a per-seed base + the arm's effect + a little noise per (arm, seed)."""

    def __init__(self, effects: dict[str, float], noise: float = 0.004, fail_at: int | None = None) -> None:
        self.effects, self.noise, self.fail_at = effects, noise, fail_at
        self.calls: list[tuple[str, int]] = []

    def __call__(self, setup, arm: Arm, seed: int) -> RunResult:
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise KeyboardInterrupt  # the run in progress is lost, nothing else
        self.calls.append((arm.name, seed))
        gen = torch.Generator().manual_seed(1000 * seed + len(arm.name))
        acc = (
            0.85
            + 0.02 * math.sin(seed)
            + self.effects.get(arm.kind, 0.0)
            + self.noise * float(torch.randn(1, generator=gen))
        )
        row = {"epoch": 1, "train_loss": 0.5, "val_loss": 1 - acc, "val_acc": acc, "drop_rate": 0.1,
               "realised_drop": 0.0, "realised_by_stage": "", "lr": 1e-3, "seconds": 0.01}  # fmt: skip
        return RunResult(arm.name, [row], acc, 1 - acc, round(acc * 359), 359, 0.01, None, seed=seed, init_hash="h")


class TestArms:
    def test_sweep_names(self) -> None:
        config = AblationConfig(arms=["none", "dropblock-fixed", "cutout", "timm"], drop_probs=[0.05, 0.1],
                                block_sizes=[3, 5])  # fmt: skip
        names = [a.name for a in expand_arms(config)]
        assert names == ["none", "dropblock-fixed[p=0.05,b=3]", "dropblock-fixed[p=0.05,b=5]",
                         "dropblock-fixed[p=0.1,b=3]", "dropblock-fixed[p=0.1,b=5]", "cutout", "timm[p=0.05]",
                         "timm[p=0.1]"]  # fmt: skip

    def test_every_dropping_arm_uses_the_same_sites(self) -> None:
        config = AblationConfig(arms=["dropblock"])
        hosts, blocks = {}, {}
        for kind in ("dropblock", "dropblock-fixed", "spatial-dropout", "dropout"):
            model = create_model(config.model, num_classes=10)
            reg = attach(Arm(kind), config, model, total_steps=10)
            hosts[kind] = [s.host for s in reg.plan]
            blocks[kind] = [s.block_size for s in reg.plan]
            assert reg.schedule.kind == ("constant" if kind == "dropblock-fixed" else "linear")
        assert len({tuple(h) for h in hosts.values()}) == 1
        assert blocks["dropblock"] == [(5, 5), (3, 3)]  # the digits' rules at 8x8 and 4x4
        assert blocks["spatial-dropout"] == [(8, 8), (4, 4)]
        assert blocks["dropout"] == [(1, 1), (1, 1)]

    def test_timm_arm_ramps_timms_own_dropblocks(self) -> None:
        config = AblationConfig(arms=["timm"], drop_prob=0.2)
        model = create_model(config.model, num_classes=10, drop_block_rate=0.2)
        reg = attach(Arm("timm"), config, model, total_steps=4)
        timm_blocks = [m for m in model.modules() if type(m).__name__ == "DropBlock2d"]
        assert len(timm_blocks) == 2 and all(m.drop_prob == 0.0 for m in timm_blocks)
        for _ in range(2):
            reg.schedule.step()
        assert [m.drop_prob for m in timm_blocks] == [0.1, 0.1]
        assert reg.scheduled_rate() == pytest.approx(0.1)

    @pytest.mark.parametrize(
        ("model", "reason"),
        [("resnet10t", None), ("efficientnet_b0", "takes no drop_block_rate"), ("tv:resnet18", "not a timm model")],
    )
    def test_timm_arm_availability(self, model, reason) -> None:
        why = unavailable_reason(Arm("timm"), AblationConfig(model=model, arms=["timm"]))
        assert why is None if reason is None else reason in why
        assert unavailable_reason(Arm("dropblock"), AblationConfig(model=model)) is None


class TestConfig:
    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"arms": ["none", "dropconnect"]}, "unknown arm 'dropconnect'; the arms are none, dropblock,"),
            ({"seeds": 1}, "seeds must be at least 2 (an interval over seeds needs two)"),
            ({"shard": "3/2"}, "shard must be i/n with 1 <= i <= n"),
            ({"shard": "a/b"}, "shard must be i/n"),
            ({"drop_probs": [0.1, 1.5]}, "drop_probs must be rates in (0, 1)"),
            ({"block_sizes": [0]}, "block_sizes must be a positive integer"),
            ({"compare": True}, "compare is a finetune setting"),
            ({"train_per_class": 0}, "train_per_class must be a positive integer"),
        ],
    )
    def test_bad_settings(self, changes, message) -> None:
        with pytest.raises(ConfigError, match=None) as e:
            AblationConfig(**changes)
        assert message in str(e.value)

    def test_defaults_and_round_trip(self) -> None:
        config = AblationConfig()
        assert config.arms == ("none", "dropblock", "spatial-dropout", "dropout")
        assert (config.seeds, config.train_per_class, config.input_size) == (5, 20, 64)
        assert AblationConfig(data="some/folder").train_per_class is None
        back = AblationConfig.from_dict(json.loads(json.dumps(AblationConfig(drop_probs=[0.1]).to_dict())))
        assert back == AblationConfig(drop_probs=[0.1])


class TestStubbed:
    def test_a_known_large_effect_is_better_and_files_are_written(self, tmp_path) -> None:
        stub = StubRun({"dropblock": 0.03})
        result = ablate(tiny(tmp_path, seeds=5), Quiet(), run=stub)
        c = result.summary.comparison("dropblock")
        assert c.verdict == "better" and c.wins == 5
        assert "dropblock vs none: +3." in result.table and ": better" in result.table
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "ablation.png", "config.json", "curves.csv", "runs.csv", "summary.json", "summary.md",
        ]  # fmt: skip
        assert (tmp_path / "summary.md").read_text().strip() == result.table
        doc = json.loads((tmp_path / "summary.json").read_text())
        assert doc["comparisons"][0]["verdict"] == "better" and len(doc["runs"]) == 10
        assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_a_null_effect_is_not_called_better(self, tmp_path) -> None:
        stub = StubRun({}, noise=0.01)
        result = ablate(tiny(tmp_path, seeds=5, arms=["none", "dropblock", "dropout"]), Quiet(), run=stub)
        verdicts = {c.arm: c.verdict for c in result.summary.comparisons}
        assert verdicts == {"dropblock": "no difference detectable", "dropout": "no difference detectable"}
        assert any(c.difference > 0 for c in result.summary.comparisons)  # a point estimate would have said better
        assert "seeds would detect a 0.5-point difference" in result.table

    def test_a_second_run_trains_nothing_and_more_seeds_add_runs(self, tmp_path) -> None:
        first = StubRun({})
        assert ablate(tiny(tmp_path), Quiet(), run=first).ran == 4
        again = StubRun({})
        result = ablate(tiny(tmp_path), Quiet(), run=again)
        assert (result.ran, result.skipped, again.calls) == (0, 4, [])
        assert result.summary is not None and len(result.rows) == 4
        more = StubRun({})
        assert ablate(tiny(tmp_path, seeds=3), Quiet(), run=more).ran == 2
        assert more.calls == [("none", 2), ("dropblock", 2)]

    def test_shards_cover_the_grid_once_and_report_merges_them(self, tmp_path) -> None:
        config = tiny(tmp_path, seeds=3, arms=["none", "dropblock", "dropout"])
        whole = {(a.name, s) for a, s in _grid(config, expand_arms(config), None)}
        done = []
        for i in (1, 2, 3, 4):
            stub = StubRun({})
            result = ablate(tiny(tmp_path, seeds=3, arms=["none", "dropblock", "dropout"], shard=f"{i}/4"), Quiet(),
                            run=stub)  # fmt: skip
            assert result.summary is None and f"shard {i}/4" in result.table
            done += stub.calls
        assert sorted(done) == sorted(whole) and len(done) == len(whole)
        assert len(list(tmp_path.glob("runs.shard-*-of-4.csv"))) == 4
        merged = report(tmp_path, Quiet())
        assert {(r["arm"], r["seed"]) for r in merged.rows} == whole
        assert [a.arm for a in merged.summary.arms] == ["none", "dropblock", "dropout"]

    def test_a_changed_config_is_refused_naming_the_fields(self, tmp_path) -> None:
        ablate(tiny(tmp_path), Quiet(), run=StubRun({}))
        with pytest.raises(ConfigError) as e:
            ablate(tiny(tmp_path, epochs=3, lr=1e-3), Quiet(), run=StubRun({}))
        message = str(e.value)
        assert "holds an ablation of another config" in message
        assert "epochs 2 there, 3 here" in message and "lr 0.005 there, 0.001 here" in message
        assert "drop_prob" not in message

    def test_an_interrupted_run_loses_only_the_run_in_progress(self, tmp_path) -> None:
        with pytest.raises(KeyboardInterrupt):
            ablate(tiny(tmp_path), Quiet(), run=StubRun({}, fail_at=3))
        assert [(r["arm"], r["seed"]) for r in AblationStore(tmp_path).rows()] == [("none", 0), ("dropblock", 0)]
        rest = StubRun({})
        assert ablate(tiny(tmp_path), Quiet(), run=rest).ran == 2
        assert rest.calls == [("none", 1), ("dropblock", 1)]

    def test_a_torn_row_is_dropped_and_cut_before_the_next(self, tmp_path) -> None:
        ablate(tiny(tmp_path), Quiet(), run=StubRun({}))
        runs = tmp_path / "runs.csv"
        whole = runs.read_text()
        torn = whole.splitlines(keepends=True)[-1][:20]  # a crash in the middle of the last row
        runs.write_text("".join(whole.splitlines(keepends=True)[:-1]) + torn)
        assert len(AblationStore(tmp_path).rows()) == 3
        rest = StubRun({})
        assert ablate(tiny(tmp_path), Quiet(), run=rest).ran == 1
        with open(runs, newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 and all(None not in r.values() and r["config_hash"] for r in rows)


class TestReal:
    """Real training of a tiny net on 10 digits per class."""

    def test_pairing_realised_rates_and_identical_data(self, tmp_path) -> None:
        inputs: dict[tuple[str, int], list[torch.Tensor]] = {}

        class Watch(Quiet):
            def on_model(self, run, model) -> None:
                seen = inputs.setdefault((run, len([k for k in inputs if k[0] == run])), [])
                model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)

        arms = ["none", "dropblock", "dropout", "cutout"]
        result = ablate(tiny(tmp_path, arms=arms), Watch())
        rows = {(r["arm"], r["seed"]): r for r in result.rows}
        for seed in (0, 1):
            assert len({rows[(a, seed)]["init_hash"] for a in arms}) == 1  # the same initial weights in every arm
        assert rows[("none", 0)]["init_hash"] != rows[("none", 1)]["init_hash"]
        for seed in (0, 1):
            assert rows[("none", seed)]["realised_drop"] == 0.0 and rows[("cutout", seed)]["realised_drop"] == 0.0
            for arm in ("dropblock", "dropout"):
                assert rows[(arm, seed)]["realised_drop"] > 0.0
                stages = [item.split("=")[0] for item in rows[(arm, seed)]["realised_by_stage"].split()]
                assert stages == ["8x8", "4x4"]  # the digits' rules: the two stages before the last
        # the same batches (order and augmentation) whatever the arm draws in between
        for seed in (0, 1):
            base = inputs[("none", seed)]
            for arm in ("dropblock", "dropout"):
                assert len(inputs[(arm, seed)]) == len(base) == 2 * 3
                assert all(torch.equal(a, b) for a, b in zip(inputs[(arm, seed)], base))
            erased = inputs[("cutout", seed)]
            assert any(not torch.equal(a, b) for a, b in zip(erased, base))
            assert all(torch.equal(a[(a != 0).flatten(1).all(1)], b[(a != 0).flatten(1).all(1)])
                       for a, b in zip(erased, base))  # fmt: skip

    def test_timm_arm_shares_the_initial_weights(self, tmp_path) -> None:
        config = tiny(
            tmp_path,
            model="resnet10t",
            input_size=32,
            epochs=1,
            seeds=2,
            arms=["none", "timm"],
            limit_train_batches=3,
            limit_val_batches=1,
        )  # fmt: skip (the ramp is 0 at the first step)
        result = ablate(config, Quiet())
        hashes = {(r["arm"], r["seed"]): r["init_hash"] for r in result.rows}
        assert hashes[("none", 0)] == hashes[("timm", 0)] != hashes[("none", 1)] == hashes[("timm", 1)]
        assert all(r["realised_drop"] > 0 for r in result.rows if r["arm"] == "timm")

    def test_plan_for_the_default(self) -> None:
        config = AblationConfig()
        sites = plan_for(config, create_model(config.model, num_classes=10))
        assert [(s.feature, s.block_size) for s in sites] == [((8, 8), (5, 5)), ((4, 4), (3, 3))]


class TestCommand:
    def test_the_embedded_default_reduced(self, capsys, tmp_path) -> None:
        argv = ["ablate", "--epochs", "1", "--seeds", "2", "--limit-train-batches", "1", "--limit-val-batches", "1",
                "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        out = capsys.readouterr()
        assert "| arm | seeds | accuracy % | loss | realised drop | Δ points vs none | won | verdict |" in out.out
        for arm in ("dropblock", "spatial-dropout", "dropout"):
            assert f"{arm} vs none: " in out.out
        assert out.err == ""
        assert main(argv) == 0
        assert "8 of 8 runs already finished in the out folder: skipped" in capsys.readouterr().out
        assert main(["ablate", "--report", str(tmp_path)]) == 0
        assert "Ablation: resnet10t on embedded digits" in capsys.readouterr().out

    def test_unavailable_timm_arm_lets_the_rest_run(self, capsys, tmp_path) -> None:
        argv = ["ablate", "--model", TINY, "--input-size", "16", "--epochs", "1", "--seeds", "2", "--arms",
                "none,timm,dropblock", "--limit-train-batches", "1", "--limit-val-batches", "1",
                "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "arm timm unavailable: test_finetune:tiny_net is not a timm model" in out
        assert "dropblock vs none" in out

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (
                ["--arms", "none,dropconnect"],
                "unknown arm 'dropconnect'; the arms are none, dropblock, dropblock-fixed",
            ),
            (["--seeds", "1"], "seeds must be at least 2"),
            (["--shard", "2-4"], "shard must be i/n with 1 <= i <= n (e.g. 2/4), got '2-4'"),
            (["--drop-probs", "0.1,x"], "--drop-probs takes comma-separated floats, got '0.1,x'"),
            (["--report", "/no/such/folder"], "holds no ablation (no config.json)"),
        ],
    )
    def test_bad_input_is_one_line_and_status_2(self, capsys, argv, message) -> None:
        from test_cli import one_line_error

        assert main(["ablate", *argv]) == 2
        assert message in one_line_error(capsys, "ablate")

    def test_another_config_in_the_folder_is_one_line_and_loses_nothing(self, capsys, tmp_path) -> None:
        from test_cli import one_line_error

        ablate(tiny(tmp_path), Quiet(), run=StubRun({}))
        before = (tmp_path / "runs.csv").read_bytes()
        argv = ["ablate", "--model", TINY, "--input-size", "16", "--epochs", "5", "--out", str(tmp_path)]
        assert main(argv) == 2
        assert "holds an ablation of another config (epochs 2 there, 5 here" in one_line_error(capsys, "ablate")
        assert (tmp_path / "runs.csv").read_bytes() == before


def _ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    import os

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    config = tiny(os.path.join(folder, "out"), epochs=1, limit_train_batches=2, limit_val_batches=1)
    first, second = (ablate(config, Quiet()) for _ in range(2))
    torch.save({"ran": [first.ran, second.ran], "rows": len(first.rows)}, os.path.join(folder, f"rank{rank}.pt"))


@pytest.mark.slow
class TestDistributed:
    def test_two_gloo_ranks_run_the_grid_once_and_rank_0_writes(self, tmp_path) -> None:
        from test_finetune import _free_port

        torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
        r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        assert r0["ran"] == r1["ran"] == [4, 0]  # both ranks train every run together; the second call skips all
        assert r0["rows"] == 4 and r1["rows"] == 0  # rank 0 reads and summarises
        assert len(AblationStore(tmp_path / "out").rows()) == 4
