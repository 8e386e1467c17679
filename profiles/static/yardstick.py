"""The FlashAttention-2 yardstick for the chunk loop of the CUDA lightning prefill.

The CUDA prefill aims at "instructions per MMA within 2× of a well-formed FA2-style loop". The FA2 side
is a measurement, committed as data: yardstick.json (next to this file) holds the main loop of
FlashAttention-2's forward kernel (`flash_fwd_kernel` of Dao-AILab/flash-attention,
csrc/flash_attn/src: head dim 128, bf16, the sm80 code path, which is what FA2 runs on Hopper),
compiled by nvcc for sm_90a and counted by `cuda.chunk_loop_summary`, the function that counts
ours. `tools/fa2_yardstick.sh` reproduces it from the two repositories (the commits are in the
JSON); `python -m profiles.static` only reads the JSON, so neither CI nor the report needs
flash-attention, CUTLASS or the network.

    python -m profiles.static.yardstick --sass fa2.sass --ptxas-log ptxas.txt --out yardstick.json \\
        --flash-attention-commit SHA --cutlass-commit SHA --nvcc-flags "..."
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

PATH = Path(__file__).with_name("yardstick.json")

# flash_fwd_kernel<Flash_fwd_kernel_traits<kHeadDim, kBlockM, kBlockN, kNWarps, ...>, Is_dropout, Is_causal, ...>
_FA2 = re.compile(r"flash_fwd_kernel<Flash_fwd_kernel_traits<(\d+), (\d+), (\d+), (\d+), .*?> >, "
                  r"(true|false), (true|false),")

# Which instantiation FA2's run_mha_fwd_hdim128 (flash_fwd_launch_template.h) picks where, no dropout:
# 128 × 64 tiles on sm80 and sm90, 64 × 64 for causal on sm86/sm89. The reference is the first.
USED_ON = {(128, 64, False): "sm80, sm90", (128, 64, True): "sm80, sm90", (64, 64, True): "sm86, sm89"}
REFERENCE = (128, 64, False)


def load(path: Path = PATH) -> dict | None:
    """The committed yardstick, or None when the file is absent."""
    return json.loads(path.read_text()) if path.is_file() else None


def reference(yardstick: dict | None) -> dict | None:
    """The kernel entry the report divides by (`"reference": true`)."""
    if not yardstick:
        return None
    refs = [k for k in yardstick["kernels"] if k.get("reference")]
    if len(refs) != 1 or not refs[0].get("loop_instructions_per_mma"):
        raise ValueError(f"yardstick: expected one reference kernel with instructions per HMMA, got {refs}")
    return refs[0]


def measure(sass: str, ptxas_log: str = "") -> list[dict]:
    """FA2 forward kernels of a `cuobjdump -sass` text: their main loop counted like ours."""
    from .cuda import chunk_loop_summary, demangle, ptxas_stats, sass_functions
    bodies = sass_functions(sass)
    stats = ptxas_stats(ptxas_log)
    names = demangle(list(bodies))
    out = []
    for mangled, body in bodies.items():
        m = _FA2.search(names[mangled])
        if not m:
            continue
        hdim, bm, bn, warps = (int(x) for x in m.groups()[:4])
        dropout, causal = m.group(5) == "true", m.group(6) == "true"
        if dropout:
            continue
        st = stats.get(mangled, {})
        out.append({"kernel": names[mangled], "head_dim": hdim, "block_m": bm, "block_n": bn, "warps": warps,
                    "rows_per_warp": bm // warps, "causal": causal,
                    "used_on": USED_ON.get((bm, bn, causal), "-"), "reference": (bm, bn, causal) == REFERENCE,
                    "registers": st.get("registers"), "spill_bytes": st.get("spill_bytes"),
                    **chunk_loop_summary(body)})
    out.sort(key=lambda k: (not k["reference"], -k["block_m"], k["causal"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiles.static.yardstick", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sass", type=Path, required=True, help="cuobjdump -sass of the FA2 cubin")
    ap.add_argument("--ptxas-log", type=Path, help="nvcc -Xptxas -v output (registers, spills)")
    ap.add_argument("--out", type=Path, default=PATH)
    ap.add_argument("--flash-attention-commit", required=True)
    ap.add_argument("--cutlass-commit", required=True)
    ap.add_argument("--nvcc", help="the nvcc that compiled it (default: the one on PATH / CUDA_HOME)")
    ap.add_argument("--nvcc-flags", default="")
    a = ap.parse_args(argv)
    from .cuda import nvcc_version
    kernels = measure(a.sass.read_text(), a.ptxas_log.read_text() if a.ptxas_log else "")
    if sum(k["reference"] for k in kernels) != 1:
        ap.error(f"no {REFERENCE} non-dropout flash_fwd_kernel in {a.sass}")
    rec = {
        "what": "FlashAttention-2 forward main loop (flash_fwd_kernel, the unmasked n_block loop of "
                "compute_attn_1rowblock) counted from SASS by profiles/static/cuda.py chunk_loop_summary, "
                "the function that counts the CUDA lightning prefill's chunk loop",
        "source": "github.com/Dao-AILab/flash-attention csrc/flash_attn/src (flash_fwd_launch_template.h, "
                  "flash_fwd_kernel.h; the instantiations run_mha_fwd_hdim128<cutlass::bfloat16_t> launches "
                  "without dropout, even seqlens and head dim 128: Is_even_MN = Is_even_K = true)",
        "flash_attention_commit": a.flash_attention_commit, "cutlass_commit": a.cutlass_commit,
        "nvcc": nvcc_version(a.nvcc), "nvcc_flags": a.nvcc_flags,
        "date": datetime.date.today().isoformat(),
        "reproduce": "tools/fa2_yardstick.sh FLASH_ATTENTION_GIT_DIR CUTLASS_GIT_DIR",
        "kernels": kernels,
    }
    a.out.write_text(json.dumps(rec, indent=1) + "\n")
    ref = reference(rec)
    print(f"wrote {a.out}: reference {ref['loop_instructions']} instructions / {ref['loop_hmma']} HMMA = "
          f"{ref['loop_instructions_per_mma']} per HMMA", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
