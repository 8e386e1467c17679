"""The one registry of ops and backends, and the public-API boundary of model/, bench/, profiles/.

Each public op declares its backends once (``register_op`` in its api.py); everything else asks
``mk.available_backends`` / ``mk.resolve_backend``. These tests need no kernel to run: every
answer comes from the registry, the device and the environment.
"""
import re
from pathlib import Path

import pytest
import torch

import mm1_kernels as mk

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
INTERPRET = mk.triton_interpret_enabled()  # conftest turns the interpreter on without a GPU

# What each op implements (order aside); a new op or backend updates this table on purpose.
EXPECTED = {
    "lightning_attention": {"torch", "triton", "cuda"},
    "lightning_decode": {"torch", "triton", "cuda"},
    "lightning_chunk_cache_step": {"torch", "triton"},
    "moe_route": {"torch", "triton", "cuda"},
    "fused_moe": {"torch", "triton", "cuda"},
    "head_logprobs": {"torch", "triton", "cuda"},
    "head_sample": {"torch", "triton", "cuda"},
    "head_logits": {"torch", "triton", "cuda"},
    "head_cispo_loss": {"torch", "triton", "cuda"},
    "cispo_loss": {"torch"},
    "invariant_linear": {"torch", "triton"},
}


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("MM1_BACKEND", raising=False)


def test_every_op_is_registered_once_with_its_backends():
    assert set(mk.registered_ops()) == set(EXPECTED)
    for op, backends in EXPECTED.items():
        order = mk.available_backends(op)
        assert set(order) == backends and len(order) == len(backends), op
        assert all(callable(getattr(mk, op)) for op in mk.registered_ops())


@pytest.mark.parametrize("op", sorted(EXPECTED))
def test_available_backends_on_the_cpu(op):
    here = mk.available_backends(op, CPU)
    # the automatic choice first: torch on a CPU; the interpreter adds Triton; never CUDA
    assert here[0] == "torch" == mk.resolve_backend(op, None, CPU)
    assert ("triton" in here) == (INTERPRET and "triton" in EXPECTED[op])
    assert "cuda" not in here
    assert set(here) <= set(mk.available_backends(op))
    # the same answer for a device string or a tensor on the device
    assert mk.available_backends(op, "cpu") == here == mk.available_backends(op, torch.zeros(1))
    for b in here:
        assert mk.resolve_backend(op, b, CPU) == b


@pytest.mark.parametrize("call", [mk.available_backends, mk.resolve_backend])
def test_unknown_op_names_the_op_and_the_valid_ones(call):
    with pytest.raises(ValueError, match=r"unknown op 'lightning'.*lightning_attention.*moe_route"):
        call("lightning")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        mk.resolve_backend("fused_moe", "gpu", CPU)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        mk.fused_moe(torch.zeros(1, 4), torch.zeros(2, 8, 4), torch.zeros(2, 4, 4),
                     torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), backend="gpu")


def test_backend_not_implemented_or_not_runnable():
    with pytest.raises(mk.BackendUnavailableError, match="not implemented"):
        mk.resolve_backend("cispo_loss", "triton", CPU)
    with pytest.raises(mk.BackendUnavailableError, match="needs CUDA tensors"):
        mk.resolve_backend("lightning_attention", "cuda", CPU)


def test_mm1_backend_overrides_the_automatic_choice(monkeypatch):
    monkeypatch.setenv("MM1_BACKEND", "torch")
    assert all(mk.resolve_backend(op, None, CPU) == "torch" for op in EXPECTED)
    if INTERPRET:
        monkeypatch.setenv("MM1_BACKEND", "triton")
        assert mk.resolve_backend("moe_route", None, CPU) == "triton"
        assert mk.resolve_backend("cispo_loss", None, CPU) == "torch"  # it has no Triton backend
        assert mk.available_backends("moe_route", CPU)[0] == "torch"  # capability, not the override
    monkeypatch.setenv("MM1_BACKEND", "cuda")
    assert mk.resolve_backend("cispo_loss", None, CPU) == "torch"  # no CUDA backend: automatic
    with pytest.raises(mk.BackendUnavailableError, match="needs CUDA tensors"):
        mk.resolve_backend("lightning_decode", None, CPU)  # implements it, cannot run it here
    # the ops themselves follow the same rule, and refuse before any work
    q = torch.randn(1, 1, 16)
    with pytest.raises(mk.BackendUnavailableError, match="lightning_decode"):
        mk.lightning_decode(q, q, q, torch.ones(1), torch.zeros(1, 1, 16, 16))
    monkeypatch.setenv("MM1_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MM1_BACKEND='fastest'"):
        mk.resolve_backend("fused_moe", None, CPU)


def test_head_cuda_backend_is_never_the_automatic_choice():
    # csrc/head has no GPU run on record: backend=None tries it last, after the always-available
    # torch backend, so only backend="cuda" (or MM1_BACKEND=cuda) runs it.
    for op in ("head_logprobs", "head_sample", "head_logits", "head_cispo_loss"):
        assert mk.available_backends(op)[-1] == "cuda", op
        assert mk.available_backends(op).index("torch") < mk.available_backends(op).index("cuda"), op


def test_nvtx_range_is_public_and_a_no_op_without_a_profiler():
    with mk.nvtx_range("mm1.test"):
        x = torch.ones(2) + 1
    assert x.sum().item() == 4


def test_one_version_string():
    # pyproject.toml reads the version from this literal line (setuptools dynamic version)
    text = (REPO / "mm1_kernels" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', text, re.M) == [mk.__version__]


# --------------------------------------------------------------------------- the API boundary

# Public submodules beside the top-level names.
PUBLIC_SUBMODULES = {"progress", "integrations"}
REACH_IN = [
    # `from mm1_kernels.X import ...` / `import mm1_kernels.X` for a non-public X
    re.compile(r"^\s*(?:from|import)\s+mm1_kernels\.(?!(?:" + "|".join(PUBLIC_SUBMODULES) + r")\b)\w+",
               re.M),
    # private names or an op's internals through the package: mk._dispatch, mm1_kernels.head.api
    # (mm1_kernels._C, the compiled extension, is named by build checks and allowed)
    re.compile(r"\b(?:mk|mm1_kernels)\.(?:\w+\.)*(?:_(?!_|C\b)\w+|api|reference|torch_head|backward|"
               r"triton_(?!interpret_enabled\b)\w+|cuda_ops)\b"),
]
# The static roofline compiles the kernels themselves (their modules are its input), as the
# AOT tests do, and the MoE tuner times the kernels at tile configurations the table does not
# hold yet (its output is that table); every other file in these folders goes through the public API.
KERNEL_READERS = {"profiles/static", "bench/tune_moe.py"}


@pytest.mark.parametrize("folder", ["bench", "profiles", "model"])
def test_callers_use_only_the_public_api(folder):
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        if any(str(path.relative_to(REPO)).startswith(d) for d in KERNEL_READERS):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in REACH_IN):
                bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not bad, "private mm1_kernels modules used outside the package:\n" + "\n".join(bad)
