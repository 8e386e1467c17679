"""Assemble the per-kernel figures and write report.json and report.md."""
from __future__ import annotations

import json
import platform
from pathlib import Path

from .read import ctas_per_sm

PEAK_BF16 = 989e12                       # H100 SXM / H200 dense bf16 tensor-core FLOP/s (datasheet)
HBM = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s (datasheet)


def _op_cost(case) -> tuple[float, float, str]:
    """Counted FLOPs and minimum bytes of the op: bench/<op>.py's cost where one exists."""
    if case.op == "route":
        p = case.params
        b = p["T"] * p["E"] * 4 + p["T"] * p["top_k"] * 8
        return 0.0, float(b), "route: logits read, weights and ids written"
    if case.op == "dense":
        p = case.params
        return (2.0 * p["T"] * p["N"] * p["K"], float((p["T"] * p["K"] + p["N"] * p["K"] + p["T"] * p["N"]) * 2),
                "dense: 2·T·N·K; x and w read once, out written once (bf16)")
    if case.name.startswith("head-backward"):
        p = case.params
        return (2.0 * p["T"] * p["V"] * p["hidden"], float((p["T"] + p["V"]) * p["hidden"] * 2),
                "dlogits only: its logit GEMM 2·T·V·hidden; h and w read once (the gradient GEMMs run in cuBLAS)")
    import importlib

    from bench.common import Case
    mod = importlib.import_module(f"bench.{case.op}")
    c = mod.cost(Case(case.op, case.kind, dict(case.params), x="T"), None)
    return float(c.flops), float(c.bytes), f"bench/{case.op}.py cost: {c.note}"


def build(cases, compiled: dict, cuda: list[dict], commit: str, seconds: float) -> dict:
    import subprocess

    import triton

    from .aot import _tool
    from .cuda import nvcc_version
    ptxas = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    ops = []
    for case in cases:
        flops, min_bytes, cost_note = _op_cost(case)
        launches = []
        for L in case.launches:
            k = compiled[json.dumps(L.compile)]
            occ = ctas_per_sm(k["registers"], k["shared_bytes"], L.threads)
            warps = L.compile[4]
            per_iter = sum(d["issued_macs"] for d in k["dots"])
            nominal = sum(d["macs"] for d in k["dots"])
            sass_iter = k["macs_per_warpgroup_static"] * max(1, warps // 4) + k["macs_per_warp_static"] * warps
            rec = {
                "kernel": L.name, "triton_kernel": L.compile[1], "grid": list(L.grid), "programs": L.programs,
                "active_programs": L.active, "num_warps": warps, "num_stages": L.compile[5],
                "constexprs": L.compile[3],
                "registers": k["registers"], "spill_bytes": k["spill_bytes"], "shared_bytes": k["shared_bytes"],
                **occ, "mma_kind": k["mma_kind"], "hgmma": k["hgmma"], "hmma": k["hmma"],
                "tma_instructions": k["tma_instructions"], "ldgsts_instructions": k["ldgsts_instructions"],
                "memory_path": k["memory_path"], "sass_instructions": k["instructions"],
                "dots_per_trip": k["dots"], "loop": L.loop, "mma_iterations": L.mma_iterations,
                "notes": L.notes,
            }
            if L.mma_iterations is not None and per_iter:
                rec["issued_macs_per_trip"] = per_iter
                rec["sass_macs_per_trip"] = sass_iter
                rec["sass_matches_ttgir"] = sass_iter == per_iter
                rec["issued_flops"] = 2.0 * per_iter * L.mma_iterations
                rec["dot_flops"] = 2.0 * nominal * L.mma_iterations  # the tl.dot products as written
                rec["counted_flops"] = L.flops_counted
                rec["issued_over_counted"] = rec["issued_flops"] / L.flops_counted if L.flops_counted else None
                rec["layout_replication"] = per_iter / nominal
            else:
                rec["issued_flops"] = 0.0 if k["mma_kind"] == "none" else None
                rec["counted_flops"] = L.flops_counted
                rec["issued_over_counted"] = None
                rec["why_no_ratio"] = ("no tensor-core instructions (CUDA-core arithmetic)" if k["mma_kind"] == "none"
                                       else "loop trips not modeled")
            b0, b1, text = L.bytes(occ["ctas_per_sm"])
            rec.update(bytes_no_reuse=b0, bytes_l2=b1, bytes_model=text, window_programs=132 * occ["ctas_per_sm"])
            launches.append(rec)
        issued = sum(r["issued_flops"] or 0.0 for r in launches)
        b0 = sum(r["bytes_no_reuse"] for r in launches)
        b1 = sum(r["bytes_l2"] for r in launches)
        floors = {}
        for gpu, bw in HBM.items():
            tc, tm = flops / PEAK_BF16, min_bytes / bw
            floors[gpu] = {"floor_ms": max(tc, tm) * 1e3, "bound": "compute" if tc >= tm else "memory",
                           "compute_ms": tc * 1e3, "memory_ms": tm * 1e3,
                           "modeled_ms_estimate": max(issued / PEAK_BF16, b1 / bw) * 1e3}
        ops.append({"case": case.name, "op": case.op, "kind": case.kind, "params": case.params, "notes": case.notes,
                    "counted_flops": flops, "min_bytes": min_bytes, "cost_note": cost_note,
                    "issued_flops": issued, "issued_over_counted": issued / flops if flops and issued else None,
                    "bytes_no_reuse": b0, "bytes_l2": b1, "bytes_over_min_no_reuse": b0 / min_bytes,
                    "bytes_over_min_l2": b1 / min_bytes, "floors": floors, "launches": launches})
    return {
        "what": "Facts of the compiled program for sm_90a (registers, spills, shared memory, SASS "
                "instructions, TTGIR dots and layouts) plus labelled estimates (CTAs/SM from the occupancy "
                "rules, loop trip counts from the kernels' structure at each shape, the HBM bytes model, "
                "floor times from datasheet ceilings). Nothing here ran on a GPU.",
        "versions": {"triton": triton.__version__, "ptxas": ptxas[-1] if ptxas else "?", "nvcc": nvcc_version(),
                     "python": platform.python_version()},
        "commit": commit, "seconds": round(seconds, 1),
        "ceilings": {"bf16_dense_flops": PEAK_BF16, "hbm_bytes_per_s": HBM, "sms": 132,
                     "source": "H100 SXM / H200 datasheets"},
        "ops": ops, "cuda": cuda, "fa2_yardstick": _yardstick(),
    }


def _yardstick() -> dict | None:
    from .yardstick import load
    return load()


def _g(x, unit=1e9, fmt="{:,.2f}"):
    return "–" if x is None else fmt.format(x / unit)


def _r(x):
    return "n/a" if x is None else f"{x:.2f}×"


def _mma(rec):
    if rec["mma_kind"] == "none":
        return "none"
    parts = [f"{k.split('.')[0]} {k.split('.')[1]} ×{v}" for k, v in {**rec["hgmma"], **rec["hmma"]}.items()]
    return "; ".join(parts)


def markdown(rep: dict) -> str:
    v = rep["versions"]
    out = [
        "# Static roofline of the sm_90a builds at M1 shapes",
        "",
        f"Generated by `python -m profiles.static` at commit {rep['commit']} with Triton {v['triton']} (its "
        f"ptxas: {v['ptxas']}), nvcc {v['nvcc']} (CUDA kernels) in {rep['seconds']:.0f} s on a CPU.",
        "",
        rep["what"],
        "",
        "How to read it:",
        "- **regs / spill / smem** come from `ptxas -v` and Triton's metadata; **CTAs/SM** from the H100 "
        "occupancy rules (65,536 registers in 256-register warp units, 228 KiB shared memory with 1 KiB reserved "
        "per CTA, 2,048 threads, 32 CTAs) — what limits it is named.",
        "- **MMA in SASS**: static count of each tensor-core instruction in the cubin (`cuobjdump -sass`). "
        "HGMMA = wgmma (one instruction per warp group), HMMA = mma.sync (per warp). **mem path**: TMA "
        "(UTMALDG/UBLKCP), cp.async (LDGSTS) or plain LDG.",
        "- **issued ÷ counted**: tensor-core multiply-adds issued = Σ over the TTGIR's dots in the loop of "
        "M·N·K × the replication its layout implies (warpsPerCTA covering more rows/columns than the tile), "
        "cross-checked against the HGMMA/HMMA shapes in SASS × warp groups (or warps) per program — a ✓ means "
        "they agree exactly — × loop trips × active programs (the trip derivation is in report.json `loop`). "
        "Counted = bench/<op>.py's cost (FLOPs the op needs). An estimate only in the routing-dependent trip "
        "counts (MoE: expected active row tiles for uniform routing).",
        "- **bytes ÷ min**: modeled HBM bytes (every program's global loads and stores at its loop's trip "
        "counts) ÷ bench's minimum bytes. *no reuse*: every program's loads go to HBM. *L2*: a tile shared by "
        "programs counts once when they are co-resident (launch-order distance < 132 × CTAs/SM); a tile one "
        "program reads again is a hit only if what the co-resident programs stream in between fits in 25 MiB "
        "(half the 50 MiB L2). Both are estimates; intermediates (MoE `h`, fp32 rows; lightning segment states) "
        "are counted, nothing is credited across launches.",
        "- **floor**: max(counted FLOPs / 989 TFLOP/s, min bytes / HBM) on H100 SXM (3.35 TB/s) and H200 "
        "(4.8 TB/s) — datasheet ceilings; **model est.** = max(issued / 989 T, L2-modeled bytes / HBM), also an "
        "estimate, not a prediction of measured time.",
        "",
        "## Per op",
        "",
        "| case | counted GFLOP | min GB | issued ÷ counted | bytes ÷ min (no reuse / L2) | floor H100 ms | "
        "floor H200 ms | bound | model est. H100 / H200 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for op in rep["ops"]:
        f1, f2 = op["floors"]["H100"], op["floors"]["H200"]
        out.append(f"| {op['case']} | {_g(op['counted_flops'], fmt='{:,.1f}')} | "
                   f"{_g(op['min_bytes'], fmt='{:,.3f}')} | "
                   f"{_r(op['issued_over_counted'])} | {op['bytes_over_min_no_reuse']:.2f}× / "
                   f"{op['bytes_over_min_l2']:.2f}× | {f1['floor_ms']:.3f} | {f2['floor_ms']:.3f} | {f1['bound']} | "
                   f"{f1['modeled_ms_estimate']:.3f} / {f2['modeled_ms_estimate']:.3f} |")
    out += ["", "## Per kernel (Triton, sm_90a)", "",
            "| case | kernel | warps/stages | regs | spill B | smem KiB | CTAs/SM (limit) | MMA in SASS | mem path | "
            "grid (active) | issued ÷ counted | issued GFLOP | bytes no reuse / L2 GB |",
            "|---|---|---|---:|---:|---:|---|---|---|---|---:|---:|---:|"]
    for op in rep["ops"]:
        for r in op["launches"]:
            chk = " ✓" if r.get("sass_matches_ttgir") else (" (SASS≠TTGIR)" if "sass_matches_ttgir" in r else "")
            ratio = _r(r["issued_over_counted"]) if r["issued_over_counted"] is not None else (
                "n/a" if r["issued_flops"] is None or r["mma_kind"] == "none" else "– (counted 0)")
            out.append(
                f"| {op['case']} | {r['kernel']} | {r['num_warps']}/{r['num_stages']} | {r['registers']} | "
                f"{r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r['ctas_per_sm']} ({r['limited_by']}) | "
                f"{_mma(r)}{chk} | {r['memory_path']} | {'×'.join(map(str, r['grid']))} ({r['active_programs']:,}) | "
                f"{ratio} | {_g(r['issued_flops'], fmt='{:,.1f}')} | {_g(r['bytes_no_reuse'])} / {_g(r['bytes_l2'])} |")
    if rep["cuda"]:
        out += ["", "## CUDA kernels (csrc/, nvcc -gencode arch=compute_90a,code=sm_90a)", "",
                "| kernel | M1 use | regs | spill B | stack B | smem KiB | CTAs/SM (limit) | MMA in SASS | mem path |",
                "|---|---|---:|---:|---:|---:|---|---|---|"]
        for r in rep["cuda"]:
            if "error" in r:
                out.append(f"| {r['file']} | compile error | | | | | | | |")
                continue
            out.append(f"| {r['kernel']} | {r['m1_use']} | {r['registers']} | {r['spill_bytes']} | "
                       f"{r['stack_bytes']} | "
                       f"{r['shared_bytes'] / 1024:.1f} | {r['ctas_per_sm']} ({r['limited_by']}) | {_mma(r)} | "
                       f"{r['memory_path']} |")
        loops = [r for r in rep["cuda"] if "loop_instructions" in r]
        if loops:
            out += ["", "Chunk loops of the CUDA lightning prefill (static SASS of the loop body: the full "
                    "causal row tile's path, straight-line in the cp.async builds); issued ÷ counted is "
                    "profiles/static/cuda.py's model of the loop (causal 16×16 tiles only, the state "
                    "update's pair counted twice; precision=high also the pairs of P V and Q S), an estimate. "
                    + _yardstick_sentence(rep.get("fa2_yardstick")),
                    "",
                    "| kernel | loop instructions | HMMA | LDSM | LDGSTS | instructions per HMMA | ÷ FA2 | "
                    "issued ÷ counted |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for r in loops:
                ratio = r.get("issued_over_counted_model")
                fa2 = r.get("loop_per_mma_over_fa2")
                out.append(f"| {r['kernel']} | {r['loop_instructions']} | {r['loop_hmma']} | {r['loop_ldsm']} | "
                           f"{r['loop_ldgsts']} | {r['loop_instructions_per_mma']:.2f} | "
                           f"{'-' if fa2 is None else f'{fa2:.2f}×'} | "
                           f"{'-' if ratio is None else f'{ratio:.3f}×'} |")
        out += ["", "CUDA bytes ÷ minimum: n/a — hand-written loops whose memory traffic is not modeled "
                "here (the kernels' header comments describe their loops)."]
    out += ["", "## Models per case", ""]
    for op in rep["ops"]:
        out.append(f"- **{op['case']}** — {op['cost_note']}. {op['notes']}")
        for r in op["launches"]:
            out.append(f"  - {r['kernel']}: trips: {r['loop']}. Bytes: {r['bytes_model']}."
                       + (f" {r['notes']}" if r["notes"] else ""))
    return "\n".join(out) + "\n"


def _yardstick_sentence(y: dict | None) -> str:
    """How the ÷ FA2 column was measured (profiles/static/yardstick.json)."""
    from .yardstick import reference
    ref = reference(y)
    if ref is None:
        return "÷ FA2: no yardstick (profiles/static/yardstick.json is absent; tools/fa2_yardstick.sh writes it)."
    others = "; ".join(f"the {'causal' if k['causal'] else 'non-causal'} {k['block_m']}×{k['block_n']} loop "
                       f"({k['used_on']}; {k['rows_per_warp']} rows per warp): {k['loop_instructions']} / "
                       f"{k['loop_hmma']} = {k['loop_instructions_per_mma']:.2f}"
                       for k in y["kernels"] if not k["reference"])
    return (f"**÷ FA2** = instructions per HMMA ÷ those of FlashAttention-2's forward main loop, measured the "
            f"same way: flash_fwd_kernel (head dim 128, bf16, {ref['block_m']}×{ref['block_n']} tile, "
            f"{ref['warps']} warps of {ref['rows_per_warp']} rows, non-causal: what FA2 runs on {ref['used_on']}) "
            f"of flash-attention {y['flash_attention_commit'][:12]} with CUTLASS {y['cutlass_commit'][:12]}, "
            f"compiled by nvcc {y['nvcc']} for sm_90a with FA2's flags and counted by the same "
            f"chunk_loop_summary: {ref['loop_instructions']} instructions / {ref['loop_hmma']} HMMA = "
            f"{ref['loop_instructions_per_mma']:.2f} per HMMA ({ref['loop_ldsm']} LDSM, {ref['loop_ldgsts']} "
            f"LDGSTS, {ref['loop_local']} spill accesses at {ref['registers']} registers)"
            + (f"; also {others}" if others else "")
            + f". The target for our loop is ≤ 2×. Data: profiles/static/yardstick.json ({y['date']}), "
            "reproduced by tools/fa2_yardstick.sh.")


def write(rep: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown(rep))
