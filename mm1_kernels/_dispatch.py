"""The one backend mechanism shared by every op.

Each public op declares which backends it implements; :func:`resolve_backend` turns the
caller's ``backend=`` argument (or the ``MM1_BACKEND`` environment variable) into the
backend that will actually run, or raises a clear error:

- ``"torch"``: the reference implementation; runs anywhere.
- ``"triton"``: Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
  (the interpreter is how CI exercises every kernel without a GPU).
- ``"cuda"``: the compiled extension ``mm1_kernels._C``; CUDA tensors only.

``backend=None`` picks the fastest backend that can run on the given device: on a GPU the
CUDA extension when the op has one, else Triton; on the CPU the torch reference (the
interpreter is for testing, not speed). ``MM1_BACKEND`` replaces that default for the whole
process for every op that implements the named backend; ops that do not implement it keep
their automatic choice.
"""
from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("torch", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_error(module: str, what: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{what} ({type(exc).__name__}: {exc})"
    return None


# Probed once at import, so torch.compile traces plain constants rather than imports.
TRITON_IMPORT_ERROR = _import_error("triton", "triton is not importable")
CUDA_EXTENSION_IMPORT_ERROR = _import_error(
    "mm1_kernels._C", "the CUDA extension mm1_kernels._C is not built or does not load")


def cuda_op_registered(name: str) -> bool:
    """True when the CUDA extension registered ``torch.ops.mm1.<name>``."""
    if CUDA_EXTENSION_IMPORT_ERROR is not None:
        return False
    return hasattr(torch.ops.mm1, name)


def _why_unavailable(backend: str, device: torch.device, cuda_op: str | None) -> str | None:
    """None when ``backend`` can run on ``device``; otherwise the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        if TRITON_IMPORT_ERROR:
            return TRITON_IMPORT_ERROR
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret_enabled():
            return None
        return (f"Triton kernels need CUDA tensors (got device '{device}'); on the CPU they run "
                f"only under the interpreter: set TRITON_INTERPRET=1 before importing mm1_kernels")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors (got device '{device}')"
        if CUDA_EXTENSION_IMPORT_ERROR:
            return CUDA_EXTENSION_IMPORT_ERROR
        if cuda_op is None or not cuda_op_registered(cuda_op):
            return f"the CUDA extension has no kernel torch.ops.mm1.{cuda_op}"
        return None
    raise AssertionError(backend)


def resolve_backend(op: str, backend: str | None, device: torch.device,
                    implemented: tuple[str, ...], cuda_op: str | None = None,
                    gpu_preference: tuple[str, ...] = ("cuda", "triton", "torch")) -> str:
    """Return the backend that runs ``op`` for tensors on ``device``.

    ``implemented`` lists the backends the op has; ``cuda_op`` names its CUDA kernel;
    ``gpu_preference`` is the automatic order on a GPU, fastest measured first.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS} or None")
    if backend is None:
        env = os.environ.get("MM1_BACKEND") or None
        if env is not None:
            if env not in BACKENDS:
                raise ValueError(f"MM1_BACKEND={env!r} is not one of {BACKENDS}")
            if env in implemented:
                backend = env
    if backend is not None:
        if backend not in implemented:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} is not implemented (available: {implemented})")
        why = _why_unavailable(backend, device, cuda_op)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run: {why}")
        return backend
    if device.type != "cuda":
        return "torch"
    for candidate in gpu_preference:
        if candidate in implemented and _why_unavailable(candidate, device, cuda_op) is None:
            return candidate
    raise AssertionError("the torch backend is always available")
