"""The command line: ``--help``, ``--version``, and the op benchmark on a tiny shape."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dropblock_inject import __version__, drop_block
from dropblock_inject.bench import bench_op
from dropblock_inject.cli import main
from dropblock_inject.op.geometry import block_geometry


class TestCli:
    def test_version_and_help(self, capsys) -> None:
        with pytest.raises(SystemExit) as exc:
            main(["--version"])
        assert exc.value.code == 0
        assert __version__ in capsys.readouterr().out
        assert main([]) == 0
        assert "bench" in capsys.readouterr().out

    def test_python_dash_m(self) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "dropblock_inject", "--help"], capture_output=True, text=True, check=True
        )
        assert "dropblock-inject" in out.stdout

    def test_bad_argument_exits_2(self, capsys) -> None:
        with pytest.raises(SystemExit) as exc:
            main(["bench", "op", "--repeats", "0"])
        assert exc.value.code == 2


class TestBench:
    def test_bench_op_reports_ratios(self) -> None:
        # a benchmark is a command: this checks that it runs and prints a line per row, not its numbers
        lines: list[str] = []
        rows = bench_op([((2, 8, 14, 14), 7)], repeats=1, print_fn=lines.append)
        names = {row["name"] for row in rows}
        assert {"floor x*2", "ours per-channel", "ours shared"} <= names
        for name in names:
            assert any(line.strip().startswith(name) and line.endswith("x floor") for line in lines), name

    def test_bench_op_compiled_rows_use_the_compiled_floor(self, monkeypatch) -> None:
        import torch

        monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the wiring, without Inductor's minutes
        lines: list[str] = []
        rows = bench_op([((2, 8, 14, 14), 7)], repeats=1, compiled=True, print_fn=lines.append)
        names = {row["name"] for row in rows}
        assert {"compiled floor x*2", "compiled per-channel", "compiled shared"} <= names
        for name in {"compiled floor x*2", "compiled per-channel", "compiled shared"}:
            assert any(line.strip().startswith(name) and line.endswith("x compiled floor") for line in lines), name

    def test_time_paired_times_each_candidate_right_after_its_baseline(self, monkeypatch) -> None:
        from dropblock_inject import bench

        calls: list[str] = []
        durations = {"floor": 2.0, "a": 3.0, "b": 5.0}
        monkeypatch.setattr(bench, "_sample", lambda fn, number, device: fn())
        fns = {name: (lambda name=name: calls.append(name) or durations[name]) for name in durations}
        timed = bench.time_paired(fns, lambda name: "floor", repeats=2)
        assert calls == ["floor", "floor", "a", "floor", "b"] * 2
        assert timed == {"floor": (2.0, 1.0), "a": (3.0, 1.5), "b": (5.0, 2.5)}

    def test_steady_heap_in_its_own_process(self) -> None:
        code = "from dropblock_inject.bench import steady_heap; print(repr(steady_heap()))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        import ctypes.util

        if sys.platform.startswith("linux") and "libc.so" in (ctypes.util.find_library("c") or ""):
            assert "heap: steady" in out
        else:
            assert out.strip() == "''"

    @pytest.mark.parametrize("fresh", [False, True])
    def test_bench_commands_keep_the_heap_steady_unless_asked(self, monkeypatch, fresh) -> None:
        from dropblock_inject import bench

        called: list[str] = []
        monkeypatch.setattr(bench, "steady_heap", lambda: called.append("heap") or "heap: steady")
        monkeypatch.setattr(bench, "bench_op", lambda *a, **kw: called.append("op"))
        monkeypatch.setattr(bench, "bench_step", lambda *a, **kw: called.append("step"))
        flag = ["--fresh-heap"] if fresh else []
        assert main(["bench", "op", "--shape", "2", "8", "14", "14", *flag]) == 0
        assert main(["bench", "step", "resnet18", *flag]) == 0
        assert called == (["op", "step"] if fresh else ["heap", "op", "heap", "step"])

    def test_bench_op_shape_must_have_4_or_5_sizes(self) -> None:
        with pytest.raises(SystemExit, match="--shape takes 4 or 5 sizes"):
            main(["bench", "op", "--shape", "2", "8", "14"])
        with pytest.raises(SystemExit, match="bench host: --shape takes 4 or 5 sizes"):
            main(["bench", "host", "--shape", "2", "8", "14"])

    def test_bench_host_times_the_fused_dispatch_with_launches_stubbed(self) -> None:
        from dropblock_inject.bench import bench_host
        from dropblock_inject.op import functional, fused

        eligible, launch = functional.fused_eligible, fused._Launch._launch
        lines: list[str] = []
        rows = bench_host([((2, 8, 14, 14), 7)], repeats=1, number=2, print_fn=lines.append)
        assert [r["name"] for r in rows] == ["baseline t*2", "per-channel", "shared"]
        # the whole CUDA path ran on the host: the seed and the apply kernel, per call
        assert [r["launches"] for r in rows] == [0, 2, 2]
        assert rows[0]["ratio"] == 1.0 and all(r["us"] > 0 for r in rows)
        assert any(line.strip().startswith("per-channel") and "x baseline" in line for line in lines)
        # the stubs are gone afterwards: a CPU tensor takes the ATen path again
        assert functional.fused_eligible is eligible and fused._Launch._launch is launch
        assert not functional.fused_eligible(torch.randn(2, 8, 14, 14), block_geometry((14, 14), (7, 7)), False)

    def test_bench_host_command(self, monkeypatch) -> None:
        from dropblock_inject import bench

        seen: list[tuple] = []
        monkeypatch.setattr(bench, "bench_host", lambda shapes, **kw: seen.append((shapes, kw)))
        assert main(["bench", "host", "--shape", "2", "8", "7", "7", "--block", "3", "--number", "5"]) == 0
        assert seen == [([((2, 8, 7, 7), 3)], {"drop_prob": 0.1, "repeats": 7, "number": 5})]

    def test_the_benchmarks_never_import_the_command_line(self) -> None:
        # the dependency goes one way, cli -> bench
        import ast
        from pathlib import Path

        from dropblock_inject import bench

        tree = ast.parse(Path(bench.__file__).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m == "dropblock_inject.cli" or m.startswith("dropblock_inject.cli.")}
        code = "import sys, dropblock_inject.bench; print('dropblock_inject.cli' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "False"

    def test_detection_backbone_names(self) -> None:
        from dropblock_inject.errors import DropBlockInjectError
        from dropblock_inject.models import create_model

        assert type(create_model("tv:fasterrcnn_mobilenet_v3_large_fpn.backbone")).__name__ == "BackboneWithFPN"
        with pytest.raises(DropBlockInjectError, match=r"only '\.backbone'"):
            create_model("tv:resnet18.backbone")


class TestVizAndBenchStep:
    def test_viz_writes_a_png(self, tmp_path) -> None:
        out = tmp_path / "plan.png"
        assert main(["viz", "tv:resnet18", "--out", str(out), "--channels", "4"]) == 0
        from PIL import Image

        with Image.open(out) as image:
            assert image.format == "PNG" and image.size[0] > 100

    def test_bench_step_reports_ratios(self) -> None:
        from dropblock_inject.bench import bench_step

        lines: list[str] = []
        times = bench_step("resnet10t", batch_size=2, input_size=(3, 64, 64), repeats=1, print_fn=lines.append)
        assert {"train unpatched", "train patched", "eval patched", "train timm drop_block_rate"} <= set(times)
        assert {"eval stripped", "memory unpatched", "memory patched", "op share"} <= set(times)
        assert any("DropBlock ops (forward + backward)" in line for line in lines)
        assert any("x unpatched" in line for line in lines)
        assert any(line.strip().startswith("patched") and "MB" in line for line in lines)

    def test_op_share_times_the_op_and_restores_it(self, monkeypatch) -> None:
        import types

        import torch

        from dropblock_inject import bench
        from dropblock_inject.op.functional import _DropBlockFunction

        # a clock that only moves when told: 1 s outside the op and 2 s in its forward per step
        now = [0.0]
        monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
        forward = _DropBlockFunction.forward

        def slow_forward(*args):
            now[0] += 2.0
            return forward(*args)

        monkeypatch.setattr(_DropBlockFunction, "forward", staticmethod(slow_forward))
        originals = (_DropBlockFunction.forward, _DropBlockFunction.backward)
        x = torch.randn(8, 32, 14, 14, requires_grad=True)

        def step() -> None:
            now[0] += 1.0
            drop_block(x, 0.1, 5).sum().backward()

        assert bench.op_share(step, repeats=3) == pytest.approx(2.0 / 3.0)
        assert (_DropBlockFunction.forward, _DropBlockFunction.backward) == originals

        def failing() -> None:
            raise RuntimeError("step failed")

        with pytest.raises(RuntimeError, match="step failed"):
            bench.op_share(failing)
        assert (_DropBlockFunction.forward, _DropBlockFunction.backward) == originals

    def test_bench_step_with_memory_writes_nothing_to_stderr(self) -> None:
        # the CPU peak comes from torch's profiler, whose native logging (profiler_start/stop, a failed CUDA
        # device count) goes to file descriptor 2: a subprocess sees what a user's terminal would
        argv = ["bench", "step", "resnet10t", "--batch-size", "2", "--input-size", "3", "32", "32", "--repeats", "1"]
        out = subprocess.run([sys.executable, "-m", "dropblock_inject", *argv], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "peak allocated" in out.stdout and "DropBlock ops (forward + backward)" in out.stdout
        assert out.stderr == ""

    def test_bench_step_channels_last_and_autocast(self) -> None:
        from dropblock_inject.bench import bench_step

        lines: list[str] = []
        times = bench_step("resnet10t", batch_size=2, input_size=(3, 64, 64), repeats=1, channels_last=True,
                           amp="bf16", memory=False, print_fn=lines.append)  # fmt: skip
        assert "train patched" in times and "memory patched" not in times
        assert "channels_last, autocast bf16" in lines[0]


TINY = "test_finetune:tiny_net"  # tests/test_finetune.py; pytest puts tests/ on sys.path
FAST = ["--model", TINY, "--input-size", "16", "--epochs", "1"]
FAST += ["--limit-train-batches", "3", "--limit-val-batches", "1"]


def one_line_error(capsys, command: str) -> str:
    """The captured stderr, checked to be one line naming the command, without a traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dropblock-inject {command}: error: ") and "Traceback" not in err
    return lines[0]


class TestPlanCommand:
    def test_table(self, capsys) -> None:
        assert main(["plan", "tv:resnet18", "--input-size", "3", "64", "64", "--drop-prob", "0.2"]) == 0
        out = capsys.readouterr().out
        assert "DropBlock plan for ResNet at input 3x64x64" in out and "layer4.1.bn1" in out

    def test_json(self, capsys) -> None:
        import json

        assert main(["plan", "tv:resnet18", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["model"] == "tv:resnet18" and doc["input_size"] == [3, 224, 224]
        assert [s["stage"] for s in doc["sites"]] == [3, 3, 4, 4]
        assert doc["sites"][0]["feature"] == [14, 14] and doc["stages"][-1]["feature"] == [7, 7]

    def test_recipe(self, capsys) -> None:
        assert main(["plan", "resnet10t", "--recipe", "auto", "--input-size", "3", "64", "64"]) == 0
        assert "layer4.0" in capsys.readouterr().out

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["resnett18"], "close matches: ['resnet18'"),
            (["tv:resnet18", "--recipe", "missing.yaml"], "does not exist"),
            (["tv:resnet18", "--recipe", "no_such_recipe"], "unknown recipe"),
            (["tv:resnet18", "--drop-prob", "1.5"], "--drop-prob must be in [0, 1)"),
            (["tv:resnet18", "--input-size", "3", "-4", "4"], "input_size"),
        ],
    )
    def test_user_errors(self, capsys, argv: list[str], message: str) -> None:
        assert main(["plan", *argv]) == 2
        assert message in one_line_error(capsys, "plan")


class TestFinetuneCommand:
    def test_compare_from_a_checkpoint_prints_both_and_writes(self, capsys, tmp_path) -> None:
        import torch
        from test_finetune import tiny_net

        torch.save(tiny_net(num_classes=3).state_dict(), tmp_path / "pre.pt")
        out = tmp_path / "run"
        argv = ["finetune", *FAST, "--compare", "--out", str(out), "--checkpoint", str(tmp_path / "pre.pt")]
        assert main(argv) == 0
        text = capsys.readouterr().out
        assert "DropBlock plan for Sequential" in text and "epoch 1/1" in text
        assert "classifier head 14.bias, 14.weight not taken from" in text
        assert "held-out accuracy with DropBlock: " in text and "held-out accuracy without DropBlock: " in text
        table = text[text.index("val acc  val loss") :].splitlines()
        assert table[1].startswith("with DropBlock") and table[2].startswith("without DropBlock")
        assert sorted(p.name for p in out.iterdir()) == [
            "baseline.pt", "metrics.csv", "metrics.json", "model.pt",
        ]  # fmt: skip

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--model", "resnett18"], "unknown timm model 'resnett18'; close matches"),
            (["--model", "tv:resnet_18"], "unknown torchvision model"),
            (["--data", "/no/such/folder"], "does not exist or is not a folder"),
            (["--recipe", "missing.yaml"], "recipe file 'missing.yaml' does not exist"),
            (["--epochs", "0"], "epochs must be a positive integer, got 0"),
            (["--batch-size", "-8"], "batch_size must be a positive integer"),
            (["--lr", "-1"], "lr must be a positive number"),
            (["--drop-prob", "-0.1"], "drop_prob must be in [0, 1)"),
            (["--workers", "-1"], "workers must be an integer >= 0"),
            (["--seed", "-1"], "seed must be an integer >= 0"),
            (["--input-size", "3", "32", "48"], "--input-size takes S or 3 S S"),
            (["--checkpoint", "/no/such.pt"], "checkpoint '/no/such.pt' does not exist"),
            (["--pretrained", "--checkpoint", "x.pt"], "either pretrained or checkpoint"),
        ],
    )
    def test_user_errors(self, capsys, argv: list[str], message: str) -> None:
        assert main(["finetune", *argv]) == 2
        assert message in one_line_error(capsys, "finetune")

    def test_unusable_files(self, capsys, tmp_path) -> None:
        import torch
        from PIL import Image

        (tmp_path / "data" / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "only" / "a.png")
        assert main(["finetune", *FAST, "--data", str(tmp_path / "data")]) == 2
        assert "at least 2" in one_line_error(capsys, "finetune")

        from dropblock_inject.models import create_model

        torch.save(create_model("resnet10t").state_dict(), tmp_path / "r10.pt")
        assert main(["finetune", *FAST, "--checkpoint", str(tmp_path / "r10.pt")]) == 2
        line = one_line_error(capsys, "finetune")
        assert "does not fit Sequential: missing keys: 0.weight" in line and "unexpected keys: conv1.0.weight" in line

        (tmp_path / "bad.yaml").write_text("stages: [1\n")
        assert main(["finetune", *FAST, "--recipe", str(tmp_path / "bad.yaml")]) == 2
        assert "bad.yaml" in one_line_error(capsys, "finetune")


class TestProgress:
    """The rich bars on a terminal: one overall bar for ablate (runs done, total, time left)."""

    def terminal(self, reporter):
        import io

        from rich.console import Console

        reporter.bar.console = Console(file=io.StringIO(), force_terminal=True, width=120)
        return reporter

    def test_ablation_bar_counts_runs_and_steps(self) -> None:
        from dropblock_inject.cli_progress import rich_ablation_reporter

        rep = self.terminal(rich_ablation_reporter())
        rep.ablation_start(runs=6, finished=2, steps_per_run=5)
        task = rep.bar.progress.tasks[0]
        assert task.total == 4 * 5 and task.description == "runs 0/4"
        rep.run_start("dropblock", 3, 1, 4)
        for i in range(5):
            rep.step("dropblock", 1, i + 1, 0.5)
        assert task.completed == 5 and task.description == "runs 0/4: dropblock seed 3"
        row = {"arm": "dropblock", "seed": 3, "val_acc": 0.9, "val_loss": 0.3, "realised_drop": 0.05,
               "realised_by_stage": "8x8=0.0200", "seconds": 1.0}  # fmt: skip
        rep.run_end(row, 1, 4)
        assert task.description == "runs 1/4"
        assert "[1/4] dropblock seed 3: acc 90.00%" in rep.bar.console.file.getvalue()
        for i in (2, 3, 4):
            rep.run_end(row, i, 4)
        assert rep.bar.progress is None  # stopped after the last run
        rep.ablation_start(runs=6, finished=6, steps_per_run=5)
        assert rep.bar.progress is None  # nothing to run: no bar left behind

    def test_finetune_bar(self) -> None:
        from dropblock_inject.cli_progress import rich_finetune_reporter

        rep = self.terminal(rich_finetune_reporter())
        rep.train_start("dropblock", 2, 3)
        task = rep.bar.progress.tasks[0]
        rep.step("dropblock", 1, 1, 0.25)
        assert (task.total, task.completed, task.fields["loss"]) == (6, 1, "0.250")
        rep.train_end("dropblock")
        assert rep.bar.progress is None
