"""python -m bench [lightning|moe|head|model|all] [...]: ceilings, then every op's grid.

On a GPU: the M1-shaped grids. Without CUDA: a smoke run by default (tiny grids, the first
point of each line, one call per implementation; --no-smoke times the whole tiny grid), torch
backend (Triton too when TRITON_INTERPRET=1), host-timer medians; the numbers check the harness
only. Results go to this checkout's bench/results/ (CPU runs as *_cpu.json, git-ignored)
unless --out says otherwise; ``python -m bench.report`` then renders them.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from pathlib import Path

import torch

from . import common

OPS = ("lightning", "moe", "head", "model")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ops", nargs="*", default=["all"], choices=OPS + ("all",), metavar="OP",
                    help=f"one or more of {', '.join(OPS)}, or all (default)")
    ap.add_argument("--out", type=Path, help="directory for the results JSON")
    ap.add_argument("--tiny", action="store_true", help="tiny grids (the default without CUDA)")
    ap.add_argument("--backends", type=lambda s: s.split(","), help="comma list of mm1 backends")
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="skip peer implementations")
    ap.add_argument("--tp", type=int, default=1, help="MoE tensor parallelism: I = 9216 / tp")
    ap.add_argument("--backward", action="store_true",
                    help="time forward+backward (training) cases instead of the forward grid, "
                         "for the ops that have them (moe, lightning)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time decode cases as CUDA-graph replays (GPU): the eager time minus the "
                         "replay time is the launch overhead")
    ap.add_argument("--model-layers", type=int, default=2,
                    help="layers of the model benchmark (M1 widths; 2 = one lightning, one softmax)")
    ap.add_argument("--warmup-ms", type=float, help="warm-up per implementation (default 25 GPU, 10 CPU)")
    ap.add_argument("--rep-ms", type=float, help="timed repetitions budget (default 100 GPU, 30 CPU)")
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=None,
                    help="tiny grids, first point of each line, one warm-up and one timed call "
                         "(default without CUDA: the numbers would mean nothing anyway)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if "all" in args.ops:
        args.ops = list(OPS)
    return args


def run(args) -> tuple[dict, Path]:
    device = common.bench_device()
    cpu = device.type != "cuda"
    args.smoke = cpu if args.smoke is None else args.smoke
    args.tiny = args.tiny or args.smoke or cpu
    policy = common.Policy.for_device(device, args.smoke)
    policy.warmup_ms = policy.warmup_ms if args.warmup_ms is None else args.warmup_ms
    policy.rep_ms = policy.rep_ms if args.rep_ms is None else args.rep_ms
    if cpu:
        print(common.CPU_WARNING)
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("TRITON_INTERPRET=1: the triton backend runs through the interpreter (a correctness "
                  "path, far slower than a GPU)")
    torch.manual_seed(0)
    env = common.environment(device)
    print(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}  "
          f"CUDA {env['cuda']}  commit {(env['git_commit'] or '?')[:10]}{' (dirty)' if env['git_dirty'] else ''}")
    ceilings = common.measure_ceilings(device, policy)
    print(f"ceilings (measured now): copy {ceilings['copy_GBps']:,.1f} GB/s, "
          f"bf16 matmul {ceilings['matmul_bf16_TFLOPs']:,.2f} TFLOP/s {tuple(ceilings['matmul_shape'])}")
    rows, skipped_ops = [], {}
    for op in args.ops:
        module = importlib.import_module(f"bench.{op}")
        why = module.unavailable()
        if why:
            print(f"[{op}] skipped: {why}")
            skipped_ops[op] = why
            continue
        grid = module.cases(device, args)
        if args.smoke:  # the first point of each line of the grid is enough to check the harness
            seen = set()
            grid = [c for c in grid if (c.kind, c.series) not in seen and not seen.add((c.kind, c.series))]
        plan = [(case, module.impls(case, device, args)) for case in grid]
        from mm1_kernels.progress import progress_bar
        bar = progress_bar(total=sum(len(i) for _, i in plan), desc=f"bench {op}",
                           enabled=args.progress, unit="impl")
        op_rows = []
        for case, impl_list in plan:
            op_rows += common.run_case(
                case, lambda inputs, c=case: module.cost(c, inputs),
                lambda c=case: module.make_inputs(c, device), impl_list, device, ceilings,
                policy, getattr(module, "MEASURE_MEMORY", False), bar, cuda_graph=args.cuda_graph)
        bar.close()
        if hasattr(module, "postprocess"):
            op_rows = module.postprocess(op_rows, ceilings)
        print(f"[{op}]")
        for row in op_rows:
            print("  " + common.format_row(row))
        rows += op_rows
    run_record = {"schema": common.SCHEMA_VERSION, "created": common.now_iso(), "argv": sys.argv,
                  "cpu_run": cpu, "note": common.CPU_WARNING if cpu else "", "ops": args.ops,
                  "skipped_ops": skipped_ops, "env": env, "ceilings": ceilings,
                  "settings": {"tiny": args.tiny, "smoke": args.smoke, "tp": args.tp,
                               "timing": dataclasses.asdict(policy), "peers": args.peers,
                               "backward": args.backward, "cuda_graph": args.cuda_graph,
                               "backends": args.backends, "model_layers": args.model_layers},
                  "cases": rows}
    path = common.write_results(run_record, args.out or common.RESULTS_DIR)
    print(f"results: {path}")
    if cpu:
        print(common.CPU_WARNING)
    return run_record, path


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
