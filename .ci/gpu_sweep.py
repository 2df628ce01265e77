"""The fused op on a CUDA GPU: loop and CUDA-graph times against ``x * 2``, launch paths, kernel profile.

Run by ``.ci/gpu-check`` (``python .ci/gpu_sweep.py [main|compiled|rest|host|steps ...]`` with the repository on
``PYTHONPATH``; no section named runs all).
"loop" times back-to-back calls between synchronisations (`bench._sample`), so a CPU-bound op shows its launch cost;
"graph" replays a captured CUDA graph of 10 calls, the GPU's time alone; "cpu" is the host
time per call before the device catches up. "fused" is the default kernel set (``fused.KERNELS``),
"fused tiles" the seed-word set with the tiled apply; ``knobs`` times the tile sizes and warps.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

from dropblock_inject.bench import _sample
from dropblock_inject.op import fused, fused_compiled
from dropblock_inject.op.functional import _DropBlockFunction
from dropblock_inject.op.geometry import block_geometry


def loop_time(fn: Callable[[], object], n: int = 50, reps: int = 7) -> float:
    """Median microseconds per call of ``n`` back-to-back calls (synchronised), over ``reps`` runs."""
    return statistics.median(_sample(fn, n, "cuda") for _ in range(reps)) * 1e6


def graph_time(fn: Callable[[], object], per: int = 10, reps: int = 15) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per * 1e3)
    return statistics.median(times)


def kernel_time(fn: Callable[[], object], n: int = 20) -> float:
    """Microseconds of GPU kernel time per call (the profiler's device time, summed over kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / n


def cpu_time(fn: Callable[[], object], n: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def with_kernels(kernels: str, fn: Callable[[], object], compiled_op: bool = False) -> Callable[[], object]:
    """``fn`` run with ``fused.KERNELS = kernels`` (and ``fused_compiled.COMPILED = compiled_op``)."""

    def call() -> object:
        saved = fused.KERNELS, fused_compiled.COMPILED
        fused.KERNELS, fused_compiled.COMPILED = kernels, compiled_op
        try:
            return fn()
        finally:
            fused.KERNELS, fused_compiled.COMPILED = saved

    return call


def case(shape, block, p=0.1, channels_last=False, dtype=torch.float32, others=False, shared=False) -> None:
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    geom = block_geometry(shape[2:], (block,) * (x.dim() - 2))
    gamma = geom.paper_gamma(p)

    def ours() -> torch.Tensor:
        return fused.fused_drop_block(x, gamma, geom, shared=shared, host_seed_in_capture=True)

    fns = {
        "x*2": lambda: x * 2.0,
        "fused": ours,
        "fused tiles": with_kernels("tiles", ours),  # 3-D: the flat set either way
        "aten": lambda: _DropBlockFunction.apply(x, p, geom, shared, "paper", None, False),
    }
    if others:
        from timm.layers import drop_block_2d
        from torchvision.ops import drop_block2d

        fns["timm per-ch"] = lambda: drop_block_2d(x, p, block, couple_channels=False)
        fns["torchvision"] = lambda: drop_block2d(x, p, block)
    tag = f"{shape}/{block} {'cl' if channels_last else 'c'} {str(dtype)[6:]}{' shared' if shared else ''}"
    base = None
    for name, fn in fns.items():
        loop, cpu = loop_time(fn), cpu_time(fn)
        graph = graph_time(fn) if name in ("x*2", "fused", "fused tiles") else float("nan")
        base = base or (loop, graph)
        print(f"{tag:34s} {name:12s} loop {loop:8.1f} us {loop / base[0]:6.2f}x | "
              f"graph {graph:7.1f} us {graph / base[1]:5.2f}x | cpu {cpu:7.1f} us", flush=True)  # fmt: skip


def knobs() -> None:
    """The apply kernel's block and warps, and the seed kernel's tile and warps, at (64, 1024, 14, 14)/7
    (graph ratios; 0 is the module's setting)."""
    x = torch.randn(64, 1024, 14, 14, device="cuda")
    geom = block_geometry((14, 14), (7, 7))
    gamma = geom.paper_gamma(0.1)
    floor = graph_time(lambda: x * 2.0)
    names = ("FLAT_BLOCK", "APPLY_WARPS", "SEED_TILE", "SEED_WARPS")
    saved = tuple(getattr(fused, name) for name in names)
    settings = [("tiles", 0, 0, 0, 0), ("flat", 0, 0, 0, 0), ("flat", 512, 4, 0, 0), ("flat", 1024, 2, 0, 0),
                ("flat", 2048, 4, 0, 0), ("flat", 1024, 8, 0, 0), ("flat", 0, 0, 2048, 0), ("flat", 0, 0, 8192, 0),
                ("flat", 0, 0, 8192, 2), ("flat", 0, 0, 16384, 4), ("flat", 0, 0, 0, 2),
                ("flat", 0, 0, 0, 4)]  # fmt: skip
    for kernels, *values in settings:
        for name, value, default in zip(names, values, saved):
            setattr(fused, name, value or default)
        fused._launch_for.cache_clear()
        fn = with_kernels(kernels, lambda: fused.fused_drop_block(x, gamma, geom, host_seed_in_capture=True))
        t = graph_time(fn)
        shown = " ".join(f"{name} {getattr(fused, name):5d}" for name in names)
        print(f"knobs {kernels:5s} {shown}: graph {t:7.1f} us {t / floor:5.2f}x x*2", flush=True)
    for name, default in zip(names, saved):
        setattr(fused, name, default)
    fused._launch_for.cache_clear()


def launch_paths() -> None:
    """Host cost of Triton's dispatch against the direct launch of the compiled kernels."""
    x = torch.randn(64, 1024, 14, 14, device="cuda")
    geom = block_geometry((14, 14), (7, 7))
    gamma = geom.paper_gamma(0.1)
    xg = x.clone().requires_grad_()
    for direct in (False, True, False, True):
        fused.DIRECT_LAUNCH = direct
        fused._launch_for.cache_clear()

        def fwd() -> None:
            fused.fused_drop_block(x, gamma, geom)

        def fwd_bwd() -> None:
            fused.fused_drop_block(xg, gamma, geom).backward(x)

        forward = f"forward loop {loop_time(fwd):7.1f} us, cpu {cpu_time(fwd):7.1f} us"
        both = f"with backward loop {loop_time(fwd_bwd):7.1f} us, cpu {cpu_time(fwd_bwd):7.1f} us"
        print(f"direct launch {direct!s:5}: {forward} | {both}", flush=True)
    fused.DIRECT_LAUNCH = True


def profile_kernels() -> None:
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(64, 1024, 14, 14, device="cuda")
    geom = block_geometry((14, 14), (7, 7))
    tiles = with_kernels("tiles", lambda: fused.fused_drop_block(x, geom.paper_gamma(0.1), geom))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fused.fused_drop_block(x, geom.paper_gamma(0.1), geom)
            tiles()
            x * 2.0
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


def compiled() -> None:
    """``torch.compile`` at (64, 1024, 14, 14)/7: the traceable op and the fused kernels as a custom op
    (``fused_compiled``, each kernel set), against the compiled ``x * 2``; default mode ("loop", host
    time included) and ``mode="reduce-overhead"`` (CUDA graphs)."""
    from dropblock_inject.op.module import DropBlock

    x = torch.randn(64, 1024, 14, 14, device="cuda")
    candidates = [("x*2", "tiles", False), ("traceable", "tiles", False), ("fused op tiles", "tiles", True),
                  ("fused op flat", "flat", True)]  # fmt: skip
    for mode in (None, "reduce-overhead"):
        floor = None
        for name, kernels, compiled_op in candidates:
            fn = torch.compile((lambda t: t * 2.0) if name == "x*2" else DropBlock(0.1, 7).cuda(), fullgraph=True,
                               dynamic=False, mode=mode)  # fmt: skip
            call = with_kernels(kernels, lambda fn=fn: fn(x), compiled_op)
            tag = f"compiled {mode or 'default':15s} {name:15s}"
            try:
                for _ in range(3):
                    call()
                t = loop_time(call)
            except Exception as e:  # report and go on
                print(f"{tag} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            gpu = kernel_time(call)
            floor = floor or (t, gpu)
            print(f"{tag} loop {t:8.1f} us {t / floor[0]:5.2f}x | kernels {gpu:7.1f} us {gpu / floor[1]:5.2f}x",
                  flush=True)  # fmt: skip


def host_costs() -> None:
    """Where the host time of one forward call at (64, 1024, 14, 14)/7 goes: each piece alone, in
    microseconds of CPU per call (median of 5 runs of :func:`cpu_time`), against ``x * 2``."""
    x = torch.randn(64, 1024, 14, 14, device="cuda")
    xg = x.clone().requires_grad_()
    geom = block_geometry((14, 14), (7, 7))
    gamma = geom.paper_gamma(0.1)
    launch = fused._launch_for(tuple(x.shape), geom, fused.KERNELS, False)
    threshold, out = fused.seed_threshold(gamma), torch.empty_like(x)
    words, count = launch.draw(threshold, 1, x.device)
    n_words = launch.n_planes * launch.words_per_plane

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, *rest):
            ctx.save_for_backward(words, count)
            return t

        @staticmethod
        def backward(ctx, grad):
            return grad, None, None, None, None

    pieces = {
        "x*2": lambda: x * 2.0,
        "torch.empty_like(x)": lambda: torch.empty_like(x),
        "torch.empty(words)": lambda: torch.empty(n_words, dtype=launch.word_dtype, device=x.device),
        "torch.zeros(1) count": lambda: torch.zeros(1, dtype=torch.int64, device=x.device),
        "_draw_seed": lambda: fused._draw_seed(None),
        "is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
        "Function.apply (no grad)": lambda: Identity.apply(x, threshold, 1, geom, False),
        "Function.apply (grad)": lambda: Identity.apply(xg, threshold, 1, geom, False),
        "_zeroed_count (pooled)": lambda: fused._zeroed_count(x.device),
        "launch.draw (alloc+zeros+seed)": lambda: launch.draw(threshold, 1, x.device),
        "launch.draw (pooled count)": lambda: launch.draw(threshold, 1, x.device, fused._zeroed_count(x.device)),
        "launch.apply (flat launch)": lambda: launch.apply(x, out, words, count),
        "launch.run": lambda: launch.run(x, out, threshold, 1),
        "fused_drop_block": lambda: fused.fused_drop_block(x, gamma, geom),
        "fused_drop_block (grad)": lambda: fused.fused_drop_block(xg, gamma, geom),
    }
    for name, fn in pieces.items():
        t = statistics.median(cpu_time(fn) for _ in range(5))
        print(f"host {name:32s} {t:7.1f} us cpu per call", flush=True)


def compiled_steps(
    name: str = "resnet26", batch: int = 64, repeats: int = 15, size: int = 224, device: str = "cuda", amp: str = "fp16"
) -> None:
    """A compiled training step (autocast, channels_last) of the unpatched model, of a copy (A/A),
    and of the patched model with the traceable op (the default) and with the fused custom op
    (``fused_compiled.COMPILED``, set around each call so Dynamo's guard on it holds), interleaved."""
    import copy

    from dropblock_inject.api import inject
    from dropblock_inject.bench import _train_step, time_interleaved
    from dropblock_inject.models import create_model

    torch.manual_seed(0)
    base = create_model(name)
    patched = inject(copy.deepcopy(base), drop_prob=0.1, input_size=(3, size, size))
    models = {"unpatched": base, "unpatched (A/A)": copy.deepcopy(base), "traceable op": patched,
              "custom op": copy.deepcopy(patched)}  # fmt: skip
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    fns = {}
    for label, model in models.items():
        model = model.to(device, memory_format=torch.channels_last)
        fns[label] = with_kernels(fused.KERNELS, _train_step(torch.compile(model), x, amp), label == "custom op")
        t0 = time.perf_counter()
        fns[label]()  # compiles
        print(f"compiled step {name} {label:16s} compiled in {time.perf_counter() - t0:6.1f} s", flush=True)
    times = time_interleaved(fns, repeats, number=1, device=device)
    print(f"compiled step {name}: batch {batch}, {size} px, {amp} autocast, channels_last, median of {repeats}")
    for label, t in times.items():
        print(
            f"compiled step {name} {label:16s} {t * 1e3:8.2f} ms {t / times['unpatched']:6.3f}x unpatched", flush=True
        )


def main_cases() -> None:
    case((64, 1024, 14, 14), 7, others=True)
    case((64, 1024, 14, 14), 7, channels_last=True)
    knobs()
    profile_kernels()


def other_cases() -> None:
    case((32, 256, 56, 56), 7)
    case((64, 512, 28, 28), 7, channels_last=True, dtype=torch.float16)
    case((64, 256, 14, 14), 7)
    case((32, 2048, 7, 7), 3)
    case((32, 2048, 7, 7), 7)
    case((64, 1024, 14, 14), 7, shared=True)
    case((8, 256, 4, 14, 14), 3)  # r3d_18's stage 3 at 16x112x112
    case((8, 512, 2, 7, 7), 3, channels_last=True)
    launch_paths()


SECTIONS = {"main": main_cases, "compiled": compiled, "rest": other_cases, "host": host_costs, "steps": compiled_steps}


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available() or not fused.triton_available():
        print("gpu_sweep: needs a CUDA device and Triton")
        return 1
    print(torch.__version__, torch.cuda.get_device_name())
    for name in argv or list(SECTIONS):
        SECTIONS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
