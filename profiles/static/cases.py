"""What the package launches at M1's shapes, and the model of each launch.

Every entry names one kernel compilation (module, kernel, argument types, constexprs, warps,
stages, the divisibility hints Triton's JIT attaches at run time) exactly as the package's
launcher would choose it at that shape (its own planning functions: ``choose_segment_len`` and
``_value_tile`` for the lightning prefill with an H100's 132 SMs, ``moe_config``/``fit_stages``
for the MoE GEMMs, ``triton_head.TILES`` on a GPU), plus:

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


def lightning_prefill(B: int, T: int) -> OpCase:
    import torch

    from mm1_kernels.lightning import triton_prefill as P

    bv = P._value_tile(D)
    nv = cdiv(D, bv)
    with _sm_count_132():
        seg = P.choose_segment_len(B * T, B, H, nv, H * D * D * 4, torch.device("cuda"))
    case = OpCase(f"lightning-prefill-B{B}-T{T}", "lightning", "prefill", dict(B=B, T=T, H=H, D=D, dtype="bf16"))
    chunks_total = B * cdiv(T, CHUNK)               # chunks per (head, value tile)
    flops_op = chunks_total * H * (4 * CHUNK**2 * D + 4 * CHUNK * D * D)
    qk_tile, v_tile = CHUNK * D * 2, CHUNK * bv * 2  # bytes of one chunk of q (or k), of v (or o)
    state_slice = D * bv * 4
    base = dict(C=CHUNK, BD=D, BV=bv, HAS_SLOTS=False, DOT_MODE="bf16x2")

    def seg_kernel(local, use_seg, final):
        return (PREFILL, "lightning_segment_kernel", PREFILL_PTRS,
                dict(base, LOCAL_PASS=local, USE_SEG_STATE=use_seg, HAS_INIT=False, STORE_FINAL=final),
                8, 3, PREFILL_ALIGNED)

    def out_bytes(G, n_last, use_seg):
        # Output/single pass: per chunk q, k ([C, D] bf16), v ([C, BV]) read, o ([C, BV]) written;
        # the incoming state slice read (split), the final state slice written (last segments).
        def f(ctas):
            progs = G * H * nv
            qk = 2 * qk_tile * chunks_total * H * nv
            vo = 2 * v_tile * chunks_total * H * nv
            states = (progs * state_slice if use_seg else 0) + n_last * H * nv * state_slice
            # q, k shared by the nv value-tile programs of a (segment, head): launch distance G·H.
            shared = G * H < window(ctas)
            qk_l2 = qk / nv if shared else qk
            text = (f"q,k {qk / 1e9:.2f} GB (each re-read by the {nv} value tiles; L2 shares them only if "
                    f"G·H = {G * H} < W = {window(ctas)}: {'yes' if shared else 'no'}), v,o {vo / 1e9:.2f} GB, "
                    f"states {states / 1e9:.3f} GB")
            return qk + vo + states, qk_l2 + vo + states, text
        return f

    if seg is None:
        G = B
        case.launches.append(Launch(
            "prefill single pass", seg_kernel(False, False, True), (G, H, nv), G * H * nv,
            chunks_total * H * nv, f"one chunk loop per program: {cdiv(T, CHUNK)} chunks × {G * H * nv} programs",
            flops_op, out_bytes(G, B, False)))
        case.notes = f"one segment per sequence (B·H·nv = {B * H * nv} programs ≥ 8 × 132)"
        return case

    nseg = cdiv(T, seg)                               # per sequence
    G = cdiv(B * T, seg) + B                          # grid rows (static bound; extra rows idle)
    real = B * nseg
    seg_chunks = seg // CHUNK
    local_chunks = B * (nseg - 1) * seg_chunks        # non-last segments hold exactly seg tokens

    def local_bytes(ctas):
        kv = (qk_tile + v_tile) * local_chunks * H * nv
        shared = G * H < window(ctas)
        k_l2 = qk_tile * local_chunks * H * (1 if shared else nv)
        st = B * (nseg - 1) * H * nv * state_slice
        return kv + st, k_l2 + v_tile * local_chunks * H * nv + st, \
            f"k,v {kv / 1e9:.2f} GB (k shared across value tiles: {'yes' if shared else 'no'}), local states written"

    def scan_bytes(ctas):
        b = B * H * nv * ((nseg - 1) * 2 * state_slice + state_slice)
        return b, b, "per (seq, head, value tile): each local state read and replaced, the last written"

    case.notes = (f"split: segment_len = {seg} tokens ({seg_chunks} chunks), {nseg} segments per sequence, "
                  f"grid rows G = {G} ({G - real} idle), B·H·nv = {B * H * nv} < 8 × 132")
    case.launches += [
        Launch("prefill local pass", seg_kernel(True, False, False), (G, H, nv), B * (nseg - 1) * H * nv,
               local_chunks * H * nv, f"{seg_chunks} chunks × {B * (nseg - 1) * H * nv} non-last-segment programs",
               0.0, local_bytes, "extra work of the split: K^T V of non-last segments again (not in the count)"),
        Launch("prefill segment scan",
               (PREFILL, "lightning_segment_scan_kernel",
                dict(slopes_ptr="*fp32", seg_state_ptr="*fp32", init_state_ptr="*fp32", seq_first_seg_ptr="*i32",
                     seq_last_seg_ptr="*i32", slot_ptr="*i32"),
                dict(BD=D, BV=bv, HAS_INIT=False, HAS_SLOTS=False), 4, 3,
                ("seg_state_ptr", "init_state_ptr", "H", "D", "DV")),
               (B, H, nv), B * H * nv, None, "no dot", 0.0, scan_bytes),
        Launch("prefill output pass", seg_kernel(False, True, True), (G, H, nv), real * H * nv,
               chunks_total * H * nv, f"{seg_chunks} chunks per segment × {real * H * nv} programs",
               flops_op, out_bytes(G, B, True)),
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


def moe(T: int, inter: int, dtype: str) -> OpCase:
    from mm1_kernels.moe import triton_fused_moe as F

    from bench.moe import touched_experts

    case = OpCase(f"moe-I{inter}-T{T}-{dtype}", "moe", "prefill" if T > 64 else "decode",
                  dict(T=T, hidden=HIDDEN, I=inter, E=E, top_k=TOP_K, dtype=dtype))
    q = dtype == "int8"
    wt, w_elt = ("i8", 1) if q else ("bf16", 2)
    n = T * TOP_K
    c = F.moe_config(inter, HIDDEN, T)
    direct = n <= F.DIRECT_MAX_ENTRIES
    bm = 16 if direct else c["BLOCK_M"]
    group_m = n if direct else c["GROUP_M"]
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

def _head_tiles():
    """triton_head's GPU tiles for bf16 inputs (this process runs without the interpreter)."""
    from mm1_kernels.head import triton_head as TH

    bt, bv, bk = TH.TILES[False]
    return bt, bv, bk, TH.SPLIT_V, TH.MERGE_BT, TH.NUM_WARPS


def _head_group_t() -> int:
    from mm1_kernels.head import triton_head as TH
    return TH.GROUP_T


def _compensate() -> bool:
    from mm1_kernels.head import triton_head as TH
    return bool(TH.COMPENSATE)


def head_forward(T: int) -> OpCase:
    bt, bv, bk, split_v, merge_bt, warps = _head_tiles()
    nsplit = cdiv(VOCAB, split_v)
    ttiles = cdiv(T, bt)
    vtiles = sum(cdiv(min(split_v, VOCAB - s * split_v), bv) for s in range(nsplit))
    ksteps = cdiv(HIDDEN, bk)
    case = OpCase(f"head-forward-T{T}", "head", "logprobs", dict(T=T, hidden=HIDDEN, V=VOCAB, dtype="bf16"))
    h_tile = bt * HIDDEN * 2
    w_step = bv * HIDDEN * 2
    group_t = _head_group_t()
    groups = cdiv(ttiles, group_t)

    def split_bytes(ctas):
        it = ttiles * vtiles * ksteps
        h = it * bt * bk * 2
        w = it * bv * bk * 2
        part = nsplit * 4 * T * 4 + ttiles * nsplit * bt * 8
        W = window(ctas)
        # Launch order: groups of group_t token tiles, token tile fastest inside a group, then
        # the split. w: the ≤ group_t programs of one split in a group are adjacent (distance
        # < group_t ≤ W), so each group reads the weight once.
        gt = min(group_t, ttiles)
        w_l2 = VOCAB * HIDDEN * 2 * groups * max(1, cdiv(gt, W))
        # h: each program re-reads its [BT, hidden] tile for every BV-wide vocabulary step. In
        # between, the W co-resident programs (gt token tiles × ~W/gt splits) stream their gt
        # hidden tiles and one [BV, hidden] weight step per split. If that fits, a token tile's
        # hidden is read once: its programs are gt apart in launch order (< W), so one of them
        # is resident from the group's first to its last split; else every step re-reads it,
        # shared by the co-resident programs of the same token tile.
        sp = min(nsplit, cdiv(W, gt))
        between = gt * h_tile + sp * w_step
        hit = between <= L2_USABLE
        h_l2 = T * HIDDEN * 2 if hit else h / sp
        return (h + w + part, h_l2 + w_l2 + part,
                f"per K step a [{bt},{bk}] h tile and a [{bv},{bk}] w tile: h {h / 1e9:.1f} GB, w {w / 1e9:.1f} GB; "
                f"L2 (groups of {group_t} token tiles, token fastest): w once per group ({groups} groups, "
                f"{w_l2 / 1e9:.2f} GB); h re-read per vocabulary step unless {gt} h tiles + {sp} w steps = "
                f"{between / 2**20:.1f} MiB ≤ {L2_USABLE / 2**20:.0f} MiB: "
                f"{'hit' if hit else 'miss'} ({h_l2 / 1e9:.2f} GB)")

    def merge_bytes(ctas):
        b = nsplit * 4 * T * 4 + T * 8 + 3 * T * 4
        return b, b, "partials read, lp/lse/entropy written"

    case.launches += [
        Launch(f"head split_stats {bt}x{bv}x{bk}",
               (HEAD, "head_split_stats_kernel",
                dict(h_ptr="*bf16", w_ptr="*bf16", inv_temp="fp32", tgt_ptr="*i64", part_ptr="*fp32",
                     logits_ptr="*fp32"),
                dict(BT=bt, BV=bv, BK=bk, FP32_INPUTS=False, COMPENSATE=_compensate(), STORE_LOGITS=False,
                     GROUP_T=group_t),
                warps, 3, ("h_ptr", "w_ptr", "tgt_ptr", "part_ptr", "T", "V", "K", "stride_h", "stride_w")),
               (ttiles * nsplit,), ttiles * nsplit, ttiles * vtiles * ksteps,
               f"K loop {ksteps} trips inside the vocabulary loop ({vtiles} {bv}-wide steps over all "
               f"{nsplit} splits) × {ttiles} token tiles",
               2 * T * VOCAB * HIDDEN, split_bytes),
        Launch("head merge", (HEAD, "head_merge_splits_kernel",
                              dict(part_ptr="*fp32", tgt_ptr="*i64", lp_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32"),
                              dict(IGNORE=-100, BT=merge_bt), 4, 3, ()),
               (cdiv(T, merge_bt),), cdiv(T, merge_bt), None, "no dot", 0.0, merge_bytes),
    ]
    case.notes = ("compiled with the divisibility hints the JIT attaches at M1's sizes (T, V = 200,064, "
                  "hidden = 6144 and the pointers; tests/test_head_aot.py compiles without them)")
    return case


def head_backward(T: int) -> OpCase:
    from mm1_kernels.head.backward import BACKWARD_VOCAB_CHUNK, TORCH_BLOCK_ELEMENTS

    bt, bv, bk, _split, _mbt, warps = _head_tiles()
    rows = max(bt, TORCH_BLOCK_ELEMENTS // BACKWARD_VOCAB_CHUNK)
    chunks = cdiv(VOCAB, BACKWARD_VOCAB_CHUNK)
    rblocks = cdiv(T, rows)
    ttiles = cdiv(T, bt)
    vtiles = sum(cdiv(min(BACKWARD_VOCAB_CHUNK, VOCAB - c * BACKWARD_VOCAB_CHUNK), bv) for c in range(chunks))
    ksteps = cdiv(HIDDEN, bk)
    case = OpCase(f"head-backward-T{T}", "head", "logprobs_fwd_bwd",
                  dict(T=T, hidden=HIDDEN, V=VOCAB, dtype="bf16"))

    def f(ctas):
        progs = ttiles * vtiles
        h = progs * bt * HIDDEN * 2
        w = progs * bv * HIDDEN * 2
        dz = T * VOCAB * 4
        W = window(ctas)
        per_tile = min(cdiv(min(T, rows), bt), ttiles)  # token tiles per launch (pid 0)
        w_l2 = VOCAB * HIDDEN * 2 * max(1, cdiv(per_tile, W))
        share = max(1, W // per_tile)                    # co-resident column tiles sharing an h tile
        h_l2 = h / share
        return (h + w + dz, h_l2 + w_l2 + dz,
                f"h {h / 1e9:.1f} GB, w {w / 1e9:.1f} GB, dz fp32 written {dz / 1e9:.2f} GB; L2: w once per "
                f"launch, h shared by {share} co-resident column tiles")

    case.launches.append(Launch(
        f"head dlogits {bt}x{bv}x{bk}",
        (HEAD, "head_dlogits_kernel",
         dict(h_ptr="*bf16", w_ptr="*bf16", inv_temp="fp32", tgt_ptr="*i64", g_lp_ptr="*fp32", g_lse_ptr="*fp32",
              g_ent_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32", dz_ptr="*fp32"),
         dict(BT=bt, BV=bv, BK=bk, FP32_INPUTS=False, COMPENSATE=_compensate()), warps, 3,
         ("h_ptr", "w_ptr", "tgt_ptr", "dz_ptr", "rows", "cols", "v0", "K", "stride_h", "stride_w", "stride_dz")),
        (ttiles, cdiv(BACKWARD_VOCAB_CHUNK, bv)), ttiles * vtiles, ttiles * vtiles * ksteps,
        f"K loop {ksteps} trips × {ttiles * vtiles} programs over {chunks} vocabulary chunks × {rblocks} row "
        f"blocks (one launch each)", 2 * T * VOCAB * HIDDEN, f,
        "recomputes the logits (2·T·V·hidden, compared with that); the two gradient GEMMs run in cuBLAS "
        "(torch.mm) and are not read here"))
    case.notes = (f"{chunks * rblocks} launches of grid ({ttiles}, {cdiv(BACKWARD_VOCAB_CHUNK, bv)}); "
                  "only the Triton kernel is modeled; the op's counted FLOPs include 4·T·V·hidden in cuBLAS")
    return case


def all_cases() -> list[OpCase]:
    out = [lightning_prefill(8, 4096), lightning_prefill(1, 32768), lightning_prefill(1, 1 << 20)]
    out += [lightning_decode(b) for b in (1, 64, 256)]
    for inter in (9216, 1152):
        for T in (1, 4096, 16384):
            for dt in ("bf16", "int8"):
                out.append(moe(T, inter, dt))
    out += [route(1), route(4096)]
    out += [head_forward(8192), head_backward(8192)]
    return out


QUICK = "moe-I1152-T4096-bf16"
