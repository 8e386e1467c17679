"""The one registry of ops and backends, and the one backend mechanism shared by every op.

Each public op declares itself once, in its own ``api.py``, with :func:`register_op`: the
backends it implements, the ``torch.ops.mm1.*`` name of its CUDA kernel (if it has one) and
its automatic order on a GPU. Everything else asks this registry: the op itself (through
:func:`resolve_backend`), the model, the benchmarks and the profiles (through the public
``mm1_kernels.available_backends`` / ``mm1_kernels.resolve_backend``).

Backends:

- ``"torch"``: the reference implementation; runs on any device.
- ``"triton"``: Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was
  set before ``mm1_kernels`` was imported (the interpreter is how CI exercises every kernel
  without a GPU).
- ``"cuda"``: the compiled extension ``mm1_kernels._C``; CUDA tensors only, and only ops
  whose kernel the extension registered.

``backend=None`` picks, on a CUDA device, the first backend of the op's GPU order that can
run; on any other device the torch reference (the interpreter is for testing, not speed).
``MM1_BACKEND`` replaces that automatic choice for the whole process, for every op that
implements the named backend; ops that do not implement it keep their automatic choice.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

BACKENDS = ("torch", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


def triton_interpret_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_error(module: str, what: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{what} ({type(exc).__name__}: {exc})"
    return None


# Whether Triton kernels are defined for the interpreter: decided when they are defined, i.e.
# at import, so a TRITON_INTERPRET=1 set later cannot make CPU tensors run on them.
INTERPRET_AT_IMPORT = triton_interpret_enabled()
# Probed once at import, so torch.compile traces plain constants rather than imports.
TRITON_IMPORT_ERROR = _import_error("triton", "triton is not importable")
CUDA_EXTENSION_IMPORT_ERROR = _import_error(
    "mm1_kernels._C", "the CUDA extension mm1_kernels._C is not built or does not load")


def cuda_op_registered(name: str) -> bool:
    """True when the CUDA extension registered ``torch.ops.mm1.<name>``."""
    if CUDA_EXTENSION_IMPORT_ERROR is not None:
        return False
    return hasattr(torch.ops.mm1, name)


@dataclass(frozen=True)
class OpSpec:
    """What one public op declares about its backends.

    ``backends``: the backends it implements; ``cuda_op``: the ``torch.ops.mm1`` name of its
    CUDA kernel (``None`` when it has none); ``gpu_order``: every implemented backend, in the
    order ``backend=None`` tries them on a GPU (fastest measured first).
    """
    name: str
    backends: tuple
    cuda_op: Optional[str]
    gpu_order: tuple


_REGISTRY: dict = {}


def register_op(name: str, backends: tuple, cuda_op: Optional[str] = None,
                gpu_order: Optional[tuple] = None) -> OpSpec:
    """Declare a public op once. ``gpu_order`` defaults to cuda, triton, torch (those implemented).

    Called at import by each op's ``api.py``; declaring the same name twice is an error.
    """
    backends = tuple(backends)
    if not backends or any(b not in BACKENDS for b in backends) or "torch" not in backends:
        raise ValueError(f"{name}: backends must be a subset of {BACKENDS} that includes 'torch', "
                         f"got {backends}")
    if ("cuda" in backends) != (cuda_op is not None):
        raise ValueError(f"{name}: cuda_op names the CUDA kernel exactly when 'cuda' is a backend")
    if gpu_order is None:
        gpu_order = tuple(b for b in ("cuda", "triton", "torch") if b in backends)
    gpu_order = tuple(gpu_order)
    if sorted(gpu_order) != sorted(backends):
        raise ValueError(f"{name}: gpu_order {gpu_order} must order exactly the backends {backends}")
    if name in _REGISTRY:
        raise ValueError(f"op {name!r} is already registered")
    spec = OpSpec(name, backends, cuda_op, gpu_order)
    _REGISTRY[name] = spec
    return spec


def registered_ops() -> tuple:
    """The names of every public op that takes a ``backend=`` argument, sorted."""
    return tuple(sorted(_REGISTRY))


def op_spec(op: str) -> OpSpec:
    """The registry entry of ``op``; ValueError naming the valid ops when there is none."""
    try:
        return _REGISTRY[op]
    except (KeyError, TypeError):
        raise ValueError(f"unknown op {op!r}; registered ops: {', '.join(registered_ops())}") from None


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.Tensor):
        return device.device
    return torch.device(device)


def _why_unavailable(backend: str, device: torch.device, cuda_op: Optional[str]) -> Optional[str]:
    """None when ``backend`` can run on ``device``; otherwise the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        if TRITON_IMPORT_ERROR:
            return TRITON_IMPORT_ERROR
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret_enabled():
            if not INTERPRET_AT_IMPORT:
                return ("TRITON_INTERPRET=1 was set after mm1_kernels was imported, so its Triton "
                        "kernels may already be defined for a GPU: set it before the first import")
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


def _auto_order(spec: OpSpec, device: torch.device) -> tuple:
    if device.type == "cuda":
        return spec.gpu_order
    return ("torch",) + tuple(b for b in spec.gpu_order if b != "torch")


DeviceLike = Union[torch.device, str, torch.Tensor, None]


def available_backends(op: str, device: DeviceLike = None) -> tuple:
    """The backends ``op`` implements, in the order ``backend=None`` would try them.

    ``device=None``: every implemented backend, whether or not it can run on this machine, in
    the op's automatic order on a GPU. With a device (``torch.device``, a string such as
    ``"cuda"``, or a tensor, whose device is used): only the backends that can run on tensors
    there, in the automatic order for that device, so the first entry is what ``backend=None``
    picks when ``MM1_BACKEND`` is unset (on a non-CUDA device: ``"torch"`` first, then
    ``"triton"`` under ``TRITON_INTERPRET=1``). ``MM1_BACKEND`` does not change the answer.
    Unknown ``op``: ValueError listing the registered ops.
    """
    spec = op_spec(op)
    if device is None:
        return spec.gpu_order
    dev = _as_device(device)
    return tuple(b for b in _auto_order(spec, dev) if _why_unavailable(b, dev, spec.cuda_op) is None)


def resolve_backend(op: str, backend: Optional[str] = None, device: DeviceLike = None) -> str:
    """The backend that runs ``op`` for tensors on ``device`` when called with ``backend=``.

    ``device``: a ``torch.device``, a string, or a tensor (its device); ``None`` means ``"cuda"``
    when torch sees a GPU, else ``"cpu"``. ``backend=None`` honours ``MM1_BACKEND``, then the
    automatic order (the first entry of ``available_backends(op, device)``). Raises ValueError
    for an unknown op or backend name (including a bad ``MM1_BACKEND``), and
    :class:`BackendUnavailableError` when the ``backend`` argument names a backend the op does
    not implement, or when the named backend (argument, or ``MM1_BACKEND`` for an op that
    implements it) cannot run on ``device``.
    """
    spec = op_spec(op)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS} or None")
    if backend is None:
        env = os.environ.get("MM1_BACKEND") or None
        if env is not None:
            if env not in BACKENDS:
                raise ValueError(f"MM1_BACKEND={env!r} is not one of {BACKENDS}")
            if env in spec.backends:
                backend = env
    dev = _as_device(device)
    if backend is not None:
        if backend not in spec.backends:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} is not implemented (available: {spec.backends})")
        why = _why_unavailable(backend, dev, spec.cuda_op)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run: {why}")
        return backend
    if dev.type != "cuda":
        return "torch"
    for candidate in spec.gpu_order:
        if _why_unavailable(candidate, dev, spec.cuda_op) is None:
            return candidate
    raise AssertionError("the torch backend is always available")
