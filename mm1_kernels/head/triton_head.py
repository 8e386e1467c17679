"""FP32 LM head in Triton: forward statistics and the backward's logit-gradient blocks.

Forward (``head_forward_triton``)
---------------------------------
One program per (token tile, vocabulary split), launched in a grouped order (below). A
program owns ``BT`` tokens × one split of
``SPLIT_V`` vocabulary ids and walks the split ``BV`` columns at a time; for each ``[BT, BV]``
tile it accumulates ``hidden @ weight.T`` over K in fp32 (``tl.dot``), scales by
1/temperature and folds the tile into four running fp32 statistics per token:

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
constant (not chosen from T), the number of splits depends only on V, and the merge order is
fixed. A row of a ``tl.dot`` tile depends only on that row's operands, so a token's results
are bitwise the same alone or inside any batch. The split count trades grid size for merge
traffic: SPLIT_V = 2048 gives 98 splits for M1's 200,064 vocabulary, so even a decode batch of
one token launches ~100 programs, and a prefill of 8k tokens ~6.3k (128-token tiles).

Program order (GROUP_T): the 1-D launch walks groups of GROUP_T token tiles; inside a group
the token tile varies fastest, then the split. The co-resident programs (132 SMs × 1 CTA) are
then ~GROUP_T token tiles × ~132/GROUP_T splits: the GROUP_T programs of one split read the
same weight tiles at about the same time (one HBM read per group instead of per token
tile), and each program's [BT, hidden] hidden tile, which it re-reads for every BV step of its
split, stays in L2 (GROUP_T hidden tiles + 132/GROUP_T weight steps = 24.8 MiB ≤ the model's 25 MiB at BT=128,
BV=64, hidden=6144). The order changes which program runs when, never what one computes, so
determinism and batch invariance are untouched (GROUP_T, like the tiles, is a constant).

Cost at M1's prefill shape (T = 8192, V = 200,064, hidden = 6144, bf16; figures from
``python -m profiles.static --case head-forward-T8192``, H100 ceilings):
  FLOPs 2·T·V·hidden = 20.14 TFLOP → 20.4 ms at 989 TFLOP/s (the floor: compute-bound).
  Minimum bytes: hidden 0.10 GB + weight 2.46 GB + outputs ≈ 2.56 GB (0.76 ms at 3.35 TB/s).
  Before (64×64×64 tiles, token tile fastest): 167 regs, 1 CTA/SM; HBM model 246× min with no
  reuse, 124× with L2 credit: the weight is read once per split group, but every program
  re-reads its hidden tile per 64-wide vocabulary step and 132 × 0.75 MiB of them do not fit in
  L2 (315 GB) → model 94.7 ms, memory-bound.
  After (128×64×64 tiles, GROUP_T = 8): 240 regs, no spills, 1 CTA/SM; hidden tiles hit L2
  (read ~once), the weight is read once per group of 8 token tiles: 8 × 2.46 GB ≈ 19.7 GB,
  ~7.7× min → 5.9 ms of HBM time under 20.4 ms of tensor-core time, so the model is
  compute-bound at the floor. Expected buy: ~4.6× on the model, all from the hidden re-reads.
  Not reached: ≤ 2× minimum bytes. With the hidden tile K-complete (hidden = 6144 does not
  fit in shared memory) the weight is re-read once per group of token tiles whose hidden
  tiles L2 holds together; ≤ 25 MiB of hidden is ~2k tokens, so at T = 8192 the weight is read
  ≥ 4× (≥ 3.9× min) by any order of these programs. 128 × 128 tiles would halve the no-reuse
  traffic but spill on sm_90a (264 B/thread compensated, 36 B plain; 255 registers) and
  change nothing in the L2 model (the bound above is about L2, not the tile).
  The two-sum (COMPENSATE) is not in this model: it is CUDA-core work beside the MMAs.

Backward (``head_dlogits_kernel``)
----------------------------------
One kernel computes the fp32 gradient w.r.t. the logits of a ``[rows, cols]`` block
(recomputing the logits tile by tile; same products, same accumulation as the forward) from
the per-token upstream gradients and the saved lse / entropy:
``dz = g_lp (onehot - p) + g_lse p - g_ent p (log p + H)``, times 1/temperature. The host
driver ``backward.head_backward_blocks`` visits vocabulary chunks × row blocks in a fixed
order and forms ``dhidden += dz @ W_chunk`` and ``dW_chunk += dz^T @ hidden`` with fp32
accumulation (tensor-core GEMMs on dz rounded to the input dtype for 16-bit inputs on a GPU;
see that function), so the weight gradient accumulates in fp32, deterministically, and the
scratch is one block (≤ 256 MiB), independent of V and bounded in T.

Precision: bf16/fp16 operands go to ``tl.dot`` as they are — products exact in fp32, fp32
accumulation (tensor cores with fp32 accumulators on a GPU). fp32 operands use
``input_precision="ieee"`` (no TF32; see ``api.head_logprobs``). Logits never leave fp32.
Each ``BK``-wide partial product is added to the running logit with a two-sum (``COMPENSATE``):
at |logit| ~ 100 one fp32 ulp is 7.6e-6, and a plain running sum over K/BK blocks drifts by
several ulps (through the interpreter at K=1024 with a massive-activation channel: max
|Δlogprob| 2.6e-5 plain, 1.8e-5 compensated; at K=256, 3.6e-5 for one fp32 GEMM vs 7.7e-6
here). What remains is the rounding inside one BK block and of the final value, so at
|logit| ~ 100 errors of ~1-2e-5 remain possible; the torch backend (fp64 GEMM, one rounding)
is the one that stays under 1e-5 there. Cost of the two-sum on a GPU, unmeasured: 4 fp32 adds
per logit per 64-wide K block on CUDA cores (~67 TFLOP/s on an H100) take about as long as the
block's 128 FLOPs per logit on bf16 tensor cores (~990 TFLOP/s); the two units can overlap, but
a compute-bound prefill may pay up to ~2x in this kernel, and the second accumulator is why the
bf16 tile is 128 × 64 and not 128 × 128 (which spills). ``COMPENSATE = False`` trades
~1.5-2x the logit error for that time; a GPU measurement should decide the default. The
interpreter computes the block dots with numpy in fp32, so CPU runs do not reproduce a GPU's
in-MMA accumulation order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpret_enabled
from .._triton_interpret import interpreted_with_fixes
from .backward import BACKWARD_VOCAB_CHUNK, TORCH_BLOCK_ELEMENTS, head_backward_blocks
from .reference import IGNORE_INDEX

# Tiles: the one place where the CPU interpreter (TRITON_INTERPRET=1, read once at import) and
# a GPU differ, on purpose. Why: tests run through the interpreter at test sizes (T ~ 1-100,
# V ~ 1000-4100), and there the GPU's SPLIT_V = 2048 / BT = 128 would leave one vocabulary
# split and one token tile, so the split merge, the running-max rescaling across splits and
# the partial-tile masks would go untested; SPLIT_V = 512 and BT = 16 exercise them at the
# same sizes. (The interpreter's cost is per program and per tile op, not per element, so the
# extra programs cost little at those sizes.) What this does not change: the math. Every configuration computes the
# same fp32 quantities (tile logits accumulated over K, the same merge formulas in split
# order); only where fp32 rounding happens differs (the two-sum is per BK block, the merge
# per split), which is inside the tolerances the tests hold both to, and the interpreter's
# numpy dots already round differently from a GPU's MMAs. Determinism and batch invariance
# hold in each configuration, since neither depends on T. The GPU configuration is compiled
# and checked by tests/test_head_aot.py.
# GPU tiles (BT, BV, BK) per input kind: the largest tiles whose sm_90a builds have no register
# spills (ptxas, tests/test_head_aot.py); with 128 × 128 the bf16 forward spills 264 B/thread,
# and the fp32 (IEEE, CUDA-core) dot needs smaller tiles still. Chosen for a clean build, not
# tuned for speed (no GPU at hand). Tiles depend on the dtype only, never on T.
# GROUP_T: token tiles per launch group of the forward (the program order above); in the
# interpreter 4, so test sizes (up to ~7 token tiles) also run a partial last group.
if triton_interpret_enabled():
    TILES = {False: (16, 128, 32), True: (16, 128, 32)}
    LOGITS_TILES = TILES
    SPLIT_V, MERGE_BT, NUM_WARPS, GROUP_T = 512, 64, 4, 4
else:
    TILES = {False: (128, 64, 64), True: (32, 64, 32)}
    # LOGITS_TILES: the 16-bit forward falls back to the 64-token tile (a) in head_logits_triton
    # (sampling), which also stores the [BT, BV] logits tile: at 128 × 64 that build reaches 255
    # registers and spills (408 B/thread without alignment hints, 44 B with them but T
    # unaligned), and (b) when hidden's width, the row strides or the pointers are not multiples
    # of 16 (Triton then cannot vectorize or pipeline the loads, and the 128 × 64 build spills
    # 128 B on Triton 3.9). Same BV, BK and two-sum, so each logit is summed over the same K
    # blocks in the same order; the choice depends on the layout only, never on T.
    LOGITS_TILES = {False: (64, 64, 64), True: (32, 64, 32)}
    SPLIT_V, MERGE_BT, NUM_WARPS, GROUP_T = 2048, 128, 8, 8
assert all(SPLIT_V % bv == 0 for tiles in (TILES, LOGITS_TILES) for _, bv, _ in tiles.values())
# A far-below-any-logit start for the running max: finite, so (m_old - m) * s_old is 0, not NaN.
NEG_BIG = tl.constexpr(-3.0e38)
COMPENSATE = True


@triton.jit
def _logit_tile(h_ptr, w_ptr, offs_t, offs_v, mask_t, mask_v, K, stride_h, stride_w, inv_temp,
                BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, FP32_INPUTS: tl.constexpr,
                COMPENSATE: tl.constexpr):
    # fp32 [BT, BV] tempered logits of tokens offs_t × vocabulary ids offs_v.
    # Compensated (two-sum) accumulation across K blocks: logits reach ~100, where one fp32
    # ulp is 7.6e-6, and plain accumulation over many blocks drifts by several ulps (measured
    # 2e-5 at K=64 through the interpreter); this leaves only the rounding inside one block.
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
        if FP32_INPUTS:
            blk = tl.dot(a, tl.trans(b), input_precision="ieee")
        else:  # 16-bit products are exact in fp32; accumulation is fp32
            blk = tl.dot(a, tl.trans(b))
        if COMPENSATE:
            tot = acc + blk
            bp = tot - acc
            comp += (acc - (tot - bp)) + (blk - bp)
            acc = tot
        else:
            acc += blk
    return (acc + comp) * inv_temp


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
    pid = tl.program_id(0)
    nsplit = tl.cdiv(V, split_v)
    per_group = GROUP_T * nsplit
    first_t = (pid // per_group) * GROUP_T
    group_size = tl.minimum(tl.cdiv(T, BT) - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_size
    split = (pid % per_group) // group_size
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
        hit = (offs_v.to(tl.int64)[None, :] == tgt[:, None]) & mask_v[None, :]
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
    COMPENSATE: tl.constexpr,
):
    """dz[r, c] = d(Σ g·outputs) / d logit[r, v0 + c], fp32, for one [rows, cols] block."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_c = tl.program_id(1) * BV + tl.arange(0, BV)
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
    hit = (v0 + offs_c).to(tl.int64)[None, :] == tgt[:, None]
    g = tl.where(hit, g + g_lp[:, None], g) * inv_temp
    ptrs = dz_ptr + offs_t.to(tl.int64)[:, None] * stride_dz + offs_c[None, :]
    tl.store(ptrs, g, mask=mask_t[:, None] & mask_c[None, :])


def num_splits(vocab: int, split_v: int = SPLIT_V) -> int:
    """Vocabulary splits of the forward: a function of V only (batch invariance)."""
    return triton.cdiv(vocab, split_v)


def head_forward_triton(hidden, weight, targets, temperature: float, split_v: int = SPLIT_V,
                        logits_out=None):
    """fp32 (logprobs, lse, entropy) ``[T]``; hidden ``[T, K]``, weight ``[V, K]`` contiguous.

    ``logits_out``: optional fp32 ``[T, V]`` (unit last stride) that receives the tempered
    logits the statistics were computed from (for sampling; never used by the training path).
    """
    T, K = hidden.shape
    V = weight.shape[0]
    fp32 = hidden.dtype == torch.float32
    aligned = all(x % 16 == 0 for x in (K, hidden.stride(0), weight.stride(0),
                                         hidden.data_ptr(), weight.data_ptr()))
    bt, bv, bk = (TILES if logits_out is None and aligned else LOGITS_TILES)[fp32]
    if split_v % bv:
        raise ValueError(f"split_v must be a multiple of {bv}, got {split_v}")
    nsplit = num_splits(V, split_v)
    partials = torch.empty(nsplit, 4, T, dtype=torch.float32, device=hidden.device)
    head_split_stats_kernel[(triton.cdiv(T, bt) * nsplit,)](
        hidden, weight, targets, partials, partials if logits_out is None else logits_out,
        T, V, K, hidden.stride(0), weight.stride(0),
        0 if logits_out is None else logits_out.stride(0), 1.0 / temperature, split_v,
        BT=bt, BV=bv, BK=bk, FP32_INPUTS=fp32, COMPENSATE=COMPENSATE,
        STORE_LOGITS=logits_out is not None, GROUP_T=GROUP_T, num_warps=NUM_WARPS)
    lp, lse, ent = (torch.empty(T, dtype=torch.float32, device=hidden.device) for _ in range(3))
    head_merge_splits_kernel[(triton.cdiv(T, MERGE_BT),)](
        partials, targets, lp, lse, ent, T, nsplit, IGNORE=IGNORE_INDEX, BT=MERGE_BT)
    return lp, lse, ent


def head_logits_triton(hidden, weight, temperature: float):
    """fp32 ``[T, V]`` tempered logits, bitwise those this call's statistics use.

    On a GPU the bf16/fp16 build has 64-token tiles here (``LOGITS_TILES``) and 128 in
    :func:`head_forward_triton`; both sum each logit over the same BK blocks in the same order.
    """
    T, V = hidden.shape[0], weight.shape[0]
    logits = torch.empty(T, V, dtype=torch.float32, device=hidden.device)
    no_targets = torch.full((T,), IGNORE_INDEX, dtype=torch.int64, device=hidden.device)
    head_forward_triton(hidden, weight, no_targets, temperature, logits_out=logits)
    return logits


def head_backward_triton(g_lp, g_lse, g_ent, hidden, weight, targets, lse, entropy,
                         temperature: float, vocab_chunk: int = BACKWARD_VOCAB_CHUNK,
                         need_dweight: bool = True):
    """(dhidden, dweight) in the inputs' dtypes; see the module docstring."""
    K = hidden.shape[1]
    fp32 = hidden.dtype == torch.float32
    bt, bv, bk = TILES[fp32]
    rows_per_block = max(bt, TORCH_BLOCK_ELEMENTS // vocab_chunk)
    inv_temp = 1.0 / temperature

    def dz_block(t0, t1, v0, v1):
        rows, cols = t1 - t0, v1 - v0
        dz = torch.empty(rows, cols, dtype=torch.float32, device=hidden.device)
        h, w = hidden[t0:t1], weight[v0:v1]
        head_dlogits_kernel[(triton.cdiv(rows, bt), triton.cdiv(cols, bv))](
            h, w, targets[t0:t1], g_lp[t0:t1], g_lse[t0:t1], g_ent[t0:t1], lse[t0:t1],
            entropy[t0:t1], dz, rows, cols, v0, K, h.stride(0), w.stride(0), dz.stride(0),
            inv_temp, BT=bt, BV=bv, BK=bk, FP32_INPUTS=fp32,
            COMPENSATE=COMPENSATE, num_warps=NUM_WARPS)
        return dz

    return head_backward_blocks(hidden, weight, dz_block, rows_per_block, vocab_chunk, need_dweight)
