"""The serving cache: fp32 lightning states in slots, and a KV cache for the softmax layers.

A slot holds one sequence. Lightning layers keep one fp32 state ``[H, D, D]`` per slot (its
size does not grow with the context); softmax layers keep keys and values for every position
up to ``max_len``, so a slot holds at most ``max_len`` tokens (prompt plus generated; the model
refuses more). ``lengths[s]`` is how many tokens slot s has seen; it lives on the host,
because the model needs it to size attention and to place new tokens without reading the GPU.

A consistent-mode cache (``consistent=True``, docs/m1_math.md §3.6) keeps, per lightning layer
and slot, the state at the sequence's last 64-token chunk boundary instead of after its last
token, plus that partial chunk's k and v (``[64, H, D]`` each, in the cache dtype; row i is the
token at position ``boundary + i``, ``lengths[s] % 64`` rows in use).
"""
from __future__ import annotations

from typing import List, Sequence

import torch

import mm1_kernels as mk

from .checks import as_int, as_size
from .config import MiniMaxM1Config


def _heads(config: MiniMaxM1Config, num_heads, num_kv_heads):
    """(H, D, KVH) of the cache: the config's, or a tensor-parallel rank's local head counts."""
    H = config.num_attention_heads if num_heads is None else as_size(num_heads, "num_heads")
    KVH = config.num_key_value_heads if num_kv_heads is None else as_size(num_kv_heads, "num_kv_heads")
    return H, config.head_dim, KVH


class MiniMaxM1Cache:
    def __init__(self, config: MiniMaxM1Config, num_slots: int, max_len: int,
                 device="cpu", dtype: torch.dtype = torch.bfloat16, num_heads=None, num_kv_heads=None,
                 consistent: bool = False):
        """``num_heads``/``num_kv_heads``: the heads one tensor-parallel rank holds (default all).
        ``consistent``: the cache of a consistent-mode model (see ``MiniMaxM1ForCausalLM.consistent``)."""
        if not isinstance(config, MiniMaxM1Config):
            raise TypeError(f"config must be a MiniMaxM1Config, got {type(config).__name__}")
        num_slots = as_size(num_slots, "num_slots")
        max_len = as_size(max_len, "max_len")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype (the keys/values), got {dtype!r}")
        ids = config.layer_ids
        lightning = [i for i in ids if config.is_lightning(i)]
        softmax = [i for i in ids if not config.is_lightning(i)]
        H, D, KVH = _heads(config, num_heads, num_kv_heads)
        self.num_slots, self.max_len = num_slots, max_len
        if not isinstance(consistent, bool):
            raise TypeError(f"consistent must be a bool, got {type(consistent).__name__}")
        self.consistent = consistent
        # What the cache was shaped for: a model checks it before running (see ``check_fits``).
        self.layout = (tuple(lightning), tuple(softmax), H, D, KVH)
        self._lightning_index = {l: n for n, l in enumerate(lightning)}
        self._softmax_index = {l: n for n, l in enumerate(softmax)}
        # One tensor per kind; a layer's slice [S, ...] is contiguous, as the kernels require.
        self.lightning_states = torch.zeros(len(lightning), num_slots, H, D, D,
                                            dtype=torch.float32, device=device)
        # Consistent mode: each slot's partial chunk (k and v of the tokens since the boundary).
        chunk = mk.LIGHTNING_CHUNK if consistent else 0
        self.partial_keys = torch.zeros(len(lightning), num_slots, chunk, H, D, dtype=dtype, device=device)
        self.partial_values = torch.zeros_like(self.partial_keys)
        self.keys = torch.zeros(len(softmax), num_slots, max_len, KVH, D, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.lengths: List[int] = [0] * num_slots

    def state(self, layer_idx: int) -> torch.Tensor:
        """fp32 ``[S, H, D, D]`` lightning states of GLOBAL layer ``layer_idx``."""
        return self.lightning_states[self._lightning_index[layer_idx]]

    def partial_chunk(self, layer_idx: int):
        """``(keys, values)``, each ``[S, 64, H, D]``, the partial chunks of lightning layer
        ``layer_idx`` (consistent mode only)."""
        if not self.consistent:
            raise ValueError("this cache keeps no partial chunks: make it with consistent=True "
                             "(model.new_cache of a consistent-mode model)")
        n = self._lightning_index[layer_idx]
        return self.partial_keys[n], self.partial_values[n]

    def kv(self, layer_idx: int):
        """``(keys, values)``, each ``[S, max_len, KVH, D]``, of softmax layer ``layer_idx``."""
        n = self._softmax_index[layer_idx]
        return self.keys[n], self.values[n]

    def check_fits(self, config: MiniMaxM1Config, device: torch.device, name: str = "cache",
                   num_heads=None, num_kv_heads=None, consistent=None) -> None:
        """ValueError unless this cache was made for ``config``'s layers and shapes (with these
        local heads), on ``device`` (and, when ``consistent`` is given, for that mode)."""
        if consistent is not None and consistent != self.consistent:
            raise ValueError(f"{name} was made with consistent={self.consistent}, the model runs with "
                             f"consistent={consistent}: make the cache with model.new_cache")
        ids = config.layer_ids
        want = (tuple(i for i in ids if config.is_lightning(i)), tuple(i for i in ids if not config.is_lightning(i)),
                *_heads(config, num_heads, num_kv_heads))
        if self.layout != want:
            raise ValueError(f"{name} was made for another model (layers/heads {self.layout[2:]} of "
                             f"{len(self.layout[0]) + len(self.layout[1])} layers); make it with model.new_cache")
        if self.lightning_states.device != torch.device(device):
            raise ValueError(f"{name} is on {self.lightning_states.device}, the model on {device}")

    def reset(self, slots: Sequence[int]) -> None:
        """Free slots: their next prefill starts a new sequence from a zero state."""
        slots = [as_int(s, "slots") for s in slots]
        bad = [s for s in slots if not 0 <= s < self.num_slots]
        if bad:
            raise ValueError(f"slots must be in [0, {self.num_slots}) (num_slots), got {bad[0]}")
        for s in slots:
            self.lengths[s] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.lightning_states, self.partial_keys,
                                                           self.partial_values, self.keys, self.values))
