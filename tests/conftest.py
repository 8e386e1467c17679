"""Test setup: CPU runs exercise Triton kernels through the interpreter.

``TRITON_INTERPRET`` must be set before any Triton kernel is defined, i.e. before
mm1_kernels is imported, so it is decided here from whether a GPU is present.
"""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped otherwise)")
    # `slow` is registered in pyproject.toml; `pytest tests -m "not slow"` is the fast subset.
    # Only the slow ThreadSanitizer tests use the emulation's TSan builds: a run without them
    # skips building them (tests/test_cuda_emulation.py reads MM1_EMU_TSAN at import).
    if "not slow" in (config.getoption("markexpr", "") or ""):
        os.environ.setdefault("MM1_EMU_TSAN", "0")
    # The Triton interpreter trips a numpy deprecation on every scalar index; it is not ours.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.runtime.interpreter")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if _HAS_CUDA else "cpu")


@pytest.fixture
def poison_outputs(monkeypatch):
    """Make every floating torch.empty/empty_like come back full of NaN during the test.

    Kernels allocate their outputs with torch.empty; poisoning it means an element a kernel
    forgot to write shows up as NaN instead of as whatever the allocator had lying around.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    yield
