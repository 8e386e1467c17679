"""Lightning attention: prefill over sequence length, decode over batch (issue 2's grid).

Peers: the torch reference (backend "torch") and fla-core's ``chunk_simple_gla(q, k, v,
g_gamma=-slopes, scale=1.0)``, which computes M1's math (docs/m1_math.md §3); for decode,
fla-core's ``fused_recurrent_simple_gla`` on one token with the state passed in and out.

``--backward`` (issue 12): forward+backward cases (kind ``fwd_bwd``, bf16, M1 heads): the
gradients of q, k, v and the initial state for random ``do`` and ``dfinal`` with
``torch.autograd.grad``, against fla-core's ``chunk_simple_gla`` forward+backward (same math).
"""
from __future__ import annotations

import math

import torch

from .common import Case, Cost, Impl, missing_names, mm1_backends

OP = "lightning"
CHUNK = 64                     # the chunk the FLOP count assumes (the Triton kernel's C)
TORCH_REFERENCE_MAX_TOKENS = 32768  # the reference loops over chunks in Python: slow beyond this
MM1_OPS = {"prefill": "lightning_attention", "decode": "lightning_decode",
           "fwd_bwd": "lightning_attention"}  # kind -> public op


def unavailable() -> str | None:
    return missing_names("mm1_kernels", "lightning_attention", "lightning_decode")


def cases(device: torch.device, args) -> list[Case]:
    if getattr(args, "backward", False):
        # 4 · T·H·D bf16 inputs and 4 gradients live at once: T = 128k at M1's heads is ~8 GiB.
        H, D, Ts, tokens = (4, 32, (64, 256), 256) if args.tiny else (64, 128, (4096, 32768, 131072), 32768)
        return [Case(OP, "fwd_bwd", dict(B=max(1, tokens // T), T=T, H=H, D=D, dtype="bf16"), x="T")
                for T in Ts]
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

    Backward (``backward``, profiles.static's case): three sweeps (dq; dk; dv and dinit), each
    the forward's 4C²D+4CD² per chunk and head (docs/m1_math.md §3.5; the states are recomputed,
    not stored); bytes: q, k, v, do read and dq, dk, dv written once, dfinal read and dinit
    written. Forward+backward (``fwd_bwd``): the sum of the forward and the backward.
    """
    p = case.params
    B, H, D, elt = p["B"], p["H"], p["D"], 2
    if case.kind in ("backward", "fwd_bwd"):
        chunks = B * math.ceil(p["T"] / CHUNK)
        per_sweep = chunks * H * (2 * CHUNK**2 * D * 2 + 2 * CHUNK * D * D * 2)
        io, states = B * p["T"] * H * D * elt, B * H * D * D * 4
        if case.kind == "backward":
            return Cost(3 * per_sweep, 7 * io + 2 * states,
                        "3 sweeps × (4C²D+4CD²) per chunk and head; q,k,v,do read, dq,dk,dv written + states")
        return Cost(4 * per_sweep, 11 * io + 3 * states,
                    "forward 4C²D+4CD² + backward 3× that per chunk and head; q,k,v read twice, o, do, "
                    "dq,dk,dv + states")
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

    if case.kind == "fwd_bwd":
        shape = (p["B"], p["T"], H, D)
        q, k, v = (act(*shape).requires_grad_() for _ in range(3))
        init = (0.1 * torch.randn(p["B"], H, D, D, device=device)).requires_grad_()
        return dict(q=q, k=k, v=v, slopes=slopes, g_gamma=-slopes, initial_state=init,
                    do=torch.randn(*shape, device=device, dtype=torch.bfloat16),
                    dfinal=torch.randn(p["B"], H, D, D, device=device))
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


def _grads(fn):
    """``fn(inputs) → (o, final)`` made into forward+backward: dq, dk, dv, dinit (none accumulated)."""
    def run(i):
        o, final = fn(i)
        return torch.autograd.grad((o, final), [i["q"], i["k"], i["v"], i["initial_state"]], (i["do"], i["dfinal"]))
    return run


def impls(case: Case, device: torch.device, args) -> list[Impl]:
    import mm1_kernels as mk

    if case.kind == "fwd_bwd":
        return _fwd_bwd_impls(case, args)
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


def _fwd_bwd_impls(case: Case, args) -> list[Impl]:
    import mm1_kernels as mk

    out = []
    tokens = case.params["B"] * case.params["T"]
    for backend in mm1_backends("lightning_attention", args):
        if backend == "torch" and not args.tiny and tokens > TORCH_REFERENCE_MAX_TOKENS:
            out.append(Impl("torch", "backend", why_not=f"the torch reference is run only up to "
                            f"{TORCH_REFERENCE_MAX_TOKENS} tokens (it loops over chunks in Python)"))
            continue
        out.append(Impl(backend, "backend", _grads(lambda i, b=backend: mk.lightning_attention(
            i["q"], i["k"], i["v"], i["slopes"], i["initial_state"], output_final_state=True, backend=b))))
    if args.peers:
        fn, why = _fla("chunk_simple_gla")
        out.append(Impl("fla chunk_simple_gla", "peer", why_not=why, fn=fn and _grads(
            lambda i: fn(i["q"], i["k"], i["v"], g_gamma=i["g_gamma"], scale=1.0,
                         initial_state=i["initial_state"], output_final_state=True))))
    return out
