"""python -m profiles.floors [OP ...] [--results FILE.json]

The two numbers first: for every point of each op's M1-shaped grid, the counted FLOPs and
minimum bytes (bench/<op>.py's cost function, the same the harness uses), the compute and
memory floors, and which one bounds the case. Ceilings come from a results JSON's measured
ones when given, else from the H100 SXM datasheet (dense bf16 989 TFLOP/s, HBM3 3.35 TB/s):
those are leads, not measurements. The per-kernel notes in profiles/notes/ quote this table.
"""
import argparse
import importlib
import json
import sys

import torch

DATASHEET = {"matmul_bf16_TFLOPs": 989.0, "copy_GBps": 3350.0, "source": "H100 SXM datasheet (lead)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiles.floors", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ops", nargs="*", default=["lightning", "moe", "head"])
    ap.add_argument("--results", help="a bench/results JSON whose measured ceilings to use")
    ap.add_argument("--tp", type=int, default=1)
    a = ap.parse_args(argv)
    ceil = DATASHEET
    if a.results:
        run = json.load(open(a.results))
        ceil = dict(run["ceilings"], source=f"measured on {run['env']['device_name']} ({a.results})")
    print(f"ceilings: {ceil['matmul_bf16_TFLOPs']:,.0f} TFLOP/s bf16, {ceil['copy_GBps']:,.0f} GB/s "
          f"({ceil['source']})\n")
    args = argparse.Namespace(tiny=False, tp=a.tp, backends=None, peers=False, model_layers=2)
    for op in a.ops:
        module = importlib.import_module(f"bench.{op}")
        print(f"| {op} case | GFLOP | min MB | compute floor ms | memory floor ms | bound |")
        print("|---|---:|---:|---:|---:|---|")
        for case in module.cases(torch.device("meta"), args):
            c = module.cost(case, None)
            tc = c.flops / (ceil["matmul_bf16_TFLOPs"] * 1e12) * 1e3
            tm = c.bytes / (ceil["copy_GBps"] * 1e9) * 1e3
            shape = ", ".join(f"{k}={v}" for k, v in case.params.items())
            print(f"| {case.kind} {shape} | {c.flops / 1e9:,.1f} | {c.bytes / 1e6:,.1f} | {tc:.3f} | {tm:.3f} | "
                  f"{'compute' if tc >= tm else 'memory'} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
