"""FP32 LM head in Triton: forward statistics and the backward's logit-gradient blocks.

Forward (``head_forward_triton``)
---------------------------------
One program per (token tile, vocabulary split), launched in a grouped order (below). A
program owns ``BT`` tokens × one split of ``SPLIT_V`` vocabulary ids and walks the split ``BV``
columns at a time; for each ``[BT, BV]`` tile it accumulates ``hidden @ weight.T`` over K in
fp32 (``tl.dot``), scales by 1/temperature and folds the tile into four running fp32
statistics per token:

    m  = max z                     s = Σ exp(z - m)
    u  = Σ exp(z - m) · (z - m)    t = z[target] if the target is in this split, else 0

Rescaling when m grows: ``s ← α s``, ``u ← α (u + (m_old - m) s_old)``, ``α = exp(m_old - m)``.
Each program writes its four numbers per token to ``partials [NSPLIT, 4, T]`` — 16 bytes ×
NSPLIT per token, never a logit. A second kernel merges the splits *in index order* for each
token: ``M = max m_i``, ``S = Σ s_i e^{m_i - M}``, ``U = Σ e^{m_i - M} (u_i + (m_i - M) s_i)``, and

    lse = M + log S,   logprob = (t - M) - log S,   entropy = log S - U / S.

Entropy is never ``lse - Σ p z`` (two ~|z| numbers cancelling to a small one) and the
logprob subtracts M from the target logit first, so neither loses digits to logits of ~100.

Why it is deterministic and batch invariant: no atomics and no lock; every tile shape is a
constant (a function of the dtype, the precision and the layout, not of T), the
number of splits depends only on V, and the merge order is fixed. A row of a ``tl.dot`` tile
depends only on that row's operands, so a token's results are bitwise the same alone or
inside any batch. SPLIT_V = 2048 gives 98 splits for M1's 200,064 vocabulary, so even a decode
batch of one token launches ~100 programs, and a prefill of 8k tokens ~6.3k (128-token tiles).

Program order (``group_t``): the 1-D launch walks groups of group_t token tiles; inside a
group the token tile varies fastest, then the split (``_grouped``; the logit-gradient kernel
uses the same order over its vocabulary tiles). The co-resident programs (132 SMs × CTAs/SM)
are then ~group_t token tiles × ~132/group_t splits: the group_t programs of one split read
the same weight tiles at about the same time (one HBM read per group instead of per token
tile). The order changes which program runs when, never what one computes.

Tiles and cost at M1's prefill shape (T = 8192, V = 200,064, hidden = 6144, bf16; figures
from ``python -m profiles.static --case head-forward-T8192 --case head-backward-T8192``, H100
ceilings; registers from Triton 3.6's ptxas, 3.9 in brackets):
  FLOPs 2·T·V·hidden = 20.14 TFLOP → 20.4 ms at 989 TFLOP/s: the floor (compute-bound).
  Minimum bytes: hidden 0.10 GB + weight 2.46 GB + outputs ≈ 2.56 GB (0.76 ms at 3.35 TB/s).
  Before (128 × 64 × 64 tiles, two-sum on, group 8): 240 regs, no spills, 72 KiB smem,
  1 CTA/SM; HGMMA 64x64x16 (32 FLOP per shared-memory operand byte per warp group); issued ÷
  counted 1.00×; HBM 184× min with no reuse, 7.74× with L2 (hidden tiles stay in L2, the
  weight is read once per group of 8 token tiles: 19.7 GB). The two-sum needs each K block's
  product alone, so every wgmma was waited for (TTGIR ``pendings = 0``) and followed by 7
  fp32 adds per logit: at 128 fp32 adds/clk/SM against 4,096 bf16 FLOP/clk/SM that is 1.75×
  the block's tensor-core time, on the critical path.
  Expected from the change: (1) the two-sum off by default (``precision="default"``, below) →
  the MMAs chain into the
  running logits with one wgmma in flight (``pendings = 1``) and no CUDA-core work in the K
  loop (FADD 332 → 140 per thread in SASS, including the epilogue); (2) 128 × 128 tiles →
  HGMMA 64x128x16 (43 FLOP per operand byte per warp group) and half the no-reuse traffic;
  target columns compared in int32 (the int64 compare cost ~45 registers at 128 × 128).
  After (128 × 128 × 64, plain, group 16): 212 [255] regs, no spills, 96 KiB smem, 1 CTA/SM;
  HGMMA 64x128x16; issued ÷ counted 1.00×; HBM 123× min no reuse, 10.7× with L2 (27.4 GB:
  h 17.5 + w 9.8); modeled 8.2 ms of HBM time under 20.4 ms of MMA: compute-bound at the floor.
  The L2 figure is worse than before, as the model predicts: at 128 × 128 no group size keeps
  hidden tiles in the 25 MiB the model credits (group_t + ⌈132/group_t⌉ ≥ 23 co-resident
  K-complete tiles of 1.5 MiB), so hidden is shared only among programs reading the same K
  slices at once; group_t = 16 balances that against the weight's re-reads (see group_t).
  ``precision="high"`` (the two-sum) keeps the old 128 × 64 build (235 regs, 7.74×).
  Not reachable here: ≤ 2× minimum bytes. That needs the weight read ≤ ~2×, i.e. groups of
  ≥ 4096 tokens whose hidden (≥ 50 MB) stays on chip while the weight streams past; the model
  credits 25 MiB of L2 (~2k tokens of hidden: weight read ≥ 4×, ≥ 3.9× min by any order of
  K-complete programs), and the alternatives are worse (weight in L2, hidden re-read
  V/~2k ≈ 100×: ~10 GB; no residency: 2·K·T·V·(1/Tw + 1/Vw) over co-resident Tw × Vw ≈ 27 GB).
  Beating that needs partial logits summed across CTAs (split K), which this design avoids.

Backward (``head_dlogits_kernel``)
----------------------------------
One kernel computes the gradient w.r.t. the logits of a ``[rows, cols]`` block (recomputing
the logits tile by tile; same products, same accumulation as the forward) from the per-token
upstream gradients and the saved lse / entropy:
``dz = g_lp (onehot - p) + g_lse p - g_ent p (log p + H)``, times 1/temperature. The host
driver ``backward.head_backward_blocks`` visits vocabulary chunks × row blocks in a fixed
order and forms ``dhidden += dz @ W_chunk`` and ``dW_chunk += dz^T @ hidden`` with fp32
accumulation (tensor-core GEMMs on dz rounded to the input dtype for 16-bit inputs on a GPU,
``backward.gemm_operand_dtype``: the kernel stores dz in that dtype directly, the same
round-to-nearest-even the driver did), so the weight gradient accumulates in fp32,
deterministically, and the scratch is one block (≤ 256 MiB), independent of V and bounded in T.
  Before (128 × 64 × 64, 2-D grid, token tile fastest; fp32 dz): 128 regs, 2 CTAs/SM; HBM
  187× min no reuse, 34.3× with L2 (87.7 GB: the 264 co-resident programs cover 2 vocabulary
  tiles × all 64 token tiles, so hidden is re-read for every 4 vocabulary tiles) → 26.2 ms
  modeled on an H100: memory-bound, 78% of the floor.
  After (128 × 128 × 64, grouped by 16 token tiles, bf16 dz): 128 regs, no spills, 96 KiB,
  2 CTAs/SM; HGMMA 64x128x16; HBM 124× / 9.0× (h 9.9 + w 9.8 + dz 3.3 GB): compute-bound at
  the floor (20.4 ms). Expected: the grouping cuts h ~8×, the 128-wide tile halves both
  operands' no-reuse traffic, bf16 dz halves the 6.6 GB store; measured as expected.

Precision: bf16/fp16 operands go to ``tl.dot`` as they are — products exact in fp32, fp32
accumulation (tensor cores with fp32 accumulators on a GPU). fp32 operands use
``input_precision="ieee"`` (no TF32; see ``api.head_logprobs``). Logits never leave fp32.
The public ops' ``precision=`` picks the accumulation across K (every launch helper below
takes it; :data:`TWO_SUM` maps it to the kernels' ``COMPENSATE`` flag):
``"default"``: the MMAs accumulate straight into the running logits, as any fp32-accumulating
GEMM does: at |logit| ~ 100 (one fp32 ulp is 7.6e-6) the running sum drifts by several ulps
over K. Through the interpreter at K = 1024 with a massive-activation channel: max
|Δlogprob| 2.5e-5, against 7.6e-6 with the two-sum and 2.8e-5 for one fp32 GEMM; at
|logit| ≤ 30, 4.6e-6. ``"high"``: each BK-wide block's product is added with a two-sum,
which leaves only the rounding inside one block (the torch backend, fp64 GEMM rounded once,
stays under 1e-5 everywhere); its cost is the 1.75× CUDA-core time and the serialised
wgmmas above, and the second accumulator halves the bf16 tile. The interpreter computes the
block dots in fp64 rounded to fp32 (see ``_triton_interpret``), so CPU runs do not reproduce
a GPU's in-MMA accumulation order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_precision
from .._dispatch import triton_interpret_enabled
from .._triton_interpret import interpreted_with_fixes
from .backward import BACKWARD_VOCAB_CHUNK, TORCH_BLOCK_ELEMENTS, gemm_operand_dtype, head_backward_blocks
from .reference import IGNORE_INDEX

# Tiles: the one place where the CPU interpreter (TRITON_INTERPRET=1, read once at import) and
# a GPU differ, on purpose. Why: tests run through the interpreter at test sizes (T ~ 1-100,
# V ~ 1000-4100), and there the GPU's SPLIT_V = 2048 / BT = 128 would leave one vocabulary
# split and one token tile, so the split merge, the running-max rescaling across splits and
# the partial-tile masks would go untested; SPLIT_V = 512 and BT = 16 exercise them at the
# same sizes. (The interpreter's cost is per program and per tile op, not per element, so the
# extra programs cost little at those sizes.) What this does not change: the math. Every
# configuration computes the same fp32 quantities (tile logits accumulated over K, the same
# merge formulas in split order); only where fp32 rounding happens differs (the two-sum is per
# BK block, the merge per split), which is inside the tolerances the tests hold both to.
# Determinism and batch invariance hold in each configuration, since none depends on T. The
# GPU configuration is compiled and checked by tests/test_head_aot.py, and the interpreter
# tests also run the GPU tile shapes once on a small problem (``tile_shape=``).
#
# GPU tiles (BT, BV, BK), keyed by (fp32 inputs, compensate, fallback): the largest tiles
# whose sm_90a builds have no register spills on Triton 3.6 and 3.9 (ptxas; tests/
# test_head_aot.py holds every entry to that). bf16/fp16 plain: 128 × 128 (two warp groups,
# HGMMA 64x128x16). The compensated build keeps the running logits, the compensation and the
# block product alive through the K loop (3 × 64 registers a thread at 128 × 128): there it
# reaches 255 registers and spills (8 B at 3 stages on 3.6; 300 B before the int32 target
# compare), so it takes 128 × 64. ``fallback`` is the sampling build (STORE_LOGITS also holds
# the store's addresses) and layouts whose width, row strides or pointers are not multiples of
# 16 (no vectorized or pipelined loads): 64 × 128 spills there (212 B), 64 × 64 does not. The
# fp32 (IEEE, CUDA-core) dot needs smaller tiles still. Within one input kind and option every
# entry has the same BK and accumulation, so each logit is summed over the same K blocks in
# the same order (the sampling logits are bitwise the statistics' own, given that an MMA's
# result for one element does not depend on the tile's other rows or columns, which batch
# invariance relies on too). Tiles depend on the dtype, the option and the layout, never on T.
# Chosen for a clean build and the tensor-core shape, not tuned on a GPU (none at hand).
# group_t: token tiles per launch group of the forward and of the logit-gradient kernel (the
# program order in the module docstring); in the interpreter 4, so test sizes (up to ~7 token
# tiles) also run a partial last group.
if triton_interpret_enabled():
    _GPU = False
    SPLIT_V, MERGE_BT, NUM_WARPS = 512, 64, 4
else:
    _GPU = True
    SPLIT_V, MERGE_BT, NUM_WARPS = 2048, 128, 8
GPU_TILES = {
    # (fp32, compensate, fallback): (BT, BV, BK)
    (False, False, False): (128, 128, 64), (False, False, True): (64, 64, 64),
    (False, True, False): (128, 64, 64), (False, True, True): (64, 64, 64),
    (True, False, False): (32, 64, 32), (True, False, True): (32, 32, 32),
    (True, True, False): (32, 64, 32), (True, True, True): (32, 64, 32),
}
# The logit-gradient kernel has no running statistics: 128 × 128 fits compensated too (255
# registers, 1 CTA/SM; 128 registers and 2 CTAs/SM without the two-sum). ``fallback``: h, w or
# dz not aligned to 16 (no vectorized loads and stores; 128 × 128 spills there).
GPU_DLOGITS_TILES = {
    # (fp32, compensate, fallback): (BT, BV, BK)
    (False, False, False): (128, 128, 64), (False, False, True): (128, 64, 64),
    (False, True, False): (128, 128, 64), (False, True, True): (64, 64, 64),
    (True, False, False): (32, 64, 32), (True, False, True): (32, 64, 32),
    (True, True, False): (32, 64, 32), (True, True, True): (32, 64, 32),
}
_INTERPRETER_TILES = (16, 128, 32)
# precision= → the two-sum across K blocks (the kernels' COMPENSATE flag; "Precision" in the
# module docstring). Off in "default", since its cost on a GPU is not small (7 fp32 adds per
# logit per 64-wide K block, ~1.75x the block's tensor-core time, and the bf16 tile halves to
# stay spill-free); "high" turns it on.
TWO_SUM = {"default": False, "high": True}


def _two_sum(precision: str) -> bool:
    check_precision(precision)
    return TWO_SUM[precision]


def tiles(fp32: bool, compensate: bool, fallback: bool = False) -> tuple[int, int, int]:
    """(BT, BV, BK) of the forward (statistics and sampling logits) for this configuration."""
    return GPU_TILES[(fp32, compensate, fallback)] if _GPU else _INTERPRETER_TILES


def dlogits_tiles(fp32: bool, compensate: bool, fallback: bool = False) -> tuple[int, int, int]:
    """(BT, BV, BK) of the logit-gradient kernel; BK and the accumulation match :func:`tiles`."""
    return GPU_DLOGITS_TILES[(fp32, compensate, fallback)] if _GPU else _INTERPRETER_TILES


def group_t(tile_shape) -> int:
    """Token tiles per launch group for these tiles (program order only; never changes a
    result). 128 × 64 and smaller: 8, where 8 hidden tiles + the co-resident programs' weight
    steps fit the L2 (hidden read once, weight once per group). 128 × 128: no group size fits
    (each [128, 6144] tile is 1.5 MiB), so 16 balances the weight's reads (once per group) with
    the hidden's (once per ⌈132/16⌉ co-resident vocabulary steps); see profiles/static."""
    return gpu_group_t(tile_shape) if _GPU else 4


def gpu_group_t(tile_shape) -> int:
    bt, bv, _ = tile_shape
    return 16 if bt * bv >= 128 * 128 else 8


assert all(SPLIT_V % bv == 0 for _, bv, _ in (*GPU_TILES.values(), _INTERPRETER_TILES))
assert all(GPU_DLOGITS_TILES[(f, c, b)][2] == GPU_TILES[(f, c, b2)][2] for f in (False, True)
           for c in (False, True) for b in (False, True) for b2 in (False, True))
# A far-below-any-logit start for the running max: finite, so (m_old - m) * s_old is 0, not NaN.
NEG_BIG = tl.constexpr(-3.0e38)


@triton.jit
def _grouped(pid, n_t, n_v, GROUP_T: tl.constexpr):
    """(token tile, vocabulary tile or split) of program ``pid`` in grouped order: groups of
    GROUP_T token tiles; inside a group the token tile varies fastest, then the vocabulary
    index. The order decides when a program runs, never what it computes."""
    per_group = GROUP_T * n_v
    first_t = (pid // per_group) * GROUP_T
    group_size = tl.minimum(n_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    return pid_t, pid_v


@triton.jit
def _logit_tile(h_ptr, w_ptr, offs_t, offs_v, mask_t, mask_v, K, stride_h, stride_w, inv_temp,
                BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, FP32_INPUTS: tl.constexpr,
                COMPENSATE: tl.constexpr):
    # fp32 [BT, BV] tempered logits of tokens offs_t × vocabulary ids offs_v (precision: see
    # the module docstring). Plain: the MMA accumulates into the running logits (one chain of
    # tensor-core MMAs, each waiting only on the one before it: pendings = 1 in the TTGIR).
    # COMPENSATE: each BK block's product comes out of a fresh MMA and is folded into (acc,
    # comp) with a two-sum, which leaves only the rounding inside one block; the fold needs the
    # product, so every MMA is waited for (pendings = 0) and costs 7 fp32 adds per logit.
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    comp = tl.zeros([BT, BV], dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(h_rows + kk[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_rows + kk[None, :], mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        if COMPENSATE:
            if FP32_INPUTS:
                blk = tl.dot(a, tl.trans(b), input_precision="ieee")
            else:  # 16-bit products are exact in fp32; accumulation is fp32
                blk = tl.dot(a, tl.trans(b))
            tot = acc + blk
            bp = tot - acc
            comp += (acc - (tot - bp)) + (blk - bp)
            acc = tot
        elif FP32_INPUTS:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if COMPENSATE:
        acc += comp
    return acc * inv_temp


@interpreted_with_fixes
@triton.jit
def head_split_stats_kernel(
    h_ptr, w_ptr, tgt_ptr, part_ptr, logits_ptr,
    T, V, K, stride_h, stride_w, stride_logits, inv_temp, split_v,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, FP32_INPUTS: tl.constexpr,
    COMPENSATE: tl.constexpr, STORE_LOGITS: tl.constexpr, GROUP_T: tl.constexpr,
):
    """partials[split, 0..3, token] = (m, s, u, t) over one vocabulary split.

    1-D grid of cdiv(T, BT) × nsplit programs in grouped order: GROUP_T token tiles, token
    tile fastest, then the split (see the module docstring). STORE_LOGITS (head_sample only)
    also writes the fp32 tempered logits to ``[T, V]``.
    """
    nsplit = tl.cdiv(V, split_v)
    pid_t, split = _grouped(tl.program_id(0), tl.cdiv(T, BT), nsplit, GROUP_T)
    offs_t = pid_t * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    tgt = tl.load(tgt_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64)
    m = tl.full([BT], NEG_BIG, tl.float32)
    s = tl.zeros([BT], dtype=tl.float32)
    u = tl.zeros([BT], dtype=tl.float32)
    t_logit = tl.zeros([BT], dtype=tl.float32)
    v_start = split * split_v
    v_end = tl.minimum(v_start + split_v, V)
    for v0 in range(v_start, v_end, BV):
        offs_v = v0 + tl.arange(0, BV)
        mask_v = offs_v < v_end
        z = _logit_tile(h_ptr, w_ptr, offs_t, offs_v, mask_t, mask_v, K, stride_h, stride_w,
                        inv_temp, BT, BV, BK, FP32_INPUTS, COMPENSATE)
        if STORE_LOGITS:  # stored first: z's pointers need not stay live through the statistics
            lptrs = logits_ptr + offs_t.to(tl.int64)[:, None] * stride_logits + offs_v[None, :]
            tl.store(lptrs, z, mask=mask_t[:, None] & mask_v[None, :])
        # The target's column in this tile (or -1), compared in int32: int64 column ids would
        # hold two registers per logit column a thread owns.
        t_col = tl.where((tgt >= v0) & (tgt < v0 + BV), tgt - v0, -1).to(tl.int32)
        hit = (tl.arange(0, BV)[None, :] == t_col[:, None]) & mask_v[None, :]
        t_logit += tl.sum(tl.where(hit, z, 0.0), axis=1)
        # Every tile holds at least one valid column, so m_new is a real logit.
        m_new = tl.maximum(m, tl.max(tl.where(mask_v[None, :], z, NEG_BIG), axis=1))
        alpha = tl.exp(m - m_new)
        d = tl.where(mask_v[None, :], z - m_new[:, None], 0.0)
        e = tl.where(mask_v[None, :], tl.exp(d), 0.0)
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    base = part_ptr + split.to(tl.int64) * 4 * T + offs_t
    tl.store(base, m, mask=mask_t)
    tl.store(base + T, s, mask=mask_t)
    tl.store(base + 2 * T, u, mask=mask_t)
    tl.store(base + 3 * T, t_logit, mask=mask_t)


@interpreted_with_fixes
@triton.jit
def head_merge_splits_kernel(
    part_ptr, tgt_ptr, lp_ptr, lse_ptr, ent_ptr, T, nsplit,
    IGNORE: tl.constexpr, BT: tl.constexpr,
):
    """Combine the splits of each token in split order: logprob, lse, entropy."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    # Walk the splits by pointer increments, not i · 4T: that int32 product wraps once
    # nsplit · 4 · T passes 2^31 (~5.5M tokens at M1's vocabulary).
    M = tl.full([BT], NEG_BIG, tl.float32)
    base = part_ptr + offs_t
    for _ in range(0, nsplit):
        M = tl.maximum(M, tl.load(base, mask=mask_t, other=0.0))
        base += 4 * T
    S = tl.zeros([BT], dtype=tl.float32)
    U = tl.zeros([BT], dtype=tl.float32)
    t_logit = tl.zeros([BT], dtype=tl.float32)
    base = part_ptr + offs_t
    for _ in range(0, nsplit):
        m_i = tl.load(base, mask=mask_t, other=0.0)
        s_i = tl.load(base + T, mask=mask_t, other=1.0)  # rows past T: keep log S finite
        u_i = tl.load(base + 2 * T, mask=mask_t, other=0.0)
        t_logit += tl.load(base + 3 * T, mask=mask_t, other=0.0)
        scale = tl.exp(m_i - M)
        S += scale * s_i
        U += scale * (u_i + (m_i - M) * s_i)
        base += 4 * T
    log_s = tl.log(S)
    tgt = tl.load(tgt_ptr + offs_t, mask=mask_t, other=IGNORE)
    lp = tl.where(tgt == IGNORE, 0.0, (t_logit - M) - log_s)
    tl.store(lp_ptr + offs_t, lp, mask=mask_t)
    tl.store(lse_ptr + offs_t, M + log_s, mask=mask_t)
    tl.store(ent_ptr + offs_t, log_s - U / S, mask=mask_t)


@interpreted_with_fixes
@triton.jit
def head_dlogits_kernel(
    h_ptr, w_ptr, tgt_ptr, g_lp_ptr, g_lse_ptr, g_ent_ptr, lse_ptr, ent_ptr, dz_ptr,
    rows, cols, v0, K, stride_h, stride_w, stride_dz, inv_temp,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, FP32_INPUTS: tl.constexpr,
    COMPENSATE: tl.constexpr, GROUP_T: tl.constexpr,
):
    """dz[r, c] = d(Σ g·outputs) / d logit[r, v0 + c] for one [rows, cols] block.

    1-D grid of cdiv(rows, BT) × cdiv(cols, BV) programs in grouped order (``_grouped``). dz
    is stored in dz's dtype: fp32, or the 16-bit input dtype when the caller's gradient GEMMs
    round it to that anyway (the same round-to-nearest-even conversion, done here once).
    """
    pid_t, pid_c = _grouped(tl.program_id(0), tl.cdiv(rows, BT), tl.cdiv(cols, BV), GROUP_T)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_c = pid_c * BV + tl.arange(0, BV)
    mask_t = offs_t < rows
    mask_c = offs_c < cols
    z = _logit_tile(h_ptr, w_ptr, offs_t, offs_c, mask_t, mask_c, K, stride_h, stride_w, inv_temp,
                    BT, BV, BK, FP32_INPUTS, COMPENSATE)
    lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
    ent = tl.load(ent_ptr + offs_t, mask=mask_t, other=0.0)
    g_lp = tl.load(g_lp_ptr + offs_t, mask=mask_t, other=0.0)   # already 0 on ignored rows
    g_lse = tl.load(g_lse_ptr + offs_t, mask=mask_t, other=0.0)
    g_ent = tl.load(g_ent_ptr + offs_t, mask=mask_t, other=0.0)
    tgt = tl.load(tgt_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    g = p * (g_lse - g_lp)[:, None] - (g_ent[:, None] * p) * (logp + ent[:, None])
    c0 = v0 + pid_c * BV  # vocabulary id of this tile's first column; int32 compare as the forward
    t_col = tl.where((tgt >= c0) & (tgt < c0 + BV), tgt - c0, -1).to(tl.int32)
    hit = tl.arange(0, BV)[None, :] == t_col[:, None]
    g = tl.where(hit, g + g_lp[:, None], g) * inv_temp
    ptrs = dz_ptr + offs_t.to(tl.int64)[:, None] * stride_dz + offs_c[None, :]
    tl.store(ptrs, g.to(dz_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_c[None, :])


def num_splits(vocab: int, split_v: int = SPLIT_V) -> int:
    """Vocabulary splits of the forward: a function of V only (batch invariance)."""
    return triton.cdiv(vocab, split_v)


def _aligned(*tensors) -> bool:
    """Widths, row strides and pointers multiples of 16 (Triton then vectorizes and pipelines)."""
    return all(x % 16 == 0 for t in tensors for x in (t.shape[1], t.stride(0), t.data_ptr()))


def head_forward_triton(hidden, weight, targets, temperature: float, split_v: int = SPLIT_V,
                        logits_out=None, precision: str = "default", tile_shape=None):
    """fp32 (logprobs, lse, entropy) ``[T]``; hidden ``[T, K]``, weight ``[V, K]`` contiguous.

    ``logits_out``: optional fp32 ``[T, V]`` (unit last stride) that receives the tempered
    logits the statistics were computed from (for sampling; never used by the training path).
    ``precision``: ``"high"`` adds the two-sum across K blocks (:data:`TWO_SUM`). ``tile_shape``:
    (BT, BV, BK) instead of :func:`tiles` (tests run the GPU shapes through the interpreter).
    """
    T, K = hidden.shape
    V = weight.shape[0]
    fp32 = hidden.dtype == torch.float32
    compensate = _two_sum(precision)
    fallback = logits_out is not None or not _aligned(hidden, weight)
    bt, bv, bk = tile_shape or tiles(fp32, compensate, fallback)
    if split_v % bv:
        raise ValueError(f"split_v must be a multiple of {bv}, got {split_v}")
    nsplit = num_splits(V, split_v)
    partials = torch.empty(nsplit, 4, T, dtype=torch.float32, device=hidden.device)
    head_split_stats_kernel[(triton.cdiv(T, bt) * nsplit,)](
        hidden, weight, targets, partials, partials if logits_out is None else logits_out,
        T, V, K, hidden.stride(0), weight.stride(0),
        0 if logits_out is None else logits_out.stride(0), 1.0 / temperature, split_v,
        BT=bt, BV=bv, BK=bk, FP32_INPUTS=fp32, COMPENSATE=compensate,
        STORE_LOGITS=logits_out is not None, GROUP_T=group_t((bt, bv, bk)), num_warps=NUM_WARPS)
    lp, lse, ent = (torch.empty(T, dtype=torch.float32, device=hidden.device) for _ in range(3))
    head_merge_splits_kernel[(triton.cdiv(T, MERGE_BT),)](
        partials, targets, lp, lse, ent, T, nsplit, IGNORE=IGNORE_INDEX, BT=MERGE_BT)
    return lp, lse, ent


def head_logits_triton(hidden, weight, temperature: float, precision: str = "default",
                       tile_shape=None):
    """fp32 ``[T, V]`` tempered logits, bitwise those this call's statistics use.

    On a GPU the bf16/fp16 build has 64-token tiles here (``fallback`` in :func:`tiles`) and
    128 in :func:`head_forward_triton`; both sum each logit over the same BK blocks in the
    same order.
    """
    T, V = hidden.shape[0], weight.shape[0]
    logits = torch.empty(T, V, dtype=torch.float32, device=hidden.device)
    no_targets = torch.full((T,), IGNORE_INDEX, dtype=torch.int64, device=hidden.device)
    head_forward_triton(hidden, weight, no_targets, temperature, logits_out=logits,
                        precision=precision, tile_shape=tile_shape)
    return logits


def head_dlogits_triton(hidden, weight, targets, g_lp, g_lse, g_ent, lse, entropy,
                        temperature: float, v0: int = 0, out=None, precision: str = "default",
                        tile_shape=None):
    """Gradient w.r.t. the tempered logits of rows ``hidden`` × vocabulary ids ``v0 + [0, V)``
    (``weight`` is those V rows), written to ``out`` (``[T, V]``, fp32 or the input dtype;
    default a new fp32 tensor) and returned. Per-row arguments are ``[T]``."""
    rows, K = hidden.shape
    cols = weight.shape[0]
    fp32 = hidden.dtype == torch.float32
    compensate = _two_sum(precision)
    if out is None:
        out = torch.empty(rows, cols, dtype=torch.float32, device=hidden.device)
    bt, bv, bk = tile_shape or dlogits_tiles(fp32, compensate, not _aligned(hidden, weight, out))
    head_dlogits_kernel[(triton.cdiv(rows, bt) * triton.cdiv(cols, bv),)](
        hidden, weight, targets, g_lp, g_lse, g_ent, lse, entropy, out, rows, cols, v0, K,
        hidden.stride(0), weight.stride(0), out.stride(0), 1.0 / temperature,
        BT=bt, BV=bv, BK=bk, FP32_INPUTS=fp32, COMPENSATE=compensate, GROUP_T=group_t((bt, bv, bk)),
        num_warps=NUM_WARPS)
    return out


def head_backward_triton(g_lp, g_lse, g_ent, hidden, weight, targets, lse, entropy,
                         temperature: float, vocab_chunk: int = BACKWARD_VOCAB_CHUNK,
                         need_dweight: bool = True, precision: str = "default"):
    """(dhidden, dweight) in the inputs' dtypes; see the module docstring. ``precision``: the
    forward's (the logits are recomputed with the same accumulation)."""
    bt = dlogits_tiles(hidden.dtype == torch.float32, _two_sum(precision))[0]
    rows_per_block = max(bt, TORCH_BLOCK_ELEMENTS // vocab_chunk)
    # The driver's gradient GEMMs take dz in gemm_operand_dtype: store it in that dtype here
    # (one rounding, the one the driver would do) instead of fp32 + a conversion pass.
    dz_dtype = gemm_operand_dtype(hidden)

    def dz_block(t0, t1, v0, v1):
        dz = torch.empty(t1 - t0, v1 - v0, dtype=dz_dtype, device=hidden.device)
        return head_dlogits_triton(hidden[t0:t1], weight[v0:v1], targets[t0:t1], g_lp[t0:t1],
                                   g_lse[t0:t1], g_ent[t0:t1], lse[t0:t1], entropy[t0:t1],
                                   temperature, v0=v0, out=dz, precision=precision)

    return head_backward_blocks(hidden, weight, dz_block, rows_per_block, vocab_chunk, need_dweight)
