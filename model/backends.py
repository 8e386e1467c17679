"""The model's ``backend=`` argument: its validation, and the backend each op gets.

Shared by ``modeling`` and ``generation`` (so neither imports the other for it); uses only the
public registry of mm1_kernels (``mk.available_backends``).
"""
from __future__ import annotations

from typing import Optional

import mm1_kernels as mk


def check_backend(backend, name: str = "backend") -> Optional[str]:
    """``backend`` itself when it is None or one of ``mk.BACKENDS``; else TypeError/ValueError
    naming the argument. (Whether a named backend can run here is the op's question, at call time.)"""
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"{name} must be None or one of {mk.BACKENDS}, got {type(backend).__name__}")
    if backend not in mk.BACKENDS:
        raise ValueError(f"{name}: unknown backend {backend!r}; choose one of {mk.BACKENDS} or None")
    return backend


def op_backend(op: str, backend: Optional[str]) -> Optional[str]:
    """The model's backend for one op: as asked when the op has it, else the op's automatic choice.

    Like ``MM1_BACKEND``: ``backend="cuda"`` runs the CUDA kernels that exist and lets an op that
    has none pick its fastest. A backend the op has but that cannot run still raises
    (``mk.BackendUnavailableError``, from the op).
    """
    if backend is None or backend in mk.available_backends(op):
        return backend
    return None
