"""Helpers shared by the engine shims (one home for each)."""
from __future__ import annotations

import torch

_local_maps: dict = {}


def sentinel_expert_map(num_experts: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The ``[E + 1]`` expert map ``[0, 1, ..., E - 1, -1]``, cached per (E, device, dtype).

    Engines that mark "an expert on another rank" with the id E (transformers' expert
    parallelism) or with -1 (SGLang; the shim sends it to E) get exactly zero for such an entry
    from ``mk.fused_moe(..., expert_map=...)``, and the identity for every local expert. Built on
    the host once per key, so build it before a CUDA graph capture (one warm-up call).
    """
    key = (num_experts, torch.device(device), dtype)
    m = _local_maps.get(key)
    if m is None:
        m = torch.cat([torch.arange(num_experts, dtype=dtype), torch.full((1,), -1, dtype=dtype)]).to(device)
        _local_maps[key] = m
    return m
