"""Benchmarks behind ``dropblock-inject bench op|host|inject|step`` (the command line is
:mod:`dropblock_inject.cli`, which imports this module; this module never imports it).

Every candidate runs interleaved with the others in one process, and each time is reported as a
ratio to a baseline timed right before it in every turn (the op's floor is an out-of-place
elementwise multiply of the same tensor): machine noise moves numerator and denominator together.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from dropblock_inject.errors import DropBlockInjectError
from dropblock_inject.op.functional import _DropBlockFunction, drop_block
from dropblock_inject.op.fused import fused_eligible
from dropblock_inject.op.geometry import block_geometry

__all__ = [
    "OP_SHAPES",
    "bench_host",
    "bench_inject",
    "bench_op",
    "bench_step",
    "op_share",
    "step_memory",
    "stubbed_launches",
    "time_interleaved",
    "time_paired",
]

OP_SHAPES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((32, 256, 56, 56), 7),
    ((32, 1024, 14, 14), 7),
    ((32, 2048, 7, 7), 3),
)


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, number: int = 3, *, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Median seconds per call of each function; the candidates take turns ``repeats`` times.

    In each turn a candidate runs once untimed (so the previous candidate's memory traffic and
    allocations do not land on it), then ``number`` timed calls whose mean is one sample. On a
    CUDA ``device`` the clock is read after ``torch.cuda.synchronize()``.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_sample(fn, number, device))
    return {name: statistics.median(ts) for name, ts in samples.items()}


def time_paired(
    fns: dict[str, Callable[[], object]],
    baseline_of: Callable[[str], str],
    repeats: int,
    number: int = 3,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, tuple[float, float]]:
    """``(median seconds, median ratio)`` per function, each ratio paired with its baseline.

    As :func:`time_interleaved`, but in every turn each candidate is timed right after a fresh
    sample of its baseline (``baseline_of(name)``, a key of ``fns``), and its ratio is the median
    over the turns of those adjacent pairs: a noisy machine's slow spells then land on both.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            base = baseline_of(name)
            base_t = _sample(fns[base], number, device)
            t = base_t if name == base else _sample(fn, number, device)
            samples[base].append(base_t)
            if name != base:
                samples[name].append(t)
            ratios[name].append(t / base_t)
    return {name: (statistics.median(samples[name]), statistics.median(ratios[name])) for name in fns}


def steady_heap() -> str:
    """Make glibc keep freed memory in the process heap (no mmap for large blocks, no trimming).

    Otherwise a benchmark times page faults as much as ops: glibc hands blocks above its mmap
    threshold back to the OS when they are freed, the next allocation of the same size faults
    every page in again (6,000 faults for a 25 MB tensor), and which candidate pays depends on the
    order of its allocations, not on its work. A training loop's steady state reuses its heap.
    Process-wide and irreversible: the ``bench`` command calls it, the library never does.

    Returns:
        A line for the report, or ``""`` where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None or not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        return ""
    return "heap: steady (glibc mallopt: no mmap, no trim), so fresh allocations do not page-fault"


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def _sample(fn: Callable[[], object], number: int, device: torch.device | str) -> float:
    """Mean seconds of ``number`` calls after one untimed call (CUDA: synchronised)."""
    sync = _synchronizer(device)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return (time.perf_counter() - t0) / number


def _synchronizer(device: torch.device | str) -> Callable[[], None]:
    """``torch.cuda.synchronize`` for a CUDA device, else a no-op."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None


def _op_candidates(x: torch.Tensor, block: int, p: float, compiled: bool) -> dict[str, Callable[[], object]]:
    fns: dict[str, Callable[[], object]] = {
        "floor x*2": lambda: x * 2.0,
        "ours per-channel": lambda: drop_block(x, p, block),
        "ours shared": lambda: drop_block(x, p, block, shared_channels=True),
    }
    if fused_eligible(x, geom := block_geometry(tuple(x.shape[2:]), (block,) * (x.dim() - 2)), False):
        # drop_block takes the fused Triton kernels here; the ATen path beside them for comparison
        fns["ours per-channel, ATen"] = lambda: _DropBlockFunction.apply(x, p, geom, False, "paper", None, False)
        fns["ours shared, ATen"] = lambda: _DropBlockFunction.apply(x, p, geom, True, "paper", None, False)
    if compiled:
        fns.update(_compiled_candidates(x, block, p))
    try:
        from timm.layers import drop_block_2d

        fns["timm per-channel"] = lambda: drop_block_2d(x, p, block, couple_channels=False)
        fns["timm shared"] = lambda: drop_block_2d(x, p, block)
    except (ImportError, TypeError):  # pragma: no cover - old timm
        pass
    try:
        from torchvision.ops import drop_block2d

        fns["torchvision"] = lambda: drop_block2d(x, p, block)
    except ImportError:  # pragma: no cover
        pass
    return fns


def _compiled_candidates(x: torch.Tensor, block: int, p: float) -> dict[str, Callable[[], object]]:
    """``torch.compile`` of the floor and of ``DropBlock`` modules (rate a schedule buffer, as in a model)."""
    from dropblock_inject.op.module import DropBlock

    def compiled(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
        fn(x)  # compile outside the timed turns
        return lambda: fn(x)

    per_channel = DropBlock(p, block).to(x.device)
    shared = DropBlock(p, block, shared_channels=True).to(x.device)
    return {
        "compiled floor x*2": compiled(lambda t: t * 2.0),
        "compiled per-channel": compiled(per_channel),
        "compiled shared": compiled(shared),
    }


def _floor_of(name: str) -> str:
    return "compiled floor x*2" if name.startswith("compiled") else "floor x*2"


CUDA_CALLS_PER_SAMPLE = 20  # bench_op on a GPU: calls per timed sample


def bench_op(
    shapes: Sequence[tuple[tuple[int, ...], int]] = OP_SHAPES,
    *,
    drop_prob: float = 0.1,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    compiled: bool = False,
    print_fn: Callable[[str], None] = print,
) -> list[dict[str, object]]:
    """Time the op against the floor and the timm/torchvision ops; prints one block per shape.

    With ``compiled``, also ``torch.compile`` of ``DropBlock`` against a compiled floor; each row's
    ratio is to the floor of its kind (eager or compiled). On CUDA a sample is
    ``CUDA_CALLS_PER_SAMPLE`` back-to-back calls between two synchronisations, as in a training
    loop, where the host queues launches ahead of the GPU (with 3, each synchronisation's latency
    weighs on every sample).

    Returns:
        One row per (shape, candidate): ``shape``, ``block``, ``name``, ``ms``, ``ratio``.
    """
    rows: list[dict[str, object]] = []
    number = CUDA_CALLS_PER_SAMPLE if torch.device(device).type == "cuda" else 3
    print_fn(
        f"bench op: {device} {str(dtype).replace('torch.', '')}, threads={torch.get_num_threads()}, "
        f"p={drop_prob}, median of {repeats} interleaved turns of {number} calls, "
        f"ratio = median of time / time(floor timed just before)"
    )
    for shape, block in shapes:
        x = torch.randn(shape, dtype=dtype, device=device)
        candidates = _op_candidates(x, block, drop_prob, compiled)
        timed = time_paired(candidates, _floor_of, repeats, number, device=device)
        print_fn(f"{tuple(shape)} block {block}:")
        for name, (t, ratio) in timed.items():
            rows.append({"shape": tuple(shape), "block": block, "name": name, "ms": t * 1e3, "ratio": ratio})
            print_fn(f"  {name:<22} {t * 1e3:9.2f} ms  {ratio:7.2f}x {_floor_of(name).removesuffix(' x*2')}")
        ours = timed["ours per-channel"][1]
        anchors = [n for n in ("timm per-channel", "torchvision") if n in timed]
        if anchors:
            speedups = ", ".join(f"{timed[n][1] / ours:.1f}x vs {n}" for n in anchors)
            print_fn(f"  ours per-channel is {speedups}")
    return rows


HOST_CALLS_PER_SAMPLE = 100  # bench_host: calls per timed sample


def bench_host(
    shapes: Sequence[tuple[tuple[int, ...], int]] = OP_SHAPES,
    *,
    drop_prob: float = 0.1,
    repeats: int = 7,
    number: int = HOST_CALLS_PER_SAMPLE,
    print_fn: Callable[[str], None] = print,
) -> list[dict[str, object]]:
    """CPU microseconds per eager forward call of ``DropBlock`` on the fused (CUDA) path, with the
    kernel launches stubbed out: the host cost of each site in each training forward, measurable
    without a GPU. Prints one block per shape.

    A call runs everything a CUDA call runs on the host: the module's forward, ``drop_block_eager``,
    ``fused_drop_block`` (the Philox seed, the pooled count), the autograd Function, the cached
    launch plan and the words' and output's allocations, on a CPU tensor of the shape that
    requires grad (as in training), inside :func:`stubbed_launches`. Each time is paired with a
    trivial baseline, one ATen op on a 1-element tensor, timed right before it in every turn.

    Returns:
        One row per (shape, candidate): ``shape``, ``block``, ``name``, ``us``, ``ratio`` and
        ``launches`` (the kernel launches one call asks for).
    """
    from dropblock_inject.op.module import DropBlock

    one = torch.ones(1)
    print_fn(
        f"bench host: cpu us per eager forward call of DropBlock's fused path (module -> drop_block_eager -> "
        f"fused_drop_block -> launch), kernel launches stubbed, input requires grad, p={drop_prob}, "
        f"median of {repeats} interleaved turns of {number} calls, ratio = median of time / time(baseline timed "
        f"just before), baseline = one op on a 1-element tensor"
    )
    rows: list[dict[str, object]] = []
    with stubbed_launches() as launches:
        for shape, block in shapes:
            x = torch.randn(shape, requires_grad=True)
            fns: dict[str, Callable[[], object]] = {"baseline t*2": lambda: one * 2.0}
            for name, shared in (("per-channel", False), ("shared", True)):
                fns[name] = functools.partial(DropBlock(drop_prob, block, shared_channels=shared), x)
            calls = {}
            for name, fn in fns.items():
                launches.clear()
                fn()
                calls[name] = len(launches)
            timed = time_paired(fns, lambda name: "baseline t*2", repeats, number)
            print_fn(f"{tuple(shape)} block {block}:")
            for name, (t, ratio) in timed.items():
                rows.append({"shape": tuple(shape), "block": block, "name": name, "us": t * 1e6, "ratio": ratio,
                             "launches": calls[name]})  # fmt: skip
                launched = f"  {calls[name]} launches stubbed" if calls[name] else ""
                print_fn(f"  {name:<22} {t * 1e6:8.1f} us  {ratio:7.2f}x baseline{launched}")
    return rows


@contextlib.contextmanager
def stubbed_launches() -> Iterator[list[str]]:
    """Run the fused (CUDA) path of the eager op on CPU tensors, with its kernel launches stubbed out.

    For the duration, the eager op takes the fused path for CPU tensors wherever it would take it
    for CUDA ones (Triton need not be installed), and ``_Launch._launch`` records the kernel's
    name in the yielded list instead of launching it: everything else, allocations included, runs.
    The output is then uninitialised memory: for timing the host only.
    """
    from unittest import mock

    from dropblock_inject.op import functional, fused

    eligible = fused.fused_eligible
    launches: list[str] = []

    def eligible_here(x: torch.Tensor, geom: object, shared: bool) -> bool:
        return eligible(x, geom, shared, device_type=x.device.type)

    def record(self: object, name: str, *args: object) -> None:
        launches.append(name)

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(fused, "triton_available", lambda: True))
        patches.enter_context(mock.patch.object(functional, "fused_eligible", eligible_here))
        patches.enter_context(mock.patch.object(fused._Launch, "_launch", record))
        yield launches


def bench_inject(
    names: Sequence[str], *, repeats: int = 5, print_fn: Callable[[str], None] = print
) -> list[dict[str, object]]:
    """Median seconds of ``plan`` and of ``inject`` (which plans again) on freshly built models."""
    from dropblock_inject.api import inject, plan
    from dropblock_inject.errors import NoSitesError
    from dropblock_inject.models import create_model

    rows: list[dict[str, object]] = []
    print_fn(f"bench inject: median of {repeats} on fresh models (model construction not timed)")
    for name in names:
        plan_t, inject_t, sites = [], [], 0
        for _ in range(repeats + 1):  # the first round warms the caches and is dropped
            model = create_model(name)
            t0 = time.perf_counter()
            try:
                sites = len(plan(model))
            except NoSitesError:
                print_fn(f"  {name:<28} no site ({time.perf_counter() - t0:.3f} s)")
                break
            t1 = time.perf_counter()
            inject(model)
            plan_t.append(t1 - t0)
            inject_t.append(time.perf_counter() - t1)
        if not inject_t:
            continue
        row = {"model": name, "sites": sites, "plan_s": statistics.median(plan_t[1:]),
               "inject_s": statistics.median(inject_t[1:])}  # fmt: skip
        rows.append(row)
        print_fn(f"  {name:<28} {sites:4d} sites  plan {row['plan_s']:.3f} s  inject {row['inject_s']:.3f} s")
    return rows


def bench_step(
    name: str,
    *,
    batch_size: int = 16,
    input_size: Sequence[int] = (3, 224, 224),
    repeats: int = 5,
    recipe: str | None = None,
    drop_prob: float = 0.1,
    channels_last: bool = False,
    amp: str | None = None,
    compiled: bool = False,
    memory: bool = True,
    device: str = "cpu",
    print_fn: Callable[[str], None] = print,
) -> dict[str, float]:
    """Training-step and eval time of the patched model against the unpatched one (and against
    itself, A/A, to show the noise), of timm's own ``drop_block_rate`` where the model takes it,
    and the eval time after ``strip``; then the peak memory of one training step.

    All candidates are built from the same weights and run interleaved; the DropBlocks run at
    their full target rate (the end of the schedule).

    Args:
        name: Model name (see :func:`dropblock_inject.models.create_model`).
        batch_size: Batch size.
        input_size: Input size without the batch dimension.
        repeats: Interleaved turns; each time is the median over the turns.
        recipe: Recipe name or path (default: the built-in rules).
        drop_prob: Drop rate.
        channels_last: Run models and input in channels_last (3-D: channels_last_3d).
        amp: ``"bf16"`` or ``"fp16"``: the step runs under ``torch.autocast``.
        compiled: ``torch.compile`` every model (compilation happens in the untimed warm-up).
        memory: Also measure the peak memory and the bytes saved for backward of one step.
        device: ``"cpu"`` or ``"cuda"``.
        print_fn: Where the table goes.

    Returns:
        Median seconds per candidate, plus ``"memory <label>"`` entries (peak bytes) when measured.
    """
    import copy

    from dropblock_inject.api import inject, strip
    from dropblock_inject.models import create_model

    torch.manual_seed(0)
    base = create_model(name)
    models = {"unpatched": base, "unpatched (A/A)": copy.deepcopy(base)}
    models["patched"] = inject(copy.deepcopy(base), recipe, drop_prob=drop_prob, input_size=tuple(input_size))
    if ":" not in name:  # a timm name: timm's own DropBlock, where the model takes drop_block_rate
        try:
            timm_model = create_model(name, drop_block_rate=drop_prob)
            timm_model.load_state_dict(base.state_dict())
            models["timm drop_block_rate"] = timm_model
        except (TypeError, RuntimeError, DropBlockInjectError):
            pass
    models["stripped"] = strip(copy.deepcopy(models["patched"]))
    x = torch.randn(batch_size, *input_size, device=device)
    models = {label: m.to(device) for label, m in models.items()}
    if channels_last:
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        x = x.to(memory_format=fmt)
        models = {label: m.to(memory_format=fmt) for label, m in models.items()}
    runners = {label: torch.compile(m) if compiled else m for label, m in models.items()}
    fns: dict[str, Callable[[], object]] = {}
    for label, model in runners.items():
        if label != "stripped":
            fns[f"train {label}"] = _train_step(model, x, amp)
    for label in ("unpatched", "patched", "stripped"):
        fns[f"eval {label}"] = _eval_step(runners[label], x, amp)
    times = time_interleaved(fns, repeats, number=1, device=device)
    flags = [f for f, on in (("channels_last", channels_last), (f"autocast {amp}", amp), ("compiled", compiled)) if on]
    flag_text = "".join(", " + f for f in flags)
    where = torch.cuda.get_device_name(device) if x.is_cuda else f"cpu, threads={torch.get_num_threads()}"
    print_fn(f"bench step {name}: batch {batch_size}, input {'x'.join(map(str, input_size))}, {where}, "
             f"median of {repeats} interleaved turns{flag_text}")  # fmt: skip
    for phase in ("train", "eval"):
        floor = times[f"{phase} unpatched"]
        for key, t in times.items():
            if key.startswith(phase):
                print_fn(f"  {key:<28} {t * 1e3:9.1f} ms  {t / floor:6.3f}x unpatched")
    if not compiled:
        share = op_share(fns["train patched"], device=device)
        times["op share"] = share
        print_fn(f"  DropBlock ops (forward + backward) in a patched training step: {share * 100:.2f} %")
    if memory:
        steps = {k[6:]: f for k, f in fns.items() if k.startswith("train ")}
        times.update(_report_memory(steps, x.device, print_fn))
    return times


def op_share(step: Callable[[], object], repeats: int = 2, *, device: torch.device | str = "cpu") -> float:
    """Fraction of the wall time of ``repeats`` calls spent in the eager DropBlock op, forward and backward.

    Free of the run-to-run noise that step timings carry: the step overhead of the patched model
    is about this fraction (plus one hook call per site). The ``forward`` and ``backward`` of the
    op's autograd Functions (ATen and fused) are wrapped with a timer for the duration (restored
    after), not profiled: the profiler's own cost per kernel would inflate an op made of small
    kernels. On a CUDA ``device`` each call is timed between two device
    synchronisations, so the share counts the op's kernels, not only their launch.
    """
    from unittest import mock

    from dropblock_inject.op.fused import _FusedDropBlock

    spent = [0.0]
    sync = _synchronizer(device)

    def timed(fn: Callable[..., object]) -> staticmethod:
        def call(*args: object) -> object:
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                sync()
                spent[0] += time.perf_counter() - t0

        return staticmethod(call)

    with contextlib.ExitStack() as patches:  # restored on exit, also when the step fails
        for fn, name in itertools.product((_DropBlockFunction, _FusedDropBlock), ("forward", "backward")):
            patches.enter_context(mock.patch.object(fn, name, timed(getattr(fn, name))))
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        sync()
        wall = time.perf_counter() - t0
    return spent[0] / wall


def _report_memory(
    steps: dict[str, Callable[[], object]], device: torch.device, print_fn: Callable[[str], None]
) -> dict[str, float]:
    """Print peak bytes and bytes saved for backward of one call of each step, as ratios to the first."""
    usage = {label: step_memory(step, device) for label, step in steps.items() if label != "unpatched (A/A)"}
    print_fn("  memory of one training step       peak allocated        saved for backward")
    ref = next(iter(usage.values()))
    for label, (peak, saved) in usage.items():
        peak_text = f"{peak / 2**20:9.1f} MB {peak / ref[0]:6.3f}x" if peak and ref[0] else "   (not measured)  "
        print_fn(f"  {label:<28} {peak_text}   {saved / 2**20:9.1f} MB {saved / ref[1]:6.3f}x")
    return {f"memory {label}": float(peak or 0) for label, (peak, _) in usage.items()}


def step_memory(step: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int | None, int]:
    """``(peak, saved)`` bytes of one call of a training step.

    ``saved`` counts the distinct storages autograd keeps for backward (``saved_tensors_hooks``).
    ``peak`` is the highest total of live tensors, parameters and gradients included: on CUDA the
    allocator's ``max_memory_allocated``, on CPU the profiler's memory timeline (None where the
    profiler cannot say).
    """
    storages: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), sum(storages.values())
    return _profiled_peak(step), sum(storages.values())


def _profiled_peak(step: Callable[[], object]) -> int | None:
    try:
        from torch.profiler import profile
        from torch.profiler._memory_profiler import Action, MemoryProfile

        with _native_stderr_to_devnull(), profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
            step()
        live = peak = 0
        for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
            if action in (Action.PREEXISTING, Action.CREATE):
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return peak
    except Exception:  # a private profiler API; the saved-bytes figure still stands
        return None


@contextlib.contextmanager
def _native_stderr_to_devnull() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to /dev/null: the profiler (kineto) logs its
    start and stop, and a failed CUDA device count on a machine without a GPU, there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _train_step(model: Callable[..., object], x: torch.Tensor, amp: str | None = None) -> Callable[[], object]:
    module = getattr(model, "_orig_mod", model)
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)

    def step() -> object:
        module.train()
        opt.zero_grad(set_to_none=True)
        with _autocast(x, amp):
            loss = _loss(model(x))
        loss.backward()
        opt.step()
        return loss

    return step


def _eval_step(model: Callable[..., object], x: torch.Tensor, amp: str | None = None) -> Callable[[], object]:
    module = getattr(model, "_orig_mod", model)

    def step() -> object:
        module.eval()
        with torch.no_grad(), _autocast(x, amp):
            return model(x)

    return step


def _autocast(x: torch.Tensor, amp: str | None) -> contextlib.AbstractContextManager[object]:
    if amp is None:
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp must be one of {sorted(dtypes)} or None, got {amp!r}")
    return torch.autocast(x.device.type, dtype=dtypes[amp])


def _loss(out: object) -> torch.Tensor:
    """Mean square of every floating tensor in a model's output (tensor, dict, list or tuple)."""
    if isinstance(out, torch.Tensor):
        return out.float().square().mean()
    parts = out.values() if isinstance(out, dict) else out
    return sum((_loss(o) for o in parts if isinstance(o, (torch.Tensor, dict, list, tuple))), torch.zeros(()))
