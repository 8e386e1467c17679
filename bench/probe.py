"""python -m bench.probe [--tiny] [--out DIR]: the whole GPU proof in one command of at most 9 minutes.

Made for one window on a borrowed H100/H200 with no package registry (torch, triton, CuPy,
pytest and ncu present; fla-core and other wheels may be carried in the git-ignored
``.wheels/``). From the repository root::

    python3 -m bench.probe                    # or: bash bench/gpu_probe.sh
    python3 -m bench.probe --tiny --out /tmp/p   # CPU, tiny shapes, Triton interpreter (CI)

Every stage runs in its own process (``python -m bench.probe --worker STAGE``) with its own
timeout, and ends with a recorded status: ``ok``, ``failed`` (an exception, a nonzero exit, or a
check over its tolerance), ``timed_out`` (killed at its budget; what it finished is kept), or
``skipped`` (with the reason). No stage can abort the probe. Stages and budgets (seconds)::

    env                  20  device, versions, commit, nvidia-smi, what is importable
    -- in the background, from here on: wheels (20) then build (215), 235 in all --
    wheels               20  pip install --no-index --no-deps .wheels/*.whl (when present)
    build               215  MM1_REQUIRE_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -e .,
                             then an import check of mm1_kernels._C
    correctness_lightning 45  prefill H=64 D=128 bf16 (B=2 T=2048, and varlen 5 sequences in
                             4096 tokens, both from random initial states), decode B=64 (80 slots):
                             every backend but cuda vs the fp64 recurrence
    correctness_moe      50  moe_route (T=1, 4096) and fused_moe E=32 hidden=6144 I=1152 top-2,
                             T=1 and 4096, bf16 and int8 weight-only, vs fp64
    correctness_head     45  head_logprobs V=200,064 hidden=6144 T=1024 bf16 forward and backward
                             vs fp64 autograd
    correctness_backward 40  lightning_attention gradients (q, k, v, initial state; H=64 D=128
                             T=512 bf16, final-state gradient too) and fused_moe gradients (x, w13,
                             w2, routing weights; E=32 hidden=6144 I=1152 T=256 bf16) vs fp64
                             autograd of the public references
    consistency          40  consistent mode's claim (bench/consistency.py's measure): the tiny model
                             (random weights, bf16) generates for prompts of 5, 17, 33 and 70
                             tokens, then the training forward scores the same sequences; with
                             consistent=True every rollout logprob equals the training one
                             bitwise (checked); default mode's mismatch is reported. Triton on a
                             GPU, torch with --tiny
    ceilings             15  D2D copy GB/s (1 GiB, read+write) and bf16 matmul TFLOP/s (8192^3),
                             bench/common.py's measure_ceilings
    -- wait for the background (at most until its 235 s are spent) --
    correctness_lightning_cuda 25  the same lightning checks, backend="cuda"
    timings_lightning    35  prefill B=8 T=4096, decode B=64: mm1 torch/triton/cuda
    timings_moe          35  prefill T=4096 and decode T=1, bf16 and int8 (I=1152, i.e. --tp 8):
                             mm1 torch/triton, per-expert loop, torch._grouped_mm (bf16)
    timings_head         35  logprobs and fwd+bwd T=1024, sample B=64: mm1 torch/triton, torch fp32 head
    timings_fla          35  fla chunk_simple_gla (prefill) and fused_recurrent_simple_gla (decode),
                             when importable (its autotuning gets its own budget)
    timings_backward     25  forward+backward: lightning B=1 T=32768 (mm1 triton, fla chunk_simple_gla
                             when importable), fused_moe T=4096 I=1152 (mm1 triton, torch._grouped_mm)
    graphs               30  lightning decode B=1, 64 (triton, cuda) and a MoE decode step T=1
                             (moe_route + fused_moe, bf16 and int8): eager vs CUDA-graph replay
    tests                60  pytest tests/test_lightning_cuda.py tests/test_moe_cuda.py
                             tests/test_head_cuda.py -m "not slow" -k "not compute_sanitizer"
                             (the CUDA C++ backends vs fp64; counts stream, so a timeout keeps them)

Worst case: env 20 + max(background 235, correctness + consistency + ceilings 235) + the rest
280 = 535 s
(asserted below 540 at import), and a global deadline (525 s after the start) trims any stage's
timeout that would pass it, so the probe ends inside 9 minutes by construction (plus a few
seconds to write the files). ``--skip a,b`` skips stages (e.g. ``--skip build,tests`` for a rerun).

Timings reuse bench/<op>.py (inputs, FLOP and byte counts, implementations) and
bench/common.py (medians of CUDA events after warm-up, rotated input sets, fractions of the
ceilings measured in the ceilings stage). Without a GPU, or with ``--tiny``, the same stages run
on the CPU with tiny shapes, the Triton backend through the interpreter (TRITON_INTERPRET=1 is
set for every stage before mm1_kernels is imported); the stages that need a GPU (wheels, build,
the CUDA backend, graphs, tests) are recorded as skipped with the reason. That run takes well
under a minute and checks the probe, not the GPU.

Output, in ``--out`` (default ``$OUT`` when set, else ``bench/results/probe_<time>_<device>/``;
a CPU run's default folder ends in ``_cpu.d`` and is git-ignored), three files:

- ``probe_summary.json``: device, versions, commit, every stage's status, seconds, budget and
  numbers. It is also a ``python -m bench`` results file (schema 1: ``env``, ``ceilings``,
  ``cases``), so ``python -m bench.report DIR`` renders its timings next to other runs.
- ``probe_summary.md``: the same as tables (stages, correctness, ceilings, timings, graphs, tests).
- ``probe_logs.tar.gz``: every stage's log and raw JSON.

How to read it: bench/results/README.md ("The probe"). A stage's status is the first thing to
look at; ``correctness[*].ok`` false means a kernel disagrees with fp64 beyond the numerics
contract at an M1 shape; a timing's ``fraction`` is the counted floor over the measured time
(1.0 = at the ceiling that bounds the case); in ``graphs``, eager minus replay time per call
is the launch and host overhead that CUDA graphs remove.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE_SCHEMA = 1
DEADLINE_S = 525.0          # no stage runs past this many seconds after the probe started
MIN_STAGE_S = 5.0           # a stage with less time than this left is skipped


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float
    gpu_only: bool          # skipped on a CPU (--tiny) run
    needs_build: bool = False
    what: str = ""


ENV = Stage("env", 20, False, what="device, versions, commit")
WHEELS = Stage("wheels", 20, True, what="offline install of .wheels/*.whl")
BUILD = Stage("build", 215, True, what="the CUDA extension (pip install -e .), then import check")
# Phase A's budgets sum to the background's 235 s. The consistency stage's 40 s came out of the
# others (lightning 50 → 45, moe 60 → 50, head 50 → 45, backward 45 → 40, ceilings 25 → 15),
# none yet timed on a GPU, so that the worst case stays 535 s.
PHASE_A = [  # while the build runs
    Stage("correctness_lightning", 45, False, what="lightning prefill (dense, varlen) and decode vs fp64"),
    Stage("correctness_moe", 50, False, what="moe_route and fused_moe bf16/int8 vs fp64"),
    Stage("correctness_head", 45, False, what="head_logprobs forward and backward vs fp64"),
    Stage("correctness_backward", 40, False, what="lightning and fused_moe gradients vs fp64 autograd"),
    Stage("consistency", 40, False, what="consistent mode: rollout vs training logprobs bitwise (tiny model)"),
    Stage("ceilings", 15, False, what="D2D copy GB/s, bf16 matmul TFLOP/s"),
]
PHASE_B = [  # after the build
    Stage("correctness_lightning_cuda", 25, True, True, "lightning, backend=cuda, vs fp64"),
    Stage("timings_lightning", 35, False, what="one prefill and one decode shape, mm1 backends"),
    Stage("timings_moe", 35, False, what="prefill/decode bf16/int8, mm1 backends and peers"),
    Stage("timings_head", 35, False, what="logprobs, fwd+bwd, sample, mm1 backends and torch fp32 head"),
    Stage("timings_fla", 35, False, what="fla-core peers of lightning (when importable)"),
    Stage("timings_backward", 25, False, what="forward+backward: lightning and fused_moe, mm1 and peers"),
    Stage("graphs", 30, True, what="eager vs CUDA-graph replay of decode steps"),
    Stage("tests", 60, True, True, "pytest of the CUDA backends (lightning, moe, head), no sanitizer"),
]
STAGES = [ENV, WHEELS, BUILD] + PHASE_A + PHASE_B
BACKGROUND_S = WHEELS.budget_s + BUILD.budget_s
WORST_CASE_S = (ENV.budget_s + max(BACKGROUND_S, sum(s.budget_s for s in PHASE_A))
                + sum(s.budget_s for s in PHASE_B))
assert WORST_CASE_S < 540, WORST_CASE_S

# Correctness tolerances (docs/design.md, numerics contract): bf16 inputs 1e-2 relative; the
# router's fp32 weights 1e-5; the fp32 head's outputs max(1e-5, 2 x the naive fp32 head's error)
# absolute; its bf16 gradients 6e-3 relative (one bf16 rounding), as tests/test_head.py.
TOL_BF16, TOL_ROUTE, TOL_HEAD_ABS, TOL_HEAD_GRAD = 1e-2, 1e-5, 1e-5, 6e-3


# ============================================================================ worker side

class Skip(Exception):
    """A stage that cannot run here; the message is the reason."""


class Worker:
    """What a stage sees: the mode, the device, and a result file written as it goes."""

    def __init__(self, name: str, work: Path, tiny: bool):
        import torch
        self.name, self.work, self.tiny = name, work, tiny
        self.torch = torch
        self.cuda = torch.cuda.is_available() and not tiny
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.seed = int(time.time() * 1000) % 2**31  # fresh inputs every run, the seed recorded
        torch.manual_seed(self.seed)
        self.data: dict = {"seed": self.seed}
        self.checks: list[dict] = []
        self.rows: list[dict] = []

    def save(self, status: str = "running", **extra) -> None:
        rec = {"stage": self.name, "status": status, "data": self.data, **extra}
        if self.checks:
            rec["checks"] = self.checks
        if self.rows:
            rec["cases"] = self.rows
        tmp = self.work / f"{self.name}.json.tmp"
        tmp.write_text(json.dumps(rec, indent=1, default=str))
        tmp.replace(self.work / f"{self.name}.json")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def poison(self, nbytes: int) -> None:
        """Leave NaN blocks in the caching allocator: outputs the op allocates likely land on
        NaN, so an unwritten element fails the finiteness check."""
        if self.cuda:
            for size in (nbytes, max(nbytes // 16, 4)):
                self.torch.full((max(size // 4, 1),), float("nan"), device=self.device)

    def check(self, op: str, case: str, backend: str, what: str, fn) -> None:
        """Run ``fn() -> (metric, value, tol)`` (or a list of them); record each, never raise."""
        t0 = time.perf_counter()
        base = {"op": op, "case": case, "backend": backend, "what": what}
        try:
            results = fn()
            results = results if isinstance(results, list) else [results]
            for metric, value, tol, *label in results:
                ok = value is not None and value == value and value <= tol
                self.checks.append({**base, "what": label[0] if label else what, "metric": metric,
                                    "value": value, "tol": tol, "ok": bool(ok),
                                    "seconds": round(time.perf_counter() - t0, 3)})
        except Exception as exc:
            from mm1_kernels import BackendUnavailableError
            if isinstance(exc, BackendUnavailableError):
                self.checks.append({**base, "ok": None, "skipped": str(exc)[:300]})
            else:
                self.checks.append({**base, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:600],
                                    "traceback": traceback.format_exc(limit=6)[-2500:]})
        print(json.dumps(self.checks[-1], default=str)[:400], flush=True)
        self.save()


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64, on out's device, in row blocks (the head's dW is 1.2 G elements);
    inf when out is not finite (NaN never passes)."""
    import torch
    out = out.detach()
    ref = ref.detach().to(out.device)
    rows = max(1, (1 << 25) // max(1, out[0].numel() if out.dim() else 1))
    o_flat = out.reshape(out.shape[0], -1) if out.dim() else out.reshape(1, 1)
    r_flat = ref.reshape(o_flat.shape)
    num = den = 0.0
    for i in range(0, o_flat.shape[0], rows):
        o = o_flat[i:i + rows].double()
        r = r_flat[i:i + rows].double()
        if not bool(torch.isfinite(o).all()):
            return float("inf")
        num += float((o - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return (num / max(den, 1e-300)) ** 0.5


def max_abs(out, ref) -> float:
    import torch
    d = out.detach().double() - ref.detach().double().to(out.device)
    if not bool(torch.isfinite(d).all()):
        return float("inf")
    return float(d.abs().max()) if d.numel() else 0.0


def _backends(w: Worker, op: str, only: tuple | None = None) -> list[str]:
    import mm1_kernels as mk
    names = [b for b in mk.available_backends(op) if b != "cuda"]
    if only:
        names = [b for b in mk.available_backends(op) if b in only]
    return names


# ---------------------------------------------------------------------------- stages

def stage_env(w: Worker) -> None:
    from bench import common
    env = common.environment(w.device)
    import mm1_kernels as mk
    from mm1_kernels import _dispatch
    env["cuda_extension"] = _dispatch.CUDA_EXTENSION_IMPORT_ERROR or "loaded"
    env["backends"] = {op: mk.available_backends(op) for op in mk.registered_ops()}
    env["probe_tiny"] = w.tiny
    env["cuda_available"] = w.torch.cuda.is_available()
    smi = shutil.which("nvidia-smi")
    if smi and w.cuda:
        try:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                                "clocks.mem,power.limit,temperature.gpu", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=15)
            env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except Exception as exc:
            env["nvidia_smi"] = f"failed: {exc!r}"
    for tool in ("nvcc", "ncu", "compute-sanitizer"):
        env[f"has_{tool}"] = shutil.which(tool) is not None
    for mod in ("cupy", "pytest", "fla"):
        env[f"version_{mod}"] = common._version(mod)
    w.data["env"] = env
    print(json.dumps(env, indent=1, default=str))


def _lightning_checks(w: Worker, backends: list[str]) -> None:
    torch = w.torch
    import mm1_kernels as mk
    from mm1_kernels import lightning_attention_reference as lightning_recurrence

    dev = w.device
    H, D = (2, 32) if w.tiny else (64, 128)
    slopes = mk.lightning_slopes(H, 39, 80).to(dev)
    act = lambda *s: torch.nn.functional.silu(torch.randn(*s, device=dev)).to(torch.bfloat16)  # noqa: E731
    dense = (2, 80) if w.tiny else (2, 2048)
    cu_list = [0, 5, 70, 150] if w.tiny else [0, 1, 63, 1000, 2050, 4096]
    cases = [("dense", f"B={dense[0]} T={dense[1]} H={H} D={D} bf16", dense[0], dense[1], None),
             ("varlen", f"varlen {len(cu_list) - 1} seqs T={cu_list[-1]} H={H} D={D} bf16", 1, cu_list[-1],
              torch.tensor(cu_list, dtype=torch.int32, device=dev))]
    for label, desc, B, T, cu in cases:
        n = B if cu is None else cu.numel() - 1
        q, k, v = act(B, T, H, D), act(B, T, H, D), act(B, T, H, D)
        init = torch.randn(n, H, D, D, device=dev) * 0.1
        t0 = time.perf_counter()
        ref_o, ref_final = lightning_recurrence(q, k, v, slopes, init, cu)  # fp64, token by token
        w.data[f"lightning_{label}_reference_s"] = round(time.perf_counter() - t0, 2)
        for b in backends:
            def run(b=b, q=q, k=k, v=v, init=init, cu=cu, ref_o=ref_o, ref_final=ref_final):
                w.poison(q.numel() * 2)
                o, final = mk.lightning_attention(q, k, v, slopes, initial_state=init, output_final_state=True,
                                                  cu_seqlens=cu, backend=b)
                w.sync()
                return [("rel", rel_err(o, ref_o), TOL_BF16, "o"),
                        ("rel", rel_err(final, ref_final), TOL_BF16, "final_state")]
            w.check("lightning_attention", desc, b, "prefill", run)
        del q, k, v, init, ref_o, ref_final
    # decode: B rows on distinct random slots of an S-slot fp32 state cache
    B, S = (4, 6) if w.tiny else (64, 80)
    q, k, v = act(B, H, D), act(B, H, D), act(B, H, D)
    state = torch.randn(S, H, D, D, device=dev) * 0.1
    slots = torch.randperm(S, device=dev)[:B].to(torch.int32)
    lam = torch.exp(-slopes.double())[:, None, None]
    ref_state = lam * state.double()[slots.long()] + k.double()[..., :, None] * v.double()[..., None, :]
    ref_o = torch.einsum("bhd,bhde->bhe", q.double(), ref_state)
    others = torch.ones(S, dtype=torch.bool, device=dev)
    others[slots.long()] = False
    for b in backends:
        def run(b=b):
            st = state.clone()
            w.poison(q.numel() * 2)
            o = mk.lightning_decode(q, k, v, slopes, st, slots, backend=b)
            w.sync()
            untouched = bool(torch.equal(st[others], state[others]))
            return [("rel", rel_err(o, ref_o), TOL_BF16, "o"),
                    ("rel", rel_err(st[slots.long()], ref_state), TOL_BF16, "state"),
                    ("unchanged_other_slots", 0.0 if untouched else 1.0, 0.0, "other slots untouched")]
        w.check("lightning_decode", f"B={B} slots={S} H={H} D={D} bf16", b, "decode", run)


def stage_correctness_lightning(w: Worker) -> None:
    _lightning_checks(w, _backends(w, "lightning_attention"))


def _cuda_backend_unavailable():
    """None when the lightning CUDA kernels can run here, else why not (the registry's reason)."""
    import mm1_kernels as mk
    try:
        mk.resolve_backend("lightning_attention", "cuda", "cuda")
    except mk.BackendUnavailableError as exc:
        return str(exc)
    return None


def stage_correctness_lightning_cuda(w: Worker) -> None:
    why = _cuda_backend_unavailable()
    if why:
        raise Skip(why)
    _lightning_checks(w, ["cuda"])


def stage_correctness_moe(w: Worker) -> None:
    torch = w.torch
    import mm1_kernels as mk
    from mm1_kernels import fused_moe_reference, moe_route_reference

    dev = w.device
    E, hidden, inter, top_k = (8, 64, 32, 2) if w.tiny else (32, 6144, 1152, 2)
    Ts = (1, 64) if w.tiny else (1, 4096)
    w13 = (torch.randn(E, 2 * inter, hidden, device=dev) * hidden ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, hidden, inter, device=dev) * inter ** -0.5).to(torch.bfloat16)
    w13_q, w13_s, w2_q, w2_s = mk.quantize_moe_weights(w13, w2)
    weights = {"bf16": (w13, w2, None, None), "int8": (w13_q, w2_q, w13_s, w2_s)}
    shape = f"E={E} hidden={hidden} I={inter} top{top_k}"
    for T in Ts:
        x = torch.randn(T, hidden, device=dev).to(torch.bfloat16)
        logits = torch.randn(T, E, device=dev) * 2
        ref_w, ref_ids = moe_route_reference(logits.double(), top_k, True)
        for b in _backends(w, "moe_route"):
            def route(b=b):
                wts, ids = mk.moe_route(logits, top_k, True, backend=b)
                w.sync()
                mismatch = float((ids.long() != ref_ids).float().mean())
                return [("rel", rel_err(wts, ref_w), TOL_ROUTE, "weights"),
                        ("id_mismatch_fraction", mismatch, 0.0, "ids")]
            w.check("moe_route", f"T={T} E={E} top{top_k}", b, "route", route)
        for dt, (a, c, sa, sc) in weights.items():
            ref_y = fused_moe_reference(x, a, c, ref_w, ref_ids, sa, sc, compute_dtype=torch.float64)
            for b in _backends(w, "fused_moe"):
                def run(b=b, a=a, c=c, sa=sa, sc=sc, ref_y=ref_y):
                    w.poison(x.numel() * 2)
                    y = mk.fused_moe(x, a, c, ref_w.float(), ref_ids, sa, sc, backend=b)
                    w.sync()
                    return ("rel", rel_err(y, ref_y), TOL_BF16, "y")
                w.check("fused_moe", f"T={T} {shape} {dt}", b, "experts", run)
            del ref_y


def stage_correctness_head(w: Worker) -> None:
    torch = w.torch
    import mm1_kernels as mk
    from mm1_kernels import head_logprobs_reference as head_reference

    dev = w.device
    V, K, T = (1000, 64, 32) if w.tiny else (200064, 6144, 1024)
    h = torch.randn(T, K, device=dev).to(torch.bfloat16)
    wt = (torch.randn(V, K, device=dev) * (4 * K ** -0.5)).to(torch.bfloat16)  # logits ~ N(0, 4^2)
    t = torch.randint(0, V, (T,), device=dev)
    t[torch.rand(T, device=dev) < 0.05] = -100
    desc = f"T={T} V={V} hidden={K} bf16"
    with torch.no_grad():
        ref = head_reference(h, wt, t)
        z = (h.float() @ wt.float().T).double()  # the naive fp32 head, fp64 after the GEMM
        lse = torch.logsumexp(z, -1)
        logp = z - lse[:, None]
        ent = -(logp.exp() * logp).sum(-1)
        lp = torch.where(t != -100, logp.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
        naive = max(max_abs(a, b) for a, b in zip((lp, lse, ent), ref))
        del z, logp
    tol = max(TOL_HEAD_ABS, 2 * naive)
    w.data["head_naive_fp32_max_abs"] = naive
    for b in _backends(w, "head_logprobs"):
        def fwd(b=b, ref=ref):
            w.poison(T * 12)
            out = mk.head_logprobs(h, wt, t, backend=b)
            w.sync()
            return [("max_abs", max_abs(o, r), tol, name)
                    for o, r, name in zip(out, ref, ("logprobs", "lse", "entropy"))]
        w.check("head_logprobs", desc, b, "forward", fwd)
    del ref
    g = [torch.randn(T, device=dev) for _ in range(3)]
    h64, w64 = h.double().requires_grad_(), wt.double().requires_grad_()
    ref = head_reference(h64, w64, t)
    sum(r * gi for r, gi in zip(ref, g)).sum().backward()
    ref_dh, ref_dw = h64.grad, w64.grad
    del ref, h64, w64
    for b in _backends(w, "head_logprobs"):
        def bwd(b=b):
            hk, wk = h.clone().requires_grad_(), wt.clone().requires_grad_()
            out = mk.head_logprobs(hk, wk, t, backend=b)
            sum(o * gi for o, gi in zip(out, g)).sum().backward()
            w.sync()
            return [("rel", rel_err(hk.grad, ref_dh), TOL_HEAD_GRAD, "d hidden"),
                    ("rel", rel_err(wk.grad, ref_dw), TOL_HEAD_GRAD, "d weight")]
        w.check("head_logprobs", desc, b, "backward", bwd)


def stage_correctness_backward(w: Worker) -> None:
    """Training gradients at M1 shapes vs fp64 autograd of the public references (issue 12)."""
    torch = w.torch
    import mm1_kernels as mk

    dev = w.device
    backends = [b for b in _backends(w, "lightning_attention") if b != "torch"] or ["torch"]
    H, D, T = (2, 32, 70) if w.tiny else (64, 128, 512)
    slopes = mk.lightning_slopes(H, 39, 80).to(dev)
    q, k, v = (torch.nn.functional.silu(torch.randn(1, T, H, D, device=dev)).to(torch.bfloat16) for _ in range(3))
    init = torch.randn(1, H, D, D, device=dev) * 0.1
    do = torch.randn(1, T, H, D, device=dev).to(torch.bfloat16)
    dfinal = torch.randn(1, H, D, D, device=dev) * 0.1
    leaves = [t.double().requires_grad_() for t in (q, k, v, init)]
    t0 = time.perf_counter()
    ref_o, ref_final = mk.lightning_attention_reference(*leaves[:3], slopes, leaves[3])
    ref = torch.autograd.grad((ref_o, ref_final), leaves, (do.double(), dfinal.double()))
    w.data["lightning_backward_reference_s"] = round(time.perf_counter() - t0, 2)
    del ref_o, ref_final, leaves
    for b in backends:
        def run(b=b):
            xs = [t.detach().clone().requires_grad_() for t in (q, k, v, init)]
            o, final = mk.lightning_attention(*xs[:3], slopes, initial_state=xs[3], output_final_state=True, backend=b)
            got = torch.autograd.grad((o, final), xs, (do, dfinal))
            w.sync()
            return [("rel", rel_err(g, r), TOL_BF16, name) for g, r, name in zip(got, ref, ("dq", "dk", "dv", "dinit"))]
        w.check("lightning_attention", f"backward B=1 T={T} H={H} D={D} bf16", b, "gradients", run)
    del ref

    E, hidden, inter, top_k, Tm = (8, 64, 32, 2, 40) if w.tiny else (32, 6144, 1152, 2, 256)
    w13 = (torch.randn(E, 2 * inter, hidden, device=dev) * hidden ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, hidden, inter, device=dev) * inter ** -0.5).to(torch.bfloat16)
    x = torch.randn(Tm, hidden, device=dev).to(torch.bfloat16)
    topk_w, topk_ids = mk.moe_route(torch.randn(Tm, E, device=dev) * 2, top_k, True, backend="torch")
    dy = torch.randn(Tm, hidden, device=dev).to(torch.bfloat16)
    leaves = [t.double().requires_grad_() for t in (x, w13, w2, topk_w)]
    y = mk.fused_moe_reference(leaves[0], leaves[1], leaves[2], leaves[3], topk_ids, compute_dtype=torch.float64)
    ref = torch.autograd.grad(y, leaves, dy.double())
    del y, leaves
    for b in [b for b in _backends(w, "fused_moe") if b != "torch"] or ["torch"]:
        def run(b=b):
            xs = [t.detach().clone().requires_grad_() for t in (x, w13, w2, topk_w)]
            y = mk.fused_moe(xs[0], xs[1], xs[2], xs[3], topk_ids, backend=b)
            got = torch.autograd.grad(y, xs, dy)
            w.sync()
            return [("rel", rel_err(g, r), TOL_BF16, name)
                    for g, r, name in zip(got, ref, ("dx", "dw13", "dw2", "dtopk_weights"))]
        w.check("fused_moe", f"backward T={Tm} E={E} hidden={hidden} I={inter} top{top_k} bf16", b, "gradients", run)


def _import_mm1_model():
    """``mm1_model`` (the model/ folder) as installed, or straight from this checkout: the stage
    runs while the build stage's ``pip install -e .`` (which maps the name) may not have run."""
    import importlib
    import importlib.util
    try:
        return importlib.import_module("mm1_model"), "installed"
    except ModuleNotFoundError as exc:
        if exc.name != "mm1_model":
            raise
    spec = importlib.util.spec_from_file_location("mm1_model", REPO / "model" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "model")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mm1_model"] = module
    spec.loader.exec_module(module)
    return module, "model/ of this checkout"


# Consistent mode on the device: bench/consistency.py's sizes, bf16, without its backward timing.
CONSISTENCY_GPU = dict(backend="triton", prompts="5,17,33,70", new_tokens=16)
CONSISTENCY_TINY = dict(backend="torch", prompts="3,70", new_tokens=3)


def stage_consistency(w: Worker) -> None:
    """Consistent mode's core claim on this device (docs/design.md §8): with consistent=True
    the rollout's logprobs (``generate``: varlen prefill + decode steps, batch of prompts)
    equal the training forward's (``model.logprobs``, one sequence per call) bitwise, for every
    generated token. Both modes run bench/consistency.py's ``measure``; the consistent row is a
    check (max |Δ| 0, every token bitwise equal), the default row is reported as measured."""
    from bench import consistency
    _, w.data["mm1_model_from"] = _import_mm1_model()
    cfg = CONSISTENCY_TINY if w.tiny else CONSISTENCY_GPU
    args = consistency.parse_args(["--dtype", "bf16", "--backend", cfg["backend"], "--prompts", cfg["prompts"],
                                   "--new-tokens", str(cfg["new_tokens"])])
    case = f"tiny model x{args.periods} bf16, prompts {cfg['prompts']}, {cfg['new_tokens']} new tokens"
    w.data["consistency"] = rows = []

    def row(consistent: bool) -> dict:
        r = consistency.measure(consistency.DTYPES["bf16"], consistent, args, backward=False)
        r["case"] = case
        rows.append(r)
        w.save()
        print(json.dumps(r, default=str), flush=True)
        return r

    def consistent_mode():
        r = row(True)
        return [("max_abs_dlogprob", r["max_abs_dlogprob"], 0.0, "rollout vs training logprobs"),
                ("frac_not_bitwise", 1.0 - r["frac_bitwise_equal"], 0.0, "tokens not bitwise equal")]

    w.check("consistency", case, cfg["backend"], "consistent=True", consistent_mode)
    try:
        row(False)
    except Exception as exc:  # default mode must run; its mismatch is allowed, an error is not
        rows.append({"mode": "default", "case": case, "backend": cfg["backend"],
                     "error": f"{type(exc).__name__}: {exc}"[:500]})
        w.save()
        raise


def _policy(w: Worker):
    from bench import common
    return common.Policy.for_device(w.device, smoke=w.tiny)


def stage_ceilings(w: Worker) -> None:
    from bench import common
    c = common.measure_ceilings(w.device, _policy(w))
    w.data["ceilings"] = c
    print(f"copy {c['copy_GBps']:,.1f} GB/s, bf16 matmul {c['matmul_bf16_TFLOPs']:,.1f} TFLOP/s")


def _ceilings(w: Worker) -> dict:
    f = w.work / "ceilings.json"
    try:
        c = json.loads(f.read_text())["data"]["ceilings"]
        w.data["ceilings_from"] = "ceilings stage"
        return c
    except Exception:
        from bench import common
        w.data["ceilings_from"] = "measured in this stage (the ceilings stage gave none)"
        c = common.measure_ceilings(w.device, _policy(w))
        w.data["ceilings"] = c
        return c


# One M1 shape per kind (GPU); with --tiny the first case of each (kind, series) of the tiny grid.
TIMING_PICKS = {
    "lightning": lambda c: (c.kind == "prefill" and c.params["T"] == 4096) or
                           (c.kind == "decode" and c.params["B"] == 64),
    "moe": lambda c: (c.kind == "prefill" and c.params["T"] == 4096) or
                     (c.kind == "decode" and c.params["T"] == 1),
    "head": lambda c: (c.kind in ("logprobs", "logprobs_fwd_bwd") and c.params["T"] == 1024) or
                      (c.kind == "sample" and c.params["T"] == 64),
}


def _timings(w: Worker, op: str, keep) -> None:
    """Time the picked cases of bench/<op>.py, one implementation at a time (rows saved as they come)."""
    import importlib

    from bench import common
    module = importlib.import_module(f"bench.{op}")
    why = module.unavailable()
    if why:
        raise Skip(why)
    args = argparse.Namespace(tiny=w.tiny, backends=None, peers=True, tp=1 if w.tiny else 8, model_layers=2)
    grid = module.cases(w.device, args)
    if w.tiny:  # the first case of each kind (its first series): the probe's code paths, quickly
        seen: set = set()
        grid = [c for c in grid if c.kind not in seen and not seen.add(c.kind)]
    else:
        grid = [c for c in grid if TIMING_PICKS[op](c)]
    ceilings = _ceilings(w)
    policy = _policy(w)
    w.data["policy"] = dataclasses.asdict(policy)
    for case in grid:
        impls = [i for i in module.impls(case, w.device, args) if keep(i)]
        # GPU: one implementation per run_case, so a stage killed at its budget keeps every row
        # finished before; tiny: the inputs made once per case
        for group in ([impls] if w.tiny else [[i] for i in impls]):
            if not group:
                continue
            rows = common.run_case(case, lambda inputs, c=case: module.cost(c, inputs),
                                   lambda c=case: module.make_inputs(c, w.device), group, w.device,
                                   ceilings, policy, getattr(module, "MEASURE_MEMORY", False))
            for row in rows:
                row.pop("traceback", None)
                print(common.format_row(row), flush=True)
            w.rows += rows
            w.save()


def _is_fla(impl) -> bool:
    return impl.name.startswith("fla ")


def stage_timings_lightning(w: Worker) -> None:
    _timings(w, "lightning", lambda i: not _is_fla(i))


def stage_timings_moe(w: Worker) -> None:
    _timings(w, "moe", lambda i: True)


def stage_timings_head(w: Worker) -> None:
    _timings(w, "head", lambda i: True)


def stage_timings_fla(w: Worker) -> None:
    try:
        import fla.ops.simple_gla  # noqa: F401
    except Exception as exc:
        raise Skip(f"fla-core is not importable ({type(exc).__name__}: {exc}); "
                   "carry its wheel in .wheels/") from None
    _timings(w, "lightning", _is_fla)


BACKWARD_PICKS = {
    "lightning": lambda c: c.kind == "fwd_bwd" and c.params["T"] == 32768,
    "moe": lambda c: c.kind == "fwd_bwd" and c.params["T"] == 4096,
}


def stage_timings_backward(w: Worker) -> None:
    """Forward+backward timings (bench's --backward grids): mm1 triton and the peers."""
    import importlib

    from bench import common
    ceilings, policy = _ceilings(w), _policy(w)
    for op in ("lightning", "moe"):
        module = importlib.import_module(f"bench.{op}")
        args = argparse.Namespace(tiny=w.tiny, backends=["triton"], peers=True, tp=1 if w.tiny else 8,
                                  model_layers=2, backward=True)
        grid = module.cases(w.device, args)
        grid = grid[:1] if w.tiny else [c for c in grid if BACKWARD_PICKS[op](c)]
        for case in grid:
            for impl in module.impls(case, w.device, args):
                if impl.name == "per-expert loop":  # the slowest peer; the forward timings have it
                    continue
                rows = common.run_case(case, lambda inputs, c=case: module.cost(c, inputs),
                                       lambda c=case: module.make_inputs(c, w.device), [impl], w.device,
                                       ceilings, policy)
                for row in rows:
                    row.pop("traceback", None)
                    print(common.format_row(row), flush=True)
                w.rows += rows
                w.save()


def _eager_and_graph(w: Worker, fn, calls: int = 20, trials: int = 15) -> dict:
    """Per-call µs of ``calls`` back-to-back eager calls, and of one CUDA graph holding them."""
    import statistics
    torch = w.torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, memoized id checks) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def timed(body):
        out = []
        for _ in range(trials):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            body()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) * 1e3 / calls)
        return statistics.median(out)

    def eager():
        for _ in range(calls):
            fn()

    t_eager = timed(eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t_graph = timed(graph.replay)
    return {"eager_us": t_eager, "graph_us": t_graph, "overhead_us": t_eager - t_graph,
            "calls_per_graph": calls, "trials": trials}


def stage_graphs(w: Worker) -> None:
    torch = w.torch
    import mm1_kernels as mk
    from mm1_kernels import BackendUnavailableError
    if not w.cuda:
        raise Skip("CUDA graphs need a GPU")
    dev = w.device
    H, D = 64, 128
    slopes = mk.lightning_slopes(H, 39, 80).to(dev)
    items = []
    for B in (1, 64):
        q, k, v = (torch.nn.functional.silu(torch.randn(B, H, D, device=dev)).bfloat16() for _ in range(3))
        state = torch.randn(B, H, D, D, device=dev) * 0.1
        slots = torch.arange(B, dtype=torch.int32, device=dev)
        for b in ("triton", "cuda"):
            items.append((f"lightning_decode B={B} H={H} D={D} bf16", b,
                          lambda q=q, k=k, v=v, st=state, sl=slots, b=b:
                          mk.lightning_decode(q, k, v, slopes, st, sl, backend=b)))
    E, hidden, inter = 32, 6144, 1152
    w13 = (torch.randn(E, 2 * inter, hidden, device=dev) * hidden ** -0.5).bfloat16()
    w2 = (torch.randn(E, hidden, inter, device=dev) * inter ** -0.5).bfloat16()
    q8 = mk.quantize_moe_weights(w13, w2)
    x = torch.randn(1, hidden, device=dev).bfloat16()
    logits = torch.randn(1, E, device=dev) * 2
    for dt, (a, sa, c, sc) in (("bf16", (w13, None, w2, None)), ("int8", q8)):
        def step(a=a, sa=sa, c=c, sc=sc):  # route + experts; check_ids=False as serving engines do
            wts, ids = mk.moe_route(logits, 2, True, backend="triton")
            return mk.fused_moe(x, a, c, wts, ids, sa, sc, backend="triton", check_ids=False)
        items.append((f"moe decode step T=1 E={E} hidden={hidden} I={inter} {dt} (route+experts)", "triton", step))
    rows = []
    for name, backend, fn in items:
        row = {"case": name, "backend": backend}
        try:
            row.update(_eager_and_graph(w, fn))
            row["status"] = "ok"
        except BackendUnavailableError as exc:
            row.update(status="skipped", message=str(exc)[:300])
        except Exception as exc:
            row.update(status="error", message=f"{type(exc).__name__}: {exc}"[:500])
        print(json.dumps(row), flush=True)
        rows.append(row)
        w.data["graphs"] = rows
        w.save()
    if any(r["status"] == "error" for r in rows):
        raise RuntimeError("a graph item failed (see data.graphs)")


# The CUDA C++ backends' GPU tests, in the order they run (lightning first: the oldest kernels).
CUDA_TEST_FILES = ("tests/test_lightning_cuda.py", "tests/test_moe_cuda.py", "tests/test_head_cuda.py")


def stage_tests(w: Worker) -> None:
    if not w.cuda:
        raise Skip("the CUDA backend's tests need a GPU")
    why = _cuda_backend_unavailable()
    if why:
        raise Skip(why)
    cmd = [sys.executable, "-m", "pytest", *CUDA_TEST_FILES, "-m", "not slow",
           "-k", "not compute_sanitizer", "-v", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={w.work / 'tests_junit.xml'}"]
    w.data["command"] = " ".join(cmd)
    w.save()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failed = []
    for line in proc.stdout:  # -v streams one line per test, so a timeout still leaves counts
        print(line, end="", flush=True)
        for word in counts:
            if f" {word.upper()}" in line and "::" in line:
                counts[word] += 1
                if word in ("failed", "error"):
                    failed.append(line.split(" ")[0])
                w.data["counts"], w.data["failed_tests"] = counts, failed
                w.save()
    w.data["returncode"] = proc.wait()
    w.data["counts"], w.data["failed_tests"] = counts, failed
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"pytest exited {proc.returncode}: {counts}")


WORKERS = {name[len("stage_"):]: fn for name, fn in globals().items() if name.startswith("stage_")}


def worker_main(name: str, work: Path, tiny: bool) -> int:
    w = Worker(name, work, tiny)
    t0 = time.perf_counter()
    try:
        WORKERS[name](w)
        bad = [c for c in w.checks if c.get("ok") is False]
        status, extra = ("failed", {"message": f"{len(bad)} check(s) failed"}) if bad else ("ok", {})
        err_rows = [f"{r['kind']} {r['impl']}" for r in w.rows if r.get("status") == "error"]
        if err_rows and status == "ok":
            status, extra = "failed", {"message": f"{len(err_rows)} timing(s) raised: {err_rows}"}
    except Skip as exc:
        status, extra = "skipped", {"reason": str(exc)}
    except Exception as exc:
        traceback.print_exc()
        status, extra = "failed", {"message": f"{type(exc).__name__}: {exc}"[:800]}
    w.save(status, seconds=round(time.perf_counter() - t0, 2), **extra)
    print(f"[{name}] {status} {extra}", flush=True)
    return 0


# ============================================================================ orchestrator side

class Probe:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="mm1_probe_"))
        (self.work / "logs").mkdir()
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.tiny = args.tiny
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._set_mode()

    def _set_mode(self):
        if self.tiny:
            self.env["TRITON_INTERPRET"] = "1"
            self.env["CUDA_VISIBLE_DEVICES"] = ""
            self.env["OMP_NUM_THREADS"] = "1"  # tiny stages run two at a time (see run_stages)
        else:
            self.env.pop("TRITON_INTERPRET", None)

    def left(self) -> float:
        return DEADLINE_S - (time.monotonic() - self.t0)

    def record(self, stage: Stage, **rec) -> dict:
        rec.setdefault("budget_s", stage.budget_s)
        rec["what"] = stage.what
        with self.lock:
            self.results[stage.name] = rec
        msg = rec.get("reason") or rec.get("message") or ""
        print(f"== {stage.name:<27} {rec['status']:<9} {rec.get('seconds', 0):6.1f}s / {stage.budget_s:.0f}s"
              f"  {msg}"[:220], flush=True)
        return rec

    def skip_reason(self, stage: Stage) -> str | None:
        if stage.name in self.args.skip:
            return "--skip"
        if stage.gpu_only and self.tiny:
            return "CPU run (--tiny or no CUDA device): needs a GPU"
        if stage.name == "timings_fla":
            import importlib.util
            importlib.invalidate_caches()  # the wheels stage may have installed it meanwhile
            if importlib.util.find_spec("fla") is None:
                return "fla-core is not installed (carry its wheel in .wheels/)"
        if stage.needs_build and BUILD.name not in self.args.skip:  # --skip build: use what is there
            b = self.results.get(BUILD.name, {})
            if b.get("status") != "ok":
                return f"the CUDA extension did not build (build: {b.get('status', 'not run')})"
        return None

    def run_cmd(self, stage: Stage, cmd: list[str], env=None, budget: float | None = None) -> dict:
        """Run ``cmd`` in its own process group with the stage's timeout; log to logs/<stage>.log."""
        timeout = min(budget or stage.budget_s, self.left())
        if timeout < MIN_STAGE_S:
            return {"status": "skipped", "reason": f"probe deadline ({DEADLINE_S:.0f} s) reached"}
        log = self.work / "logs" / f"{stage.name}.log"
        t0 = time.monotonic()
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                for sig in (signal.SIGTERM, signal.SIGKILL):  # this stage's own process group only
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                rc = proc.returncode
        rec = {"seconds": round(time.monotonic() - t0, 2), "returncode": rc, "timeout_s": round(timeout, 1)}
        if timed_out:
            rec.update(status="timed_out", message=f"killed after {timeout:.0f} s")
        else:
            rec["status"] = "ok" if rc == 0 else "failed"
            if rc != 0:
                rec["message"] = f"exit code {rc}: " + _tail(log, 400)
        return rec

    def run_stage(self, stage: Stage) -> dict:
        why = self.skip_reason(stage)
        if why:
            return self.record(stage, status="skipped", reason=why, seconds=0.0)
        cmd = [sys.executable, "-m", "bench.probe", "--worker", stage.name, "--work", str(self.work)]
        if self.tiny:
            cmd.append("--tiny")
        rec = self.run_cmd(stage, cmd)
        try:  # the worker's own record (also the partial one of a timed-out stage)
            worker = json.loads((self.work / f"{stage.name}.json").read_text())
        except Exception:
            worker = None
        if worker is not None:
            for key in ("data", "checks", "cases"):
                if key in worker:
                    rec[key] = worker[key]
            if rec["status"] == "ok":
                rec["status"] = worker["status"] if worker["status"] != "running" else "failed"
                for key in ("reason", "message"):
                    if key in worker:
                        rec[key] = worker[key]
        elif rec["status"] == "ok":
            rec.update(status="failed", message="the stage wrote no result")
        return self.record(stage, **rec)

    # -- the background chain: wheels, then the build
    def background(self) -> None:
        try:
            self._wheels()
            self._build()
        except Exception as exc:  # never let the thread die silently
            self.record(BUILD, status="failed", message=f"{type(exc).__name__}: {exc}", seconds=0.0)

    def _wheels(self) -> None:
        why = self.skip_reason(WHEELS)
        wheels = sorted((REPO / ".wheels").glob("*.whl"))
        if not why and not wheels:
            why = "no .wheels/*.whl carried (fla-core peers are then skipped)"
        if why:
            self.record(WHEELS, status="skipped", reason=why, seconds=0.0)
            return
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
               str(REPO / ".wheels"), "--disable-pip-version-check"]
        rec = self.run_cmd(WHEELS, pip + [str(p) for p in wheels])
        if rec["status"] == "failed":  # one bad wheel (another Python, say) should not stop the rest
            bad = []
            for p in wheels:
                r = self.run_cmd(WHEELS, pip + [str(p)], budget=WHEELS.budget_s - rec["seconds"])
                if r["status"] != "ok":
                    bad.append(p.name)
            rec.update(status="failed" if bad else "ok", message=f"not installed: {bad}" if bad else "")
        rec["wheels"] = [p.name for p in wheels]
        self.record(WHEELS, **rec)

    def _build(self) -> None:
        why = self.skip_reason(BUILD)
        if why:
            self.record(BUILD, status="skipped", reason=why, seconds=0.0)
            return
        left = self.chain_deadline - time.monotonic()
        env = dict(self.env, MM1_REQUIRE_CUDA_BUILD="1")
        pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
               "--disable-pip-version-check", "-e", "."]
        rec = self.run_cmd(BUILD, pip, env=env, budget=min(BUILD.budget_s, left) - 15)
        if rec["status"] == "ok":  # a torch without CUDA installs without _C: check it loads
            check = self.run_cmd(BUILD, [sys.executable, "-c", "import torch, mm1_kernels._C as C; "
                                         "print(C.__file__, torch.ops.mm1.lightning_decode_cuda)"], budget=15)
            rec["import_check"] = check["status"]
            if check["status"] != "ok":
                rec.update(status="failed", message="built, but mm1_kernels._C does not load: "
                           + _tail(self.work / "logs" / "build.log", 300))
            else:
                rec["extension"] = _tail(self.work / "logs" / "build.log", 300).splitlines()[-1:]
        self.record(BUILD, **rec)

    # -- the whole probe
    def run(self) -> Path:
        print(f"mm1 probe: {'tiny CPU run' if self.tiny else 'GPU run'}; work dir {self.work}; "
              f"worst case {WORST_CASE_S:.0f} s, deadline {DEADLINE_S:.0f} s", flush=True)
        env_rec = self.run_stage(ENV)
        env = env_rec.get("data", {}).get("env", {})
        if not self.tiny and env and not env.get("cuda_available"):
            print("no CUDA device: running the tiny CPU probe (as --tiny)", flush=True)
            self.tiny = True
            self._set_mode()
        self.chain_deadline = time.monotonic() + BACKGROUND_S
        bg = threading.Thread(target=self.background, daemon=True)
        bg.start()
        self.run_stages(PHASE_A)
        bg.join(timeout=max(0.0, self.chain_deadline - time.monotonic()) + 20)
        for s in (WHEELS, BUILD):
            if s.name not in self.results:  # the thread is still inside a stage past its budget
                self.record(s, status="timed_out", message="still running at the join", seconds=0.0)
        self.run_stages(PHASE_B)
        return self.finish(env)

    def run_stages(self, stages: list[Stage]) -> None:
        """One after another on a GPU (nothing else may run while a stage times its kernels); two
        at a time on a tiny CPU run, where most of a stage is starting Python and torch."""
        if not self.tiny:
            for stage in stages:
                self.run_stage(stage)
            return
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(self.run_stage, stages))

    def finish(self, env: dict) -> Path:
        out = self.args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
        created = _now_iso()
        if out is None:
            slug = _slug(env.get("device_name", "unknown"))
            stamp = created.replace(":", "").replace("-", "")[:15]
            out = REPO / "bench" / "results" / (f"probe_{stamp}_{slug}" + ("_cpu.d" if self.tiny else ""))
        out.mkdir(parents=True, exist_ok=True)
        summary = build_summary(self, env, created)
        (out / "probe_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (out / "probe_summary.md").write_text(markdown(summary))
        with tarfile.open(out / "probe_logs.tar.gz", "w:gz") as tar:
            tar.add(self.work, arcname="probe_logs")
        shutil.rmtree(self.work, ignore_errors=True)
        print(short_table(summary))
        print(f"probe: {summary['wall_s']:.0f} s; files in {out}: probe_summary.json, probe_summary.md, "
              "probe_logs.tar.gz")
        return out


def _tail(path: Path, n: int) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def _slug(name: str) -> str:
    import re
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


def _now_iso() -> str:
    import datetime as dt
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:
        return None


def build_summary(p: Probe, env: dict, created: str) -> dict:
    res = p.results
    stages = {}
    for s in STAGES:
        rec = res.get(s.name) or {"status": "skipped", "reason": "not reached", "budget_s": s.budget_s}
        stages[s.name] = {k: v for k, v in rec.items() if k not in ("checks", "cases")}
        stages[s.name].get("data", {}).pop("env", None)
    ceilings = next((r["data"]["ceilings"] for r in [res.get("ceilings", {})] + list(res.values())
                     if r.get("data", {}).get("ceilings")), {})
    cases = [row for name in ("timings_lightning", "timings_moe", "timings_head", "timings_fla", "timings_backward")
             for row in res.get(name, {}).get("cases", [])]
    checks = [c for name in ("correctness_lightning", "correctness_moe", "correctness_head",
                             "correctness_backward", "consistency", "correctness_lightning_cuda")
              for c in res.get(name, {}).get("checks", [])]
    if not env:
        env = {"device_name": "unknown (env stage failed)", "git_commit": _git("rev-parse", "HEAD")}
    cpu = p.tiny
    note = ("CPU run (--tiny): tiny shapes, Triton through the interpreter; it checks the probe, "
            "not the GPU" if cpu else "")
    return {
        # python -m bench's results schema, so bench.report can render the timings
        "schema": 1, "created": created, "argv": sys.argv, "cpu_run": cpu, "note": note,
        "ops": ["lightning", "moe", "head"], "skipped_ops": {}, "env": env, "ceilings": ceilings,
        "settings": {"probe": True, "tiny": p.tiny, "tp": 1 if p.tiny else 8,
                     "deadline_s": DEADLINE_S, "worst_case_s": WORST_CASE_S},
        "cases": cases,
        # the probe's own
        "probe_schema": PROBE_SCHEMA,
        "wall_s": round(time.monotonic() - p.t0, 1),
        "stages": stages,
        "correctness": checks,
        "correctness_ok": bool(checks) and all(c.get("ok") is not False for c in checks),
        "consistency": res.get("consistency", {}).get("data", {}).get("consistency", []),
        "graphs": res.get("graphs", {}).get("data", {}).get("graphs", []),
        "tests": res.get("tests", {}).get("data", {}),
        "build": {k: res.get("build", {}).get(k) for k in ("status", "seconds", "message", "reason",
                                                           "extension")},
    }


def _f(v, fmt=".3g"):
    return "" if v is None else (format(v, fmt) if isinstance(v, (int, float)) else str(v))


def markdown(s: dict) -> str:
    env = s["env"]
    lines = [f"# mm1 probe: {env.get('device_name')}", ""]
    if s["note"]:
        lines += [f"**{s['note']}**", ""]
    lines += [f"{s['created']}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
              f"commit {(env.get('git_commit') or '?')[:12]}{' (dirty)' if env.get('git_dirty') else ''}; "
              f"{s['wall_s']:.0f} s in all. How to read this: bench/results/README.md, \"The probe\".", ""]
    if env.get("nvidia_smi"):
        lines += [f"nvidia-smi: `{env['nvidia_smi']}`", ""]
    lines += ["## Stages", "", "| stage | status | seconds | budget | note |", "|---|---|---:|---:|---|"]
    for name, r in s["stages"].items():
        note = (r.get("reason") or r.get("message") or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {name} | {r['status']} | {_f(r.get('seconds'), '.1f')} | {_f(r.get('budget_s'), '.0f')} "
                     f"| {note} |")
    lines += ["", "## Correctness vs fp64", "", "| op | case | backend | what | metric | value | tol | ok |",
              "|---|---|---|---|---|---:|---:|---|"]
    for c in s["correctness"]:
        ok = {True: "yes", False: "**NO**", None: "skipped"}[c.get("ok")]
        extra = c.get("error") or c.get("skipped") or ""
        lines.append(f"| {c['op']} | {c['case']} | {c['backend']} | {c['what']} | {c.get('metric', '')} "
                     f"| {_f(c.get('value'), '.2e')} | {_f(c.get('tol'), '.0e')} | {ok} {extra[:100]} |")
    if s["consistency"]:
        lines += ["", "## Consistency: rollout vs training logprobs (bench/consistency.py)", "",
                  "| case | backend | device | mode | tokens | max abs Δ | mean abs Δ | bitwise | Pearson(p) |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in s["consistency"]:  # (its times include compilation: in the stage's JSON only)
            if r.get("error"):
                lines.append(f"| {r['case']} | {r['backend']} | | {r['mode']} | | | | | error: {r['error'][:100]} |")
                continue
            lines.append(f"| {r['case']} | {r['backend']} | {r['device']} | {r['mode']} | {r['tokens']} "
                         f"| {r['max_abs_dlogprob']:.2e} | {r['mean_abs_dlogprob']:.2e} "
                         f"| {100 * r['frac_bitwise_equal']:.1f}% | {r['pearson_p']:.10f} |")
    c = s["ceilings"]
    if c:
        lines += ["", "## Ceilings (measured in this run)", "",
                  f"D2D copy {c['copy_GBps']:,.0f} GB/s (read + write); bf16 matmul "
                  f"{c['matmul_bf16_TFLOPs']:,.1f} TFLOP/s at {c['matmul_shape']}."]
    lines += ["", "## Timings", "", "| op | shape | impl | ms | floor ms | TFLOP/s | GB/s | % of ceiling | status |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in s["cases"]:
        shape = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        if r["status"] == "ok":
            lines.append(f"| {r['op']}.{r['kind']} | {shape} | {r['impl']} | {r['median_ms']:.4g} | "
                         f"{r['floor_ms']:.4g} | {r['TFLOPs']:.4g} | {r['GBps']:.4g} | "
                         f"{100 * r['fraction']:.1f} ({r['bound']}) | ok |")
        else:
            lines.append(f"| {r['op']}.{r['kind']} | {shape} | {r['impl']} | | {_f(r.get('floor_ms'), '.4g')} "
                         f"| | | | {r['status']}: {(r.get('message') or '')[:80]} |")
    if s["graphs"]:
        lines += ["", "## CUDA graphs (per call, µs)", "",
                  "| case | backend | eager | graph replay | launch + host overhead | status |",
                  "|---|---|---:|---:|---:|---|"]
        for g in s["graphs"]:
            lines.append(f"| {g['case']} | {g['backend']} | {_f(g.get('eager_us'), '.1f')} | "
                         f"{_f(g.get('graph_us'), '.1f')} | {_f(g.get('overhead_us'), '.1f')} | "
                         f"{g['status']} {(g.get('message') or '')[:80]} |")
    t = s["tests"]
    if t.get("counts"):
        lines += ["", "## CUDA backend tests", "", f"`{t.get('command', '')}`: {t['counts']}"
                  + (f"; failed: {t.get('failed_tests')}" if t.get("failed_tests") else "")]
    return "\n".join(lines) + "\n"


def short_table(s: dict) -> str:
    """The last lines printed: the device tool returns the tail of the output."""
    out = ["", "stage                          status     seconds"]
    for name, r in s["stages"].items():
        note = (r.get("reason") or r.get("message") or "")[:70].replace("\n", " ")
        out.append(f"{name:<30} {r['status']:<10} {_f(r.get('seconds'), '6.1f'):>7}  {note}")
    bad = [c for c in s["correctness"] if c.get("ok") is False]
    out.append(f"correctness: {len(s['correctness'])} checks, {len(bad)} failed"
               + "".join(f"\n  FAIL {c['op']} {c['case']} {c['backend']} {c['what']}: "
                         f"{c.get('value', c.get('error'))}" for c in bad[:8]))
    for r in s["consistency"]:
        if not r.get("error"):
            out.append(f"  consistency {r['mode']:<10} {r['backend']:<7} max|Δlogprob| {r['max_abs_dlogprob']:.2e}, "
                       f"{100 * r['frac_bitwise_equal']:.1f}% of {r['tokens']} tokens bitwise equal")
    for r in s["cases"]:
        if r["status"] == "ok":
            out.append(f"  {r['op']}.{r['kind']:<16} {r['impl']:<30} {r['median_ms']:9.3f} ms "
                       f"{100 * r['fraction']:5.1f}% of {r['bound']}")
    for g in s["graphs"]:
        if g["status"] == "ok":
            out.append(f"  graph {g['case'][:50]:<50} {g['backend']:<7} eager {g['eager_us']:7.1f} µs "
                       f"graph {g['graph_us']:7.1f} µs")
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, Triton interpreter (CI)")
    ap.add_argument("--out", type=Path, help="output folder (default $OUT, else bench/results/probe_<time>_<device>/)")
    ap.add_argument("--skip", type=lambda s: [x for x in s.split(",") if x], default=[],
                    help=f"comma list of stages to skip: {', '.join(s.name for s in STAGES)}")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = set(args.skip) - {s.name for s in STAGES}
    if unknown:
        ap.error(f"unknown stage(s) in --skip: {sorted(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.work, args.tiny)
    Probe(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
