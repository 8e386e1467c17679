"""Argument checks at the model's entry points: each failure is a TypeError or ValueError that
names the argument, raised before any layer runs (never an IndexError from deep inside).

Cost: a check of token ids on a GPU tensor reads two numbers back (one host sync per call, at
entry, never per layer). It is skipped while a CUDA graph is being captured or torch.compile
is tracing, where a sync is not allowed; the caller owns the ids then.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence

import torch


def as_int(value, name: str) -> int:
    """``value`` as a Python int (ints, integer numpy/torch scalars); TypeError otherwise."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def as_size(value, name: str, minimum: int = 1) -> int:
    """An int >= ``minimum`` (a count or a length)."""
    v = as_int(value, name)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def as_id_tensor(ids, name: str) -> torch.Tensor:
    """``ids`` (a tensor, list, numpy array, ...) as an int64 tensor on its own device.

    Refuses floating, complex and bool ids (TypeError): rounding a float to a token is a guess.
    """
    if isinstance(ids, torch.Tensor):
        t = ids
    else:
        try:
            t = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must hold integer token ids, got {type(ids).__name__} "
                            f"({exc})") from None
        if t.numel() == 0:  # [] parses as float32
            t = t.long()
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    return t.long()


def _can_sync(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_token_range(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    """ValueError unless every id is in ``[0, vocab_size)`` (one host read for all of them)."""
    if ids.numel() == 0 or not _can_sync(ids):
        return
    lo, hi = torch.stack(torch.aminmax(ids.reshape(-1))).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name}: token ids must be in [0, {vocab_size}) (the vocabulary), "
                         f"got values in [{lo}, {hi}]")


def token_ids(ids, vocab_size: int, name: str, ndim: Optional[int] = None, check: bool = True) -> torch.Tensor:
    """Checked int64 ids: integer dtype, ``ndim`` dimensions (when given), not empty, in the vocab."""
    t = as_id_tensor(ids, name)
    if ndim is not None and t.dim() != ndim:
        shape = {1: "1-D", 2: "2-D [B, T]"}.get(ndim, f"{ndim}-D")
        raise ValueError(f"{name} must be {shape}, got shape {list(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {list(t.shape)}): there is no token to run")
    if check:
        check_token_range(t, vocab_size, name)
    return t


def prompt_list(prompts, vocab_size: int, name: str, check: bool = True) -> List[torch.Tensor]:
    """A non-empty sequence of non-empty 1-D prompts (a 2-D tensor is a batch of equal-length
    prompts) as int64 tensors; one range check for all of them."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"{name}: a tensor of prompts must be [N, T], got shape {list(prompts.shape)} "
                             f"(pass a list of 1-D prompts for different lengths)")
        prompts = list(prompts)
    elif isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        try:
            prompts = list(prompts)
        except TypeError:
            raise TypeError(f"{name} must be a list of 1-D token sequences, "
                            f"got {type(prompts).__name__}") from None
    if len(prompts) == 0:
        raise ValueError(f"{name} is empty: need at least one prompt")
    seqs = []
    for i, p in enumerate(prompts):
        t = as_id_tensor(p, f"{name}[{i}]")
        if t.dim() != 1:
            what = "a single token id (wrap one prompt in a list: [prompt])" if t.dim() == 0 \
                else f"shape {list(t.shape)}"
            raise ValueError(f"{name}[{i}] must be a 1-D sequence of token ids, got {what}")
        if t.numel() == 0:
            raise ValueError(f"{name}[{i}] is an empty prompt: every prompt needs at least one token")
        seqs.append(t)
    if check:
        _check_prompts_range(seqs, vocab_size, name)
    return seqs


def _check_prompts_range(seqs: List[torch.Tensor], vocab_size: int, name: str) -> None:
    # One read per device for all prompts together; the offending prompt is named on failure.
    by_device = {}
    for i, t in enumerate(seqs):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        try:
            check_token_range(torch.cat([seqs[i] for i in idx]), vocab_size, name)
        except ValueError:
            for i in idx:
                check_token_range(seqs[i], vocab_size, f"{name}[{i}]")
            raise


def slot_list(slot_ids, n: int, num_slots: int, what: str, name: str = "slot_ids") -> List[int]:
    """``n`` distinct slots in ``[0, num_slots)`` as Python ints (default: slots 0..n-1)."""
    if slot_ids is None:
        if n > num_slots:
            raise ValueError(f"cache has {num_slots} slot(s), too few for {n} {what}; "
                             f"make a cache with num_slots >= {n}")
        return list(range(n))
    if isinstance(slot_ids, torch.Tensor):
        if slot_ids.dtype == torch.bool or slot_ids.is_floating_point() or slot_ids.is_complex():
            raise TypeError(f"{name} must hold integer slot indices, got dtype {slot_ids.dtype}")
        slots = slot_ids.reshape(-1).tolist()  # one host read
    else:
        try:
            slots = [as_int(s, name) for s in slot_ids]
        except TypeError as exc:
            if not hasattr(slot_ids, "__iter__"):
                raise TypeError(f"{name} must be a sequence of ints, got {type(slot_ids).__name__}") from None
            raise TypeError(f"{name} must hold integer slot indices: {exc}") from None
    if len(slots) != n:
        raise ValueError(f"{name} must give one slot for each of the {n} {what}, got {len(slots)}")
    bad = [s for s in slots if not 0 <= s < num_slots]
    if bad:
        raise ValueError(f"{name} must be in [0, {num_slots}) (the cache's num_slots), got {bad[0]} "
                         f"in {slots}")
    if len(set(slots)) != n:
        dup = sorted({s for s in slots if slots.count(s) > 1})
        raise ValueError(f"{name} must be distinct, got slot(s) {dup} more than once in {slots}")
    return slots
