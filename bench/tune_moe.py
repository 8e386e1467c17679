"""python -m bench.tune_moe: measure the fused-MoE tile table on this GPU and write it as data.

For each expert width I (one tensor-parallel rank of M1: 9216 / TP), weight dtype and token
bucket of the default table (``mm1_kernels/moe/configs/default.json``), it times every candidate
configuration at the bucket's representative token count (its upper bound; 16,384 for the last,
open bucket) on M1's shapes (hidden 6144, 32 experts, top-2, uniform random routing), checks
the winner against the torch reference, and writes

    mm1_kernels/moe/configs/device_name=<GPU name>,dtype=<bf16|int8>.json

(``--out DIR`` writes there instead), which ``fused_moe`` then uses on that GPU (the lookup is
described in ``mm1_kernels/moe/tile_configs.py``). Commit the file with the run's log.

Candidates: the default entry plus a grid over BLOCK_M {16 (T ≤ 64 only), 64, 128}, BLOCK_N1
{32, 64, 128}, BLOCK_K {64, 128, 256}, BLOCK_N2 {64, 128}, num_warps {4, 8}, num_stages
{3, 4}, GROUP_M {16, 128}, minus those over the shared-memory budget or with more warps than
one warpgroup per 64 rows (duplicated wgmma work); ``--max-configs`` caps how many per bucket are timed
(default 48, chosen evenly through the grid, the default entry always included). At ~0.1-2 ms
a call this is minutes per width on an H100: start with ``--widths 9216 1152 --dtypes bf16``.

``--tiny`` runs the same pipeline on the CPU through the Triton interpreter at toy shapes (the
CI check that the tuner and the file it writes work; its timings mean nothing).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

E, TOP_K, HIDDEN = 32, 2, 6144


def representative_tokens(buckets) -> list[int]:
    """The token count timed for each bucket: its upper bound (16,384 for the open one)."""
    return [16384 if b == float("inf") else int(b) for b in buckets]


def candidates(tokens: int, inter: int, hidden: int, default: dict, max_configs: int) -> list[dict]:
    from mm1_kernels.moe.tile_configs import FIELDS, fit_stages

    grid = []
    for bm, bn1, bk, bn2, warps, stages, group in itertools.product(
            (16, 64, 128), (32, 64, 128), (64, 128, 256), (64, 128), (4, 8), (3, 4), (16, 128)):
        # Decode buckets keep the 16-row tile; past it, one warpgroup (4 warps) per 64 rows (more
        # would duplicate wgmma work across warpgroups).
        if (bm == 16) != (tokens <= 64) or warps > max(4, bm // 16):
            continue
        c = dict(BLOCK_M=bm, BLOCK_N1=bn1, BLOCK_K1=bk, BLOCK_N2=bn2, BLOCK_K2=bk, num_warps=warps,
                 num_stages=stages, GROUP_M=group)
        if (fit_stages(stages, bm, bn1, bk, 2, 2, 2) != stages or fit_stages(stages, bm, bn2, bk, 1, 2, 2) != stages
                or bn1 > max(16, inter) or bn2 > max(16, hidden) or bk > max(16, min(inter, hidden))):
            continue
        grid.append(c)
    step = max(1, len(grid) // max(1, max_configs - 1))
    chosen = grid[::step][:max(0, max_configs - 1)]
    base = {f: default[f] for f in FIELDS}
    return [base] + [c for c in chosen if c != base]


def make_problem(T: int, hidden: int, inter: int, dtype: str, device: torch.device, seed: int = 0):
    import mm1_kernels as mk

    g = torch.Generator(device="cpu").manual_seed(seed)
    act = torch.float32 if device.type == "cpu" else torch.bfloat16
    x = torch.randn(T, hidden, generator=g).to(device, act)
    logits = (2 * torch.randn(T, E, generator=g)).to(device)
    w, ids = mk.moe_route(logits, top_k=TOP_K)
    w13 = (torch.randn(E, 2 * inter, hidden, generator=g) * hidden ** -0.5).to(device, act)
    w2 = (torch.randn(E, hidden, inter, generator=g) * inter ** -0.5).to(device, act)
    kw = {}
    if dtype == "int8":
        w13, s13, w2, s2 = mk.quantize_moe_weights(w13, w2)
        kw = dict(w13_scale=s13, w2_scale=s2)
    return x, w13, w2, w, ids, kw


def time_config(problem, config: dict, device: torch.device, reps: int) -> float:
    """Median milliseconds of one fused_moe call with ``config`` (CUDA events on a GPU)."""
    from mm1_kernels.moe.triton_fused_moe import fused_moe_triton

    x, w13, w2, w, ids, kw = problem

    def call():
        return fused_moe_triton(x, w13, w2, w, ids, kw.get("w13_scale"), kw.get("w2_scale"), config=config)

    call()  # compile
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(3):
            call()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            call()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def check_config(problem, config: dict) -> float:
    """Relative error of the tuned config's output vs the fp64 torch reference."""
    import mm1_kernels as mk
    from mm1_kernels.moe.triton_fused_moe import fused_moe_triton

    x, w13, w2, w, ids, kw = problem
    out = fused_moe_triton(x, w13, w2, w, ids, kw.get("w13_scale"), kw.get("w2_scale"), config=config)
    if kw:
        w13, w2 = (mk.dequantize_moe_weight(w13, kw["w13_scale"], torch.float64),
                   mk.dequantize_moe_weight(w2, kw["w2_scale"], torch.float64))
    ref = mk.fused_moe_reference(x.double(), w13.double(), w2.double(), w.double(), ids)
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tune_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[9216, 4608, 2304, 1152])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    p.add_argument("--max-configs", type=int, default=48)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="directory for the JSON (default: the package's configs/)")
    p.add_argument("--tiny", action="store_true", help="CPU interpreter check at toy shapes (numbers mean nothing)")
    args = p.parse_args(argv)

    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from mm1_kernels.moe import tile_configs as tc

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("bench.tune_moe needs a CUDA GPU (or --tiny for the CPU pipeline check)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else "cpu-interpreter"
    hidden = HIDDEN if cuda else 32
    default = tc.load_table(str(tc.DEFAULT_FILE))
    buckets = default["buckets"]
    # --tiny: toy sizes, direct decode (T ≤ 8) and aligned (T = 9) paths both exercised.
    tokens_per_bucket = representative_tokens(buckets) if cuda else [1, 4, 9, 9, 9, 9][:len(buckets)]
    widths = args.widths if cuda else [32]
    for dtype in args.dtypes:
        table, log = {}, []
        for inter in widths:
            rows = []
            for T in tokens_per_bucket:
                problem = make_problem(T, hidden, inter, dtype, device)
                base = tc.moe_config(inter, hidden, T)
                cands = candidates(T, inter, hidden, base, args.max_configs if cuda else 2)
                timed = []
                for c in cands:
                    try:
                        timed.append((time_config(problem, c, device, args.reps if cuda else 1), c))
                    except Exception as exc:  # a config that fails to compile or run is skipped, and said
                        log.append(dict(I=inter, T=T, config=c, error=f"{type(exc).__name__}: {exc}"[:300]))
                if not timed:
                    raise RuntimeError(f"no candidate ran for I={inter} T={T} ({dtype}); see the errors above: {log}")
                best_ms, best = min(timed, key=lambda tc_: tc_[0])
                base_ms = next(ms for ms, c in timed if c == cands[0])
                err = check_config(problem, best)
                limit = 1e-2 if (cuda or dtype == "int8") else 1e-5
                if not err <= limit:
                    raise RuntimeError(f"tuned config {best} for I={inter} T={T} {dtype}: error {err:.2e} > {limit}")
                rows.append(best)
                log.append(dict(I=inter, T=T, best_ms=best_ms, default_ms=base_ms, speedup=base_ms / best_ms,
                                rel_err=err, timed=len(timed), best=best))
                print(f"{dtype} I={inter:5d} T={T:6d}: best {best_ms:.4f} ms (default {base_ms:.4f}, "
                      f"{base_ms / best_ms:.2f}x) of {len(timed)} configs, rel err {err:.1e}: {best}", flush=True)
            table[str(inter)] = rows
        comment = (f"Measured by python -m bench.tune_moe on {name} ({dtype} weights, hidden {hidden}, "
                   f"{E} experts, top-{TOP_K}, uniform routing; T per bucket {tokens_per_bucket}).")
        out_dir = args.out or tc.CONFIG_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / tc.device_file(name, dtype).name
        path.write_text(tc.format_table(table, buckets, comment, device_name=name, weight_dtype=dtype))
        (path.with_suffix(".log.json")).write_text(json.dumps(log, indent=1, default=str))
        tc.load_table(str(path))  # the file it wrote is a valid table
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
