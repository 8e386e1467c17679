"""Lightning attention: prefill over sequence length, decode over batch (issue 2's grid).

Peers: the torch reference (backend "torch") and fla-core's ``chunk_simple_gla(q, k, v,
g_gamma=-slopes, scale=1.0)``, which computes M1's math (docs/m1_math.md §3); for decode,
fla-core's ``fused_recurrent_simple_gla`` on one token with the state passed in and out.
"""
from __future__ import annotations

import math

import torch

from .common import Case, Cost, Impl, missing_names, mm1_backends

OP = "lightning"
CHUNK = 64                     # the chunk the FLOP count assumes (the Triton kernel's C)
TORCH_REFERENCE_MAX_TOKENS = 32768  # the reference loops over chunks in Python: slow beyond this
MM1_OPS = {"prefill": "lightning_attention", "decode": "lightning_decode"}  # kind -> public op


def unavailable() -> str | None:
    return missing_names("mm1_kernels", "lightning_attention", "lightning_decode")


def cases(device: torch.device, args) -> list[Case]:
    if args.tiny:
        H, D, prefill_T, decode_B, tokens = 4, 32, (64, 256), (1, 16), 256
    else:
        H, D, prefill_T, decode_B, tokens = 64, 128, (4096, 32768, 131072, 1048576), (1, 16, 64, 256), 32768
    out = [Case(OP, "prefill", dict(B=max(1, tokens // T), T=T, H=H, D=D, dtype="bf16"), x="T")
           for T in prefill_T]  # B·T held at `tokens` where T allows it
    out += [Case(OP, "decode", dict(B=B, H=H, D=D, dtype="bf16"), x="B") for B in decode_B]
    return out


def cost(case: Case, inputs=None) -> Cost:
    """FLOPs and minimum bytes, counted explicitly.

    Prefill, per chunk of C tokens and head: intra q·kᵀ 2C²D + scores·v 2C²D (the causal half
    is computed and masked, as every chunked kernel does) + inter q·S 2CD² + state kᵀ·v 2CD².
    Bytes: read q, k, v and write o once, plus each sequence's fp32 final state written.
    Decode, per row and head: state decay and update 3D² + readout q·S 2D²; bytes: the fp32
    state read and written, q, k, v read, o written.
    """
    p = case.params
    B, H, D, elt = p["B"], p["H"], p["D"], 2
    if case.kind == "prefill":
        chunks = B * math.ceil(p["T"] / CHUNK)
        flops = chunks * H * (2 * CHUNK**2 * D * 2 + 2 * CHUNK * D * D * 2)
        nbytes = 4 * B * p["T"] * H * D * elt + B * H * D * D * 4
        return Cost(flops, nbytes, "chunk C=64: 4C²D+4CD² per chunk and head; q,k,v,o + final states")
    flops = B * H * 5 * D * D
    nbytes = B * H * (2 * D * D * 4 + 4 * D * elt)
    return Cost(flops, nbytes, "5D² per row and head; fp32 state read+write, q,k,v,o")


def make_inputs(case: Case, device: torch.device) -> dict:
    import mm1_kernels as mk

    p = case.params
    H, D = p["H"], p["D"]
    slopes = mk.lightning_slopes(H, 39, 80).to(device)  # a middle layer of M1's 80

    def act(*shape):  # silu-activated, as M1 feeds the kernel (docs/m1_math.md §3)
        return torch.nn.functional.silu(torch.randn(*shape, device=device, dtype=torch.bfloat16))

    if case.kind == "prefill":
        shape = (p["B"], p["T"], H, D)
        return dict(q=act(*shape), k=act(*shape), v=act(*shape), slopes=slopes, g_gamma=-slopes)
    B = p["B"]
    state = torch.randn(B, H, D, D, device=device, dtype=torch.float32) * 0.1
    return dict(q=act(B, H, D), k=act(B, H, D), v=act(B, H, D), slopes=slopes, g_gamma=-slopes,
                state_cache=state, slot_ids=torch.arange(B, device=device, dtype=torch.int32))


def _fla(name: str):
    try:
        import fla.ops.simple_gla as simple_gla
        return getattr(simple_gla, name), None
    except Exception as exc:
        return None, f"fla-core not installed or lacks {name} ({type(exc).__name__})"


def impls(case: Case, device: torch.device, args) -> list[Impl]:
    import mm1_kernels as mk

    out = []
    tokens = case.params["B"] * case.params.get("T", 1)
    for backend in mm1_backends(MM1_OPS[case.kind], args):
        if backend == "torch" and not args.tiny and tokens > TORCH_REFERENCE_MAX_TOKENS:
            out.append(Impl("torch", "backend", why_not=f"the torch reference is run only up to "
                            f"{TORCH_REFERENCE_MAX_TOKENS} tokens (it loops over chunks in Python)"))
        elif case.kind == "prefill":
            out.append(Impl(backend, "backend", lambda i, b=backend: mk.lightning_attention(
                i["q"], i["k"], i["v"], i["slopes"], output_final_state=True, backend=b)))
        else:
            out.append(Impl(backend, "backend", lambda i, b=backend: mk.lightning_decode(
                i["q"], i["k"], i["v"], i["slopes"], i["state_cache"], i["slot_ids"], backend=b)))
    if not args.peers:
        return out
    if case.kind == "prefill":
        fn, why = _fla("chunk_simple_gla")
        out.append(Impl("fla chunk_simple_gla", "peer", why_not=why, fn=fn and (
            lambda i: fn(i["q"], i["k"], i["v"], g_gamma=i["g_gamma"], scale=1.0,
                         output_final_state=True))))
    else:
        fn, why = _fla("fused_recurrent_simple_gla")
        out.append(Impl("fla fused_recurrent_simple_gla", "peer", why_not=why, fn=fn and (
            lambda i: fn(i["q"][:, None], i["k"][:, None], i["v"][:, None], g_gamma=i["g_gamma"],
                         scale=1.0, initial_state=i["state_cache"], output_final_state=True))))
    return out
