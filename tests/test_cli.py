"""The command line: ``--help``, ``--version``, and the op benchmark on a tiny shape."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dropblock_inject import __version__
from dropblock_inject.bench import bench_op
from dropblock_inject.cli import main


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
        lines: list[str] = []
        rows = bench_op([((2, 8, 14, 14), 7)], repeats=1, print_fn=lines.append)
        names = {row["name"] for row in rows}
        assert {"floor x*2", "ours per-channel", "ours shared"} <= names
        assert next(r for r in rows if r["name"] == "floor x*2")["ratio"] == 1.0
        assert any("x floor" in line for line in lines)


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
        assert any("x unpatched" in line for line in lines)
