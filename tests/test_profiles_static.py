"""`python -m profiles.static` runs at one shape (CPU only) and writes sane figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "profiles.static", "--quick", "--out", str(out), "--jobs", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (out / "report.md").read_text().startswith("# Static roofline")
    return json.loads((out / "report.json").read_text())


def test_header(report):
    assert report["versions"]["triton"] and report["commit"]
    assert "estimate" in report["what"]


def test_kernel_fields_are_sane(report):
    (op,) = report["ops"]
    kernels = {r["triton_kernel"]: r for r in op["launches"]}
    assert set(kernels) == {"moe_align_kernel", "moe_gate_up_kernel", "moe_down_kernel", "moe_combine_kernel"}
    for r in kernels.values():
        assert 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] >= 0 and 0 <= r["shared_bytes"] <= 227 * 1024, r
        assert 1 <= r["ctas_per_sm"] <= 32, r
        assert r["bytes_l2"] <= r["bytes_no_reuse"] and r["bytes_l2"] > 0, r
    for name in ("moe_gate_up_kernel", "moe_down_kernel"):
        r = kernels[name]
        assert r["mma_kind"].startswith("HGMMA"), r["mma_kind"]
        # The SASS shapes agree with the TTGIR dots × their layouts, and padding rows only add.
        assert r["sass_matches_ttgir"], r
        assert r["issued_over_counted"] >= 1.0, r
    assert kernels["moe_align_kernel"]["mma_kind"] == "none"
    assert op["issued_over_counted"] >= 1.0 and op["bytes_over_min_l2"] >= 1.0
    for gpu in ("H100", "H200"):
        assert op["floors"][gpu]["floor_ms"] > 0
    assert op["floors"]["H200"]["memory_ms"] < op["floors"]["H100"]["memory_ms"]


# ---- the FA2 yardstick and the CUDA table's plumbing (text only: no nvcc, no flash-attention) ----

def _sass(instrs):
    """cuobjdump-like SASS lines: (opcode text) at consecutive 16-byte addresses."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(instrs))


def test_chunk_loop_merges_out_of_line_blocks():
    from profiles.static.cuda import chunk_loop_summary
    # 0: entry; 1-2 an out-of-line copy block (jumps forward into the loop); 3-9 the loop, whose
    # branch at 6 goes back to the block at 1; 10: the loop's back branch to 3.
    sass = _sass(["BRA 0x30", "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]", "BRA 0x70",
                  "HMMA.16816.F32.BF16 R4, R8, R12, R4", "LDSM.16.M88.4 R8, [R1]", "FADD R0, R1, R2",
                  "@P0 BRA 0x10", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "LDL R0, [R1]", "MOV R0, R1",
                  "@P1 BRA 0x30", "EXIT"])
    got = chunk_loop_summary(sass)
    assert got == {"loop_instructions": 10, "loop_hmma": 2, "loop_ldsm": 1, "loop_ldgsts": 1, "loop_local": 1,
                   "loop_instructions_per_mma": 5.0}, got
    # A loop nested inside the widest one adds nothing; no backward branch, no loop.
    nested = _sass(["MOV R0, R1", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "@P0 BRA 0x10", "@P1 BRA 0x0", "EXIT"])
    assert chunk_loop_summary(nested)["loop_instructions"] == 4
    assert chunk_loop_summary(_sass(["MOV R0, R1", "EXIT"])) == {}


def test_fa2_yardstick_committed():
    from profiles.static.yardstick import load, reference
    y = load()
    assert y is not None, "profiles/static/yardstick.json is committed (tools/fa2_yardstick.sh writes it)"
    for key in ("flash_attention_commit", "cutlass_commit"):
        assert len(y[key]) == 40 and int(y[key], 16) >= 0, y[key]
    ref = reference(y)
    assert (ref["head_dim"], ref["block_m"], ref["block_n"], ref["warps"], ref["causal"]) == (128, 128, 64, 4, False)
    # Figures that agree with each other: per HMMA = instructions ÷ HMMA; the loop of a 32-row warp
    # issues Q K^T (2·8·8) and P V (2·16·4) m16n8k16 tiles per 64-key block.
    for k in y["kernels"]:
        assert k["loop_instructions_per_mma"] == round(k["loop_instructions"] / k["loop_hmma"], 2), k
        tiles = k["rows_per_warp"] // 16
        assert k["loop_hmma"] == tiles * (k["block_n"] // 8) * (k["head_dim"] // 16) \
            + tiles * (k["head_dim"] // 8) * (k["block_n"] // 16), k


def test_fa2_column_and_sentence():
    from profiles.static.cuda import kernel_row
    from profiles.static.report import markdown
    from profiles.static.yardstick import load, reference
    y = load()
    ref = reference(y)["loop_instructions_per_mma"]
    st = {"registers": 156, "spill_bytes": 0, "stack_bytes": 0, "static_shared_bytes": 0}
    loop = _sass(["HMMA.16816.F32.BF16 R4, R8, R12, R4"] + ["FADD R0, R1, R2"] * 6 + ["@P0 BRA 0x0", "EXIT"])
    pretty = ("void mm1::lightning::(anonymous namespace)::"
              "lightning_prefill_bf16_kernel<128, 128, true, 0, false>(mm1::P)")
    row = kernel_row("csrc/lightning/lightning_prefill.cu", pretty, st, loop, 256)
    assert row["loop_instructions_per_mma"] == 8.0 and row["m1_use"] == "prefill, one segment per sequence"
    assert row["loop_per_mma_over_fa2"] == round(8.0 / ref, 2)
    rep = {"versions": {"triton": "t", "ptxas": "p", "nvcc": "n", "python": "3"}, "commit": "c", "seconds": 1.0,
           "what": "w", "ops": [], "cuda": [row], "fa2_yardstick": y}
    md = markdown(rep)
    assert "| instructions per HMMA | ÷ FA2 | issued ÷ counted |" in md
    assert f"| 8.00 | {8.0 / ref:.2f}× | " in md
    assert f"= {ref:.2f} per HMMA" in md and y["flash_attention_commit"][:12] in md
    rep["fa2_yardstick"] = None
    assert "÷ FA2: no yardstick" in markdown(rep)


def test_cuda_rows_tolerate_new_kernels():
    """New instantiations and kernels (a segment split, a precision flag) are listed, not dropped;
    fp32/fp16 instantiations are left out (M1 runs bf16)."""
    from profiles.static.cuda import kernel_row, launch_bounds
    st = {"registers": 64, "spill_bytes": 0, "stack_bytes": 0, "static_shared_bytes": 1024}
    loop = _sass(["HMMA.16816.F32.BF16 R4, R8, R12, R4", "MOV R0, R1", "@P0 BRA 0x0", "EXIT"])
    ns = "void mm1::lightning::(anonymous namespace)::"
    new = kernel_row("f.cu", ns + "lightning_prefill_bf16_kernel<128, 64, true, 3, (mm1::Precision)1>(A)",
                     st, loop, 256)
    assert new["kernel"] == "lightning_prefill_bf16_kernel<128, 64, true, 3, (mm1::Precision)1>"
    assert new["m1_use"] == "-" and new["loop_hmma"] == 1 and "issued_over_counted_model" not in new
    # The modeled passes: the whole and output passes in both precisions; the local pass's
    # K^T V is the split's extra work (not in the count), so it has no ratio.
    got = {}
    for args in ("0, false", "2, false", "0, true", "2, true", "1, false"):
        r = kernel_row("f.cu", ns + f"lightning_prefill_bf16_kernel<128, 128, true, {args}>(A)", st, loop, 256)
        assert r["m1_use"] != "-", args
        got[args] = r.get("issued_over_counted_model")
    assert got["0, false"] == got["2, false"] == 1.208 and got["0, true"] == got["2, true"] == 1.646
    assert got["1, false"] is None
    # Two value tiles per head (BV = 64 at Dv = 128) would issue Q K^T twice: 1.31x, not 1.21x.
    from profiles.static.cuda import prefill_bf16_issued_over_counted
    assert prefill_bf16_issued_over_counted(bv=64) == 1.3125
    for pretty in (ns + "lightning_segment_table_kernel(mm1::lightning::SegArgs)",
                   ns + "lightning_scan_kernel<__nv_bfloat16>(mm1::lightning::ScanArgs)"):
        r = kernel_row("f.cu", pretty, st, _sass(["MOV R0, R1", "EXIT"]), 128)
        assert r["kernel"].startswith(("lightning_segment_table_kernel", "lightning_scan_kernel")), r
        assert r["threads"] == 128 and r["shared_bytes"] == 1024 and r["ctas_per_sm"] >= 1, r
    assert kernel_row("f.cu", ns + "lightning_prefill_kernel<float, 128, 64>(A)", st, loop, 256) is None
    assert kernel_row("f.cu", ns + "lightning_decode_kernel<__half, 4, 4>(A)", st, loop, 256) is None
    elf = (".nv.info._Z1kv\n\t<0x1>\n\tAttribute:\tEIATTR_MAX_THREADS\n\tFormat:\tEIFMT_SVAL\n"
           "\tValue:\t0x80 0x1 0x1 \n.nv.info._Z1jv\n\t<0x1>\n\tAttribute:\tEIATTR_CUDA_API_VERSION\n")
    assert launch_bounds(elf) == {"_Z1kv": 128}
