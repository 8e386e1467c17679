"""Argument validation shared by every op: one place, one wording.

Shape and dtype problems raise ``TypeError`` (wrong type or dtype) or ``ValueError``
(wrong shape, device, layout or value) with the argument's name, before any kernel runs.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | Sequence[int] | None = None,
                 shape: Sequence[int | None] | None = None,
                 device: torch.device | None = None,
                 contiguous: bool = False, last_dim_contiguous: bool = False) -> torch.Tensor:
    """Validate one tensor argument; ``None`` entries in ``shape`` accept any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()); got strides {t.stride()}")
    if last_dim_contiguous and t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension; got strides {t.stride()}")
    return t


# The ``precision=`` options of the ops that trade tensor-core work for accuracy: "default" and
# "high". Each op's docstring says what they mean there (lightning_attention: bf16 hi + lo
# products in the Triton prefill; the FP32 head: the two-sum across K blocks).
PRECISIONS = ("default", "high")


def check_precision(precision) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        listed = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"these inputs must share one dtype: {listed}")
    return next(iter(dtypes.values()))


def can_check_device_values(*tensors: torch.Tensor) -> bool:
    """Whether checks that read tensor values (slot ids, cu_seqlens) may run now.

    Reading a CUDA tensor's values synchronizes the host, which is illegal during CUDA graph
    capture and impossible while torch.compile traces. In those cases the kernels' own guards
    (clamped offsets, skipped out-of-range slots) keep memory safe and the host check is
    skipped.
    """
    if torch.compiler.is_compiling():
        return False
    if any(t.device.type == "cuda" for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return not any(t.device.type == "meta" for t in tensors)


class _ValueCheckMemo:
    """Remembers the last tensor whose values passed a check, so a model that hands the same
    ``cu_seqlens`` or ``slot_ids`` to each of its 70 lightning layers pays one host sync per
    forward, not 70. Identity is held by a weak reference (no address reuse) and the tensor's
    version counter (any in-place write invalidates it)."""

    def __init__(self):
        self._ref = None
        self._key = None

    def hit(self, t: torch.Tensor, key) -> bool:
        return self._ref is not None and self._ref() is t and self._key == (t._version, key)

    def remember(self, t: torch.Tensor, key) -> None:
        self._ref, self._key = weakref.ref(t), (t._version, key)


_cu_seqlens_memo = _ValueCheckMemo()
_slot_ids_memo = _ValueCheckMemo()


class _ValueCheckMemoPerTensor:
    """Like :class:`_ValueCheckMemo`, for many live tensors at once (each of a model's 70
    lightning layers has its own slopes): an entry per tensor id, dropped when the tensor dies."""

    def __init__(self):
        self._entries: dict = {}

    def hit(self, t: torch.Tensor, key) -> bool:
        entry = self._entries.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == (t._version, key)

    def remember(self, t: torch.Tensor, key) -> None:
        tid = id(t)
        self._entries[tid] = (weakref.ref(t, lambda _, tid=tid: self._entries.pop(tid, None)), (t._version, key))


_slopes_memo = _ValueCheckMemoPerTensor()


def check_slopes(slopes: torch.Tensor) -> None:
    """Lightning decay rates must be finite and >= 0 (the decay exp(-s) is then in (0, 1]; a
    negative rate makes the state grow without bound, a NaN poisons every token). One host sync
    per slopes tensor while it is unmodified (a model's layers reuse theirs), none under graph
    capture or torch.compile."""
    if can_check_device_values(slopes) and not _slopes_memo.hit(slopes, None):
        bad = ~(torch.isfinite(slopes) & (slopes >= 0))
        if bool(bad.any()):
            raise ValueError(f"slopes must be finite and >= 0 (decay exp(-slopes) in (0, 1]); got "
                             f"{slopes[bad][:8].tolist()} at heads {bad.nonzero().flatten()[:8].tolist()}")
        _slopes_memo.remember(slopes, None)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int, device: torch.device,
                     values: bool = True) -> int:
    """Validate varlen offsets ``[N+1]``: int32, 0 first, non-decreasing, ``total_tokens`` last.

    Returns N, the number of sequences. ``values=False`` checks only dtype, shape and device
    (the caller vouches for the values: no host sync).
    """
    check_tensor("cu_seqlens", cu_seqlens, dtypes=INDEX_DTYPES, ndim=1, device=device, contiguous=True)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets ([0, T]), got {cu_seqlens.numel()}")
    if values and can_check_device_values(cu_seqlens) and not _cu_seqlens_memo.hit(cu_seqlens, total_tokens):
        cu = cu_seqlens.detach().to("cpu", torch.int64)
        if int(cu[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
        if int(cu[-1]) != total_tokens:
            raise ValueError(f"cu_seqlens must end at the number of tokens ({total_tokens}), got {int(cu[-1])}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()[:16]}...")
        _cu_seqlens_memo.remember(cu_seqlens, total_tokens)
    return cu_seqlens.numel() - 1


def check_slot_ids(slot_ids: torch.Tensor, batch: int, num_slots: int, device: torch.device,
                   values: bool = True) -> None:
    """Validate ``slot_ids [B]``: integer, on the device, each < ``num_slots`` (negative = padding),
    and the non-negative ones distinct (two rows updating one slot in place would race).

    One host sync (a copy of the B ids), memoized like :func:`check_cu_seqlens`; none with
    ``values=False`` (dtype, shape and device only).
    """
    check_tensor("slot_ids", slot_ids, dtypes=INDEX_DTYPES, shape=(batch,), device=device, contiguous=True)
    if values and can_check_device_values(slot_ids) and slot_ids.numel() \
            and not _slot_ids_memo.hit(slot_ids, num_slots):
        ids = slot_ids.detach().to("cpu", torch.int64)
        hi = int(ids.max())
        if hi >= num_slots:
            raise ValueError(f"slot_ids holds {hi} but the state cache has only {num_slots} slots")
        used = ids[ids >= 0]
        distinct, counts = torch.unique(used, return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"slot_ids must be distinct (negative padding ids excepted); "
                             f"repeated: {distinct[counts > 1][:8].tolist()}")
        _slot_ids_memo.remember(slot_ids, num_slots)


_index_range_memos: dict[str, _ValueCheckMemo] = {}


def check_index_range(name: str, ids: torch.Tensor, upper: int, what: str,
                      ignore_value: int | None = None) -> None:
    """Values of ``ids`` must lie in ``[0, upper)`` (``what`` names the bound), or equal
    ``ignore_value``. One host sync, skipped when values cannot be read (see
    :func:`can_check_device_values`) and memoized per tensor like the checks above."""
    if not ids.numel() or not can_check_device_values(ids):
        return
    memo = _index_range_memos.setdefault(name, _ValueCheckMemo())
    if memo.hit(ids, (upper, ignore_value)):
        return
    bad = (ids < 0) | (ids >= upper)
    if ignore_value is not None:
        bad &= ids != ignore_value
    if bool(bad.any()):
        also = f" or {ignore_value}" if ignore_value is not None else ""
        raise ValueError(f"{name} must be in [0, {upper}) ({what}){also}; got {ids[bad][:8].tolist()}")
    memo.remember(ids, (upper, ignore_value))
