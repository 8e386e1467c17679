"""Consistent mode's cache step: the chunk-aligned prefill continued from a slot (docs/m1_math.md §3.6).

In consistent mode a token's output must be bitwise the one a single pass over its whole
sequence computes (``lightning_attention(..., consistent=True)``): chunks of C = 64 aligned to
the sequence's start, the state carried across chunk boundaries. A slot therefore keeps the
state at the sequence's last chunk boundary plus the k, v of the tokens since then (the partial
chunk, fewer than C), and every call (prefill, continued prefill, decode) reruns, per sequence,
that same prefill over [partial chunk + new tokens] from the boundary state: the chunks then
fall where the single pass has them, and a row's output depends only on its q, its chunk's k, v
and the incoming state (rows after it are masked to exact zeros), so it is the single pass's
value bit for bit. The state is then advanced only over chunks that completed
(``boundary_state``), and the k, v of the new partial chunk are stored.

Everything here is device-side tensor arithmetic with static shapes (no host sync; the packed
buffer is sized T + (C-1)·N), so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

CHUNK = 64


def pack_partial_chunks(q, k, v, partial_k, partial_v, slot_ids, cached_lens, cu_seqlens):
    """Pack, per sequence, its cached partial chunk then its new tokens.

    q, k, v ``[1, T, H, ·]`` (varlen, ``cu_seqlens [N+1]``); ``partial_k/v [S, C, H, ·]``;
    ``cached_lens [N]``: tokens the sequence's slot has seen before. Returns ``(q2, k2, v2, cu2,
    new_rows)``: packed ``[1, T + (C-1)·N + 1, H, ·]``, int32 ``cu2 [N+1]`` and the packed row of
    each new token ``[T]``. q is zero on the cached rows (their outputs are not kept). k and v
    are written on the packed sequences' rows only: the rows past ``cu2[-1]`` (the static
    bound's slack, and one trash row that absorbs the unused candidates of the partial chunks)
    hold whatever the allocator had, and no sequence covers them, so no pass reads them. A
    sequence whose slot is negative or out of range has no cached rows.
    """
    T, N, S = q.shape[1], slot_ids.shape[0], partial_k.shape[0]
    dev = q.device
    cu = cu_seqlens.long()
    valid = (slot_ids >= 0) & (slot_ids < S)
    slot = torch.where(valid, slot_ids, 0).long()
    p = torch.where(valid, cached_lens.long() % CHUNK, 0)                   # cached rows per sequence
    p_incl = torch.cumsum(p, 0)
    cu2 = torch.cat([cu[:1], cu[1:] + p_incl])
    trash = T + (CHUNK - 1) * N                                              # the static bound
    t = torch.arange(T, device=dev)
    new_rows = t + p_incl[torch.searchsorted(cu[1:], t, right=True).clamp(max=N - 1)]  # cu2[n] + p[n] + local
    # Candidate r of sequence n's partial chunk goes to its packed row when r < p[n], else to trash.
    r = torch.arange(CHUNK - 1, device=dev)
    old_rows = torch.where(r[None] < p[:, None], cu2[:-1, None] + r[None], trash).flatten()

    def pack(new, partial):
        out = (new.new_zeros if partial is None else new.new_empty)(1, trash + 1, *new.shape[2:])
        out[0].index_copy_(0, new_rows, new[0])
        if partial is not None:
            cached = partial.index_select(0, slot)[:, :CHUNK - 1].reshape(-1, *new.shape[2:])
            out[0].index_copy_(0, old_rows, cached)
        return out

    return pack(q, None), pack(k, partial_k), pack(v, partial_v), cu2.int(), new_rows


def store_partial_chunks_(k2, v2, partial_k, partial_v, slot_ids, cached_lens, cu_seqlens, cu2, T):
    """Write each sequence's new partial chunk (its last ``(cached + new) % C`` tokens) into its slot
    of ``partial_k/v`` in place, from the packed ``k2, v2`` of :func:`pack_partial_chunks`.

    Each of the ``T`` new tokens writes one row, at its position mod C: the value the new partial
    chunk holds there (the token itself, or a later token of the same residue), or zeros at
    residues past the new partial length (never read). A row is written by several tokens only
    with one value, so the result is deterministic (no scatter race). Tokens of padding
    sequences (negative or out-of-range slot) write nothing; cached rows that stay in the
    partial chunk are left as they are (no new token has their residue).
    """
    N, S = slot_ids.shape[0], partial_k.shape[0]
    if T == 0 or S == 0:
        return
    dev = k2.device
    cu, cu2 = cu_seqlens.long(), cu2.long()
    valid = (slot_ids >= 0) & (slot_ids < S)
    slot = torch.where(valid, slot_ids, 0).long()
    cached = cached_lens.long()
    p = torch.where(valid, cached % CHUNK, 0)
    t = torch.arange(T, device=dev)
    seq = torch.searchsorted(cu[1:], t, right=True).clamp(max=N - 1)
    total = cached + (cu[1:] - cu[:-1])                      # tokens seen after this call
    rest = total % CHUNK                                     # the new partial chunk's length
    d = (cached[seq] + t - cu[seq]) % CHUNK                  # the token's row in the chunk
    keep = d < rest[seq]
    # Packed row of the token at position total - rest + d (packed rows start at cached - p).
    src = cu2[seq] + (total[seq] - rest[seq] + d) - (cached[seq] - p[seq])
    src = torch.where(keep, src, 0).clamp(0, k2.shape[1] - 1)
    dest = slot[seq] * CHUNK + d
    ok = valid[seq]
    # Rows of padding sequences are pointed at the first writing token's row with its very
    # value (or, when no token writes, at row 0 with its current value): no boolean indexing.
    # Index with one-element tensors (index_select), never 0-d ones: tensor[0-d tensor] reads
    # the index back to the host (a sync per call).
    first = ok.int().argmax().view(1)
    any_ok = ok.any()
    for packed, partial in ((k2, partial_k), (v2, partial_v)):
        flat = partial.view(S * CHUNK, *partial.shape[2:])
        values = torch.where(keep[:, None, None], packed[0, src], 0)
        dest0 = torch.where(any_ok, dest.index_select(0, first), 0)                       # [1]
        value0 = torch.where(any_ok, values.index_select(0, first), flat.index_select(0, dest0))
        flat.index_put_((torch.where(ok, dest, dest0),), torch.where(ok[:, None, None], values, value0))


def chunk_cache_step(q, k, v, slopes, state_cache, partial_k, partial_v, slot_ids, cached_lens, cu_seqlens,
                     prefill):
    """Consistent mode's step on validated inputs; see ``mm1_kernels.lightning_chunk_cache_step``.

    ``prefill(q2, k2, v2, cu2)`` runs the backend's single-pass prefill over the packed
    sequences from ``state_cache[slot_ids]`` and writes each one's state at its last chunk
    boundary back into its slot (padding sequences: zero outputs, cache untouched); it
    returns the packed outputs. Returns ``o [1, T, H, Dv]``.
    """
    T = q.shape[1]
    q2, k2, v2, cu2, new_rows = pack_partial_chunks(q, k, v, partial_k, partial_v, slot_ids, cached_lens,
                                                    cu_seqlens)
    o2 = prefill(q2, k2, v2, cu2)
    # Before the partial chunks are overwritten: k2, v2 are copies, nothing reads the cache now.
    store_partial_chunks_(k2, v2, partial_k, partial_v, slot_ids, cached_lens, cu_seqlens, cu2, T)
    return o2.index_select(1, new_rows)
