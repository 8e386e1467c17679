"""MoE (issue 3): prefill and decode token counts, bf16 and int8 weight-only, M1's shapes.

Peers: the per-expert loop (how the original model runs: one gather, three matmuls and an
index_add per expert), torch's grouped matmul (``torch._grouped_mm``, bf16 only) when the
installed torch has it, and the torch reference (backend "torch").

``--backward`` (issue 12): forward+backward cases (kind ``fwd_bwd``, bf16, prefill token
counts): gradients of x, w13, w2 and topk_weights with ``torch.autograd.grad``, against the
same peers differentiated by autograd (``torch._grouped_mm`` has a backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import Case, Cost, Impl, missing_names, mm1_backends

OP = "moe"
E, TOP_K = 32, 2
MM1_OPS = {"prefill": "fused_moe", "decode": "fused_moe", "fwd_bwd": "fused_moe"}  # kind -> public op


def unavailable() -> str | None:
    return missing_names("mm1_kernels", "moe_route", "fused_moe", "quantize_moe_weights")


def cases(device: torch.device, args) -> list[Case]:
    if getattr(args, "backward", False):
        hidden, inter, Ts = (64, 128, (64, 256)) if args.tiny else (6144, 9216 // args.tp, (512, 4096, 16384))
        return [Case(OP, "fwd_bwd", dict(T=T, hidden=hidden, I=inter, E=E, top_k=TOP_K, dtype="bf16"),
                     x="T", series="bf16") for T in Ts]
    if args.tiny:
        hidden, inter, prefill_T, decode_T = 64, 128, (64, 256), (1, 8)
    else:
        hidden, inter, prefill_T, decode_T = 6144, 9216 // args.tp, (512, 4096, 16384, 65536), (1, 8, 32, 64)
    out = []
    for dtype in ("bf16", "int8"):
        for kind, Ts in (("prefill", prefill_T), ("decode", decode_T)):
            out += [Case(OP, kind, dict(T=T, hidden=hidden, I=inter, E=E, top_k=TOP_K, dtype=dtype),
                         x="T", series=dtype) for T in Ts]
    return out


def touched_experts(topk_ids: torch.Tensor | None, T: int) -> float:
    """Experts the case's tokens route to; the expectation for uniform routing without inputs."""
    if topk_ids is not None:
        return float(torch.unique(topk_ids).numel())
    return E * (1 - (1 - TOP_K / E) ** T)


def cost(case: Case, inputs=None) -> Cost:
    """FLOPs: per routed token 2·hidden·2I (gate+up) + 2·I·hidden (down) = 6·hidden·I.

    Minimum bytes: the weights of the experts the batch touches, read once (int8: 1 byte per
    weight plus fp32 scales), x read and y written in bf16, the routing (ids and weights) read.
    Prefill is compute-bound and decode is bandwidth-bound over the touched experts; the
    harness picks the larger floor.

    Forward+backward (``fwd_bwd``): 18·hidden·I per routed token, 3× the forward (dh = W2ᵀdy
    2, dx 4, dW13 4, dW2 2, plus the forward's 6); the Triton backward also recomputes gate/up
    (4 more), not counted. Bytes: the touched weights read twice (forward, backward) and their
    gradients written once; x read twice, dy read, y and dx written.
    """
    p = case.params
    T, h, I = p["T"], p["hidden"], p["I"]
    touched = touched_experts(None if inputs is None else inputs["topk_ids"], T)
    if case.kind == "backward":  # the backward alone (profiles.static's backward case)
        nbytes = touched * 3 * h * I * 2 * 2 + 3 * T * h * 2 + T * TOP_K * (4 + 4 + 4)
        return Cost(12 * T * TOP_K * h * I, nbytes,
                    f"12·hidden·I per routed token (backward, recompute not counted); {touched:g} experts touched")
    if case.kind == "fwd_bwd":
        nbytes = touched * 3 * h * I * 2 * 3 + 5 * T * h * 2 + T * TOP_K * (4 + 4 + 4)
        return Cost(18 * T * TOP_K * h * I, nbytes,
                    f"18·hidden·I per routed token (fwd+bwd, recompute not counted); {touched:g} experts touched")
    w_elt = 1 if p["dtype"] == "int8" else 2
    weights = touched * 3 * h * I * w_elt + (touched * (2 * I + h) * 4 if p["dtype"] == "int8" else 0)
    nbytes = weights + 2 * T * h * 2 + T * TOP_K * (4 + 4)
    return Cost(6 * T * TOP_K * h * I, nbytes, f"6·hidden·I per routed token; {touched:g} experts touched")


def make_inputs(case: Case, device: torch.device) -> dict:
    import mm1_kernels as mk

    p = case.params
    T, h, I = p["T"], p["hidden"], p["I"]
    bf16 = torch.bfloat16
    x = torch.randn(T, h, device=device, dtype=bf16)
    logits = torch.randn(T, E, device=device, dtype=torch.float32) * 2
    topk_weights, topk_ids = mk.moe_route(logits, top_k=TOP_K, renormalize=True)
    w13 = torch.randn(E, 2 * I, h, device=device, dtype=bf16) * h ** -0.5
    w2 = torch.randn(E, h, I, device=device, dtype=bf16) * I ** -0.5
    inputs = dict(x=x, topk_weights=topk_weights, topk_ids=topk_ids, w13=w13, w2=w2,
                  w13_scale=None, w2_scale=None)
    if case.kind == "fwd_bwd":
        for name in ("x", "topk_weights", "w13", "w2"):
            inputs[name].requires_grad_()
        inputs["dy"] = torch.randn(T, h, device=device, dtype=bf16)
        return inputs
    if p["dtype"] == "int8":
        q = mk.quantize_moe_weights(w13, w2)
        del w13, w2
        inputs.update(zip(("w13", "w13_scale", "w2", "w2_scale"), q))
    return inputs


def _expert_weight(w, scale, e, dtype):
    return w[e] if scale is None else w[e].to(dtype) * scale[e, :, None].to(dtype)


def per_expert_loop(x, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None):
    """The original model's MoE: per expert, gather its tokens, gate/up, silu, down, index_add."""
    out = torch.zeros_like(x)
    inter = w2.shape[-1]
    for e in range(w13.shape[0]):
        tok, slot = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        gate_up = x[tok] @ _expert_weight(w13, w13_scale, e, x.dtype).T
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = act @ _expert_weight(w2, w2_scale, e, x.dtype).T
        out.index_add_(0, tok, y * topk_weights[tok, slot, None].to(x.dtype))
    return out


def grouped_mm_moe(x, w13, w2, topk_weights, topk_ids):
    """Sort routed tokens by expert, two ``torch._grouped_mm`` calls, weighted scatter-add."""
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    tok = order // topk_ids.shape[1]
    gate_up = torch._grouped_mm(x[tok], w13.transpose(1, 2), offs=offs)
    inter = w2.shape[-1]
    act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).contiguous()
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    y = y * topk_weights.flatten()[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


def _args(i):
    return (i["x"], i["w13"], i["w2"], i["topk_weights"], i["topk_ids"])


def _grads(fn):
    """``fn(inputs) → y`` made into forward+backward: the four gradients (none accumulated)."""
    def run(i):
        return torch.autograd.grad(fn(i), [i["x"], i["w13"], i["w2"], i["topk_weights"]], i["dy"])
    return run


def impls(case: Case, device: torch.device, args) -> list[Impl]:
    import mm1_kernels as mk

    wrap = _grads if case.kind == "fwd_bwd" else (lambda fn: fn)
    out = [Impl(b, "backend", wrap(lambda i, b=b: mk.fused_moe(
        *_args(i), w13_scale=i["w13_scale"], w2_scale=i["w2_scale"], backend=b)))
        for b in mm1_backends("fused_moe", args)]
    if not args.peers:
        return out
    out.append(Impl("per-expert loop", "peer", wrap(lambda i: per_expert_loop(
        *_args(i), w13_scale=i["w13_scale"], w2_scale=i["w2_scale"]))))
    if not hasattr(torch, "_grouped_mm"):
        out.append(Impl("torch._grouped_mm", "peer", why_not="this torch has no torch._grouped_mm"))
    elif case.params["dtype"] != "bf16":
        out.append(Impl("torch._grouped_mm", "peer", why_not="torch._grouped_mm has no int8 weight-only path"))
    else:
        out.append(Impl("torch._grouped_mm", "peer", wrap(lambda i: grouped_mm_moe(*_args(i)))))
    return out
