"""The interpreter fixes act on this package's kernels only, and compute what a GPU computes."""
import os
import threading

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpreterBuilder  # noqa: E402

import mm1_kernels as mk  # noqa: E402
from mm1_kernels import _triton_interpret as fixes  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the CPU interpreter (TRITON_INTERPRET=1)")


@triton.jit
def _foreign_kernel(a_ptr, b_ptr, x_ptr, dot_ptr, cast_ptr):
    # Another library's kernel: a bf16 dot and an fp32 -> bf16 cast, launched without our wrapper.
    r = tl.arange(0, 16)
    tile = r[:, None] * 16 + r[None, :]
    tl.store(dot_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))
    tl.store(cast_ptr + r, tl.load(x_ptr + r).to(tl.bfloat16))


def _foreign_inputs():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 16, generator=g).bfloat16()
    x = (1.0 + torch.arange(16, dtype=torch.float32) / 8) * (1 + 2.0 ** -8 + 2.0 ** -10)
    return a, b, x


def _run_foreign(kernel=_foreign_kernel):
    a, b, x = _foreign_inputs()
    dot, cast = torch.empty(16, 16), torch.empty(16, dtype=torch.bfloat16)
    kernel[(1,)](a, b, x, dot, cast)
    return dot, cast


def _run_one_of_ours():
    q, k, v = (torch.rand(1, 5, 1, 16).bfloat16() for _ in range(3))
    o, _ = mk.lightning_attention(q, k, v, mk.lightning_slopes(1, 0, 2), backend="triton")
    return o


def test_import_leaves_the_interpreter_alone():
    original = {name: InterpreterBuilder.__dict__[name] for name in fixes._FIXES}
    before = _run_foreign()
    _run_one_of_ours()
    after = _run_foreign()
    for name, method in original.items():
        assert InterpreterBuilder.__dict__[name] is method, f"{name} left patched after our launch"
    # Another library's kernel computes exactly what it computed before ours ran, whatever that is.
    assert torch.equal(before[0].nan_to_num(), after[0].nan_to_num())
    assert torch.equal(before[1].float().nan_to_num(), after[1].float().nan_to_num())


_FOREIGN_DIGEST = """
import hashlib, os
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl
if {import_ours}:
    import mm1_kernels  # noqa: F401
    import mm1_kernels.lightning.triton_prefill  # noqa: F401  (defines and decorates kernels)

@triton.jit
def foreign(a_ptr, b_ptr, x_ptr, dot_ptr, cast_ptr):
    r = tl.arange(0, 16)
    tile = r[:, None] * 16 + r[None, :]
    tl.store(dot_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))
    tl.store(cast_ptr + r, tl.load(x_ptr + r).to(tl.bfloat16))

g = torch.Generator().manual_seed(3)
a, b = torch.randn(16, 16, generator=g).bfloat16(), torch.randn(16, 16, generator=g).bfloat16()
x = (1.0 + torch.arange(16, dtype=torch.float32) / 8) * (1 + 2.0 ** -8 + 2.0 ** -10)
dot, cast = torch.empty(16, 16), torch.empty(16, dtype=torch.bfloat16)
foreign[(1,)](a, b, x, dot, cast)
print(hashlib.sha256(dot.numpy().tobytes() + cast.view(torch.int16).numpy().tobytes()).hexdigest())
"""


def test_importing_the_package_changes_no_foreign_kernel():
    """The same foreign kernel in two fresh interpreters, one that never imports mm1_kernels and
    one that imports it (and its kernels) first: bitwise the same results. (Checked in fresh
    processes: within this one, the package was imported before any test could look.)"""
    import subprocess
    import sys

    digests = []
    for import_ours in (False, True):
        code = _FOREIGN_DIGEST.format(import_ours=import_ours)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        digests.append(out.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


def test_our_launches_compute_what_a_gpu_does():
    wrapped = fixes.interpreted_with_fixes(_foreign_kernel)
    dot, cast = _run_foreign(wrapped)
    a, b, x = _foreign_inputs()
    torch.testing.assert_close(dot, a.float() @ b.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(cast, x.bfloat16())                  # round to nearest even, as torch


def test_fixes_are_per_thread():
    """While our kernel runs on one thread, a foreign kernel on another sees the plain interpreter."""
    plain = _run_foreign()
    seen = {}
    started, release = threading.Event(), threading.Event()

    @fixes.interpreted_with_fixes
    @triton.jit
    def _blocking_kernel(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr) + 1)

    real = fixes.interpreter_fixes

    def hold():
        with real():
            started.set()
            release.wait(timeout=60)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert started.wait(timeout=60)
        seen["foreign"] = _run_foreign()
    finally:
        release.set()
        t.join()
    assert torch.equal(plain[0].nan_to_num(), seen["foreign"][0].nan_to_num())
    assert torch.equal(plain[1].float().nan_to_num(), seen["foreign"][1].float().nan_to_num())
    x = torch.zeros(1)
    _blocking_kernel[(1,)](x)
    assert x.item() == 1.0


def test_probe_matches_the_installed_triton():
    """The cast fix is applied exactly when the plain interpreter truncates; the dot fix always."""
    _, cast = _run_foreign()
    _, _, x = _foreign_inputs()
    assert "create_dot" in fixes.needed_fixes()
    assert ("cast_impl" in fixes.needed_fixes()) == (not torch.equal(cast, x.bfloat16()))


@fixes.interpreted_with_fixes
@triton.jit
def _tile_dot_kernel(a_ptr, b_ptr, c_ptr, K: tl.constexpr):
    r = tl.arange(0, 16)
    kk = tl.arange(0, K)
    a = tl.load(a_ptr + r[:, None] * K + kk[None, :])
    b = tl.load(b_ptr + kk[:, None] * 64 + tl.arange(0, 64)[None, :])
    tl.store(c_ptr + r[:, None] * 64 + tl.arange(0, 64)[None, :], tl.dot(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dot_rows_do_not_depend_on_other_rows(dtype):
    """A row's dot result is bitwise the same whatever the tile's other rows hold (as on a tensor
    core), and is the fp64 product rounded once to fp32."""
    g = torch.Generator().manual_seed(1)
    K = 64
    a = (30 * torch.randn(16, K, generator=g)).to(dtype)
    b = torch.randn(K, 64, generator=g).to(dtype)
    full = torch.empty(16, 64)
    _tile_dot_kernel[(1,)](a, b, full, K=K)
    for r in (0, 7, 15):
        alone_a = torch.zeros_like(a)
        alone_a[0] = a[r]
        alone = torch.empty(16, 64)
        _tile_dot_kernel[(1,)](alone_a, b, alone, K=K)
        assert torch.equal(alone[0], full[r]), r
    assert torch.equal(full, (a.double() @ b.double()).float())


@pytest.mark.parametrize("values", [
    pytest.param([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8)], id="ties-to-even"),
    pytest.param([3.0e38, 3.4e38, -3.4e38, float("inf"), -float("inf")], id="overflow-inf"),
    pytest.param([1e-40, -1e-40, 5e-39, 0.0, -0.0], id="subnormal-zero"),
    pytest.param(list(np.random.default_rng(0).standard_normal(64) * 1e3), id="random"),
])
def test_rne_conversion_matches_torch(values):
    x = torch.tensor(values, dtype=torch.float32)
    bits = fixes._fp32_to_bf16_bits_rne(x.numpy())
    assert np.array_equal(bits, x.bfloat16().view(torch.int16).numpy().view(np.uint16))


def test_rne_conversion_keeps_nan():
    x = np.array([np.nan, -np.nan, np.float32(np.frombuffer(np.uint32(0x7FFFFFFF).tobytes(), np.float32)[0])],
                 dtype=np.float32)
    back = (fixes._fp32_to_bf16_bits_rne(x).astype(np.uint32) << 16).view(np.float32)
    assert np.isnan(back).all()
