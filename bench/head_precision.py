"""Precision diagnostic for the FP32 LM head: bf16 logits vs the FP32 head vs fp64.

    python -m bench.head_precision [--tokens N] [--vocab V] [--hidden K] [--out PATH.png]

MiniMax-M1's tech report (docs/m1_math.md §6): with bf16 logits the training engine's token
probabilities correlated with the rollout engine's at only ~0.987 (Pearson); computing the
LM head in FP32 raised it to ~0.997. This script rebuilds that comparison on synthetic data.

Inputs: bf16 hidden states ``[T, K]`` drawn N(0, 1) with a few "massive activation" channels
(±``--spike``, the same channels on every token, as in M1's high-magnitude activations), and a
bf16 head ``[V, K]`` (default V = 200,064, M1's vocabulary) scaled so logits reach a few tens.
Target tokens are *sampled* from the fp64 distribution, as a rollout would.

Heads compared (all from the same bf16 inputs):
- ``fp64``: the truth.
- ``fp32``: one fp32-accumulating GEMM, logits kept in fp32 (the Triton kernel's numerics
  class; its accumulation order differs).
- ``bf16``: the same logits rounded to bf16 (a bf16-output GEMM), softmax in fp32.
- ``mm1``: ``mk.head_logprobs`` of the sampled tokens (auto backend: torch on a CPU, Triton on
  a GPU).
fp64 stands in for the other engine: the report's mismatch is between two engines whose
logits differ, and an fp64 comparison bounds what either head contributes to it.

Printed (and written beside the plot as JSON): max and mean |Δlogprob| of the sampled tokens
against fp64, the Pearson correlation of the sampled tokens' probabilities against fp64 (the
report's metric), and the max |Δlogprob| over every vocabulary entry with p > 1e-4.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from .common import RESULTS_DIR


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m bench.head_precision", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096 if cuda else 256)
    ap.add_argument("--vocab", type=int, default=200064)
    ap.add_argument("--hidden", type=int, default=6144 if cuda else 1024)
    ap.add_argument("--spike", type=float, default=60.0, help="massive-activation magnitude")
    ap.add_argument("--spike-channels", type=int, default=4)
    ap.add_argument("--logit-scale", type=float, default=2.0,
                    help="std of the logits without the spike channels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=32, help="tokens per block (memory bound)")
    ap.add_argument("--out", type=Path,
                    default=RESULTS_DIR / ("head_precision.png" if cuda else "head_precision_cpu.png"))
    ap.add_argument("--no-mm1", action="store_true", help="skip mk.head_logprobs")
    return ap.parse_args(argv)


def make_inputs(args, device):
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    T, K, V = args.tokens, args.hidden, args.vocab
    h = torch.randn(T, K, generator=g)
    ch = torch.randperm(K, generator=g)[: args.spike_channels]
    sign = torch.sign(torch.randn(args.spike_channels, generator=g))
    h[:, ch] = sign * args.spike * (1 + 0.1 * torch.randn(T, args.spike_channels, generator=g))
    w = torch.randn(V, K, generator=g) * (args.logit_scale / math.sqrt(K))
    return h.to(device, torch.bfloat16), w.to(device, torch.bfloat16)


def logits_three_ways(h, w, vchunk=32768):
    """fp64, fp32 and bf16 logits of one token block (fp32 accumulation for the latter two)."""
    h64, h32 = h.double(), h.float()
    outs = {k: [] for k in ("fp64", "fp32")}
    for v0 in range(0, w.shape[0], vchunk):
        wc = w[v0:v0 + vchunk]
        outs["fp64"].append(h64 @ wc.double().T)
        outs["fp32"].append(h32 @ wc.float().T)
    z = {k: torch.cat(v, dim=1) for k, v in outs.items()}
    z["bf16"] = z["fp32"].bfloat16().float()
    return z


def pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a @ b / (a.norm() * b.norm())).item()


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.time()
    h, w = make_inputs(args, device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    names = ("bf16", "fp32")
    lp = {k: [] for k in ("fp64",) + names}
    vocab_max = {k: 0.0 for k in names}
    targets, zmax = [], 0.0
    for t0 in range(0, args.tokens, args.chunk):
        z = logits_three_ways(h[t0:t0 + args.chunk], w)
        zmax = max(zmax, z["fp64"].abs().max().item())
        logp64 = torch.log_softmax(z["fp64"], dim=-1)
        tgt = torch.multinomial(logp64.exp(), 1, generator=gen)[:, 0]
        targets.append(tgt)
        lp["fp64"].append(logp64.gather(1, tgt[:, None])[:, 0])
        keep = logp64 > math.log(1e-4)
        for k in names:
            logp = torch.log_softmax(z[k], dim=-1).double()  # fp32 softmax of each head's logits
            lp[k].append(logp.gather(1, tgt[:, None])[:, 0])
            vocab_max[k] = max(vocab_max[k], (logp - logp64).abs()[keep].max().item())
        del z
    lp = {k: torch.cat(v).cpu() for k, v in lp.items()}
    targets = torch.cat(targets)
    if not args.no_mm1:
        import mm1_kernels as mk
        mm1_backend = mk.resolve_backend("head_logprobs", None, device)
        out = mk.head_logprobs(h, w, targets, backend=mm1_backend)
        lp["mm1"] = out.logprobs.double().cpu()
    p64 = lp["fp64"].exp()
    metrics = {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
               "spike": args.spike, "max_abs_logit": zmax, "device": str(device),
               "heads": {}}
    if "mm1" in lp:
        metrics["mm1_backend"] = mm1_backend
    for k in [n for n in lp if n != "fp64"]:
        d = (lp[k] - lp["fp64"]).abs()
        metrics["heads"][k] = {"max_abs_dlogprob": d.max().item(), "mean_abs_dlogprob": d.mean().item(),
                               "pearson_p_vs_fp64": pearson(lp[k].exp(), p64)}
        if k in vocab_max:
            metrics["heads"][k]["max_abs_dlogprob_vocab_p>1e-4"] = vocab_max[k]
    metrics["seconds"] = time.time() - t_start

    print(f"T={args.tokens} V={args.vocab} K={args.hidden} spike=±{args.spike} on "
          f"{args.spike_channels} channels; max |logit| = {zmax:.1f}")
    print(f"{'head':8s} {'max|Δlogp|':>12s} {'mean|Δlogp|':>12s} {'vocab max|Δ|':>13s} "
          f"{'pearson(p, fp64)':>17s} {'1 - pearson':>12s}")
    for k, m in metrics["heads"].items():
        print(f"{k:8s} {m['max_abs_dlogprob']:12.3e} {m['mean_abs_dlogprob']:12.3e} "
              f"{m.get('max_abs_dlogprob_vocab_p>1e-4', float('nan')):13.3e} "
              f"{m['pearson_p_vs_fp64']:17.7f} {1 - m['pearson_p_vs_fp64']:12.2e}")
    if "mm1_backend" in metrics:
        print(f"mm1 = mk.head_logprobs, backend {metrics['mm1_backend']!r}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, k in zip(axes[:2], ("bf16", "mm1" if "mm1" in lp else "fp32")):
        r = metrics["heads"][k]["pearson_p_vs_fp64"]
        ax.scatter(p64, lp[k].exp(), s=4, alpha=0.5)
        ax.plot([0, 1], [0, 1], "k--", lw=0.5)
        ax.set_title(f"{k} head vs fp64: pearson {r:.6f}")
        ax.set_xlabel("p(sampled token), fp64")
        ax.set_ylabel(f"p(sampled token), {k}")
    ax = axes[2]
    bins = torch.logspace(-10, 1, 60).numpy()
    for k in ("bf16", "fp32") + (("mm1",) if "mm1" in lp else ()):
        d = (lp[k] - lp["fp64"]).abs().clamp(min=1e-10).numpy()
        ax.hist(d, bins=bins, alpha=0.5, label=k)
    ax.set_xscale("log")
    ax.set_xlabel("|logprob - fp64 logprob| of sampled tokens")
    ax.set_ylabel("tokens")
    ax.legend()
    fig.suptitle(f"FP32 head precision: T={args.tokens}, V={args.vocab}, K={args.hidden}, "
                 f"max |logit| {zmax:.0f} ({device})")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    args.out.with_suffix(".json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} ({metrics['seconds']:.1f} s)")
    return metrics


if __name__ == "__main__":
    main()
