"""NVTX ranges around public ops and model phases.

Uses the ``nvtx`` package when installed, torch's NVTX bindings on a CUDA build otherwise,
and nothing on CPU-only builds. A range push/pop costs well under a microsecond when no
profiler is attached; inside a torch.compile trace no range is emitted (it would break the
graph).
"""
from __future__ import annotations

import contextlib
import functools

import torch

try:  # pragma: no cover - optional dependency
    import nvtx as _nvtx_pkg
except Exception:  # pragma: no cover
    _nvtx_pkg = None


@contextlib.contextmanager
def nvtx_range(name: str):
    if torch.compiler.is_compiling():
        yield
        return
    if _nvtx_pkg is not None:
        with _nvtx_pkg.annotate(name, domain="mm1"):
            yield
        return
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
        return
    yield


def annotate(name: str):
    """Decorator form of :func:`nvtx_range`."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            with nvtx_range(name):
                return fn(*args, **kwargs)
        return inner
    return wrap
