"""generate(): varlen prefill, then one decode step per new token, through the FP32 head.

Every token comes from ``mk.head_sample``: greedy when ``temperature == 0``, otherwise sampled with
temperature / top-p / top-k (M1's recommended sampling: temperature 1.0, top_p 0.95).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

import mm1_kernels as mk

from .backends import op_backend
from .checks import as_int, prompt_list, token_ids

M1_TEMPERATURE, M1_TOP_P = 1.0, 0.95


def select_next(model, hidden: torch.Tensor, temperature: float, top_p: float, top_k: int,
                generator: Optional[torch.Generator]):
    """Next token and its logprob for each row of ``hidden [N, hidden]`` (after the final norm)."""
    head = getattr(model, "head_ops", mk)  # the vocabulary-parallel head under tensor parallelism
    tokens, logprobs = head.head_sample(hidden, model.lm_head.weight, temperature=temperature, top_p=top_p,
                                        top_k=top_k, generator=generator,
                                        backend=op_backend("head_sample", model.backend))
    return tokens.long(), logprobs


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, stop_tokens: Optional[Sequence[int]] = None,
             callback: Optional[Callable[[int, torch.Tensor], object]] = None,
             generator: Optional[torch.Generator] = None, pad_token_id: Optional[int] = None,
             return_logprobs: bool = False):
    """Generate up to ``max_new_tokens`` tokens for each prompt.

    Args:
        input_ids: int tensor ``[B, T]`` (equal lengths) or a non-empty list of non-empty 1-D
            prompts (any lengths); ids in ``[0, vocab_size)``.
        max_new_tokens: an int >= 0 (0 returns the prompts).
        stop_tokens: a sequence stops after emitting one of these (it is kept in the output).
        callback: called as ``callback(step, tokens)`` after each new token; ``tokens [B]`` are
            the new tokens (``pad_token_id`` for finished rows). Returning False stops generation.
        pad_token_id: fills finished rows (default: the first stop token, else 0).

    Returns the prompts followed by their new tokens: a LongTensor ``[B, T + n]`` for tensor
    input, a list of 1-D tensors (without padding) for list input; with ``return_logprobs``
    also the fp32 logprobs of the new tokens ``[B, n]``.
    """
    V = model.config.vocab_size
    as_tensor = isinstance(input_ids, torch.Tensor)
    if as_tensor:
        input_ids = token_ids(input_ids, V, "input_ids", ndim=2)
    prompts = prompt_list(input_ids, V, "input_ids", check=not as_tensor)
    max_new_tokens = as_int(max_new_tokens, "max_new_tokens")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B = len(prompts)
    stop_list = [] if stop_tokens is None else [as_int(t, "stop_tokens") for t in stop_tokens]
    bad = [t for t in stop_list if not 0 <= t < V]
    if bad:
        raise ValueError(f"stop_tokens must be token ids in [0, {V}), got {bad[0]}")
    if pad_token_id is not None:
        pad_token_id = as_int(pad_token_id, "pad_token_id")
        if not 0 <= pad_token_id < V:  # finished rows keep decoding their pad token
            raise ValueError(f"pad_token_id must be a token id in [0, {V}), got {pad_token_id}")
    stops = torch.tensor(sorted(set(stop_list)), dtype=torch.long, device=model.device)
    pad = pad_token_id if pad_token_id is not None else (min(stop_list) if stop_list else 0)
    max_len = max(int(p.numel()) for p in prompts) + max_new_tokens
    cache = model.new_cache(B, max_len)
    out_tokens, out_lp = [], []
    finished = torch.zeros(B, dtype=torch.bool, device=model.device)
    if max_new_tokens > 0:
        # The head runs in select_next (mk.head_sample): prefill's own logits would be unused.
        hidden = model.prefill(prompts, cache, return_logits=False, check_ids=False).hidden_states
        for step in range(max_new_tokens):
            tok, lp = select_next(model, hidden, temperature, top_p, top_k, generator)
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            out_tokens.append(tok)
            out_lp.append(torch.where(finished, torch.zeros_like(lp), lp))
            if stops.numel():
                finished |= torch.isin(tok, stops)
            if callback is not None and callback(step, tok) is False:
                break
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            # Finished rows keep decoding (their outputs are discarded): no ragged batch, no sync.
            # sampled ids (and the checked pad) are in the vocabulary: no per-step host check
            hidden = model.decode(tok, cache, return_logits=False, check_ids=False).hidden_states
    new = (torch.stack(out_tokens, 1) if out_tokens
           else torch.empty(B, 0, dtype=torch.long, device=model.device))
    lps = torch.stack(out_lp, 1) if out_lp else torch.empty(B, 0, device=model.device)
    if as_tensor:
        result = torch.cat([input_ids.to(new.device), new], 1)
    else:
        result = []
        stop_set = set(stops.tolist())
        for b, p in enumerate(prompts):
            row = new[b].tolist()
            if stop_set:
                hits = [i for i, t in enumerate(row) if t in stop_set]
                row = row[:hits[0] + 1] if hits else row
            result.append(torch.cat([p.to(new.device), torch.tensor(row, dtype=torch.long, device=new.device)]))
    return (result, lps) if return_logprobs else result
