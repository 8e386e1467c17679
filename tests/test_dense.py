"""Consistent mode's batch-invariant building blocks: ``mk.invariant_linear``, ``invariant_sum``,
``invariant_pointwise``, and ``fused_moe(..., consistent=True)``.

"Batch invariant" is tested bitwise: a row computed alone equals the same row computed among
1..130 other rows at every position, on every backend (Triton through the interpreter on a CPU).
"""
import pytest
import torch
import torch.nn.functional as F

import mm1_kernels as mk
from mm1_kernels.dense import invariant_pointwise, invariant_sum

from numerics import assert_close_to_reference

HAS_TRITON_DEVICE = torch.cuda.is_available() or mk.triton_interpret_enabled()
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON_DEVICE else [])
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
ROW_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 65, 130]


def _embed(row, n, pos, seed):
    """``n`` random rows with ``row`` at ``pos``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, row.shape[-1], generator=g).to(device=row.device, dtype=row.dtype)
    x[pos] = row
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(64, 192), (64, 4), (48, 40)])
def test_invariant_linear_is_batch_invariant(backend, dtype, K, N):
    g = torch.Generator(device="cpu").manual_seed(K + N)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device=DEV, dtype=dtype)
    row = torch.randn(1, K, generator=g).to(device=DEV, dtype=dtype)
    alone = mk.invariant_linear(row, w, backend=backend)[0]
    for n in ROW_COUNTS:
        for pos in sorted({0, n // 2, n - 1}):
            out = mk.invariant_linear(_embed(row[0], n, pos, seed=n * 131 + pos), w, backend=backend)
            assert torch.equal(out[pos], alone), (n, pos)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_invariant_linear_matches_fp64_and_differentiates(backend, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 37, 80, generator=g).to(device=DEV, dtype=dtype).requires_grad_()
    w = (torch.randn(72, 80, generator=g) / 9).to(device=DEV, dtype=dtype).requires_grad_()
    out = mk.invariant_linear(x, w, backend=backend)
    assert out.shape == (2, 37, 72) and out.dtype == dtype
    ref = x.detach().double() @ w.detach().double().t()
    assert_close_to_reference(out, ref, dtype=dtype, naive=F.linear(x.detach(), w.detach()))
    gy = torch.randn(out.shape, generator=g).to(device=DEV, dtype=dtype)
    dx, dw = torch.autograd.grad(out, (x, w), gy)
    assert_close_to_reference(dx, gy.double() @ w.detach().double(), dtype=dtype)
    assert_close_to_reference(dw, gy.double().reshape(-1, 72).t() @ x.detach().double().reshape(-1, 80),
                              dtype=dtype)


def test_invariant_linear_compiles_and_checks_arguments():
    x = torch.randn(5, 16, device=DEV)
    w = torch.randn(8, 16, device=DEV)
    torch.library.opcheck(torch.ops.mm1.invariant_linear.default, (x, w, "torch"))
    f = torch.compile(lambda a, b: mk.invariant_linear(a, b, backend="torch"), fullgraph=True, backend="eager")
    assert torch.equal(f(x, w), mk.invariant_linear(x, w, backend="torch"))
    assert mk.invariant_linear(x[:0], w).shape == (0, 8)
    with pytest.raises(TypeError, match="weight"):
        mk.invariant_linear(x, w.double())
    with pytest.raises(ValueError, match="K=17"):
        mk.invariant_linear(torch.randn(3, 17, device=DEV), w)
    with pytest.raises(TypeError, match="x must"):
        mk.invariant_linear(x.long(), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [torch.sigmoid, F.silu, torch.exp, torch.cos], ids=lambda f: f.__name__)
def test_pointwise_is_position_independent(dtype, fn):
    """The vectorized/scalar-tail split of CPU elementwise loops is gone: an element's bits do
    not depend on the tensor's size or its position (plain ``fn`` fails this for fp32 sigmoid/silu)."""
    v = (torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 3).to(device=DEV, dtype=dtype)
    full = invariant_pointwise(fn, v)
    for n in list(range(1, 70)) + [255, 257, 1000]:
        assert torch.equal(invariant_pointwise(fn, v[:n]), full[:n]), n
    ones = torch.stack([invariant_pointwise(fn, v[i:i + 1])[0] for i in range(64)])
    assert torch.equal(ones, full[:64])
    x = v[:600].view(20, 30).t()  # a non-contiguous view: its elements, in its shape
    assert torch.equal(invariant_pointwise(fn, x), full[:600].view(20, 30).t())


@pytest.mark.parametrize("threads", [3, 8])
def test_pointwise_is_position_independent_with_more_threads(threads):
    """With more threads than this machine's cores, ATen splits a long loop into per-thread
    chunks, each with its own scalar tail: those must not reach the results."""
    v = torch.randn(71_680, generator=torch.Generator().manual_seed(2)) * 3
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for fn in (torch.sigmoid, F.silu):
            full = invariant_pointwise(fn, v)
            pieces = torch.cat([invariant_pointwise(fn, p) for p in v.split(256)])
            assert torch.equal(full, pieces), fn.__name__
    finally:
        torch.set_num_threads(before)


def test_invariant_sum_adds_in_its_pairwise_tree_order():
    """[1, u, u, u, u, u, u, u] with u = 2^-24 (half an ulp of 1): the tree pairs element i with
    i + 4, then i with i + 2, then 0 with 1, giving 1 + 3·2^-23; a left-to-right sum rounds every
    1 + u back to 1. Pins the order, not only the value's neighbourhood."""
    u = 2.0 ** -24
    x = torch.tensor([[1.0] + [u] * 7], device=DEV)
    assert invariant_sum(x, -1).item() == 1.0 + 3 * 2.0 ** -23
    assert invariant_sum(x[:, :5], -1).item() == 1.0 + 2.0 ** -23  # zero-padded to 8: [1, u, u, u] -> [1, 2u]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 64, 100])
def test_invariant_sum_is_a_fixed_tree(n):
    x = torch.randn(7, n, 3, dtype=torch.float64, device=DEV)
    torch.testing.assert_close(invariant_sum(x, 1), x.sum(1))
    xf = x.float()
    whole = invariant_sum(xf, 1)
    for r in range(7):  # a row alone: the same bits
        assert torch.equal(invariant_sum(xf[r:r + 1], 1)[0], whole[r])
    assert torch.equal(invariant_sum(xf.transpose(0, 2), 1), whole.t())


def _moe(T, E=4, hidden=64, inter=96, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = (torch.randn(E, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(device=DEV, dtype=dtype)
    w2 = (torch.randn(E, hidden, inter, generator=g) / inter ** 0.5).to(device=DEV, dtype=dtype)
    return w13, w2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_consistent_is_batch_invariant(backend, dtype):
    """A token alone (Triton: the DIRECT decode path) equals the same token inside batches of
    3, 9 and 70 tokens (DIRECT up to 8 tokens at top-2, the aligned path past it), at any position."""
    E, hidden, k = 4, 64, 2
    w13, w2 = _moe(1, E, hidden, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(5)
    x1 = torch.randn(1, hidden, generator=g).to(device=DEV, dtype=dtype)
    ids1 = torch.tensor([[2, 0]], dtype=torch.int32, device=DEV)
    w1 = torch.tensor([[0.7, 0.3]], device=DEV)
    alone = mk.fused_moe(x1, w13, w2, w1, ids1, backend=backend, consistent=True)[0]
    for n in [3, 9, 70]:  # DIRECT (T*k <= 16), aligned, and past the default table's T <= 64 buckets
        for pos in sorted({0, n - 1, n // 2}):
            x = _embed(x1[0], n, pos, seed=n + 7 * pos)
            ids = torch.randint(0, E, (n, k), generator=g).to(device=DEV, dtype=torch.int32)
            ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, E - 1, (n,), generator=g).to(DEV)) % E
            tw = torch.rand(n, k, generator=g).to(DEV)
            ids[pos], tw[pos] = ids1[0], w1[0]
            out = mk.fused_moe(x, w13, w2, tw, ids, backend=backend, consistent=True)
            assert torch.equal(out[pos], alone), (n, pos)
    # the same function as the default mode, up to rounding
    default = mk.fused_moe(x, w13, w2, tw, ids, backend=backend)
    assert_close_to_reference(out, default.double(), dtype=dtype)


def test_fused_moe_consistent_argument_checked():
    w13, w2 = _moe(1)
    x = torch.randn(2, 64, device=DEV)
    ids = torch.tensor([[0, 1], [1, 2]], device=DEV)
    with pytest.raises(TypeError, match="consistent"):
        mk.fused_moe(x, w13, w2, torch.ones(2, 2, device=DEV), ids, consistent=1)
