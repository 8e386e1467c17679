"""What every benchmark module shares: device facts, ceilings, timing, costs, results files.

The method (docs/design.md, "Performance method"): count each case's FLOPs and minimum bytes,
measure the device's two ceilings (a large device-to-device copy, a large bf16 matmul) in the
same process, time each implementation's median, and report the achieved rate as a fraction
of the ceiling that bounds the case. Every number comes from this file's helpers.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

# bench/ runs from a checkout (``python -m bench`` in its root), never from an installation:
# results go to this checkout's bench/results/ (CPU runs as *_cpu.json, which git ignores).
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1
CPU_WARNING = "CPU run: numbers are not GPU performance (tiny sizes, torch backend; harness check only)"


# --------------------------------------------------------------------------- device and run facts

def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception:
        return None


def _mm1_version() -> str | None:
    try:
        import mm1_kernels as mk
    except Exception:
        return None
    return mk.__version__


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Everything needed to say where a number came from."""
    env = {
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "mm1_kernels": _mm1_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "peers": {name: _version(mod) for name, mod in
                  (("fla-core", "fla"), ("liger-kernel", "liger_kernel"), ("nvtx", "nvtx"))},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm_count=props.multi_processor_count,
                   l2_bytes=getattr(props, "L2_cache_size", None),
                   memory_bytes=props.total_memory,
                   compute_capability=f"{props.major}.{props.minor}")
    else:
        env.update(device_name=f"CPU: {_cpu_name()}", sm_count=None, l2_bytes=None,
                   cpu_threads=torch.get_num_threads())
    return env


def device_slug(name: str) -> str:
    import re
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


# --------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Policy:
    """How long to warm up and repeat: milliseconds of budget, and the least number of calls."""
    warmup_ms: float
    rep_ms: float
    min_warmup: int
    min_reps: int

    @classmethod
    def for_device(cls, device: torch.device, smoke: bool = False) -> Policy:
        if smoke:  # one call each: the harness runs, no number means anything
            return cls(0.0, 0.0, 1, 1)
        return cls(25.0, 100.0, 3, 5) if device.type == "cuda" else cls(10.0, 30.0, 2, 3)


@dataclasses.dataclass
class Timing:
    median_ms: float
    reps: int
    sets: int          # input sets rotated through, so repeated calls do not hit a warm cache


def rotation_sets(set_bytes: int, device: torch.device) -> int:
    """How many input sets make the rotation overflow L2 (at least 2x its size), memory permitting."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    want = math.ceil(2 * l2 / max(set_bytes, 1))
    budget = torch.cuda.mem_get_info(device)[0] // 4
    return max(1, min(want, 16, budget // max(set_bytes, 1)))


def median_time(call: Callable[[int], object], sets: int, device: torch.device, policy: Policy,
                max_reps: int = 200) -> Timing:
    """Median time of ``call(i)`` (i picks the rotated input set), after warm-up.

    GPU: CUDA events around each call, the stream never synchronized inside the timed loop.
    CPU: ``time.perf_counter`` around each call.
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    call(0)  # compile, autotune, allocate: outside every number
    sync()
    per_call_ms = (time.perf_counter() - t0) * 1e3
    i, t0 = 1, time.perf_counter()
    while i < policy.min_warmup or (time.perf_counter() - t0) * 1e3 < policy.warmup_ms:
        call(i % sets)
        sync()
        i += 1
    if i > 1:
        per_call_ms = (time.perf_counter() - t0) * 1e3 / (i - 1)
    reps = max(policy.min_reps, min(max_reps, int(policy.rep_ms / max(per_call_ms, 1e-3))))
    times = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for r, (start, end) in enumerate(events):
            start.record()
            call(r % sets)
            end.record()
        sync()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for r in range(reps):
            t = time.perf_counter()
            call(r % sets)
            times.append((time.perf_counter() - t) * 1e3)
    return Timing(statistics.median(times), reps, sets)


# --------------------------------------------------------------------------- ceilings

def measure_ceilings(device: torch.device, policy: Policy) -> dict:
    """The two ceilings, measured now on this device: copy GB/s and bf16 matmul TFLOP/s."""
    cuda = device.type == "cuda"

    def copy_ms(n):  # fp32 elements; the tensors are freed on return
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        return median_time(lambda i: dst.copy_(src), 1, device, policy).median_ms

    def matmul_ms(n):  # random data: a matmul on zeros runs faster than on real data
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        return median_time(lambda i: a @ b, 1, device, policy).median_ms

    n_copy = (2**30 if cuda else 2**26) // 4                 # 1 GiB on GPU, 64 MiB on CPU
    copy_bytes = 2 * n_copy * 4                             # read + write
    t_copy = copy_ms(n_copy)
    free_memory(device)
    n = 8192 if cuda else 1024
    t_mm = matmul_ms(n)
    free_memory(device)
    return {
        "copy_GBps": copy_bytes / t_copy / 1e6,
        "copy_bytes": copy_bytes,
        "copy_ms": t_copy,
        "matmul_bf16_TFLOPs": 2 * n**3 / t_mm / 1e9,
        "matmul_shape": [n, n, n],
        "matmul_ms": t_mm,
    }


# --------------------------------------------------------------------------- cases and results

@dataclasses.dataclass
class Case:
    """One point of an op's grid: ``kind`` (prefill, decode, ...), its parameters, the x-axis."""
    op: str
    kind: str
    params: dict
    x: str                     # the parameter the plots put on the x axis
    series: str = ""           # extra label for a line (e.g. "int8"), besides the implementation

    @property
    def name(self) -> str:
        return f"{self.op}.{self.kind}[" + ",".join(f"{k}={v}" for k, v in self.params.items()) + "]"


@dataclasses.dataclass
class Cost:
    flops: float
    bytes: float
    note: str = ""


@dataclasses.dataclass
class Impl:
    """One way to run a case. ``fn(inputs)`` does the work; ``why_not`` says why it cannot run."""
    name: str
    kind: str                  # "backend" (mm1_kernels) or "peer"
    fn: Callable | None = None
    why_not: str | None = None


def bound_and_fraction(cost: Cost, median_ms: float, ceilings: dict) -> tuple[str, float]:
    """Which ceiling bounds the case (the larger floor), and the fraction of it reached."""
    t_compute = cost.flops / (ceilings["matmul_bf16_TFLOPs"] * 1e12)
    t_memory = cost.bytes / (ceilings["copy_GBps"] * 1e9)
    bound = "compute" if t_compute >= t_memory else "memory"
    return bound, max(t_compute, t_memory) / (median_ms * 1e-3)


def floor_ms(cost: Cost, ceilings: dict) -> float:
    return 1e3 * max(cost.flops / (ceilings["matmul_bf16_TFLOPs"] * 1e12),
                     cost.bytes / (ceilings["copy_GBps"] * 1e9))


def tensors_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensors_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensors_bytes(v) for v in obj)
    return 0


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graph_replay_time(fn: Callable[[], object], device: torch.device, policy: Policy) -> Timing:
    """Median time of ``fn`` replayed from a CUDA graph: the kernels alone, without the Python,
    dispatch and launch overhead an eager call pays (decode steps are made of short kernels, so
    the difference is the launch overhead a serving engine removes by capturing its step)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside capture (allocator, lazy init, autotuning)
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_time(lambda i: graph.replay(), 1, device, policy)


def run_case(case: Case, cost_of: Callable[[dict | None], Cost], make_inputs: Callable[[], dict],
             impls: list[Impl],
             device: torch.device, ceilings: dict, policy: Policy, measure_memory: bool = False,
             progress=None, cuda_graph: bool = False) -> list[dict]:
    """Time every implementation of one case; one result row each (skips and failures included).

    ``cost_of(inputs)`` counts the case's FLOPs and bytes (from the first input set, or None
    when the inputs could not be made). ``cuda_graph``: decode cases on a GPU are also timed
    as a CUDA-graph replay (``graph_ms``; ``launch_overhead_ms`` = eager − graph).
    """
    from mm1_kernels import BackendUnavailableError, nvtx_range

    rows = []
    sets: list[dict] = []
    try:
        first = make_inputs()
        n_sets = rotation_sets(tensors_bytes(first), device)
        sets = [first] + [make_inputs() for _ in range(n_sets - 1)]
    except Exception as exc:  # the inputs themselves do not fit: every impl is skipped
        why = ("out of memory allocating inputs" if is_oom(exc) else f"inputs failed: {exc!r}")
    cost = cost_of(sets[0] if sets else None)
    base = {"op": case.op, "kind": case.kind, "params": case.params, "x": case.x,
            "series": case.series, "flops": cost.flops, "bytes": cost.bytes, "cost_note": cost.note,
            "floor_ms": floor_ms(cost, ceilings)}
    if not sets:
        free_memory(device)
        for impl in impls:
            rows.append({**base, "impl": impl.name, "impl_kind": impl.kind, "status": "error",
                         "message": why})
            if progress is not None:
                progress.update(1)
        return rows
    for impl in impls:
        row = {**base, "impl": impl.name, "impl_kind": impl.kind}
        if impl.fn is None:
            row.update(status="skipped", message=impl.why_not)
        else:
            try:
                with nvtx_range(f"bench:{case.name}:{impl.name}"):
                    if measure_memory and device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats(device)
                        before = torch.cuda.memory_allocated(device)
                        impl.fn(sets[0])
                        torch.cuda.synchronize()
                        row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - before
                    timing = median_time(lambda i: impl.fn(sets[i]), len(sets), device, policy)
                bound, fraction = bound_and_fraction(cost, timing.median_ms, ceilings)
                row.update(status="ok", median_ms=timing.median_ms, reps=timing.reps,
                           rotated_sets=timing.sets,
                           TFLOPs=cost.flops / timing.median_ms / 1e9,
                           GBps=cost.bytes / timing.median_ms / 1e6,
                           bound=bound, fraction=fraction)
                if cuda_graph and case.kind == "decode" and device.type == "cuda":
                    try:  # one input set: a graph replays fixed addresses (the L2 may be warm)
                        g = graph_replay_time(lambda: impl.fn(sets[0]), device, policy)
                        row.update(graph_ms=g.median_ms, launch_overhead_ms=timing.median_ms - g.median_ms)
                    except Exception as exc:  # e.g. an implementation that synchronizes the host
                        row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            except BackendUnavailableError as exc:
                row.update(status="skipped", message=str(exc)[:500])
            except Exception as exc:
                if is_oom(exc):
                    row.update(status="oom", message="out of memory")
                else:
                    row.update(status="error", message=f"{type(exc).__name__}: {exc}"[:500],
                               traceback=traceback.format_exc(limit=4)[-2000:])
            free_memory(device)
        rows.append(row)
        if progress is not None:
            progress.update(1)
    sets.clear()
    free_memory(device)
    return rows


# --------------------------------------------------------------------------- output

def format_row(row: dict) -> str:
    shape = ",".join(f"{k}={v}" for k, v in row["params"].items())
    shape = shape if len(shape) <= 44 else shape[:43] + "…"
    head = f"{row['op']}.{row['kind']:<8} {shape:<44} {row['impl']:<22}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('message', '')}"[:200]
    mem = f"  peak {row['peak_mem_bytes'] / 2**20:,.0f} MiB" if "peak_mem_bytes" in row else ""
    graph = (f"  graph {row['graph_ms']:.3f} ms (launch overhead {row['launch_overhead_ms']:.3f})"
             if "graph_ms" in row else (f"  graph: {row['graph_error']}" if "graph_error" in row else ""))
    return (f"{head} {row['median_ms']:10.3f} ms {row['TFLOPs']:9.2f} TFLOP/s {row['GBps']:9.1f} GB/s"
            f"  {100 * row['fraction']:5.1f}% of {row['bound']} ceiling{mem}{graph}")


def write_results(run: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = run["created"].replace(":", "").replace("-", "")[:15]
    cpu = "_cpu" if run["cpu_run"] else ""  # *_cpu.* is git-ignored: CPU runs check the harness only
    name = f"{stamp}_{device_slug(run['env']['device_name'])}_{'-'.join(run['ops'])}{cpu}.json"
    path = out_dir / name
    path.write_text(json.dumps(run, indent=1, default=str))
    return path


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def mm1_backends(op: str, args) -> tuple:
    """The mm1 backends to time for the public op ``op``: ``--backends`` if given, else every
    backend the op implements (from the registry; one that cannot run here gives a skipped row)."""
    import mm1_kernels as mk

    return tuple(args.backends) if getattr(args, "backends", None) else mk.available_backends(op)


def missing_names(module: str, *names: str) -> str | None:
    """Why ``module`` cannot be benchmarked (not importable, or lacking ``names``), else None."""
    try:
        mod = __import__(module)
        missing = [n for n in names if not hasattr(mod, n)]
    except Exception as exc:
        return f"{module} is not importable ({exc})"
    return f"{module} lacks {', '.join(missing)}" if missing else None
