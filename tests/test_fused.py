"""The fused Triton DropBlock (``op/fused.py``): on CUDA where one exists, else in Triton's interpreter.

Without a GPU, ``test_kernels_under_the_interpreter`` runs ``TestFusedKernels`` again in a
subprocess with ``TRITON_INTERPRET=1``, which runs the same kernels on CPU tensors (slowly, so
the shapes are small). The GPU-only checks (no host sync, statistics at scale, dispatch) skip
on CPU with the reason stated.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dropblock_inject as dbi
from conftest import is_union_of_blocks
from dropblock_inject.op import fused, fused_compiled
from dropblock_inject.op.fused import _FusedDropBlock, fused_drop_block, fused_eligible, triton_available
from dropblock_inject.op.geometry import block_geometry

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NO_GPU = "no CUDA device: on a machine with a CUDA GPU, run `bash .ci/gpu-check`"

# (shape, block, gamma, channels_last, dtype)
CASES = [
    ((4, 16, 14, 14), 7, 0.01, False, torch.float32),
    ((4, 16, 14, 14), 7, 0.01, True, torch.float32),
    ((2, 16, 28, 28), 7, 0.01, True, torch.float16),  # channels_last tiles: 8 channels by 8 rows
    ((2, 8, 7, 7), 3, 0.05, False, torch.float16),
    ((2, 8, 7, 7), 3, 0.05, True, torch.bfloat16),
    ((3, 5, 20, 64), 5, 0.02, False, torch.float32),  # a full 64-bit row word
    ((3, 5, 13, 9), 4, 0.2, False, torch.float32),  # odd sizes, an even block, heavy overlap
    ((3, 5, 13, 9), 1, 0.2, False, torch.float32),  # block 1: dropout
    ((2, 8, 7, 7), 7, 0.3, False, torch.float32),  # one seed position per plane (resnet stage 4)
    ((2, 4, 1, 9), 3, 0.3, False, torch.float32),  # a one-row map: the block clipped to (1, 3)
    ((1, 3, 64, 64), (9, 2), 0.02, False, torch.float32),  # rectangular block, two row tiles
    # 3-D: the flat set, a volume's D * H rows as one plane's
    ((2, 8, 4, 14, 14), (2, 7, 7), 0.02, False, torch.float32),  # r3d_18's stage 3 (4x14x14)
    ((2, 8, 2, 7, 7), 3, 0.05, True, torch.bfloat16),  # channels_last_3d, the block's depth clipped to 2
    ((3, 5, 3, 9, 13), (1, 4, 3), 0.1, False, torch.float16),  # depth 1: each slice on its own
    ((1, 4, 5, 12, 40), (3, 3, 5), 0.02, False, torch.float32),  # 60 rows, 40 columns (64-bit words)
]


@pytest.fixture
def device() -> str:
    if HAS_CUDA:
        return "cuda"
    if INTERPRETED and triton_available():
        return "cpu"
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 (test_kernels_under_the_interpreter runs that)")


@pytest.fixture(params=fused.KERNEL_SETS)
def kernels(request, monkeypatch) -> str:
    """Each kernel set in turn (``fused.KERNELS``)."""
    monkeypatch.setattr(fused, "KERNELS", request.param)
    return request.param


def case_input(shape, block, gamma, channels_last, dtype, device):
    """The input and geometry of a case."""
    x = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    return x, block_geometry(shape[2:], (block,) * (x.dim() - 2) if isinstance(block, int) else block)


def record_draws(monkeypatch, what=type) -> list:
    """Record ``what`` of the seed (its type by default) at every ``_Launch.draw``."""
    draws = []
    draw = fused._Launch.draw
    monkeypatch.setattr(
        fused._Launch, "draw", lambda self, t, s, *rest: draws.append(what(s)) or draw(self, t, s, *rest)
    )
    return draws


def assert_drop_block(x: torch.Tensor, y: torch.Tensor, block: tuple[int, int]) -> None:
    """``y`` zeroes a union of whole valid-region blocks and rescales the rest by ``numel / kept``."""
    dropped = (y == 0) & (x != 0)
    assert is_union_of_blocks(dropped.flatten(0, 1).float(), block)
    kept = dropped.numel() - int(dropped.sum())
    ref = torch.where(dropped, 0.0, x.float() * (dropped.numel() / kept)).to(x.dtype)
    # Triton's interpreter truncates float32 to bfloat16 (the GPU rounds to nearest): one ulp there
    ulp = 2.0**-7 if INTERPRETED and x.dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(y, ref, rtol=ulp, atol=0.0)
    assert y.dtype == x.dtype and y.stride() == x.stride()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'cl' if c[3] else 'c'}-{c[4]}".replace(" ", ""))
class TestFusedKernels:
    def test_output_is_blocks_and_rescale(self, case, device) -> None:
        x, geom = case_input(*case, device)
        assert_drop_block(x, fused_drop_block(x, case[2], geom), geom.block)

    def test_backward_is_the_same_mask_and_scale(self, case, device) -> None:
        x, geom = case_input(*case, device)
        x.requires_grad_()
        y = fused_drop_block(x, case[2], geom)
        dtype = x.dtype
        grad = torch.randn_like(y)
        y.backward(grad)
        factor = torch.where(y == 0, 0.0, y.float() / x.detach().float())
        scale = factor.max().item()
        expect = torch.where(y == 0, 0.0, grad.float() * scale).to(dtype)
        torch.testing.assert_close(x.grad, expect, rtol=2.0**-7 if dtype != torch.float32 else 1e-6, atol=0.0)

    def test_shared_masks_are_blocks_per_sample_with_their_gradient(self, case, device, kernels) -> None:
        x, geom = case_input(*case, device)
        x.requires_grad_()
        y = fused_drop_block(x, case[2], geom, shared=True)
        assert_drop_block(x.detach(), y.detach(), geom.block)
        dropped = (y == 0) & (x != 0)
        assert torch.equal(dropped.all(1), dropped.any(1))  # one mask, in every channel of a sample
        grad = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, grad)
        scale = torch.where(dropped, 0.0, y.detach().float() / x.detach().float()).max().item()
        expect = torch.where(dropped, 0.0, grad.float() * scale).to(x.dtype)
        torch.testing.assert_close(dx, expect, rtol=2.0**-7 if x.dtype != torch.float32 else 1e-6, atol=0.0)

    def test_inplace_writes_the_input(self, case, device, kernels) -> None:
        x, geom = case_input(*case, device)
        ref = fused_drop_block(x, case[2], geom, generator=torch.Generator().manual_seed(3))
        buf = x.clone()
        out = fused_drop_block(buf, case[2], geom, generator=torch.Generator().manual_seed(3), inplace=True)
        assert out is buf and torch.equal(out, ref)

    def test_kernel_sets_give_the_same_output(self, case, device, monkeypatch) -> None:
        # the same Philox draws, so the same blocks: the set that is not the default (whose output
        # and backward the tests above check) must give the very same output and gradient
        x, geom = case_input(*case, device)
        x.requires_grad_()
        grad = torch.randn_like(x)
        results = []
        for kernels in fused.KERNEL_SETS:
            monkeypatch.setattr(fused, "KERNELS", kernels)
            y = fused_drop_block(x, case[2], geom, generator=torch.Generator().manual_seed(5))
            (dx,) = torch.autograd.grad(y, x, grad)
            results.append((y, dx))
        (y0, dx0), (y1, dx1) = results
        assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
        assert y1.stride() == x.stride() and dx1.stride() == x.stride()


class TestFusedSeeds:
    def test_seeds_are_bernoulli_in_every_column(self, device) -> None:
        # block 1: every seed drops one unit; 4 columns share a Philox call, so check each column
        x = torch.ones(4, 64, 16, 16, device=device)
        dropped = (fused_drop_block(x, 0.2, block_geometry((16, 16), (1, 1))) == 0).float()
        assert dropped.mean().item() == pytest.approx(0.2, abs=0.008)  # 5 sd of 65k draws
        per_column = dropped.mean((0, 1, 2))
        assert per_column.sub(0.2).abs().max().item() < 0.032  # 5 sd of 4096 draws
        assert dropped.mean((0, 2, 3)).std().item() < 0.05  # channels alike (sd of 1024 draws: 0.0125)

    def test_a_generator_makes_it_reproducible(self, device) -> None:
        x = torch.randn(2, 16, 14, 14, device=device)
        geom = block_geometry((14, 14), (7, 7))
        a, b = (fused_drop_block(x, 0.02, geom, generator=torch.Generator().manual_seed(7)) for _ in range(2))
        c = fused_drop_block(x, 0.02, geom, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)

    def test_under_capture_the_seed_is_drawn_on_the_device(self, device, monkeypatch, kernels) -> None:
        monkeypatch.setattr(fused, "_capturing", lambda x: True)  # what CUDA graph capture sees
        x = torch.randn(2, 16, 14, 14, device=device)
        geom = block_geometry((14, 14), (7, 7))
        draws = record_draws(monkeypatch, lambda s: s.device)
        torch.manual_seed(3)
        a = fused_drop_block(x, 0.05, geom)
        torch.manual_seed(3)
        b = fused_drop_block(x, 0.05, geom)
        c = fused_drop_block(x, 0.05, geom)
        assert_drop_block(x, a, geom.block)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert draws == [x.device] * 3  # a tensor seed on the input's device, read by the kernel

    @pytest.mark.parametrize("in_memory", [False, True], ids=["by value", "in memory"])
    def test_rates_at_the_ends_of_the_threshold_range(self, device, monkeypatch, kernels, in_memory) -> None:
        # threshold 0 (no seed), 2**31 + 2**30 (its bit pattern a negative int32) and 2**32 (all seeds)
        monkeypatch.setattr(fused, "_capturing", lambda x: in_memory)
        x = torch.rand(4, 64, 16, 16, device=device) + 1.0
        geom = block_geometry((16, 16), (1, 1))  # block 1: every seed drops its unit
        assert torch.equal(fused_drop_block(x, 0.0, geom), x)
        dropped = (fused_drop_block(x, 0.75, geom) == 0).float().mean().item()
        assert dropped == pytest.approx(0.75, abs=0.009)  # 5 sd of 65k draws
        assert not fused_drop_block(x, 1.0, geom).any()

    def test_a_saved_count_outlives_later_calls(self, device, monkeypatch, kernels) -> None:
        # pools of two zeroed counts: the later calls take new pools while the first call's count is saved
        monkeypatch.setattr(fused, "COUNT_POOL", 2)
        monkeypatch.setattr(fused, "_COUNT_POOLS", {})
        geom = block_geometry((14, 14), (7, 7))
        x = (torch.rand(2, 16, 14, 14, device=device) + 1.0).requires_grad_()
        ys = [fused_drop_block(x, 0.05, geom) for _ in range(5)]
        for y in ys:
            count = y.grad_fn.saved_tensors[1]
            assert count.item() == (y == 0).sum().item() > 0  # each call counted into its own zeroed slot
        (dx,) = torch.autograd.grad(ys[0], x, torch.ones_like(ys[0]))
        scale = x.numel() / (ys[0] != 0).sum().item()
        torch.testing.assert_close(dx, torch.where(ys[0] == 0, 0.0, scale), rtol=1e-6, atol=0.0)

    def test_inplace_marks_the_input_dirty(self, device) -> None:
        leaf = torch.randn(2, 4, 7, 7, device=device, requires_grad=True)
        x = leaf * 1.0
        y = fused_drop_block(x, 0.2, block_geometry((7, 7), (3, 3)), inplace=True)
        assert y is x and x._version > 0
        y.sum().backward()
        assert torch.equal(leaf.grad == 0, y.detach() == 0)


class TestFusedCompiled:
    """The kernels as a custom op inside a compiled graph (``fused_compiled.COMPILED``, off by default)."""

    def test_the_custom_op_passes_opcheck(self, device, kernels) -> None:
        x = torch.randn(2, 8, 14, 14, device=device, requires_grad=True)
        threshold = torch.tensor([fused.seed_threshold(0.05)], device=device)
        seed = torch.tensor([123], device=device)
        args = (x, threshold, seed, [7, 7], kernels)
        torch.library.opcheck(torch.ops.dropblock_inject.fused_drop_block.default, args)

    def test_a_compiled_graph_runs_it_and_never_recompiles_for_the_rate(self, device, kernels, monkeypatch) -> None:
        from torch._dynamo.testing import CompileCounterWithBackend

        from dropblock_inject.op.traceable import drop_block_traceable

        monkeypatch.setattr(fused_compiled, "COMPILED", True)
        monkeypatch.setattr(fused_compiled, "_COMPILED_DEVICE", device)
        draws = record_draws(monkeypatch)
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        geom = block_geometry((14, 14), (7, 7))
        fn = torch.compile(
            lambda x, r: drop_block_traceable(x, r, geom, False, "paper", max_rate=0.3), backend=counter, fullgraph=True
        )
        x = torch.randn(2, 8, 14, 14, device=device, requires_grad=True)
        for rate in (0.3, 0.2, 0.3):
            y = fn(x, torch.tensor(rate, device=device))
            assert_drop_block(x.detach(), y.detach(), geom.block)
            grad = torch.randn_like(y)
            (dx,) = torch.autograd.grad(y, x, grad)
            scale = (y.detach() / x.detach()).masked_fill(y == 0, 0.0).max().item()
            torch.testing.assert_close(dx, torch.where(y == 0, 0.0, grad * scale), rtol=1e-6, atol=0.0)
        assert counter.frame_count == 1  # one compilation for every rate
        assert draws == [torch.Tensor] * 3  # the fused op ran, its seed drawn in the graph
        a, b = (fn(x, torch.tensor(0.3, device=device)) for _ in range(2))
        assert not torch.equal(a, b)  # a new seed at every call


def test_a_cpu_generator_is_refused_during_capture(monkeypatch) -> None:
    monkeypatch.setattr(fused, "_capturing", lambda x: True)
    x = torch.randn(2, 4, 14, 14)
    with pytest.raises(RuntimeError, match="a CPU generator cannot do: pass a CUDA generator"):
        fused_drop_block(x, 0.01, block_geometry((14, 14), (7, 7)), generator=torch.Generator())


def test_zeroed_counts_are_single_use_aligned_slots(monkeypatch) -> None:
    monkeypatch.setattr(fused, "COUNT_POOL", 3)
    monkeypatch.setattr(fused, "_COUNT_POOLS", {})
    with torch.inference_mode():  # the first pool is made here; its slots must still serve autograd
        counts = [fused._zeroed_count(torch.device("cpu")) for _ in range(2)]
    counts += [fused._zeroed_count(torch.device("cpu")) for _ in range(5)]
    assert len({c.data_ptr() for c in counts}) == 7 and all(c.data_ptr() % 16 == 0 for c in counts)
    assert all(c.shape == (1,) and c.dtype == torch.int64 and c.item() == 0 for c in counts)
    assert len({c.untyped_storage().data_ptr() for c in counts}) == 3  # one fill per COUNT_POOL calls
    assert not any(c.is_inference() for c in counts)


def test_seeds_follow_torch_manual_seed_and_fit_int32() -> None:
    torch.manual_seed(11)
    first = [fused._draw_seed(None) for _ in range(50)]
    torch.manual_seed(11)
    assert [fused._draw_seed(None) for _ in range(50)] == first
    assert len(set(first)) == 50 and all(0 <= s < 2**31 - 1 for s in first)  # Triton types them int32
    gen = torch.Generator().manual_seed(4)
    assert fused._draw_seed(gen) == fused._draw_seed(torch.Generator().manual_seed(4))


def test_seed_thresholds_go_by_value_as_32_bit_integers() -> None:
    # a compiled kernel is launched directly with the argument types of its first launch: every
    # threshold must take the same (int32) types, the small ones and those past 2**31
    cases = {0: (-1, 0), 1: (0, 1), 2**31: (2**31 - 1, 1), 2**31 + 1: (-(2**31), 1), 2**32: (-1, 1)}
    for threshold, expected in cases.items():
        assert fused._by_value(threshold) == expected
        last, _ = expected
        assert (last & 0xFFFFFFFF) == (threshold - 1) & 0xFFFFFFFF and -(2**31) <= last < 2**31


def test_launches_go_to_the_inputs_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(fused._on_device_of(torch.empty(2)), contextlib.nullcontext)  # not CUDA
    fake = type("Fake", (), {"get_device": lambda self: self.index, "index": 1})()  # a tensor on cuda:1
    guard = fused._on_device_of(fake)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    fake.index = 0
    assert isinstance(fused._on_device_of(fake), contextlib.nullcontext)


def test_apply_tiles() -> None:
    geom = block_geometry((28, 28), (7, 7))
    launch = fused._Launch((16, 64, 28, 28), geom, "tiles")
    (planes, rows, _), contiguous = launch.apply_tiling(channels_last=False)
    assert (contiguous["BP"], contiguous["BH"], rows) == (2, 32, 1)  # whole planes, 2 per tile
    (planes, rows, _), cl = launch.apply_tiling(channels_last=True)
    assert (cl["BP"], cl["BH"], cl["BI"], rows) == (8, 8, 16, 4)  # 8 adjacent channels by 8 rows
    assert planes * cl["BP"] == 16 * 64 and cl["BP"] * cl["BH"] * cl["W_P2"] == fused.TILE_UNITS
    flat = fused._Launch((16, 64, 28, 28), geom)  # the default set: blocks of storage order
    (blocks, _, _), consts = flat.apply_tiling(channels_last=True)
    assert blocks * fused.FLAT_BLOCK >= 16 * 64 * 28 * 28 > (blocks - 1) * fused.FLAT_BLOCK and consts["CHANNELS_LAST"]


def test_eligibility() -> None:
    geom = block_geometry((14, 14), (7, 7))
    x = torch.randn(2, 4, 14, 14)
    assert fused_eligible(x, geom, False, device_type="cpu") == triton_available()
    assert not fused_eligible(x, geom, False)  # a CPU tensor never takes the CUDA path
    assert fused_eligible(x, geom, True, device_type="cpu") == triton_available()  # shared masks too
    assert not fused_eligible(x, block_geometry((14, 14), (7, 7), "full"), False, device_type="cpu")
    assert not fused_eligible(torch.randn(2, 4, 8, 65), block_geometry((8, 65), (3, 3)), False, device_type="cpu")
    assert not fused_eligible(torch.randn(2, 4, 65, 8), block_geometry((65, 8), (3, 3)), False, device_type="cpu")
    assert not fused_eligible(x[..., ::2], block_geometry((14, 7), (7, 7)), False, device_type="cpu")
    x3 = torch.randn(2, 4, 3, 8, 8)  # 3-D: D * H rows of W columns
    assert fused_eligible(x3, block_geometry((3, 8, 8), (1, 3, 3)), False, device_type="cpu") == triton_available()
    x3 = torch.randn(2, 4, 5, 13, 8)
    assert not fused_eligible(x3, block_geometry((5, 13, 8), (1, 3, 3)), False, device_type="cpu")  # 65 rows
    big = block_geometry((64, 64), (33, 33))  # 2**29 seed positions, but 2**31 units: not in 32-bit offsets
    assert fused_eligible(torch.empty(2**10, 2**9 - 1, 64, 64, device="meta"), big, False, device_type="meta")
    assert not fused_eligible(torch.empty(2**10, 2**9, 64, 64, device="meta"), big, False, device_type="meta")


def test_an_unknown_kernel_set_is_named(monkeypatch) -> None:
    monkeypatch.setattr(fused, "KERNELS", "fast")
    with pytest.raises(ValueError, match=r"FUSED_KERNELS must be one of \('tiles', 'flat'\), got 'fast'"):
        fused_drop_block(torch.randn(2, 4, 14, 14), 0.01, block_geometry((14, 14), (7, 7)))


@pytest.mark.skipif(
    HAS_CUDA or INTERPRETED or not triton_available(), reason="CUDA, or an outer TRITON_INTERPRET=1 run, runs them"
)
def test_kernels_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    tests = Path(__file__).resolve().parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(tests / "test_fused.py")]
    cmd += ["-k", "TestFusedKernels or TestFusedSeeds or TestFusedCompiled"]
    done = subprocess.run(cmd, env=env, cwd=tests.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
                 torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}  # fmt: skip


def compile_for_h100(kernel, types: list[str], consts: dict, divisible: tuple[int, ...] = (), warps: int = 4) -> dict:
    """Compile ``kernel`` (its leading arguments of Triton ``types``, then ``consts``) to an sm_90
    cubin with Triton's own ptxas (no GPU needed); returns the assembly (``"ptx"``, ``"cubin"``).
    Pointers, and the integer arguments at ``divisible``, are known to be multiples of 16, as
    Triton specialises them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**dict(zip(kernel.arg_names, types)), **dict.fromkeys(consts, "constexpr")}
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(types) if kind[0] == "*" or i in divisible}
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"]
    return compiled.asm


@pytest.mark.skipif(
    HAS_CUDA or INTERPRETED or not triton_available(), reason="on a GPU the kernels run; here they are compiled"
)
@pytest.mark.parametrize("kernels", fused.KERNEL_SETS)
@pytest.mark.parametrize(
    "shape, block, dtype, shared",
    [
        ((64, 1024, 14, 14), 7, torch.float32, False),
        ((64, 512, 28, 28), 7, torch.float16, False),
        ((3, 5, 20, 64), 5, torch.bfloat16, False),  # 64-bit row words
        ((64, 512, 28, 28), 7, torch.float16, True),  # one mask per sample
        ((8, 256, 4, 14, 14), 3, torch.float16, False),  # 3-D
    ],
)
def test_kernels_compile_for_an_h100(kernels, shape, block, dtype, shared) -> None:
    # what the interpreter cannot show: that Triton lowers every kernel to the GPU (types, layouts)
    from dropblock_inject.op import _fused_kernels

    if len(shape) == 5 and kernels != "flat":
        pytest.skip("3-D inputs take the flat set")
    launch = fused._Launch(shape, block_geometry(shape[2:], (block,) * (len(shape) - 2)), kernels, shared)
    words = "*" + _TRITON_TYPES[launch.word_dtype]
    for in_memory in (False, True):
        args = [words, "*i64", "*i64" if in_memory else "i32", "*i64" if in_memory else "i32", "i32", "i32"]
        consts = launch.draw_consts(in_memory)
        compile_for_h100(getattr(_fused_kernels, launch.seed_kernel), args, consts, warps=fused.SEED_WARPS)
    for channels_last in (False, True):
        _, consts = launch.apply_tiling(channels_last)
        data = "*" + _TRITON_TYPES[dtype]
        args = [data, data, words, "*i64", "i32"] + (["i32"] * 5 if kernels == "tiles" else [])  # planes, strides
        divisible = (4,) if launch.numel % 16 == 0 else ()  # numel
        kernel = getattr(_fused_kernels, launch.apply_kernel)
        ptx = compile_for_h100(kernel, args, consts, divisible, fused.APPLY_WARPS)["ptx"]
        if kernels == "flat":
            assert "ld.global.v4" in ptx and "st.global.v4" in ptx  # whole vectors in storage order


@pytest.mark.skipif(
    HAS_CUDA or INTERPRETED or not triton_available(), reason="on a GPU the kernels run; here they are compiled"
)
def test_the_seed_kernel_works_whole_planes_per_thread(tmp_path) -> None:
    # the planes are the tile's last axis, so a thread draws, packs and dilates whole planes: the
    # sm_90 code of the default seed kernel at 14x14/7 is about 1,400 instructions per plane
    # (with the planes first, whose row reductions went through shuffles and shared memory: 3,040
    # in one warp, 4,288 in four)
    import triton

    from dropblock_inject.op import _fused_kernels

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("Triton ships no cuobjdump here")
    launch = fused._Launch((64, 1024, 14, 14), block_geometry((14, 14), (7, 7)))
    consts = launch.draw_consts(False)
    kernel = getattr(_fused_kernels, launch.seed_kernel)
    asm = compile_for_h100(kernel, ["*i16", "*i64", "i32", "i32", "i32", "i32"], consts, warps=fused.SEED_WARPS)
    (tmp_path / "seed.cubin").write_bytes(asm["cubin"])
    sass = subprocess.run([cuobjdump, "-sass", tmp_path / "seed.cubin"], capture_output=True, text=True).stdout
    instructions = len(re.findall(r"/\*[0-9a-f]{4}\*/\s+\S", sass))
    assert 0 < instructions * 32 * fused.SEED_WARPS / consts["BP"] < 2000


def test_compiled_models_take_the_traceable_op_unless_asked() -> None:
    code = "from dropblock_inject.op import fused_compiled as f; print(f.COMPILED)"
    env = {k: v for k, v in os.environ.items() if k != "DROPBLOCK_INJECT_FUSED_COMPILED"}
    for value, expected in ((None, "False"), ("1", "True"), ("0", "False")):
        run_env = env if value is None else {**env, "DROPBLOCK_INJECT_FUSED_COMPILED": value}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
class TestFusedOnCuda:
    def test_drop_rate_matches_expected_at_scale(self) -> None:
        geom = block_geometry((14, 14), (7, 7))
        x = torch.ones(64, 1024, 14, 14, device="cuda")
        gamma = geom.calibrated_gamma(0.1)
        fractions = [(fused_drop_block(x, gamma, geom) == 0).float().mean().item() for _ in range(8)]
        # 65k planes per call: the standard deviation of the fraction is about 0.0007
        assert sum(fractions) / len(fractions) == pytest.approx(0.1, abs=0.002)

    def test_direct_launch_matches_triton_dispatch(self, monkeypatch, kernels) -> None:
        x = torch.randn(8, 64, 14, 14, device="cuda")
        geom = block_geometry((14, 14), (7, 7))
        outs = []
        for direct in (False, True):
            monkeypatch.setattr(fused, "DIRECT_LAUNCH", direct)
            fused._launch_for.cache_clear()
            gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
            outs.append([fused_drop_block(x, 0.02, geom, generator=g) for g in gens])
        assert all(torch.equal(a, b) for a, b in zip(*outs))
        assert fused._launch_for(tuple(x.shape), geom, kernels, False)._compiled  # later calls took compiled kernels

    def test_a_direct_launch_takes_any_rate(self, kernels) -> None:
        # the seed kernel compiled at a small threshold, then launched directly past 2**31
        x = torch.ones(8, 256, 16, 16, device="cuda")
        geom = block_geometry((16, 16), (1, 1))
        for gamma in (0.01, 0.75, 1.0, 0.0):
            dropped = (fused_drop_block(x, gamma, geom) == 0).float().mean().item()
            assert dropped == pytest.approx(gamma, abs=0.01)

    @pytest.mark.parametrize("shared", [False, True])
    @pytest.mark.parametrize("shape, block", [((8, 64, 28, 28), 7), ((4, 32, 4, 14, 14), 3)], ids=["2-D", "3-D"])
    def test_no_host_sync(self, kernels, shared, shape, block) -> None:
        x = torch.randn(shape, device="cuda", requires_grad=True)
        m = dbi.DropBlock(0.1, block, shared_channels=shared).cuda().train()
        m(x).sum().backward()  # compile the kernels before the check
        torch.cuda.set_sync_debug_mode("error")
        try:
            m(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def test_a_captured_cuda_graph_draws_new_blocks_at_every_replay(self, kernels) -> None:
        x = torch.randn(8, 64, 14, 14, device="cuda")
        geom = block_geometry((14, 14), (7, 7))
        fused_drop_block(x, 0.02, geom)  # compile the kernels outside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fused_drop_block(x, 0.02, geom)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fused_drop_block(x, 0.02, geom)
        outs = []
        for _ in range(3):
            graph.replay()
            outs.append(y.clone())
        assert not torch.equal(outs[1], outs[2])
        for out in outs:
            assert_drop_block(x, out, geom.block)

    @pytest.mark.parametrize("compiled_op", [True, False])
    def test_a_compiled_model_at_every_batch_size(self, monkeypatch, compiled_op) -> None:
        monkeypatch.setattr(fused_compiled, "COMPILED", compiled_op)
        draws = record_draws(monkeypatch)
        torch._dynamo.reset()
        model = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), dbi.DropBlock(0.2, 7)).cuda().train()
        fn = torch.compile(model)
        for batch in (4, 3, 4, 2):  # the second size recompiles with dynamic shapes
            x = torch.randn(batch, 8, 14, 14, device="cuda", requires_grad=True)
            y = fn(x)
            y.sum().backward()
            assert is_union_of_blocks((y == 0).flatten(0, 1).float(), (7, 7)) and x.grad is not None
        # the custom op draws seed and threshold in the graph; the traceable op never reaches the kernels
        assert draws == ([torch.Tensor] * 4 if compiled_op else [])

    @pytest.mark.parametrize("compiled_op", [True, False])
    def test_compiled_with_cuda_graphs_draws_new_blocks_per_replay(self, monkeypatch, kernels, compiled_op) -> None:
        monkeypatch.setattr(fused_compiled, "COMPILED", compiled_op)
        torch._dynamo.reset()
        fn = torch.compile(dbi.DropBlock(0.2, 7).cuda().train(), mode="reduce-overhead", fullgraph=True)
        x = torch.randn(8, 64, 14, 14, device="cuda")
        outs = [fn(x).clone() for _ in range(4)]  # the later calls replay a CUDA graph
        assert not torch.equal(outs[2], outs[3])
        assert all(is_union_of_blocks((o == 0).flatten(0, 1).float(), (7, 7)) for o in outs)

    def test_drop_block_dispatches_to_the_fused_kernels(self, kernels) -> None:
        x = torch.randn(4, 32, 14, 14, device="cuda", requires_grad=True)
        y = dbi.drop_block(x, 0.1, 7)
        assert y.grad_fn.__class__.__name__ == _FusedDropBlock.__name__ + "Backward"
        words, count = y.grad_fn.saved_tensors
        # tiles: one byte per seed row (8 seed columns); flat: 16 bits per output row (14 columns)
        dtype, per_plane = (torch.uint8, 8) if kernels == "tiles" else (torch.int16, 14)
        assert words.dtype == dtype and words.numel() == 4 * 32 * per_plane and count.numel() == 1
        x = torch.randn(4, 32, 14, 14, device="cuda", requires_grad=True)
        out = dbi.drop_block(x, 0.1, 7, shared_channels=True)
        assert out.grad_fn.__class__.__name__ == _FusedDropBlock.__name__ + "Backward"
        assert out.grad_fn.saved_tensors[0].numel() == 4 * per_plane  # one mask per sample
        x = torch.randn(4, 32, 4, 14, 14, device="cuda", requires_grad=True)  # 3-D: 56 rows of 14
        assert dbi.drop_block(x, 0.1, 3).grad_fn.__class__.__name__ == _FusedDropBlock.__name__ + "Backward"
        x = torch.randn(4, 32, 8, 14, 14, device="cuda", requires_grad=True)  # 112 rows: ATen
        assert "Fused" not in dbi.drop_block(x, 0.1, 3).grad_fn.__class__.__name__
