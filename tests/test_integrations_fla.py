"""mm1_kernels.integrations.fla against fla's chunk_simple_gla semantics, computed here in fp64.

Reference: simple GLA with a constant per-head log decay g_gamma, written from fla's docstring
and chunk.py: S_t = exp(g_gamma) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t, default
scale = K ** -0.5, layout [B, T, H, K] (head_first=True in older releases: [B, H, T, K]).
"""
import subprocess
import sys

import pytest
import torch

from mm1_kernels._dispatch import triton_interpret_enabled
from mm1_kernels.integrations.fla import chunk_simple_gla

from numerics import assert_close_to_reference, tol_for

BACKENDS = ["torch"] + (["triton"] if torch.cuda.is_available() or triton_interpret_enabled() else [])
B, T, H, K, V = 2, 19, 2, 16, 8
G_GAMMA = -torch.tensor([0.1, 0.7])


def ref_simple_gla(q, k, v, g_gamma, scale, h0=None, cu=None):
    """fp64 loop on [1 or B, T, H, K]; returns o and the final state of each sequence."""
    q, k, v = q.double(), k.double(), v.double()
    decay = torch.ones(H, dtype=torch.float64) if g_gamma is None else torch.exp(g_gamma.double())
    bounds = [(b, 0, q.shape[1]) for b in range(q.shape[0])] if cu is None else \
        [(0, int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)]
    o = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        S = torch.zeros(H, q.shape[-1], v.shape[-1], dtype=torch.float64) if h0 is None else h0[n].double()
        for t in range(start, end):
            S = decay[:, None, None] * S + k[b, t, :, :, None] * v[b, t, :, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t], S)
        finals.append(S)
    return o, torch.stack(finals)


def inputs(dtype=torch.float32, seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return ((0.3 * torch.randn(batch, T, H, K, generator=g)).to(dtype),
            (0.3 * torch.randn(batch, T, H, K, generator=g)).to(dtype),
            torch.randn(batch, T, H, V, generator=g).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_simple_gla_matches_fp64(backend, scale, dtype):
    q, k, v = inputs(dtype)
    h0 = torch.randn(B, H, K, V)
    o, ht = chunk_simple_gla(q, k, v, g_gamma=G_GAMMA, scale=scale, initial_state=h0, output_final_state=True,
                             backend=backend)
    ref_o, ref_ht = ref_simple_gla(q, k, v, G_GAMMA, K ** -0.5 if scale is None else scale, h0)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert ht.dtype == torch.float32 and ht.shape == (B, H, K, V)
    tol = tol_for(dtype) if dtype != torch.float32 else 1e-5
    assert_close_to_reference(o, ref_o, dtype=dtype, tol=tol)
    assert_close_to_reference(ht, ref_ht, dtype=dtype, tol=tol)


def test_chunk_simple_gla_head_first_and_state_v_first():
    q, k, v = inputs()
    h0 = torch.randn(B, H, K, V)
    o_ref, ht_ref = chunk_simple_gla(q, k, v, g_gamma=G_GAMMA, scale=1.0, initial_state=h0,
                                     output_final_state=True, backend="torch")
    o, ht = chunk_simple_gla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g_gamma=G_GAMMA,
                             scale=1.0, initial_state=h0, output_final_state=True, head_first=True,
                             backend="torch")
    assert o.shape == (B, H, T, V)
    assert torch.equal(o, o_ref.transpose(1, 2)) and torch.equal(ht, ht_ref)
    o2, ht2 = chunk_simple_gla(q, k, v, g_gamma=G_GAMMA, scale=1.0, initial_state=h0.transpose(-1, -2),
                               output_final_state=True, state_v_first=True, backend="torch")
    assert torch.equal(o2, o_ref) and torch.equal(ht2, ht_ref.transpose(-1, -2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_simple_gla_varlen_and_no_decay(backend):
    q, k, v = inputs(batch=1, seed=1)
    cu = torch.tensor([0, 7, 19])
    h0 = torch.randn(2, H, K, V)
    o, ht = chunk_simple_gla(q, k, v, g_gamma=G_GAMMA, scale=1.0, initial_state=h0, output_final_state=True,
                             cu_seqlens=cu, backend=backend)
    ref_o, ref_ht = ref_simple_gla(q, k, v, G_GAMMA, 1.0, h0, cu)
    assert_close_to_reference(o, ref_o, tol=1e-5)
    assert_close_to_reference(ht, ref_ht, tol=1e-5)
    # No g_gamma and no g: plain (undecayed) linear attention; no final state unless asked.
    o, ht = chunk_simple_gla(q, k, v, scale=1.0, backend=backend)
    assert ht is None
    assert_close_to_reference(o, ref_simple_gla(q, k, v, None, 1.0)[0], tol=1e-5)


def test_chunk_simple_gla_rejects_per_token_gates():
    q, k, v = inputs()
    with pytest.raises(NotImplementedError, match="g "):
        chunk_simple_gla(q, k, v, g=torch.zeros(B, T, H))


def test_import_does_not_import_fla():
    code = ("import sys; import mm1_kernels.integrations.fla; "
            "bad = [m for m in sys.modules if m == 'fla' or m.startswith('fla.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
