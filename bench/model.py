"""The end-to-end benchmark: a slice of MiniMax-M1 at full width, random weights.

Full M1 does not fit one GPU (912 GB in bf16), so the benchmark builds ``--model-layers``
of M1's layers at full width (default 2: global layers 6 and 7, one lightning and one softmax
layer, each with its 32-expert MoE; about 27 GB in bf16, random weights) and times the
public API only:
- prefill: ``model(input_ids).logits`` for one sequence of T tokens;
- decode: ``model.generate`` (greedy) with 1 and with 1 + NEW new tokens; the per-token
  decode time is the difference over NEW (the prompt's prefill cancels), kind "decode".
Without CUDA it builds a tiny config instead.
"""
from __future__ import annotations

import torch

from .common import Case, Cost, Impl, bound_and_fraction, floor_ms, missing_names

OP = "model"
NEW = 16                       # decode steps timed on the GPU
TINY_NEW = 2                   # and at tiny sizes (the CPU's numbers only check the harness)
CHUNK = 64
_STATE: dict = {}


def _config(args):
    from mm1_model import MiniMaxM1Config

    if args.tiny:
        return MiniMaxM1Config.tiny()  # 7 lightning + 1 softmax layer, CPU-sized
    # M1's own global layer indices, ending on the first softmax layer (7): slopes as in the 80
    n = args.model_layers
    return MiniMaxM1Config.m1_slice(range(8 - n, 8) if n <= 8 else range(n))


def _build(args, device):
    from mm1_model import MiniMaxM1ForCausalLM

    config = _config(args)
    with torch.device("meta"):
        model = MiniMaxM1ForCausalLM(config)
    # bf16 while still on meta (slopes, RoPE frequencies and the router stay fp32), then allocate
    model = model.to(torch.bfloat16).to_empty(device=device).reset_buffers().eval()
    with torch.no_grad():  # random weights at O(1) activations, drawn on the device (27 GB on GPU)
        for p in model.parameters():
            if p.is_floating_point():
                p.normal_(0.0, p.shape[-1] ** -0.5) if p.dim() >= 2 else p.fill_(1.0)
    return config, model


def unavailable() -> str | None:
    return missing_names("mm1_model", "MiniMaxM1Config", "MiniMaxM1ForCausalLM")


def _dims(config) -> dict:
    g = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    types = [config.attn_type_list[i] for i in config.layer_ids]
    return dict(layers=len(types), lightning_layers=types.count(0), softmax_layers=types.count(1),
                hidden=g("hidden_size"), H=g("num_attention_heads"), D=g("head_dim"),
                kvH=g("num_key_value_heads"), I=g("intermediate_size"), E=g("num_local_experts"),
                k=g("num_experts_per_tok"), V=g("vocab_size"))


def cases(device: torch.device, args) -> list[Case]:
    try:
        config, model = _build(args, device)
    except Exception as exc:
        _STATE["error"] = f"building the model failed ({type(exc).__name__}: {exc})"[:400]
        return [Case(OP, "prefill", dict(B=1, T=0), x="T")]
    _STATE.update(model=model, dims=_dims(config))
    # What a tensor-parallel run of the same layers would send (this benchmark runs one GPU):
    # all-reduce bytes per token and layer at TP = --tp, or M1's deployment TP = 8.
    from mm1_model.parallel import collective_bytes_per_token
    tp = args.tp if getattr(args, "tp", 1) > 1 else 8
    c = collective_bytes_per_token(config, tp, act_bytes=2)
    _STATE["comm_note"] = (f"; at TP={tp} each rank all-reduces {c['per_layer']:,.0f} B per token and layer "
                           f"(+{c['embedding']:,.0f} B embedding)")
    d = _STATE["dims"]
    prompt, prefill_T, decode_B = (8, (16, 64), (1, 4)) if args.tiny else (128, (1024, 4096, 8192), (1, 16, 64))
    _STATE["new"] = new = TINY_NEW if args.tiny else NEW
    out = [Case(OP, "prefill", dict(B=1, T=T, **d), x="T") for T in prefill_T]
    out += [Case(OP, "generate", dict(B=B, T=prompt, new=n, **d), x="B", series=f"new={n}")
            for B in decode_B for n in (1, 1 + new)]
    return out


def _expected_touched(E: int, k: int, tokens: int) -> float:
    return E * (1 - (1 - k / E) ** tokens)


def step_cost(p: dict, tokens_per_row: int, context: int, all_logits: bool = True) -> Cost:
    """FLOPs and bytes of one forward over B rows of `tokens_per_row` new tokens.

    FLOPs: 2 × the active parameters per token (lightning qkv+gate+out 5·H·D·hidden; softmax
    q,o 2·H·D·hidden + k,v 2·kvH·D·hidden; MoE top-k experts 3·hidden·I each plus the router),
    plus token mixing: lightning (4·C·D + 4·D²)·H per token in prefill and 5·D²·H in decode,
    softmax attention 4·context·D·H per token (context halved for causal prefill), plus the
    LM head 2·V·hidden per head row. Bytes: every weight read once (experts: those expected to
    be touched), the lightning state read and written per row, the KV cache read, the output.
    ``all_logits``: the head runs on every token and writes fp32 logits (``model(ids).logits``);
    otherwise on each row's last token only, writing a token and a logprob (``generate``, which
    samples through ``mk.head_sample`` and never forms the logits).
    """
    h, H, D, kvH, I, E, k, V = (p[n] for n in ("hidden", "H", "D", "kvH", "I", "E", "k", "V"))
    nl, ns, B = p["lightning_layers"], p["softmax_layers"], p["B"]
    tokens = B * tokens_per_row
    head_rows = tokens if all_logits else B
    body = nl * 5 * H * D * h + ns * (2 * H * D * h + 2 * kvH * D * h) + (nl + ns) * E * h
    active = body + (nl + ns) * k * 3 * h * I
    prefill = tokens_per_row > 1
    mixing = nl * ((4 * CHUNK * D + 4 * D * D) if prefill else 5 * D * D) * H \
        + ns * 4 * (context / 2 if prefill else context) * D * H
    flops = tokens * (2 * active + mixing) + head_rows * 2 * V * h
    touched = _expected_touched(E, k, tokens)
    weights = 2 * (body + V * h + (nl + ns) * touched * 3 * h * I)
    state = 0 if prefill else B * nl * H * D * D * 4 * 2
    kv = 0 if prefill else B * ns * context * 2 * kvH * D * 2
    out = tokens * V * 4 if all_logits else B * (8 + 4)
    return Cost(flops, weights + state + kv + out,
                "2×active params per token + mixing + head; weights (touched experts), state, KV, output")


def cost(case: Case, inputs=None) -> Cost:
    p = case.params
    if "hidden" not in p:
        return Cost(0, 0, "model unavailable")
    comm = _STATE.get("comm_note", "")
    if case.kind == "prefill":
        c = step_cost(p, p["T"], p["T"])
        return Cost(c.flops, c.bytes, c.note + comm)
    # generate: the prompt's prefill plus new-1 decode steps, each sampling one token per row
    c = step_cost(p, p["T"], p["T"], all_logits=False)
    d = step_cost(p, 1, p["T"] + p["new"] // 2, all_logits=False)
    return Cost(c.flops + (p["new"] - 1) * d.flops, c.bytes + (p["new"] - 1) * d.bytes,
                "prefill + decode steps" + comm)


def make_inputs(case: Case, device: torch.device) -> dict:
    p = case.params
    V = p.get("V") or 2
    return dict(input_ids=torch.randint(0, V, (p["B"], max(p["T"], 1)), device=device))


def impls(case: Case, device: torch.device, args) -> list[Impl]:
    if "error" in _STATE:
        return [Impl("mm1_model", "backend", why_not=_STATE["error"])]
    model = _STATE["model"]
    if case.kind == "prefill":
        def prefill(i):
            with torch.no_grad():
                return model(i["input_ids"]).logits
        return [Impl("mm1_model", "backend", prefill)]

    def generate(i, new=case.params["new"]):
        with torch.no_grad():
            return model.generate(i["input_ids"], max_new_tokens=new, temperature=0.0)
    return [Impl("mm1_model", "backend", generate)]


def postprocess(rows: list[dict], ceilings: dict) -> list[dict]:
    """Derive the per-token decode rows from generate(1 + new) minus generate(1)."""
    out, new = list(rows), _STATE.get("new", 0)
    by_b = {}
    for r in rows:
        if r["kind"] == "generate" and r["status"] == "ok":
            by_b.setdefault(r["params"]["B"], {})[r["params"]["new"]] = r
    for _, pair in sorted(by_b.items()):
        if 1 not in pair or 1 + new not in pair:
            continue
        p = dict(pair[1]["params"], new=new)
        ms = (pair[1 + new]["median_ms"] - pair[1]["median_ms"]) / new
        c = step_cost(p, 1, p["T"] + new // 2, all_logits=False)
        row = {**pair[1], "kind": "decode", "params": {k: v for k, v in p.items() if k != "new"},
               "series": "", "flops": c.flops, "bytes": c.bytes, "floor_ms": floor_ms(c, ceilings),
               "cost_note": f"one decode step: (generate(1+{new}) − generate(1)) / {new}",
               "median_ms": ms}
        if ms > 0:
            bound, fraction = bound_and_fraction(c, ms, ceilings)
            row.update(TFLOPs=c.flops / ms / 1e9, GBps=c.bytes / ms / 1e6, bound=bound, fraction=fraction)
        else:  # none of generate(1)'s rates may survive into this row
            for key in ("TFLOPs", "GBps", "bound", "fraction"):
                row.pop(key, None)
            row.update(status="error", message="generate(1+new) was not slower than generate(1): noise")
        out.append(row)
    return out
