"""Tensor and expert parallelism on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

``MiniMaxM1ForCausalLM(config, tensor_parallel_size=W)`` / ``from_pretrained(...,
tensor_parallel_size=W, expert_parallel=False)`` inside an initialized process group of W ranks.
Rank r of the group holds (every split contiguous and equal; a size that does not divide is
refused, naming the config field):

- lightning layers: heads ``[r·H/W, (r+1)·H/W)``: their rows of ``qkv_proj`` (per-head
  interleaved ``[q|k|v]``, so a head's 3D rows are contiguous), of ``output_gate`` and of the
  output norm's weight, their columns of ``out_proj``, their slopes and fp32 cache states. The
  output RMSNorm normalizes over all H·D channels: the per-token sum of squares is all-reduced
  (one ``[tokens]`` fp32 all-reduce per layer); ``out_proj``'s partial sums are all-reduced.
- softmax layers: query heads as above; KV heads ``[r·KVH/W, ...)`` when W <= KVH, else the one
  KV head of this rank's query group (replicated on W/KVH ranks; GQA groups stay whole); the
  cache holds the local KV heads; ``o_proj``'s partial sums are all-reduced.
- MoE, tensor parallel (default): every expert's intermediate dimension I is split: gate rows
  ``[i0, i0 + I/W)`` and the *same* up rows (``I + i0 ...``; kept paired, silu(gate)·up is
  elementwise), the same columns of w2. int8: w13's per-row scales are sliced; w2's scale is per
  output row over the full I, computed on load from an all-reduced max, so the int8 weights
  are bitwise those of the unsharded model. The fp32 router is replicated. One all-reduce.
- MoE, expert parallel: experts ``[r·E/W, ...)`` whole; every rank routes every token with the
  fp32 router and runs ``mk.fused_moe(..., expert_map=...)`` (global id -> local index, -1 =
  another rank's expert, which contributes exactly 0). One all-reduce.
- embedding and LM head: vocabulary rows ``[r·V/W, ...)``. The embedding's all-reduce adds one
  row to zeros (exact). The FP32 head (:meth:`TensorParallel.head_logprobs`, ``head_sample``,
  ``head_logits``) gathers per-rank statistics and merges them in rank order on every rank.
- norms and the router: replicated.

Every rank returns the same results. Collectives are plain ``torch.distributed`` calls on the
group, each inside ``mk.nvtx_range("mm1.tp.<what>")`` and counted in
:attr:`TensorParallel.comm_bytes` (bytes sent into each kind of collective, per rank).

Precision: a row-parallel output and the MoE output are partial sums in the model dtype,
all-reduced in that dtype (as vLLM and Megatron do): in bf16 each partial is rounded before the
sum, where the unsharded GEMM rounds the full sum once. Measured on the tiny model in bf16 (6
batches of 2 x 16 tokens, W = 2 and 4, float / int8 / expert-parallel int8 experts): relative
logit error against the fp32 model 4.9-5.9% on average sharded vs 4.8-5.4% unsharded (at most
1.2x); reducing fp32 partials instead changed nothing measurable. fp32 weights: within 1e-5.

Autograd (every rank computing the same loss): a row-parallel all-reduce passes its gradient
through unchanged, a replicated input entering column-parallel weights all-reduces its
gradient (:meth:`TensorParallel.copy_in`), the norm's sum of squares all-reduces both ways,
and the head's backward all-reduces d hidden.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mm1_kernels as mk

from .checks import as_int
from .config import MiniMaxM1Config

IGNORE_INDEX = -100
# fp32 logits of one block of rows (256 MiB), as the head's own torch backend.
_BLOCK_ELEMENTS = 1 << 26
# Tempered logits beyond this are refused before sampling (the head's own limit).
_SAFE_TEMPERED_LOGIT = 1e37
_EPS_HIGH = inspect.signature(mk.head_cispo_loss).parameters["eps_high"].default  # mk's default

Ranges = List[Tuple[int, int]]
Spec = Optional[Tuple[int, Ranges]]   # (dimension, [start, stop) ranges concatenated) or None


class TensorParallel:
    """One model's tensor (and expert) parallel layout over a process group, and its collectives.

    ``size``/``rank``: the group's; ``group``: a ``torch.distributed`` ProcessGroup or None
    for the default group. Without an initialized group (``group=None``, ``rank`` given) the
    layout still answers shape questions (e.g. a meta model for :func:`per_rank_memory`), but
    a collective raises.
    """

    def __init__(self, config: MiniMaxM1Config, size: int, rank: int, group=None,
                 expert_parallel: bool = False):
        size, rank = as_int(size, "tensor_parallel_size"), as_int(rank, "rank")
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"tensor_parallel_size must be >= 1 and rank in [0, size), got {size}, {rank}")
        if not isinstance(expert_parallel, bool):
            raise TypeError(f"expert_parallel must be a bool, got {expert_parallel!r}")
        self.config, self.size, self.rank, self.group = config, size, rank, group
        self.expert_parallel = expert_parallel
        self.comm_bytes: Dict[str, int] = {}
        H, KVH, W = config.num_attention_heads, config.num_key_value_heads, size

        def need(ok, field, value, what):
            if not ok:
                raise ValueError(f"tensor_parallel_size={W}: config field {field} ({value}) must be "
                                 f"{what}")

        need(H % W == 0, "num_attention_heads", H, f"a multiple of {W}")
        need(KVH % W == 0 or W % KVH == 0, "num_key_value_heads", KVH,
             f"a multiple or a divisor of {W} (GQA groups are kept whole)")
        need(config.vocab_size % W == 0, "vocab_size", config.vocab_size, f"a multiple of {W}")
        if expert_parallel:
            need(config.num_local_experts % W == 0, "num_local_experts", config.num_local_experts,
                 f"a multiple of {W} (expert_parallel=True)")
        else:
            need(config.intermediate_size % W == 0, "intermediate_size", config.intermediate_size,
                 f"a multiple of {W} (tensor-parallel experts)")

    @classmethod
    def from_process_group(cls, config: MiniMaxM1Config, size: int, group=None,
                           expert_parallel: bool = False) -> TensorParallel:
        """The layout of this process's rank in ``group`` (default: the default group)."""
        size = as_int(size, "tensor_parallel_size")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"tensor_parallel_size={size} needs an initialized torch.distributed "
                               f"process group of {size} ranks (torchrun, or "
                               f"torch.distributed.init_process_group): none is initialized")
        world = dist.get_world_size(group)
        if world != size:
            raise ValueError(f"tensor_parallel_size={size}, but the process group has {world} ranks")
        return cls(config, size, dist.get_rank(group), group, expert_parallel)

    # ------------------------------------------------------------------ what this rank holds
    def _part(self, n: int) -> Tuple[int, int]:
        """[start, stop) of this rank's equal share of n."""
        k = n // self.size
        return self.rank * k, (self.rank + 1) * k

    @property
    def heads(self) -> Tuple[int, int]:
        """[start, stop) of this rank's query (and lightning) heads."""
        return self._part(self.config.num_attention_heads)

    @property
    def kv_heads(self) -> Tuple[int, int]:
        """[start, stop) of the KV heads this rank holds (the query group's, W > KVH)."""
        KVH, W = self.config.num_key_value_heads, self.size
        if W <= KVH:
            return self._part(KVH)
        k = self.rank // (W // KVH)
        return k, k + 1

    @property
    def experts(self) -> Tuple[int, int]:
        E = self.config.num_local_experts
        return self._part(E) if self.expert_parallel else (0, E)

    @property
    def inter(self) -> Tuple[int, int]:
        """[start, stop) of each expert's intermediate rows this rank holds."""
        I = self.config.intermediate_size
        return (0, I) if self.expert_parallel else self._part(I)

    @property
    def vocab(self) -> Tuple[int, int]:
        return self._part(self.config.vocab_size)

    def spec(self, name: str) -> Spec:
        """How a model parameter (or buffer) named ``name`` is cut for this rank, or None."""
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0, [self.vocab]
        m = re.match(r"^model\.layers\.\d+\.(.+)$", name)
        if not m:
            return None
        rest, D = m.group(1), self.config.head_dim
        (h0, h1), (k0, k1) = self.heads, self.kv_heads
        heads, kv = [(h0 * D, h1 * D)], [(k0 * D, k1 * D)]
        attn = {"qkv_proj.weight": (0, [(3 * h0 * D, 3 * h1 * D)]), "output_gate.weight": (0, heads),
                "norm.weight": (0, heads), "out_proj.weight": (1, heads),
                "q_proj.weight": (0, heads), "k_proj.weight": (0, kv), "v_proj.weight": (0, kv),
                "o_proj.weight": (1, heads)}
        if rest.startswith("self_attn."):
            return attn.get(rest[len("self_attn."):])
        if not rest.startswith("block_sparse_moe.") or rest.endswith("gate.weight"):
            return None
        which = rest[len("block_sparse_moe."):]
        if self.expert_parallel:
            return (0, [self.experts]) if which in ("w13", "w2", "w13_scale", "w2_scale") else None
        I, (i0, i1) = self.config.intermediate_size, self.inter
        return {"w13": (1, [(i0, i1), (I + i0, I + i1)]), "w13_scale": (1, [(i0, i1), (I + i0, I + i1)]),
                "w2": (2, [(i0, i1)])}.get(which)

    def expert_spec(self, which: str) -> Spec:
        """The cut of one expert's checkpoint tensor: w1/w3 ``[I, hidden]``, w2 ``[hidden, I]``."""
        if self.expert_parallel:
            return None
        return (1 if which == "w2" else 0), [self.inter]

    def owns_expert(self, e: int) -> bool:
        e0, e1 = self.experts
        return e0 <= e < e1

    def expert_map(self, device) -> torch.Tensor:
        """int32 ``[E]``: global expert id -> index in this rank's stack, -1 elsewhere."""
        E, (e0, e1) = self.config.num_local_experts, self.experts
        m = torch.full((E,), -1, dtype=torch.int32)
        m[e0:e1] = torch.arange(e1 - e0, dtype=torch.int32)
        return m.to(device)

    def quantize_experts(self, w13: torch.Tensor, w2: torch.Tensor):
        """``mk.quantize_moe_weights`` of this rank's experts with the unsharded model's scales.

        Tensor-parallel experts hold an I-slice of each w2 row, whose int8 scale is
        ``amax(|row|) / 127`` over the full I: the row maxima are all-reduced (MAX; a maximum of
        values of w2's dtype is exact) and appended as one extra column, so the quantizer sees
        the full row's maximum; that column (and two zero rows appended to w13 to keep the
        shapes paired) are dropped. The int8 weights and scales are then bitwise the unsharded
        model's slices.
        """
        if self.expert_parallel or self.size == 1:
            return mk.quantize_moe_weights(w13, w2)
        amax = w2.float().abs().amax(-1)
        self.all_reduce_(amax, "quantize", op=dist.ReduceOp.MAX)
        pad = w13.new_zeros(w13.shape[0], 2, w13.shape[2])
        q13, s13, q2, s2 = mk.quantize_moe_weights(torch.cat([w13, pad], 1),
                                                   torch.cat([w2, amax.to(w2.dtype)[..., None]], -1))
        return q13[:, :-2].contiguous(), s13[:, :-2].contiguous(), q2[..., :-1].contiguous(), s2

    # ------------------------------------------------------------------ collectives
    def _count(self, what: str, t: torch.Tensor) -> None:
        self.comm_bytes[what] = self.comm_bytes.get(what, 0) + t.numel() * t.element_size()

    def all_reduce_(self, t: torch.Tensor, what: str, op=None) -> torch.Tensor:
        """In-place all-reduce (sum unless ``op``) over the group; returns ``t``."""
        self._count(what, t)
        with mk.nvtx_range(f"mm1.tp.all_reduce.{what}"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, what: str) -> List[torch.Tensor]:
        """Every rank's ``t`` (same shape everywhere), in rank order."""
        t = t.contiguous()
        self._count(what, t)
        out = [torch.empty_like(t) for _ in range(self.size)]
        with mk.nvtx_range(f"mm1.tp.all_gather.{what}"):
            dist.all_gather(out, t, group=self.group)
        return out

    def broadcast_(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``t`` <- group rank 0's ``t``."""
        self._count(what, t)
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        with mk.nvtx_range(f"mm1.tp.broadcast.{what}"):
            dist.broadcast(t, src=src, group=self.group)
        return t

    def reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum of every rank's partial ``t`` (row-parallel output); gradient passed through."""
        if torch.is_grad_enabled() and t.requires_grad:
            return _ReduceSum.apply(t, self, what)
        return self.all_reduce_(t, what)

    def reduce_both(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum of every rank's partial ``t`` whose consumers differ per rank: gradient summed too."""
        if torch.is_grad_enabled() and t.requires_grad:
            return _ReduceSumBoth.apply(t, self, what)
        return self.all_reduce_(t, what)

    def copy_in(self, t: torch.Tensor, what: str = "grad") -> torch.Tensor:
        """A replicated ``t`` entering this rank's column shard: identity; its gradient is summed."""
        if torch.is_grad_enabled() and t.requires_grad:
            return _CopyIn.apply(t, self, what)
        return t

    # ------------------------------------------------------------------ vocabulary-parallel FP32 head
    def head_logits(self, hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0,
                    backend: Optional[str] = None) -> torch.Tensor:
        """``mk.head_logits`` over the whole vocabulary: each rank's shard, all-gathered."""
        z = mk.head_logits(self.copy_in(hidden, "head"), weight, temperature=temperature, backend=backend)
        if torch.is_grad_enabled() and z.requires_grad:
            return _GatherLast.apply(z, self)
        return torch.cat(self.all_gather(z, "head_logits"), -1)

    def head_logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0, backend: Optional[str] = None) -> mk.HeadOutput:
        """``mk.head_logprobs`` with ``weight`` this rank's vocabulary rows; ``targets`` global ids.

        Each rank folds its logits (``mk.head_logits``, a block of rows at a time) into four fp32
        numbers per token, ``m = max z``, ``s = Σ e^{z-m}``, ``u = Σ e^{z-m}(z-m)`` and the
        target's logit (0 off its rank); the ``[W, 4, T]`` statistics are all-gathered and merged
        in rank order in fp64 (``lse = M + log S``, ``logprob = (t - M) - log S``, ``entropy =
        log S - U/S``, the head kernel's merge), so every rank holds bitwise the same results,
        deterministically. Batch invariance: the merge is per token, and the Triton head's logits
        are batch invariant; the per-rank row reductions are torch's (``amax``/``sum`` over the
        shard), which on a GPU may pick their reduction order by the number of rows, so a token's
        last bits can depend on the batch there (the Triton split statistics of mm1_kernels.head,
        were they public, would remove that). The logits of a block of rows exist per rank
        (``[rows, V/W]`` fp32, at most 256 MiB), as in the torch head. Differentiable w.r.t.
        hidden (gradient all-reduced) and the weight shard (backward: the head's own
        ``torch.ops.mm1.head_logprobs_backward`` on the shard with the global lse and entropy).
        """
        V, Vl = self.config.vocab_size, weight.shape[0]
        if weight.dim() != 2 or Vl * self.size != V:
            raise ValueError(f"weight must be this rank's [{V // self.size}, hidden] vocabulary rows, "
                             f"got {list(weight.shape)}")
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(f"targets must have shape {list(hidden.shape[:-1])}, got {list(targets.shape)}")
        if targets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"targets must be int32 or int64, got {targets.dtype}")
        if targets.numel() and not _capturing(targets):
            bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= V)
            if bool(bad.any()):
                raise ValueError(f"targets must be token ids in [0, {V}) or {IGNORE_INDEX}, got "
                                 f"{targets[bad].flatten()[0].item()}")
        lp, lse, ent = _VocabParallelLogprobs.apply(hidden, weight, targets, float(temperature), backend, self)
        lead = hidden.shape[:-1]
        return mk.HeadOutput(lp.view(lead), lse.view(lead), ent.view(lead))

    def head_cispo_loss(self, hidden, weight, targets, old_logprobs, advantages, mask=None, eps_low=None,
                        eps_high=_EPS_HIGH, temperature: float = 1.0, backend: Optional[str] = None,
                        return_head: bool = False):
        """``mk.head_cispo_loss`` over the vocabulary shards: :meth:`head_logprobs` (its gradient
        all-reduced), then ``mk.cispo_loss`` on the (replicated) logprobs, the same on every rank."""
        out = self.head_logprobs(hidden, weight, targets, temperature=temperature, backend=backend)
        valid = targets != IGNORE_INDEX
        if mask is not None:
            valid = valid & (mask if mask.dtype == torch.bool else mask != 0)
        loss = mk.cispo_loss(out.logprobs, old_logprobs, advantages, valid, eps_low=eps_low, eps_high=eps_high)
        return (loss, out) if return_head else loss

    @torch.no_grad()
    def head_sample(self, hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0, generator: Optional[torch.Generator] = None,
                    backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``mk.head_sample`` over the vocabulary shards: the same tokens on every rank.

        Greedy (``temperature == 0``): each rank's (max, first argmax) are gathered and the
        first rank holding the maximum wins (torch's first-maximum rule, over the whole
        vocabulary). Sampling: the tempered fp32 logits are all-gathered (a block of rows at a
        time, as the single-process head), every rank samples with its ``generator``, and rank
        0's tokens are broadcast, so the ranks agree whatever their generators' states; with
        the same seed everywhere the tokens are those of the unsharded ``mk.head_sample`` on
        the torch backend. The logprobs come from :meth:`head_logprobs`.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
        if not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
        lead, K = hidden.shape[:-1], hidden.shape[-1]
        h2 = hidden.reshape(-1, K)
        rows, V = h2.shape[0], self.config.vocab_size
        v0 = self.vocab[0]
        t = float(temperature) if temperature > 0 else 1.0
        tokens = torch.empty(rows, dtype=torch.int64, device=hidden.device)
        step = max(1, _BLOCK_ELEMENTS // V)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            z = mk.head_logits(h2[r0:r1], weight, temperature=t, backend=backend)
            if temperature == 0:
                idx = z.argmax(-1)
                top = z.gather(1, idx[:, None])[:, 0].double()
                bad = ~(z.abs().amax(-1) <= _SAFE_TEMPERED_LOGIT)
                stats = torch.stack(self.all_gather(torch.stack([top, (idx + v0).double(), bad.double()]),
                                                    "head_sample"))          # [W, 3, rows]
                _refuse_nonfinite(stats[:, 2].amax(0) > 0)
                win = (stats[:, 0] == stats[:, 0].amax(0)).double().argmax(0)  # first rank at the max
                tokens[r0:r1] = stats[:, 1].gather(0, win[None])[0].long()
            else:
                z = torch.cat(self.all_gather(z, "head_sample"), -1)        # [rows, V], rank order
                _refuse_nonfinite(~(z.abs().amax(-1) <= _SAFE_TEMPERED_LOGIT))
                tokens[r0:r1] = mk.sample_from_logits(z, float(top_p), top_k, generator)
        if temperature > 0:
            self.broadcast_(tokens, "head_sample")
        lp = self.head_logprobs(h2, weight, tokens, t, backend).logprobs
        return tokens.view(lead), lp.view(lead)

    def _local_head_stats(self, h2, weight, local_targets, temperature, backend) -> torch.Tensor:
        """fp32 ``[4, T]``: (max, Σ e^{z-m}, Σ e^{z-m}(z-m), target logit or 0) over this shard."""
        T, Vl = h2.shape[0], weight.shape[0]
        out = torch.empty(4, T, dtype=torch.float32, device=h2.device)
        step = max(1, _BLOCK_ELEMENTS // Vl)
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            z = mk.head_logits(h2[t0:t1], weight, temperature=temperature, backend=backend)
            m = z.amax(-1)
            d = z - m[:, None]
            e = d.exp()
            tgt = local_targets[t0:t1]
            own = tgt >= 0
            zt = z.gather(1, torch.where(own, tgt, 0).long()[:, None])[:, 0]
            out[:, t0:t1] = torch.stack([m, e.sum(-1), (e * d).sum(-1), torch.where(own, zt, 0.0)])
        return out


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _refuse_nonfinite(bad: torch.Tensor) -> None:
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(f"head_sample: cannot sample: the tempered logits are NaN, inf or beyond "
                         f"1e37 in row(s) {rows}: hidden or weight holds non-finite or out-of-range "
                         f"values, or the temperature is too small")


def merge_head_stats(stats: torch.Tensor, targets: torch.Tensor):
    """(logprobs, lse, entropy) fp32 ``[T]`` from per-rank statistics ``[W, 4, T]``, merged in
    rank order in fp64 (the formulas of the head kernel's split merge)."""
    st = stats.double()
    M = st[:, 0].amax(0)
    S = torch.zeros_like(M)
    U = torch.zeros_like(M)
    t = torch.zeros_like(M)
    for r in range(st.shape[0]):   # fixed order: every rank computes the same bits
        m, s, u, zt = st[r]
        a = torch.exp(m - M)
        S += a * s
        U += a * (u + (m - M) * s)
        t += zt
    log_s = S.log()
    lp = torch.where(targets != IGNORE_INDEX, (t - M) - log_s, torch.zeros_like(M))
    return lp.float(), (M + log_s).float(), (log_s - U / S).float()


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, backend, tp):
        K = hidden.shape[-1]
        h2 = hidden.reshape(-1, K)
        t1 = targets.reshape(-1).long()
        v0, v1 = tp.vocab
        own = (t1 >= v0) & (t1 < v1)
        local = torch.where(own, t1 - v0, torch.full_like(t1, -1))
        stats = tp._local_head_stats(h2, weight, local, temperature, backend)
        lp, lse, ent = merge_head_stats(torch.stack(tp.all_gather(stats, "head_stats")), t1)
        ctx.save_for_backward(h2, weight, t1, lse, ent)
        ctx.temperature, ctx.backend, ctx.tp, ctx.shape = temperature, backend, tp, hidden.shape
        return lp, lse, ent

    @staticmethod
    def backward(ctx, g_lp, g_lse, g_ent):
        h2, weight, t1, lse, ent = ctx.saved_tensors
        tp = ctx.tp
        v0, v1 = tp.vocab

        def f32(g):
            return torch.zeros_like(lse) if g is None else g.float().reshape(-1)

        g_lp, g_lse, g_ent = f32(g_lp), f32(g_lse), f32(g_ent)
        valid = t1 != IGNORE_INDEX
        own = valid & (t1 >= v0) & (t1 < v1)
        g_lp = torch.where(valid, g_lp, torch.zeros_like(g_lp))
        # The op's dz = p (g_lse - g_lp) - g_ent p (log p + H) + onehot · g_lp, with the GLOBAL lse
        # and entropy: the owner of the target passes g_lp as it is; every other rank has no
        # one-hot column, so it passes g_lp = 0 and moves -g_lp into g_lse.
        g_lp_local = torch.where(own, g_lp, torch.zeros_like(g_lp))
        g_lse_local = g_lse - g_lp + g_lp_local
        local = torch.where(own, t1 - v0, torch.full_like(t1, IGNORE_INDEX))
        chosen = mk.resolve_backend("head_logprobs", ctx.backend, h2.device)
        need_dw = bool(ctx.needs_input_grad[1])
        dh, dw = torch.ops.mm1.head_logprobs_backward(g_lp_local, g_lse_local, g_ent.contiguous(), h2,
                                                      weight, local, lse, ent, ctx.temperature, chosen,
                                                      need_dw)
        dh = tp.all_reduce_(dh, "head_grad")
        return dh.view(ctx.shape), (dw if need_dw else None), None, None, None, None


class _ReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, tp, what):
        return tp.all_reduce_(t.clone(), what)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _ReduceSumBoth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, tp, what):
        ctx.tp, ctx.what = tp, what
        return tp.all_reduce_(t.clone(), what)

    @staticmethod
    def backward(ctx, g):
        return ctx.tp.all_reduce_(g.clone(), ctx.what + "_grad"), None, None


class _CopyIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, tp, what):
        ctx.tp, ctx.what = tp, what
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return ctx.tp.all_reduce_(g.clone(), ctx.what + "_grad"), None, None


class _SumReplicaGrad(torch.autograd.Function):
    """Identity on a weight whose rows ``[start, stop)`` of ``rows`` several ranks hold: its gradient
    is placed in a zero ``[rows, ...]`` tensor at those rows, all-reduced over the group, and the
    rows taken back, i.e. summed over the ranks holding the same rows (no subgroup needed; the
    backward moves rows / (stop - start) times the weight's gradient, training only)."""

    @staticmethod
    def forward(ctx, w, tp, replica, what):
        ctx.tp, ctx.replica, ctx.what = tp, replica, what
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        a, b, rows = ctx.replica
        full = g.new_zeros((rows,) + tuple(g.shape[1:]))
        full[a:b] = g
        return ctx.tp.all_reduce_(full, ctx.what + "_replica_grad")[a:b].clone(), None, None, None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, tp):
        ctx.tp, ctx.n = tp, z.shape[-1]
        return torch.cat(tp.all_gather(z, "head_logits"), -1)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(-1, ctx.tp.rank * ctx.n, ctx.n), None


# ---------------------------------------------------------------------- sharded modules
class ColumnParallelLinear(nn.Module):
    """``nn.Linear`` (no bias) over this rank's output rows; the replicated input's gradient is summed.

    ``replica``: ``(start, stop, rows)`` when these rows (KV heads with W > KVH) are held by several
    ranks: each copy's weight gradient is then the sum over its holders' (see ``_SumReplicaGrad``).
    """

    def __init__(self, weight: nn.Parameter, tp: TensorParallel, what: str, replica=None):
        super().__init__()
        self.weight, self.tp, self.what, self.replica = weight, tp, what, replica

    def forward(self, x):
        w = self.weight
        if self.replica is not None and torch.is_grad_enabled() and w.requires_grad:
            w = _SumReplicaGrad.apply(w, self.tp, self.replica, self.what)
        return F.linear(self.tp.copy_in(x, self.what), w)


class RowParallelLinear(nn.Module):
    """``nn.Linear`` (no bias) over this rank's input columns; the partial outputs are all-reduced."""

    def __init__(self, weight: nn.Parameter, tp: TensorParallel, what: str):
        super().__init__()
        self.weight, self.tp, self.what = weight, tp, what

    def forward(self, x):
        return self.tp.reduce(F.linear(x, self.weight), self.what)


class ShardedRMSNorm(nn.Module):
    """The lightning output norm over all ``full_dim`` channels, this rank holding a slice: the
    per-token sum of squares is all-reduced (the unsharded ``rms_norm`` takes the mean)."""

    def __init__(self, weight: nn.Parameter, eps: float, full_dim: int, tp: TensorParallel):
        super().__init__()
        self.weight, self.eps, self.full_dim, self.tp = weight, eps, full_dim, tp

    def forward(self, x, consistent: bool = False):
        # ``consistent``: the unsharded norm's argument; a tensor-parallel model refuses
        # consistent mode (MiniMaxM1ForCausalLM.consistent), so it is always False here.
        xf = x.float()
        ss = self.tp.reduce_both(xf.pow(2).sum(-1, keepdim=True), "lightning_norm")
        return self.weight * (xf * torch.rsqrt(ss / self.full_dim + self.eps)).to(x.dtype)


class VocabParallelEmbedding(nn.Module):
    """The embedding over this rank's vocabulary rows: other ids give zeros; all-reduced (exact)."""

    def __init__(self, weight: nn.Parameter, tp: TensorParallel):
        super().__init__()
        self.weight, self.tp = weight, tp

    def forward(self, ids):
        v0, v1 = self.tp.vocab
        own = (ids >= v0) & (ids < v1)
        h = F.embedding(torch.where(own, ids - v0, torch.zeros_like(ids)), self.weight)
        return self.tp.reduce(h.masked_fill(~own[..., None], 0), "embed")


def _cut(t: torch.Tensor, spec: Spec) -> torch.Tensor:
    dim, ranges = spec
    parts = [t.narrow(dim, a, b - a) for a, b in ranges]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).clone()  # own storage


def read_slice(stored, spec: Spec, lead: tuple = ()) -> torch.Tensor:
    """Read only ``spec``'s part of a lazy safetensors slice (``safe_open(...).get_slice``),
    after indexing the leading dimensions by ``lead`` (e.g. one expert of a stack)."""
    if spec is None:
        return stored[lead] if lead else stored[:]
    dim, ranges = spec
    parts = [stored[lead + (slice(None),) * dim + (slice(a, b),)] for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


@torch.no_grad()
def shard_model_(model, tp: TensorParallel):
    """Keep this rank's slices of every parameter of a full-size model (meta or real) and swap
    in the sharded modules. Called by the model's constructor."""
    from .modeling import LightningAttention, SoftmaxAttention, SparseMoE  # modeling imports us

    def cut_param(module, attr, full_name):
        p = getattr(module, attr)
        spec = tp.spec(full_name)
        if spec is not None:
            setattr(module, attr, nn.Parameter(_cut(p.data, spec), requires_grad=p.requires_grad))
        return getattr(module, attr)

    model.tp = tp
    emb = model.model.embed_tokens
    model.model.embed_tokens = VocabParallelEmbedding(cut_param(emb, "weight", "model.embed_tokens.weight"), tp)
    cut_param(model.lm_head, "weight", "lm_head.weight")
    model.lm_head.out_features = model.lm_head.weight.shape[0]
    D = model.config.head_dim
    for n, layer in enumerate(model.model.layers):
        pre = f"model.layers.{n}."
        attn = layer.self_attn
        h0, h1 = tp.heads
        if isinstance(attn, LightningAttention):
            for name in ("qkv_proj", "output_gate"):
                w = cut_param(getattr(attn, name), "weight", pre + f"self_attn.{name}.weight")
                setattr(attn, name, ColumnParallelLinear(w, tp, f"layer{n}.{name}"))
            attn.out_proj = RowParallelLinear(cut_param(attn.out_proj, "weight", pre + "self_attn.out_proj.weight"),
                                              tp, "lightning_out")
            norm = attn.norm
            attn.norm = ShardedRMSNorm(cut_param(norm, "weight", pre + "self_attn.norm.weight"), norm.eps,
                                       attn.num_heads * D, tp)
            attn.head_offset, attn.num_heads = h0, h1 - h0
            attn.slopes = attn.slopes.new_empty(h1 - h0)
            attn.reset_buffers()
        elif isinstance(attn, SoftmaxAttention):
            k0, k1 = tp.kv_heads
            KVH = model.config.num_key_value_heads
            replica = (k0 * D, k1 * D, KVH * D) if tp.size > KVH else None
            for name in ("q_proj", "k_proj", "v_proj"):
                w = cut_param(getattr(attn, name), "weight", pre + f"self_attn.{name}.weight")
                setattr(attn, name, ColumnParallelLinear(w, tp, f"layer{n}.{name}",
                                                         replica if name != "q_proj" else None))
            attn.o_proj = RowParallelLinear(cut_param(attn.o_proj, "weight", pre + "self_attn.o_proj.weight"),
                                            tp, "softmax_out")
            attn.num_heads, attn.num_kv_heads = h1 - h0, k1 - k0
        moe = layer.block_sparse_moe
        assert isinstance(moe, SparseMoE)
        for name in ("w13", "w2"):
            cut_param(moe, name, pre + f"block_sparse_moe.{name}")
        for name in ("w13_scale", "w2_scale"):
            b = getattr(moe, name)
            spec = tp.spec(pre + f"block_sparse_moe.{name}")
            if b is not None and spec is not None:
                setattr(moe, name, _cut(b, spec))
        moe.tp = tp
        moe.num_experts = moe.w13.shape[0]
        moe.expert_map = tp.expert_map(moe.w13.device) if tp.expert_parallel else None
    return model


def reset_buffers_(model) -> None:
    """Recompute the expert maps (after ``to_empty`` from the meta device)."""
    for layer in model.model.layers:
        moe = layer.block_sparse_moe
        if moe.expert_map is not None and moe.expert_map.device.type != "meta":
            moe.expert_map = moe.tp.expert_map(moe.expert_map.device)


# ---------------------------------------------------------------------- memory
def per_rank_memory(config: MiniMaxM1Config, tensor_parallel_size: int = 8, expert_parallel: bool = False,
                    dtype: torch.dtype = torch.bfloat16, int8_experts: bool = True) -> Dict[str, int]:
    """Bytes one rank holds, from the sharded model built on the meta device (rank 0; every
    rank holds the same amount): ``experts`` (w13, w2 and their int8 scales), ``attention``,
    ``embed_head`` (its embedding and LM-head rows), ``other`` (norms, routers, buffers),
    ``weights`` (their sum); and per sequence on this rank, ``lightning_state_per_seq`` (fp32
    ``[H/W, D, D]`` per lightning layer) and ``kv_per_token`` (keys and values of the local KV
    heads per softmax layer, in ``dtype``)."""
    from .modeling import MiniMaxM1ForCausalLM
    tp = TensorParallel(config, tensor_parallel_size, 0, None, expert_parallel)
    with torch.device("meta"):
        model = MiniMaxM1ForCausalLM(config)
    shard_model_(model, tp)
    model.to(dtype)
    if int8_experts:
        for layer in model.model.layers:
            layer.block_sparse_moe.make_int8(device="meta")
    out = {"experts": 0, "attention": 0, "embed_head": 0, "other": 0}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        n = t.numel() * t.element_size()
        if ".block_sparse_moe.w" in name:
            out["experts"] += n
        elif ".self_attn." in name and not name.endswith(("slopes", "inv_freq")):
            out["attention"] += n
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out["embed_head"] += n
        else:
            out["other"] += n
    out["weights"] = sum(out.values())
    ids = config.layer_ids
    (h0, h1), (k0, k1), D = tp.heads, tp.kv_heads, config.head_dim
    out["lightning_state_per_seq"] = sum(config.is_lightning(i) for i in ids) * (h1 - h0) * D * D * 4
    out["kv_per_token"] = sum(not config.is_lightning(i) for i in ids) * 2 * (k1 - k0) * D * dtype.itemsize
    return out


# ---------------------------------------------------------------------- communication
def collective_bytes_per_token(config: MiniMaxM1Config, tensor_parallel_size: int,
                               act_bytes: int = 2) -> Dict[str, float]:
    """Bytes one rank puts into all-reduces per token for one forward of the trunk (embedding
    and decoder layers, prefill or decode alike), as :class:`TensorParallel` issues them
    (``comm_bytes`` counts the same), with activations of ``act_bytes`` bytes:

    - ``lightning_layer``: the output norm's fp32 sum of squares (4 B), ``out_proj``'s partial
      output (hidden) and the MoE's (hidden);
    - ``softmax_layer``: ``o_proj``'s partial output and the MoE's (hidden each);
    - ``embedding``: the vocabulary-parallel lookup (hidden), once per token;
    - ``per_layer``: the mean over the config's layers, embedding excluded.

    Tensor- and expert-parallel experts cost the same (one [tokens, hidden] all-reduce). The FP32
    head is separate: its statistics are gathered per row (4 fp32 values × W), full logits only
    when asked. 0 for ``tensor_parallel_size`` 1.
    """
    if tensor_parallel_size <= 1:
        return {"lightning_layer": 0.0, "softmax_layer": 0.0, "embedding": 0.0, "per_layer": 0.0}
    h = config.hidden_size
    lightning, softmax = 4 + 2 * h * act_bytes, 2 * h * act_bytes
    ids = config.layer_ids
    n_light = sum(config.is_lightning(i) for i in ids)
    per_layer = (n_light * lightning + (len(ids) - n_light) * softmax) / max(1, len(ids))
    return {"lightning_layer": float(lightning), "softmax_layer": float(softmax), "embedding": float(h * act_bytes),
            "per_layer": per_layer}
