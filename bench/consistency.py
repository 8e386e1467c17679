"""Rollout vs training logprobs, default mode against consistent mode.

    python -m bench.consistency [--dtype fp32,bf16] [--backend torch] [--prompts 5,17,33,70]
                                [--new-tokens 32] [--periods 1] [--repeat 1] [--out PATH.json]

For each dtype and mode it builds the tiny model (``MiniMaxM1Config.tiny``, random O(1)
weights, seed 0), generates ``--new-tokens`` sampled tokens (temperature 1) for prompts of the
given lengths in one batch (varlen prefill + decode steps), and scores the same sequences with
the training forward (``model.logprobs``, one sequence per call). Printed per (dtype, mode):
max and mean |Δlogprob| of the generated tokens, the fraction bitwise equal, the Pearson
correlation of their probabilities (M1's metric, docs/m1_math.md §6), and the time of
``generate`` and of the training forward, and forward + backward (``logprobs().sum()``), best
of ``--repeat``. Consistent mode's figures must be 0, 1.0 and 1 exactly.

Without CUDA the times are this process's CPU seconds with the torch backend (or the Triton
interpreter, which ``--backend triton`` then turns on): they show the relative cost of
consistent mode on a CPU, not GPU times.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.consistency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--backend", default="torch", choices=("torch", "triton", "cuda"))
    ap.add_argument("--prompts", default="5,17,33,70", help="comma list of prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--periods", type=int, default=1, help="tiny config periods (8 layers each)")
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions (best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        ap.error(f"--dtype: choose from {sorted(DTYPES)}, got {args.dtype!r}")
    try:
        args.lengths = [int(n) for n in args.prompts.split(",")]
    except ValueError:
        ap.error(f"--prompts must be a comma list of positive ints, got {args.prompts!r}")
    if not args.lengths or min(args.lengths) < 1 or args.new_tokens < 1 or args.repeat < 1:
        ap.error("--prompts lengths, --new-tokens and --repeat must be positive")
    return args


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best(fn, repeat, device):
    """Best of ``repeat`` runs: wall seconds on a GPU; on a CPU this process's CPU seconds (all
    threads), which other processes sharing the cores do not inflate as they do wall time."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync(device)
        t0 = clock()
        out = fn()
        _sync(device)
        best = min(best, clock() - t0)
    return best, out


def measure(dtype: torch.dtype, consistent: bool, args, backward: bool = True) -> dict:
    """One (dtype, mode) row; ``args`` as :func:`parse_args` returns them. ``backward=False``
    skips the forward + backward timing (``train_fwd_bwd_s`` is then None): the GPU probe's
    consistency stage (bench/probe.py) calls this for the rollout-vs-training claim alone."""
    from mm1_model import MiniMaxM1Config, MiniMaxM1ForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = MiniMaxM1Config.tiny(num_periods=args.periods)
    model = MiniMaxM1ForCausalLM(config, backend=args.backend, consistent=consistent)
    model = model.init_random_(args.seed).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in args.lengths]

    def rollout():
        gen = torch.Generator(device=device).manual_seed(args.seed + 2)
        return model.generate(prompts, max_new_tokens=args.new_tokens, temperature=1.0,
                              generator=gen, return_logprobs=True)

    t_gen, (seqs, rollout_lp) = _best(rollout, args.repeat, device)
    # generate drops a row's tokens after a stop token; there is none here, so every row is full.
    n = args.new_tokens

    def train():
        with torch.no_grad():
            return [model.logprobs(s[None].to(device))[0, len(p) - 1:] for p, s in zip(prompts, seqs)]

    def train_backward():
        model.zero_grad(set_to_none=True)
        for s in seqs:
            model.logprobs(s[None].to(device)).sum().backward()

    t_fwd, train_lp = _best(train, args.repeat, device)
    t_bwd = _best(train_backward, args.repeat, device)[0] if backward else None
    new = torch.stack(train_lp).float()
    old = rollout_lp[:, :n].float()
    d = (new - old).abs()
    pearson = torch.corrcoef(torch.stack([new.exp().flatten(), old.exp().flatten()]).double())[0, 1]
    return {"dtype": str(dtype).replace("torch.", ""), "mode": "consistent" if consistent else "default",
            "backend": args.backend, "device": device.type, "tokens": d.numel(),
            "max_abs_dlogprob": d.max().item(), "mean_abs_dlogprob": d.mean().item(),
            "frac_bitwise_equal": (d == 0).float().mean().item(), "pearson_p": pearson.item(),
            "generate_s": t_gen, "train_forward_s": t_fwd, "train_fwd_bwd_s": t_bwd}


def main(argv=None):
    args = parse_args(argv)
    if args.backend == "triton" and not torch.cuda.is_available():
        # Triton on CPU tensors: the interpreter, chosen before mm1_kernels is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = []
    where = "GPU (wall seconds)" if torch.cuda.is_available() else "CPU (process CPU seconds, not GPU times)"
    print(f"tiny model x{args.periods} period(s), prompts {args.lengths}, {args.new_tokens} sampled tokens each, "
          f"backend {args.backend}, times on {where}")
    print(f"{'dtype':<9}{'mode':<12}{'max|Δ|':>10}{'mean|Δ|':>10}{'bitwise':>9}{'Pearson(p)':>15}"
          f"{'generate':>10}{'train fwd':>11}{'fwd+bwd':>9}")
    for name in args.dtypes:
        pair = []
        for consistent in (False, True):
            r = measure(DTYPES[name], consistent, args)
            pair.append(r)
            rows.append(r)
            print(f"{name:<9}{r['mode']:<12}{r['max_abs_dlogprob']:>10.2e}{r['mean_abs_dlogprob']:>10.2e}"
                  f"{r['frac_bitwise_equal']:>9.1%}{r['pearson_p']:>15.10f}{r['generate_s']:>9.2f}s"
                  f"{r['train_forward_s']:>10.2f}s{r['train_fwd_bwd_s']:>8.2f}s")
        fast, cons = pair
        print(f"{name:<9}{'cost':<12}consistent / default: generate x{cons['generate_s'] / fast['generate_s']:.2f}, "
              f"train forward x{cons['train_forward_s'] / fast['train_forward_s']:.2f}, "
              f"forward+backward x{cons['train_fwd_bwd_s'] / fast['train_fwd_bwd_s']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"},
                                        "rows": rows}, indent=2, default=str) + "\n")
    return rows


if __name__ == "__main__":
    main()
