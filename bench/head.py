"""The FP32 LM head (issue 4): log-probs forward and forward+backward, and sampling.

Peers: torch's fp32 head ``(h.float() @ w.float().T).log_softmax(-1)`` (it materializes the
fp32 [T, V] logits: its peak memory is part of the comparison) and Liger-Kernel's fused
linear cross entropy when installed (forward+backward only: it computes gradients in its
forward). Peak memory is recorded per case on the GPU.
"""
from __future__ import annotations

import torch

from .common import Case, Cost, Impl, missing_names, mm1_backends

OP = "head"
MEASURE_MEMORY = True
IGNORE = -100

MM1_OPS = {"logprobs": "head_logprobs", "logprobs_fwd_bwd": "head_logprobs",  # kind -> public op
           "sample": "head_sample"}

def unavailable() -> str | None:
    return missing_names("mm1_kernels", "head_logprobs", "head_sample")


def cases(device: torch.device, args) -> list[Case]:
    if args.tiny:
        hidden, V, Ts, Bs = 64, 1000, (64, 256), (1, 8)
    else:
        hidden, V, Ts, Bs = 6144, 200064, (1024, 8192, 32768), (1, 64, 256)
    out = [Case(OP, kind, dict(T=T, hidden=hidden, V=V, dtype="bf16"), x="T")
           for kind in ("logprobs", "logprobs_fwd_bwd") for T in Ts]
    out += [Case(OP, "sample", dict(T=B, hidden=hidden, V=V, dtype="bf16"), x="T") for B in Bs]
    return out


def cost(case: Case, inputs=None) -> Cost:
    """FLOPs: the logits GEMM 2·T·V·hidden (softmax terms ignored); backward adds the two
    gradient GEMMs (6·T·V·hidden in all; a kernel that recomputes logits does 8, counted 6).

    Minimum bytes: hidden and weight read once in bf16, targets read, fp32 log-probs, lse and
    entropy written; backward adds the bf16 gradients of hidden and weight written. Sampling
    writes a token and a log-prob per row.
    """
    p = case.params
    T, h, V = p["T"], p["hidden"], p["V"]
    inputs_bytes = (T * h + V * h) * 2
    if case.kind == "logprobs":
        return Cost(2 * T * V * h, inputs_bytes + T * 8 + 3 * T * 4, "2·T·V·hidden; h, w read, 3 fp32 [T] out")
    if case.kind == "logprobs_fwd_bwd":
        return Cost(6 * T * V * h, 2 * inputs_bytes + T * 8 + 3 * T * 4,
                    "6·T·V·hidden; h, w read, grads written")
    return Cost(2 * T * V * h, inputs_bytes + T * 12, "2·T·V·hidden; h, w read, token+logprob out")


def make_inputs(case: Case, device: torch.device) -> dict:
    p = case.params
    T, h, V = p["T"], p["hidden"], p["V"]
    grad = case.kind == "logprobs_fwd_bwd"
    hidden = torch.randn(T, h, device=device, dtype=torch.bfloat16).requires_grad_(grad)
    # logits with a standard deviation of ~4 and tails towards ~20, like a trained head's
    weight = (torch.randn(V, h, device=device, dtype=torch.bfloat16) * (4 * h ** -0.5)).requires_grad_(grad)
    targets = torch.randint(0, V, (T,), device=device)
    targets[torch.rand(T, device=device) < 0.05] = IGNORE
    return dict(hidden=hidden, weight=weight, targets=targets)


def torch_fp32_logprobs(hidden, weight, targets):
    logp = (hidden.float() @ weight.float().T).log_softmax(-1)
    return logp.gather(1, targets.clamp(min=0)[:, None])[:, 0].masked_fill(targets == IGNORE, 0.0)


def _grads(loss, i):
    return torch.autograd.grad(loss, [i["hidden"], i["weight"]])


def impls(case: Case, device: torch.device, args) -> list[Impl]:
    import mm1_kernels as mk

    kind = case.kind
    backends = mm1_backends(MM1_OPS[kind], args)
    if kind == "sample":
        out = [Impl(b, "backend", lambda i, b=b: mk.head_sample(
            i["hidden"], i["weight"], temperature=1.0, backend=b)) for b in backends]
        if args.peers:
            out.append(Impl("torch fp32 softmax+multinomial", "peer", lambda i: torch.multinomial(
                (i["hidden"].float() @ i["weight"].float().T).softmax(-1), 1)))
        return out
    if kind == "logprobs":
        out = [Impl(b, "backend", lambda i, b=b: mk.head_logprobs(
            i["hidden"], i["weight"], i["targets"], backend=b)) for b in backends]
        if args.peers:
            out.append(Impl("torch fp32 head", "peer", lambda i: torch_fp32_logprobs(
                i["hidden"], i["weight"], i["targets"])))
        return out
    out = [Impl(b, "backend", lambda i, b=b: _grads(mk.head_logprobs(
        i["hidden"], i["weight"], i["targets"], backend=b).logprobs.sum(), i)) for b in backends]
    if not args.peers:
        return out
    out.append(Impl("torch fp32 head", "peer", lambda i: _grads(
        torch_fp32_logprobs(i["hidden"], i["weight"], i["targets"]).sum(), i)))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
        out.append(Impl("liger fused linear CE", "peer", lambda i: _grads(
            liger(i["weight"], i["hidden"], i["targets"]), i)))
    except Exception as exc:
        out.append(Impl("liger fused linear CE", "peer",
                        why_not=f"Liger-Kernel not installed ({type(exc).__name__})"))
    return out
