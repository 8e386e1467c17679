"""What the package launches at M1's shapes, and the model of each launch.

Every entry names one kernel compilation (module, kernel, argument types, constexprs, warps,
stages, the divisibility hints Triton's JIT attaches at run time) exactly as the package's
launcher would choose it at that shape (its own planning functions: ``choose_segment_len`` and
``prefill_tiles`` for the lightning prefill with an H100's 132 SMs, ``moe_config``/``fit_stages``
for the MoE GEMMs, ``triton_head.tiles`` on a GPU), plus:

- ``grid`` and ``programs``: the launch; ``active`` programs (the rest return at once);
- ``mma_iterations``: how many times, summed over all programs, the loop that holds every
  ``tl.dot`` of the kernel runs. Tensor-core work issued = this × the multiply-adds one trip
  issues (from the TTGIR dots and their layouts, cross-checked against the HGMMA/HMMA shapes
  in SASS × warp groups/warps; see ``read.py``);
- a bytes model: ``bytes(ctas_per_sm)`` returns (no-reuse bytes, L2-credited bytes, text).

L2 rule (an estimate, the same for every kernel): a tile several programs read costs one HBM
read when the programs are co-resident, i.e. their distance in launch order (x fastest) is
below W = 132 × CTAs/SM; otherwise every program reads it. A tile one program reads again
later is an L2 hit only when everything the co-resident programs stream in between fits in
half the 50 MiB L2 (the nearer partition). Nothing is credited across kernel launches.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

from .read import H100_SMS

L2_BYTES = 50 * 2**20
L2_USABLE = L2_BYTES // 2
H, D, CHUNK = 64, 128, 64                     # lightning: heads, head dim, chunk
E, TOP_K, HIDDEN = 32, 2, 6144                # MoE
VOCAB = 200_064
PREFILL = "mm1_kernels.lightning.triton_prefill"
DECODE = "mm1_kernels.lightning.triton_decode"
FUSED = "mm1_kernels.moe.triton_fused_moe"
ROUTE = "mm1_kernels.moe.triton_route"
HEAD = "mm1_kernels.head.triton_head"

PREFILL_PTRS = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", o_ptr="*bf16", slopes_ptr="*fp32",
                    seg_meta_ptr="*i32", seg_state_ptr="*fp32", init_state_ptr="*fp32",
                    final_state_ptr="*fp32", seq_last_seg_ptr="*i32", slot_ptr="*i32")
# At M1's shape every pointer is 16-byte aligned and every size and stride (H=64, D=128, the
# strides of a fused [B, T, H, 3D] qkv tensor) is a multiple of 16, as Triton's JIT would see;
# tests/test_triton_aot.py compiles with the same hints.
PREFILL_ALIGNED = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "seg_state_ptr", "init_state_ptr", "final_state_ptr",
                   "stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
                   "stride_vb", "stride_vt", "stride_vh", "stride_ob", "stride_ot", "stride_oh", "H", "D", "DV")
DECODE_ALIGNED = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "state_ptr", "states_ptr", "stride_qb", "stride_qt",
                  "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb", "stride_vt", "stride_vh",
                  "stride_ob", "stride_ot", "stride_oh", "H", "D", "DV")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Launch:
    name: str
    compile: tuple                      # (module, kernel, pointer types, constexprs, warps, stages, aligned)
    grid: tuple[int, ...]
    active: int                         # programs that do work
    mma_iterations: int | None          # Σ over programs of trips of the loop holding the dots
    loop: str                           # how mma_iterations was derived
    flops_counted: float                # the op's counted FLOPs this launch performs (bench cost)
    bytes: Callable[[int], tuple[float, float, str]]
    notes: str = ""

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def threads(self) -> int:
        return 32 * self.compile[4]


@dataclass
class OpCase:
    name: str
    op: str                             # bench module: lightning, moe, head
    kind: str
    params: dict
    launches: list[Launch] = field(default_factory=list)
    notes: str = ""


def window(ctas: int) -> int:
    return H100_SMS * max(1, ctas)


# ----------------------------------------------------------------------------- lightning

@contextlib.contextmanager
def _sm_count_132():
    """choose_segment_len as on an H100: the package's planner with 132 SMs."""
    from mm1_kernels.lightning import triton_prefill as P

    orig = P._num_sms
    P._num_sms = lambda device: H100_SMS
    try:
        yield
    finally:
        P._num_sms = orig


def lightning_prefill(B: int, T: int, heads: int = H, precision: str = "default",
                      consistent: bool = False) -> OpCase:
    """The Triton prefill as ``lightning_prefill_triton`` launches it on an H100 (132 SMs).

    Programs are (segment, head, value tile) in a 1-D grid, value tile fastest; at D = 128 one
    value tile covers Dv, so each program reads its q, k, v chunk once and writes o once.
    ``consistent``: as ``lightning_attention(consistent=True)`` launches it: never split, one
    program walks a whole sequence (the work is the same; fewer programs may leave SMs idle,
    which this roofline does not model: see the case's notes).
    """
    import torch

    from mm1_kernels.lightning import triton_prefill as P

    bv, warps, stages = P.prefill_tiles(D, D, torch.bfloat16)
    nv = cdiv(D, bv)
    with _sm_count_132():
        seg = None if consistent else P.choose_segment_len(B * T, B, heads, nv, heads * D * D * 4,
                                                           torch.device("cuda"))
    suffix = ((f"-H{heads}" if heads != H else "") + (f"-{precision}" if precision != "default" else "")
              + ("-consistent" if consistent else ""))
    case = OpCase(f"lightning-prefill-B{B}-T{T}{suffix}", "lightning", "prefill",
                  dict(B=B, T=T, H=heads, D=D, dtype="bf16"))
    chunks_total = B * cdiv(T, CHUNK)               # chunks per (head, value tile)
    flops_op = chunks_total * heads * (4 * CHUNK**2 * D + 4 * CHUNK * D * D)
    qk_tile, v_tile = CHUNK * D * 2, CHUNK * bv * 2  # bytes of one chunk of q (or k), of v (or o)
    state_slice = D * bv * 4
    base = dict(C=CHUNK, BD=D, BV=bv, HAS_SLOTS=False, DOT_MODE=P.BF16_DOT_MODE[precision],
                EXACT_TILES=D % bv == 0, BOUNDARY_STATE=False)

    def seg_kernel(local, use_seg, final):
        return (PREFILL, "lightning_segment_kernel", PREFILL_PTRS,
                dict(base, LOCAL_PASS=local, USE_SEG_STATE=use_seg, HAS_INIT=False, STORE_FINAL=final),
                warps, stages, PREFILL_ALIGNED)

    def shared_qk(ctas):
        # The nv value-tile programs of one (segment, head) are adjacent in launch order
        # (distance < nv ≤ W): they read q and k together, once from HBM.
        return nv <= window(ctas)

    def out_bytes(G, n_last, use_seg):
        # Output/single pass: per chunk q, k ([C, D] bf16), v ([C, BV]) read, o ([C, BV]) written;
        # the incoming state slice read (split), the final state slice written (last segments).
        def f(ctas):
            progs = G * heads * nv
            qk = 2 * qk_tile * chunks_total * heads * nv
            vo = 2 * v_tile * chunks_total * heads * nv
            states = (progs * state_slice if use_seg else 0) + n_last * heads * nv * state_slice
            qk_l2 = qk / nv if shared_qk(ctas) else qk
            text = (f"q,k {qk / 1e9:.2f} GB ({nv} value tile{'s' if nv > 1 else ''} per (segment, head)"
                    + (", adjacent: L2 shares q, k" if nv > 1 else ": each read once") +
                    f"), v,o {vo / 1e9:.2f} GB, states {states / 1e9:.3f} GB")
            return qk + vo + states, qk_l2 + vo + states, text
        return f

    loop_out = f"{P.BF16_DOT_MODE[precision]} products"
    if seg is None:
        G = B
        case.launches.append(Launch(
            "prefill single pass", seg_kernel(False, False, True), (G * heads * nv,), G * heads * nv,
            chunks_total * heads * nv,
            f"one chunk loop per program: {cdiv(T, CHUNK)} chunks × {G * heads * nv} programs ({loop_out})",
            flops_op, out_bytes(G, B, False)))
        progs = B * heads * nv
        case.notes = (f"consistent mode: never split, {progs} programs, one per (sequence, head, value tile) "
                      f"on 132 SMs: at most {min(1.0, progs / (P.PROGRAMS_PER_SM * H100_SMS)):.0%} of the SMs "
                      "busy (not in the model est.)" if consistent else
                      f"one segment per sequence (B·H·nv = {progs} programs > {P.PROGRAMS_PER_SM} × 132 / 2)")
        return case

    nseg = cdiv(T, seg)                               # per sequence
    G = cdiv(B * T, seg) + B                          # grid rows (static bound; extra rows idle)
    real = B * nseg
    seg_chunks = seg // CHUNK
    local_chunks = B * (nseg - 1) * seg_chunks        # non-last segments hold exactly seg tokens

    def local_bytes(ctas):
        k = qk_tile * local_chunks * heads * nv
        v = v_tile * local_chunks * heads * nv
        st = B * (nseg - 1) * heads * nv * state_slice
        k_l2 = k / nv if shared_qk(ctas) else k
        return k + v + st, k_l2 + v + st, \
            f"k,v {(k + v) / 1e9:.2f} GB of the non-last segments (read again by the output pass), local states written"

    scan_tiles = cdiv(D, P.SCAN_BV)

    def scan_bytes(ctas):
        b = B * heads * D * D * 4 * ((nseg - 1) * 2 + 1)
        return b, b, "per (seq, head): each local state read and replaced, the last written"

    case.notes = (f"split: segment_len = {seg} tokens ({seg_chunks} chunks), {nseg} segments per sequence, "
                  f"grid rows G = {G} ({G - real} idle), B·H·nv = {B * heads * nv} programs → "
                  f"{real * heads * nv} (PROGRAMS_PER_SM = {P.PROGRAMS_PER_SM} on 132 SMs)")
    case.launches += [
        Launch("prefill local pass", seg_kernel(True, False, False), (G * heads * nv,),
               B * (nseg - 1) * heads * nv, local_chunks * heads * nv,
               f"{seg_chunks} chunks × {B * (nseg - 1) * heads * nv} non-last-segment programs",
               0.0, local_bytes,
               "extra work of the split: K^T V of the non-last segments again, as a bf16 pair (not in the count)"),
        Launch("prefill segment scan",
               (PREFILL, "lightning_segment_scan_kernel",
                dict(slopes_ptr="*fp32", seg_state_ptr="*fp32", init_state_ptr="*fp32", seq_first_seg_ptr="*i32",
                     seq_last_seg_ptr="*i32", slot_ptr="*i32"),
                dict(BD=D, BV=P.SCAN_BV, HAS_INIT=False, HAS_SLOTS=False), 4, 3,
                ("seg_state_ptr", "init_state_ptr", "H", "D", "DV")),
               (B, heads, scan_tiles), B * heads * scan_tiles, None, "no dot", 0.0, scan_bytes),
        Launch("prefill output pass", seg_kernel(False, True, True), (G * heads * nv,), real * heads * nv,
               chunks_total * heads * nv, f"{seg_chunks} chunks per segment × {real * heads * nv} programs "
               f"({loop_out})", flops_op, out_bytes(G, B, True)),
    ]
    return case


def lightning_decode(B: int) -> OpCase:
    bv = 32 if B * H >= 256 else 16                   # triton_decode.lightning_decode_triton
    nv = cdiv(D, bv)
    case = OpCase(f"lightning-decode-B{B}", "lightning", "decode", dict(B=B, H=H, D=D, dtype="bf16"))

    def f(ctas):
        progs = B * H * nv
        state = progs * D * bv * 4 * 2
        qk = progs * 2 * D * 2
        vo = progs * 2 * bv * 2
        shared = B * H < window(ctas)
        qk_l2 = qk / nv if shared else qk
        return state + qk + vo, state + qk_l2 + vo, "fp32 state slice read + written; q,k per value tile"

    case.launches.append(Launch(
        f"decode (BV {bv})",
        (DECODE, "lightning_decode_kernel",
         dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", o_ptr="*bf16", slopes_ptr="*fp32",
              state_ptr="*fp32", slot_ptr="*i32", states_ptr="*fp32"),
         dict(BD=D, BV=bv, HAS_SLOTS=True, STORE_STATES=False, ONE_TOKEN=True), 4, 3, DECODE_ALIGNED),
        (B, H, nv), B * H * nv, None, "no dot (CUDA-core FMAs)", B * H * 5 * D * D, f))
    return case


# ----------------------------------------------------------------------------- MoE

def expected_row_tiles(T: int, bm: int) -> float:
    """E[Σ_e ⌈count_e / BLOCK_M⌉] for uniform random routing: each token picks TOP_K distinct
    experts, so an expert's count is Binomial(T, TOP_K/E). Padding rows are computed by the MMA."""
    p = TOP_K / E
    total = 0.0
    for x in range(1, T + 1):
        logpmf = math.lgamma(T + 1) - math.lgamma(x + 1) - math.lgamma(T - x + 1) + x * math.log(p) + \
            (T - x) * math.log1p(-p)
        if logpmf > -60:
            total += math.exp(logpmf) * cdiv(x, bm)
    return E * total


def moe(T: int, inter: int, dtype: str, consistent: bool = False) -> OpCase:
    """``consistent``: ``fused_moe(consistent=True)``: tile_configs.CONSISTENT_CONFIG at every T."""
    from mm1_kernels.moe import triton_fused_moe as F
    from mm1_kernels.moe.tile_configs import CONSISTENT_CONFIG

    from bench.moe import touched_experts

    case = OpCase(f"moe-I{inter}-T{T}-{dtype}" + ("-consistent" if consistent else ""), "moe",
                  "prefill" if T > 64 else "decode",
                  dict(T=T, hidden=HIDDEN, I=inter, E=E, top_k=TOP_K, dtype=dtype))
    q = dtype == "int8"
    wt, w_elt = ("i8", 1) if q else ("bf16", 2)
    n = T * TOP_K
    c = dict(CONSISTENT_CONFIG) if consistent else F.moe_config(inter, HIDDEN, T)
    direct = n <= F.DIRECT_MAX_ENTRIES
    bm = 16 if direct else c["BLOCK_M"]
    group_m = F.DIRECT_MAX_ENTRIES if direct else c["GROUP_M"]
    max_blocks = n if direct else cdiv(n + min(E, n) * (bm - 1), bm)
    touched = touched_experts(None, T)
    per_expert = n / touched
    tiles = n if direct else expected_row_tiles(T, bm)
    st1 = F.fit_stages(c["num_stages"], bm, c["BLOCK_N1"], c["BLOCK_K1"], 2, 2, w_elt)
    st2 = F.fit_stages(c["num_stages"], bm, c["BLOCK_N2"], c["BLOCK_K2"], 1, 2, w_elt)
    meta = dict(sorted_ids_ptr="*i32", block_expert_ptr="*i32", scale_ptr="*fp32")

    def aligned(kernel):
        names = ("x_ptr", "w_ptr", "h_ptr", "rows_ptr", "I", "K", "H", "stride_xt", "stride_we", "stride_wn",
                 "stride_se")
        return tuple(a for a in names if a in getattr(F, kernel).arg_names)

    n1, n2 = cdiv(inter, c["BLOCK_N1"]), cdiv(HIDDEN, c["BLOCK_N2"])
    block_e = max(16, 1 << (E - 1).bit_length())
    block_n = max(16, min(1 << max(0, (n - 1).bit_length()), max(16, 8192 // block_e)))
    # Grouped launch order (grouped_tile): an expert's row tiles are adjacent, so one weight
    # column tile is read from HBM once per group of GROUP_M row tiles the expert's tiles fall
    # in (expected 1 + (tiles per expert - 1) / GROUP_M), and the group's activation rows are
    # reused across the column sweep (distance GROUP_M programs, inside the co-resident window).
    tiles_per_expert = tiles / touched
    weight_reads = min(tiles_per_expert, 1 + (tiles_per_expert - 1) / group_m)

    def align_bytes(ctas):
        b = 2 * n * 4 + max_blocks * bm * 4 + max_blocks * 4
        return b, b, "ids read twice (count, scatter); sorted_ids and block_expert written"

    def gate_up_bytes(ctas):
        w = tiles * n1 * 2 * c["BLOCK_N1"] * HIDDEN * w_elt
        x = n * HIDDEN * 2 * n1
        h = n * inter * 2
        s = tiles * n1 * 2 * c["BLOCK_N1"] * 4 if q else 0
        w_l2 = touched * 2 * inter * HIDDEN * w_elt * weight_reads
        x_shared = group_m < window(ctas)
        x_l2 = x / n1 if x_shared else x
        return (w + x + h + s, w_l2 + x_l2 + h + s,
                f"w13 {w / 1e9:.3f} GB ({tiles:.1f} row tiles × {n1} column tiles; L2: {weight_reads:.2f} reads per "
                f"touched expert {w_l2 / 1e9:.3f}), x rows {x / 1e9:.3f} GB (L2-shared across column tiles: "
                f"{'yes' if x_shared else 'no'}, GROUP_M {group_m} vs W {window(ctas)}), h written {h / 1e9:.3f}")

    def down_bytes(ctas, fused_combine=False):
        w = tiles * n2 * c["BLOCK_N2"] * inter * w_elt
        a = n * inter * 2 * n2
        out = T * HIDDEN * 2 if fused_combine else n * HIDDEN * 4
        w_l2 = touched * HIDDEN * inter * w_elt * weight_reads
        shared = group_m < window(ctas)
        a_l2 = a / n2 if shared else a
        return (w + a + out, w_l2 + a_l2 + out,
                f"w2 {w / 1e9:.3f} GB (L2: {w_l2 / 1e9:.3f}), h rows {a / 1e9:.3f} GB "
                f"(shared: {'yes' if shared else 'no'}), "
                + (f"bf16 y written {out / 1e9:.3f}" if fused_combine else f"fp32 rows written {out / 1e9:.3f}"))

    def combine_bytes(ctas):
        b = n * HIDDEN * 4 + T * HIDDEN * 2 + n * 4
        return b, b, "fp32 rows read, bf16 y written"

    gate_up = Launch(
        f"moe gate_up {bm}x{c['BLOCK_N1']}x{c['BLOCK_K1']}" + (" (direct)" if direct else ""),
        (FUSED, "moe_gate_up_kernel",
         dict(meta, ids_ptr="*i32", map_ptr="*i32", x_ptr="*bf16", h_ptr="*bf16", w_ptr=f"*{wt}"),
         dict(stride_sn=1, TOP_K=TOP_K, QUANT=q, PRECISION="tf32", DIRECT=direct, HAS_MAP=False, GROUP_M=group_m,
              BLOCK_M=bm, BLOCK_N=c["BLOCK_N1"], BLOCK_K=c["BLOCK_K1"]), c["num_warps"], st1,
         aligned("moe_gate_up_kernel")),
        (max_blocks * n1,), round(tiles * n1), tiles * n1 * cdiv(HIDDEN, c["BLOCK_K1"]),
        f"K loop {cdiv(HIDDEN, c['BLOCK_K1'])} trips × {tiles:.1f} active row tiles (of {max_blocks}; "
        + ("one per entry" if direct else f"expected for uniform random routing, {per_expert:.0f} entries per "
           "touched expert") + f") × {n1} column tiles",
        4 * n * HIDDEN * inter, gate_up_bytes)
    if direct:
        case.launches += [
            gate_up,
            Launch(f"moe down+combine {bm}x{c['BLOCK_N2']}x{c['BLOCK_K2']} (direct)",
                   (FUSED, "moe_down_combine_kernel",
                    dict(h_ptr="*bf16", w_ptr=f"*{wt}", scale_ptr="*fp32", topk_w_ptr="*fp32", ids_ptr="*i32",
                         map_ptr="*i32", out_ptr="*bf16"),
                    dict(stride_sn=1, TOP_K=TOP_K, QUANT=q, PRECISION="tf32", HAS_MAP=False, BLOCK_M=bm,
                         BLOCK_N=c["BLOCK_N2"], BLOCK_K=c["BLOCK_K2"]), c["num_warps"], st2,
                    aligned("moe_down_combine_kernel")),
                   (T * n2,), T * n2, T * n2 * cdiv(inter, c["BLOCK_K2"]),
                   f"K loop {cdiv(inter, c['BLOCK_K2'])} trips (each of the {TOP_K} unrolled slot loops) × {T} tokens "
                   f"× {n2} column tiles",
                   2 * n * HIDDEN * inter, lambda ctas: down_bytes(ctas, fused_combine=True)),
        ]
    else:
        case.launches += [
            Launch("moe align (1 program)",
                   (FUSED, "moe_align_kernel",
                    dict(ids_ptr="*i32", map_ptr="*i32", sorted_ids_ptr="*i32", block_expert_ptr="*i32"),
                    dict(HAS_MAP=False, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_E=block_e,
                         BLOCK_S=max(16, min(1024, 8192 // block_e))), 4, 3, ()),
                   (1,), 1, None, "no dot", 0.0, align_bytes),
            gate_up,
            Launch(f"moe down {bm}x{c['BLOCK_N2']}x{c['BLOCK_K2']}",
                   (FUSED, "moe_down_kernel",
                    dict(meta, h_ptr="*bf16", w_ptr=f"*{wt}", topk_w_ptr="*fp32", rows_ptr="*fp32"),
                    dict(stride_sn=1, QUANT=q, PRECISION="tf32", GROUP_M=group_m, BLOCK_M=bm,
                         BLOCK_N=c["BLOCK_N2"], BLOCK_K=c["BLOCK_K2"]), c["num_warps"], st2,
                    aligned("moe_down_kernel")),
                   (max_blocks * n2,), round(tiles * n2), tiles * n2 * cdiv(inter, c["BLOCK_K2"]),
                   f"K loop {cdiv(inter, c['BLOCK_K2'])} trips × {tiles:.1f} active row tiles × {n2} column tiles",
                   2 * n * HIDDEN * inter, down_bytes),
            Launch("moe combine",
                   (FUSED, "moe_combine_kernel",
                    dict(rows_ptr="*fp32", ids_ptr="*i32", map_ptr="*i32", out_ptr="*bf16"),
                    dict(TOP_K=TOP_K, HAS_MAP=False, BLOCK_H=1024), 4, 3, ()),
                   (T, cdiv(HIDDEN, 1024)), T * cdiv(HIDDEN, 1024), None, "no dot", 0.0, combine_bytes),
        ]
    case.notes = (f"tiles {c}; stages {st1}/{st2}; {touched:.1f} experts touched (expected, uniform routing); "
                  + ("direct decode path (no alignment, combine fused into GEMM 2)" if direct
                     else f"max_blocks {max_blocks}"))
    return case


def route(T: int) -> OpCase:
    block_e = 32
    block_t = max(1, min(64, 4096 // block_e, 1 << max(0, (T - 1).bit_length())))
    case = OpCase(f"moe-route-T{T}", "route", "route", dict(T=T, E=E, top_k=TOP_K))

    def f(ctas):
        b = T * E * 4 + T * TOP_K * 8
        return b, b, "fp32 logits read, weights and ids written"

    case.launches.append(Launch(
        f"moe route (BLOCK_T {block_t})",
        (ROUTE, "moe_route_kernel", dict(logits_ptr="*fp32", weights_ptr="*fp32", ids_ptr="*i32"),
         dict(TOP_K=TOP_K, RENORMALIZE=True, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=2), 4, 3, ()),
        (cdiv(T, block_t),), cdiv(T, block_t), None, "no dot", 0.0, f))
    return case


# ----------------------------------------------------------------------------- head

def _head_config(compensate: bool | None = None):
    """triton_head's GPU configuration for bf16 inputs (this process runs without the
    interpreter): forward tiles (aligned layout, no stored logits), logit-gradient tiles,
    SPLIT_V, MERGE_BT, warps, GROUP_T and the two-sum option (default: the module's)."""
    from mm1_kernels.head import triton_head as TH

    comp = TH.TWO_SUM["default"] if compensate is None else compensate
    fwd, dlogits = TH.tiles(False, comp), TH.dlogits_tiles(False, comp)
    return dict(fwd=fwd, dlogits=dlogits, split_v=TH.SPLIT_V, merge_bt=TH.MERGE_BT, warps=TH.NUM_WARPS,
                group_t=TH.group_t(fwd), group_t_dlogits=TH.group_t(dlogits), compensate=comp)


def _head_l2(n_t: int, n_v: int, n_lanes: int, gt: int, W: int, h_tile: int, w_tile: int):
    """HBM reads of hidden and weight for programs (token tile, vocabulary step) visited in
    triton_head's grouped order (groups of gt token tiles, token tile fastest, then the
    vocabulary index), every program reading a K-complete [BT, hidden] and [BV, hidden] tile.

    n_v vocabulary steps per token tile, walked by n_lanes programs in launch order (the
    forward: one program per split walks its split's steps; the gradient: one program per
    step). Returns (hidden reads, weight reads) in tiles, and the text. W co-resident programs
    span gt token tiles × sp = min(n_lanes, ⌈W/gt⌉) vocabulary steps. Weight: the gt programs of one vocabulary
    step in a group are adjacent (distance < gt ≤ W): one read per group. Hidden: a token
    tile's tile is needed again one vocabulary step later; in between the co-resident programs
    touch gt hidden tiles and sp weight tiles. If those fit in L2 the tile is read once per
    group, else once per window of sp steps (the sp co-resident programs of a token tile read
    the same K slices at about the same time: one HBM read)."""
    gt = min(gt, n_t)
    groups = cdiv(n_t, gt)
    sp = min(n_lanes, cdiv(W, gt))
    between = gt * h_tile + sp * w_tile
    hit = between <= L2_USABLE
    h_reads = n_t if hit else n_t * cdiv(n_v, sp)
    w_reads = n_v * groups
    text = (f"groups of {gt} token tiles × {sp} co-resident vocabulary steps: w once per group ({groups} "
            f"groups); h again per step unless {gt} h tiles + {sp} w tiles = {between / 2**20:.1f} MiB ≤ "
            f"{L2_USABLE / 2**20:.0f} MiB: {'hit, h once per group' if hit else f'miss, h once per {sp} steps'}")
    return h_reads, w_reads, text


def head_forward(T: int, compensate: bool | None = None) -> OpCase:
    """The forward as head_forward_triton launches it for bf16 on a GPU (aligned layout).

    Per program (token tile, vocabulary split): for each BV-wide step of the split a K loop
    over [BT, BK] hidden and [BV, BK] weight slices, so each step streams a K-complete hidden
    tile and weight tile; bytes by :func:`_head_l2`. Why not ≤ 2× the minimum bytes at T = 8192
    (the weight, 2.46 GB, read ≤ 2×): the weight is re-read once per group of token tiles whose
    hidden tiles are co-resident, and T = 8192 tokens of hidden are 100 MB, twice the whole L2;
    and with K-complete tiles the co-resident programs' hidden + weight tiles (gt + ⌈W/gt⌉ ≥ 23
    tiles of 1.5 MiB at 128 × 128) exceed the 25 MiB this model credits, so hidden tiles are
    shared only by programs reading the same K slices at the same time (see triton_head).
    """
    cfg = _head_config(compensate)
    bt, bv, bk = cfg["fwd"]
    split_v, group_t = cfg["split_v"], cfg["group_t"]
    nsplit = cdiv(VOCAB, split_v)
    ttiles = cdiv(T, bt)
    vtiles = sum(cdiv(min(split_v, VOCAB - s * split_v), bv) for s in range(nsplit))
    ksteps = cdiv(HIDDEN, bk)
    name = f"head-forward-T{T}" + ("-compensated" if compensate and not _head_config()["compensate"] else "")
    case = OpCase(name, "head", "logprobs", dict(T=T, hidden=HIDDEN, V=VOCAB, dtype="bf16"))
    h_tile = bt * HIDDEN * 2
    w_step = bv * HIDDEN * 2

    def split_bytes(ctas):
        it = ttiles * vtiles * ksteps
        h = it * bt * bk * 2
        w = it * bv * bk * 2
        part = nsplit * 4 * T * 4 + ttiles * nsplit * bt * 8
        # The splits are consecutive vocabulary steps of one program; across programs the
        # order is (token tile, split), so the co-resident programs sit at ⌈W/gt⌉ different
        # splits, each at some step: the model counts their steps as ⌈W/gt⌉ weight tiles.
        h_reads, w_reads, text = _head_l2(ttiles, vtiles, nsplit, group_t, window(ctas), h_tile, w_step)
        h_l2, w_l2 = h_reads * h_tile, w_reads * w_step
        return (h + w + part, h_l2 + w_l2 + part,
                f"per K step a [{bt},{bk}] h tile and a [{bv},{bk}] w tile: h {h / 1e9:.1f} GB, w {w / 1e9:.1f} GB; "
                f"L2: {text}: h {h_l2 / 1e9:.2f} GB, w {w_l2 / 1e9:.2f} GB")

    def merge_bytes(ctas):
        b = nsplit * 4 * T * 4 + T * 8 + 3 * T * 4
        return b, b, "partials read, lp/lse/entropy written"

    case.launches += [
        Launch(f"head split_stats {bt}x{bv}x{bk}" + (" compensated" if cfg["compensate"] else ""),
               (HEAD, "head_split_stats_kernel",
                dict(h_ptr="*bf16", w_ptr="*bf16", inv_temp="fp32", tgt_ptr="*i64", part_ptr="*fp32",
                     logits_ptr="*fp32"),
                dict(BT=bt, BV=bv, BK=bk, FP32_INPUTS=False, COMPENSATE=cfg["compensate"], STORE_LOGITS=False,
                     GROUP_T=group_t),
                cfg["warps"], 3, ("h_ptr", "w_ptr", "tgt_ptr", "part_ptr", "T", "V", "K", "stride_h", "stride_w")),
               (ttiles * nsplit,), ttiles * nsplit, ttiles * vtiles * ksteps,
               f"K loop {ksteps} trips inside the vocabulary loop ({vtiles} {bv}-wide steps over all "
               f"{nsplit} splits) × {ttiles} token tiles",
               2 * T * VOCAB * HIDDEN, split_bytes),
        Launch("head merge", (HEAD, "head_merge_splits_kernel",
                              dict(part_ptr="*fp32", tgt_ptr="*i64", lp_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32"),
                              dict(IGNORE=-100, BT=cfg["merge_bt"]), 4, 3, ()),
               (cdiv(T, cfg["merge_bt"]),), cdiv(T, cfg["merge_bt"]), None, "no dot", 0.0, merge_bytes),
    ]
    case.notes = ("compiled with the divisibility hints the JIT attaches at M1's sizes (T, V = 200,064, "
                  "hidden = 6144 and the pointers; tests/test_head_aot.py compiles without them too); "
                  "two-sum across K blocks "
                  + ('on (precision="high")' if cfg["compensate"] else 'off (precision="default")'))
    return case


def head_backward(T: int) -> OpCase:
    """The logit-gradient kernel as head_backward_triton launches it for bf16 on a GPU: one
    launch per (vocabulary chunk, row block) of the shared driver, each a grouped 1-D grid of
    K-complete [BT, BV] tiles (bytes by :func:`_head_l2`, nothing credited across launches);
    dz stored in bf16 (the dtype the driver's tensor-core gradient GEMMs take)."""
    from mm1_kernels.head.backward import BACKWARD_VOCAB_CHUNK, TORCH_BLOCK_ELEMENTS

    cfg = _head_config()
    bt, bv, bk = cfg["dlogits"]
    group_t = cfg["group_t_dlogits"]
    rows = max(bt, TORCH_BLOCK_ELEMENTS // BACKWARD_VOCAB_CHUNK)
    chunks = cdiv(VOCAB, BACKWARD_VOCAB_CHUNK)
    rblocks = cdiv(T, rows)
    ttiles = cdiv(T, bt)
    chunk_cols = [min(BACKWARD_VOCAB_CHUNK, VOCAB - c * BACKWARD_VOCAB_CHUNK) for c in range(chunks)]
    vtiles = sum(cdiv(c, bv) for c in chunk_cols)
    ksteps = cdiv(HIDDEN, bk)
    case = OpCase(f"head-backward-T{T}", "head", "logprobs_fwd_bwd",
                  dict(T=T, hidden=HIDDEN, V=VOCAB, dtype="bf16"))
    h_tile, w_tile = bt * HIDDEN * 2, bv * HIDDEN * 2

    def f(ctas):
        h = w = h_l2 = w_l2 = 0
        text = ""
        for r0 in range(0, T, rows):
            n_t = cdiv(min(rows, T - r0), bt)
            for cols in chunk_cols:
                n_v = cdiv(cols, bv)
                h += n_t * n_v * h_tile
                w += n_t * n_v * w_tile
                h_reads, w_reads, text = _head_l2(n_t, n_v, n_v, group_t, window(ctas), h_tile, w_tile)
                h_l2 += h_reads * h_tile
                w_l2 += w_reads * w_tile
        dz = T * VOCAB * 2
        return (h + w + dz, h_l2 + w_l2 + dz,
                f"h {h / 1e9:.1f} GB, w {w / 1e9:.1f} GB, dz bf16 written {dz / 1e9:.2f} GB; L2 per launch "
                f"(first): {text}: h {h_l2 / 1e9:.2f} GB, w {w_l2 / 1e9:.2f} GB over all launches")

    case.launches.append(Launch(
        f"head dlogits {bt}x{bv}x{bk}",
        (HEAD, "head_dlogits_kernel",
         dict(h_ptr="*bf16", w_ptr="*bf16", inv_temp="fp32", tgt_ptr="*i64", g_lp_ptr="*fp32", g_lse_ptr="*fp32",
              g_ent_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32", dz_ptr="*bf16"),
         dict(BT=bt, BV=bv, BK=bk, FP32_INPUTS=False, COMPENSATE=cfg["compensate"], GROUP_T=group_t),
         cfg["warps"], 3,
         ("h_ptr", "w_ptr", "tgt_ptr", "dz_ptr", "rows", "cols", "v0", "K", "stride_h", "stride_w", "stride_dz")),
        (ttiles * cdiv(BACKWARD_VOCAB_CHUNK, bv),), ttiles * vtiles, ttiles * vtiles * ksteps,
        f"K loop {ksteps} trips × {ttiles * vtiles} programs over {chunks} vocabulary chunks × {rblocks} row "
        f"blocks (one launch each)", 2 * T * VOCAB * HIDDEN, f,
        "recomputes the logits (2·T·V·hidden, compared with that); the two gradient GEMMs run in cuBLAS "
        "(torch.mm) and are not read here"))
    case.notes = (f"{chunks * rblocks} launches of {ttiles * cdiv(BACKWARD_VOCAB_CHUNK, bv)} programs (grouped, "
                  f"{group_t} token tiles); only the Triton kernel is modeled; the op's counted FLOPs include "
                  "4·T·V·hidden in cuBLAS")
    return case


# ----------------------------------------------------------------------------- MoE backward

BWD = "mm1_kernels.moe.triton_backward"


def moe_backward(T: int, inter: int) -> OpCase:
    """The Triton backward of fused_moe (bf16, dW wanted), launch by launch, at the tiles
    ``triton_backward.backward_config`` picks. The op's counted FLOPs are the backward's
    12·hidden·I per routed token (bench/moe.py, kind ``backward``); the gate/up recompute (4 more)
    is extra work of this launch order, reported as issued but counted 0."""
    from mm1_kernels.moe import triton_backward as B
    from mm1_kernels.moe import triton_fused_moe as F

    from bench.moe import touched_experts

    case = OpCase(f"moe-backward-I{inter}-T{T}-bf16", "moe", "backward",
                  dict(T=T, hidden=HIDDEN, I=inter, E=E, top_k=TOP_K, dtype="bf16"))
    n = T * TOP_K
    c = B.backward_config(inter, HIDDEN, T, TOP_K)
    bm, bn1, bk1, bn2, bk2 = c["BLOCK_M"], c["BLOCK_N1"], c["BLOCK_K1"], c["BLOCK_N2"], c["BLOCK_K2"]
    bp, bq, warps = c["BLOCK_P"], c["BLOCK_Q"], c["num_warps"]
    max_blocks = cdiv(n + min(E, n) * (bm - 1), bm)
    touched = touched_experts(None, T)
    tiles = expected_row_tiles(T, bm)
    n1, n2 = cdiv(inter, bn1), cdiv(HIDDEN, bn2)
    st1 = F.fit_stages(c["num_stages"], bm, bn1, bk1, 3, 4, 2)
    st2 = F.fit_stages(c["num_stages"], bm, bn2, bk2, 1, 2, 2)
    block_e = max(16, 1 << (E - 1).bit_length())
    block_n = max(16, min(1 << max(0, (n - 1).bit_length()), max(16, 8192 // block_e)))
    block_b = max(16, min(1024, 1 << max(0, (max_blocks - 1).bit_length())))
    meta = dict(sorted_ids_ptr="*i32", block_expert_ptr="*i32")
    x_bytes = T * HIDDEN * 2
    group_m = c["GROUP_M"]
    tiles_per_expert = tiles / touched
    weight_reads = min(tiles_per_expert, 1 + (tiles_per_expert - 1) / group_m)

    def aligned(kernel, *extra):
        names = ("x_ptr", "dy_ptr", "w13_ptr", "w2_ptr", "dgu_ptr", "hw_ptr", "dtw_part_ptr", "rows_out_ptr",
                 "a_ptr", "b_ptr", "out_ptr", "N", "I", "H", "K", "P", "Q", "stride_xt", "stride_dyt",
                 "stride_w13e", "stride_w13n", "stride_w2e", "stride_w2n", "stride_we", "stride_wn",
                 "stride_a", "stride_b", "stride_oe", "stride_op")
        return tuple(a for a in names if a in getattr(B, kernel).arg_names)

    def align_bytes(ctas):
        b = 2 * n * 4 + max_blocks * bm * 4 + max_blocks * 4
        return b, b, "ids read twice (count, scatter); sorted_ids and block_expert written"

    def act_bytes(ctas):
        w = tiles * n1 * 3 * bn1 * HIDDEN * 2           # gate, up (w13) and w2 column tiles per row tile
        a = 2 * n * HIDDEN * 2 * n1                      # x and dy rows, per column tile
        out = n * 3 * inter * 2 + n1 * n * 4             # dgu, hw, routing partials
        # Grouped order (as the forward's gate_up): a weight column tile is read once per group
        # of GROUP_M row tiles an expert's tiles fall in; x, dy rows shared across the column sweep.
        w_l2 = touched * 3 * inter * HIDDEN * 2 * weight_reads
        shared = group_m < window(ctas)
        a_l2 = a / n1 if shared else a
        return (w + a + out, w_l2 + a_l2 + out,
                f"w13+w2 tiles {w / 1e9:.2f} GB (L2: {weight_reads:.2f} reads per touched expert "
                f"{w_l2 / 1e9:.2f}), x,dy rows {a / 1e9:.2f} GB (shared across column tiles: "
                f"{'yes' if shared else 'no'}, GROUP_M {group_m} vs W {window(ctas)}), dgu+hw+partials "
                f"written {out / 1e9:.3f}")

    def dx_bytes(ctas):
        w = tiles * n2 * bn2 * 2 * inter * 2
        a = n * 2 * inter * 2 * n2
        out = n * HIDDEN * 4
        w_l2 = touched * 2 * inter * HIDDEN * 2
        shared = max_blocks < window(ctas)
        a_l2 = a / n2 if shared else a
        return (w + a + out, w_l2 + a_l2 + out,
                f"w13 {w / 1e9:.2f} GB (L2: {w_l2 / 1e9:.2f}), dgu rows {a / 1e9:.2f} GB (shared: "
                f"{'yes' if shared else 'no'}), fp32 rows written {out / 1e9:.3f}")

    def combine_bytes(ctas):
        b = n * HIDDEN * 4 + x_bytes + n * 4
        return b, b, "fp32 rows read, bf16 dx written"

    def route_bytes(ctas):
        b = n1 * n * 4 + n * 4 * 2
        return b, b, f"{n1} fp32 partials per entry read, ids read, fp32 gradient written"

    def dw_bytes(P, Q, a_row, b_row, what):
        def f(ctas):
            ptiles, qtiles = cdiv(P, bp), cdiv(Q, bq)
            ab = tiles * bm * (bp * ptiles * qtiles + bq * qtiles * ptiles) * 2  # every program reads its rows
            out = E * P * Q * 2
            # Expert slowest in launch order: the expert's rows (A: n/touched rows × a_row, B: × b_row)
            # stay in L2 while its ptiles·qtiles programs run, if they fit.
            per_expert = n / touched * (a_row + b_row) * 2
            hit = per_expert <= L2_USABLE
            ab_l2 = n * (a_row + b_row) * 2 if hit else ab
            return (ab + out, ab_l2 + out,
                    f"{what}: rows {ab / 1e9:.2f} GB ({ptiles}×{qtiles} output tiles per expert re-read them); "
                    f"L2: an expert's rows {per_expert / 2**20:.1f} MiB ≤ {L2_USABLE / 2**20:.0f} MiB: "
                    f"{'hit' if hit else 'miss'} ({ab_l2 / 1e9:.2f} GB); bf16 gradient written {out / 1e9:.2f} GB")
        return f

    def dw_launch(name, P, Q, a_by_token, a_row, b_row, flops):
        ptiles, qtiles = cdiv(P, bp), cdiv(Q, bq)
        return Launch(
            f"moe bwd {name} {bp}x{bq}x{bm}",
            (BWD, "moe_bwd_dw_kernel", dict(meta, a_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16"),
             dict(A_BY_TOKEN=a_by_token, B_BY_TOKEN=not a_by_token, TOP_K=TOP_K, PRECISION="tf32", BLOCK_M=bm,
                  BLOCK_P=bp, BLOCK_Q=bq, BLOCK_B=block_b), warps, c["num_stages"], aligned("moe_bwd_dw_kernel")),
            (qtiles, ptiles, E), qtiles * ptiles * E, round(tiles * ptiles * qtiles),
            f"row-tile loop: {tiles:.1f} expected row tiles (all experts) × {ptiles}×{qtiles} output tiles",
            flops, dw_bytes(P, Q, a_row, b_row, name))

    case.launches += [
        Launch("moe bwd align (1 program)",
               (F.__name__, "moe_align_kernel",
                dict(ids_ptr="*i32", map_ptr="*i32", sorted_ids_ptr="*i32", block_expert_ptr="*i32"),
                dict(HAS_MAP=False, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_E=block_e,
                     BLOCK_S=max(16, min(1024, 8192 // block_e))), 4, 3, ()),
               (1,), 1, None, "no dot", 0.0, align_bytes, "recomputed: the forward saves no metadata"),
        Launch(f"moe bwd act {bm}x{bn1}x{bk1}",
               (BWD, "moe_bwd_act_kernel",
                dict(meta, x_ptr="*bf16", dy_ptr="*bf16", w13_ptr="*bf16", s13_ptr="*fp32", w2_ptr="*bf16",
                     s2_ptr="*fp32", topk_w_ptr="*fp32", dgu_ptr="*bf16", hw_ptr="*bf16", dtw_part_ptr="*fp32"),
                dict(TOP_K=TOP_K, QUANT=False, STORE_HW=True, PRECISION="tf32", GROUP_M=group_m, BLOCK_M=bm,
                     BLOCK_N=bn1, BLOCK_K=bk1), c["act_warps"], st1, aligned("moe_bwd_act_kernel")),
               (max_blocks * n1,), round(tiles * n1), round(tiles * n1) * cdiv(HIDDEN, bk1),
               f"K loop {cdiv(HIDDEN, bk1)} trips × {tiles:.1f} active row tiles (of {max_blocks}) × {n1} column tiles",
               2 * n * HIDDEN * inter, act_bytes,
               "3 dots per trip: gate and up recomputed (4·n·hidden·I, not counted) and W2ᵀdy (counted)"),
        Launch(f"moe bwd dx {bm}x{bn2}x{bk2}",
               (BWD, "moe_bwd_dx_kernel",
                dict(meta, dgu_ptr="*bf16", w13_ptr="*bf16", rows_out_ptr="*fp32"),
                dict(QUANT=False, PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=bk2), warps, st2,
                aligned("moe_bwd_dx_kernel")),
               (max_blocks, n2), round(tiles * n2), round(tiles * n2) * cdiv(2 * inter, bk2),
               f"K loop {cdiv(2 * inter, bk2)} trips × {tiles:.1f} active row tiles × {n2} column tiles",
               4 * n * HIDDEN * inter, dx_bytes),
        Launch("moe bwd dx combine",
               (F.__name__, "moe_combine_kernel",
                dict(rows_ptr="*fp32", ids_ptr="*i32", map_ptr="*i32", out_ptr="*bf16"),
                dict(TOP_K=TOP_K, HAS_MAP=False, BLOCK_H=1024), 4, 3, ()),
               (T, cdiv(HIDDEN, 1024)), T * cdiv(HIDDEN, 1024), None, "no dot", 0.0, combine_bytes),
        Launch("moe bwd routing gradient",
               (BWD, "moe_bwd_route_grad_kernel",
                dict(part_ptr="*fp32", ids_ptr="*i32", map_ptr="*i32", out_ptr="*fp32"),
                dict(HAS_MAP=False, BLOCK=1024), 4, 3, ()),
               (cdiv(n, 1024),), cdiv(n, 1024), None, "no dot", 0.0, route_bytes),
        dw_launch("dW13", 2 * inter, HIDDEN, False, 2 * inter, HIDDEN, 4 * n * HIDDEN * inter),
        dw_launch("dW2", HIDDEN, inter, True, HIDDEN, inter, 2 * n * HIDDEN * inter),
    ]
    case.notes = (f"tiles {c}; stages {st1}/{st2}; {touched:.1f} experts touched (expected, uniform routing); "
                  f"max_blocks {max_blocks}; forward not included (see moe-I{inter}-T{T}-bf16)")
    return case


# ----------------------------------------------------------------------------- lightning backward

LB_BWD = "mm1_kernels.lightning.triton_backward"
LB_SWEEP_PTRS = dict(x_ptr="*bf16", y_ptr="*bf16", z_ptr="*bf16", out_ptr="*bf16", slopes_ptr="*fp32",
                     seg_meta_ptr="*i32", seg_state_ptr="*fp32", init_ptr="*fp32", final_ptr="*fp32",
                     sweep_end_ptr="*i32")
# As the prefill: 16-byte-aligned pointers, strides and sizes multiples of 16 at M1's shape.
LB_SWEEP_ALIGNED = ("x_ptr", "y_ptr", "z_ptr", "out_ptr", "seg_state_ptr", "init_ptr", "final_ptr",
                    "stride_xb", "stride_xt", "stride_xh", "stride_yb", "stride_yt", "stride_yh",
                    "stride_zb", "stride_zt", "stride_zh", "stride_ob", "stride_ot", "stride_oh",
                    "H", "DY", "DZ")


def lightning_backward(B: int, T: int, heads: int = H) -> OpCase:
    """The Triton backward (``triton_backward.lightning_backward_triton``) on an H100 (132 SMs):
    three sweeps (dq forward in time; dk, dv backward), each split into local pass, scan and
    output pass when the sequence is long, training from a zero state with no gradient through
    the final state (the model's case: no init, no dfinal, no dinit), precision "default". The
    dk and dv sweeps compile to the same kernel at D = Dv. Counted FLOPs: bench/lightning.py's
    ``backward``.
    ``heads`` < 64 (tensor parallelism) is where the planner splits a sequence into segments."""
    import torch

    from mm1_kernels.lightning import triton_backward as LB

    bz = LB._z_tile(D)
    nz = cdiv(D, bz)
    warps = LB.NUM_WARPS
    with _sm_count_132():
        seg = LB.plan_segments(B * T, B, heads, D, D, torch.device("cuda"))
    case = OpCase(f"lightning-backward-B{B}-T{T}" + (f"-H{heads}" if heads != H else ""), "lightning", "backward",
                  dict(B=B, T=T, H=heads, D=D, dtype="bf16"))
    chunks_total = B * cdiv(T, CHUNK)
    flops_sweep = chunks_total * heads * (4 * CHUNK**2 * D + 4 * CHUNK * D * D)
    xy_tile, z_tile = CHUNK * D * 2, CHUNK * bz * 2   # one chunk of x (or y), of z (or out), bf16
    state_slice = D * bz * 4

    def sweep_kernel(reverse, io_t, local, use_seg):
        return (LB_BWD, "lightning_bwd_sweep_kernel", LB_SWEEP_PTRS,
                dict(C=CHUNK, BY=D, BZ=bz, REVERSE=reverse, IO_T=io_t, LOCAL_PASS=local, USE_SEG_STATE=use_seg,
                     HAS_INIT=False, STORE_FINAL=False, DOT_MODE=LB.BF16_DOT_MODE["default"]), warps, 3,
                LB_SWEEP_ALIGNED)

    def stream_bytes(chunks, with_x, seg_states):
        # Per chunk and z-tile program: y (and x in an output pass) [C, D] read, z [C, BZ] read,
        # out [C, BZ] written (output pass). The nz z-tile programs of a (segment, head) are
        # adjacent in launch order (z tile fastest): they share x and y in L2.
        def f(ctas):
            xy = (2 if with_x else 1) * xy_tile * chunks * heads * nz
            zo = (2 if with_x else 1) * z_tile * chunks * heads * nz
            states = seg_states * heads * nz * state_slice
            xy_l2 = xy / nz if nz <= window(ctas) else xy
            return xy + zo + states, xy_l2 + zo + states, \
                f"x,y {xy / 1e9:.2f} GB (shared by {nz} adjacent z tiles in L2), z,out {zo / 1e9:.2f} GB, " \
                f"states {states / 1e9:.3f} GB"
        return f

    # (name, reverse, init/final seen transposed): as lightning_backward_triton launches them.
    names = (("dq sweep (forward)", False, True), ("dk sweep (reverse)", True, True),
             ("dv sweep (reverse)", True, False))
    if seg is None:
        for name, rev, io_t in names:
            case.launches.append(Launch(
                name, sweep_kernel(rev, io_t, False, False), (B * heads * nz,), B * heads * nz,
                chunks_total * heads * nz,
                f"one chunk loop per program: {cdiv(T, CHUNK)} chunks × {B * heads * nz} programs",
                flops_sweep, stream_bytes(chunks_total, True, 0)))
        case.notes = (f"one segment per sequence (no scratch); 3 sweeps of {B * heads * nz} programs; "
                      "the forward is not included (see the lightning-prefill cases)")
        return case

    nseg = cdiv(T, seg)
    G = cdiv(B * T, seg) + B
    real = B * nseg
    seg_chunks = seg // CHUNK
    local_chunks = B * (nseg - 1) * seg_chunks

    def scan_bytes(ctas):
        b = B * heads * D * D * 4 * ((nseg - 1) * 2 + 1)
        return b, b, "per (seq, head): each local state read and replaced, the last written"

    for name, rev, io_t in names:
        case.launches += [
            Launch(f"{name} local pass", sweep_kernel(rev, io_t, True, False), (G * heads * nz,),
                   B * (nseg - 1) * heads * nz, local_chunks * heads * nz,
                   f"{seg_chunks} chunks × {B * (nseg - 1) * heads * nz} programs "
                   "(all but the segment the sweep ends in)",
                   0.0, stream_bytes(local_chunks, False, B * (nseg - 1)),
                   "extra work of the split: y^T z of those segments again (not in the count)"),
            Launch(f"{name} scan",
                   (LB_BWD, "lightning_bwd_scan_kernel",
                    dict(slopes_ptr="*fp32", seg_meta_ptr="*i32", seg_state_ptr="*fp32", init_ptr="*fp32",
                         sweep_start_ptr="*i32", sweep_end_ptr="*i32"),
                    dict(BY=D, BZ=bz, HAS_INIT=False, IO_T=io_t), 4, 3, ("seg_state_ptr", "init_ptr", "H", "DY", "DZ")),
                   (B, heads, nz), B * heads * nz, None, "no dot", 0.0, scan_bytes),
            Launch(f"{name} output pass", sweep_kernel(rev, io_t, False, True), (G * heads * nz,), real * heads * nz,
                   chunks_total * heads * nz, f"{seg_chunks} chunks per segment × {real * heads * nz} programs",
                   flops_sweep, stream_bytes(chunks_total, True, real)),
        ]
    case.notes = (f"split: segment_len = {seg} tokens, {nseg} segments per sequence, G = {G} grid rows; "
                  f"scratch {G} × H·D·D·4 = {G * heads * D * D * 4 / 2**20:.1f} MiB shared by the 3 sweeps; "
                  "the forward is not included (see the lightning-prefill cases)")
    return case


# ----------------------------------------------------------------------------- dense (consistent mode)

DENSE = "mm1_kernels.dense.triton_linear"


def invariant_linear(T: int, n_out: int, k_in: int, label: str) -> OpCase:
    """``mk.invariant_linear`` (consistent mode's projections) as its Triton backend launches it:
    fixed BLOCK_M × BLOCK_N × BLOCK_K tiles at every row count, grid (row tile, column tile),
    row tile fastest in launch order. Bytes: the row tiles of one column tile are adjacent, so
    the weight tile is read once while the x tiles are re-read per column tile unless L2 keeps
    them; the rule of :func:`_head_l2` (same accounting as the head: x tiles play the hidden
    tiles, weight tiles the vocabulary steps)."""
    from mm1_kernels.dense import triton_linear as L

    bm, bn, bk = L.BLOCK_M, L.BLOCK_N, L.BLOCK_K
    case = OpCase(f"dense-invariant-{label}-T{T}", "dense", "prefill",
                  dict(T=T, N=n_out, K=k_in, dtype="bf16"))
    mt, nt = cdiv(T, bm), cdiv(n_out, bn)
    flops = 2 * T * n_out * k_in

    def f(ctas):
        x_tile, w_tile = bm * k_in * 2, bn * k_in * 2
        x_reads, w_reads, text = _head_l2(mt, nt, nt, mt, window(ctas), x_tile, w_tile)
        out = T * n_out * 2
        no_reuse = mt * nt * (x_tile + w_tile) + out
        return no_reuse, x_reads * x_tile + w_reads * w_tile + out, text + f"; out {out / 1e9:.3f} GB"

    case.launches.append(Launch(
        f"invariant linear {bm}x{bn}x{bk}",
        (DENSE, "invariant_linear_kernel", dict(x_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16"),
         dict(PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), 4, 3,
         tuple(a for a in ("x_ptr", "w_ptr", "out_ptr", "N", "K", "stride_xm", "stride_wn", "stride_om")
               if a in L.invariant_linear_kernel.arg_names)),
        (mt, nt), mt * nt, mt * nt * cdiv(k_in, bk),
        f"K loop {cdiv(k_in, bk)} trips × {mt} row tiles × {nt} column tiles", flops, f))
    case.notes = ("consistent mode's batch-invariant GEMM (one tile shape, no split-K); the default mode "
                  "runs these projections through torch (cuBLAS)")
    return case


def all_cases() -> list[OpCase]:
    out = [lightning_prefill(8, 4096), lightning_prefill(1, 32768), lightning_prefill(1, 1 << 20),
           lightning_prefill(1, 1 << 20, heads=8), lightning_prefill(8, 4096, precision="high")]
    out += [lightning_decode(b) for b in (1, 64, 256)]
    for inter in (9216, 1152):
        for T in (1, 4096, 16384):
            for dt in ("bf16", "int8"):
                out.append(moe(T, inter, dt))
    out += [route(1), route(4096)]
    out += [head_forward(8192), head_forward(8192, compensate=True), head_backward(8192)]
    out += [moe_backward(4096, 9216)]
    out += [lightning_backward(1, 32768), lightning_backward(1, 1 << 20, heads=8)]
    # Consistent mode (mm1_model's consistent=True): the kernels it launches instead.
    out += [lightning_prefill(1, 32768, consistent=True), moe(4096, 9216, "bf16", consistent=True),
            moe(4096, 1152, "bf16", consistent=True),
            invariant_linear(4096, 3 * H * D, HIDDEN, "qkv"), invariant_linear(4096, HIDDEN, H * D, "out")]
    return out


QUICK = "moe-I1152-T4096-bf16"
