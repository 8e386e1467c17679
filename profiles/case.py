"""python -m profiles.case OP KIND [--param K=V ...] [--impl NAME] [--iters N]

Runs one case of a benchmark grid (bench/<op>.py) the way a profiler wants it: warm-up
outside the capture range, then N calls between cudaProfilerStart/Stop inside one NVTX range
``profile:<case>:<impl>``. run_ncu.py and run_nsys.py wrap this; it also runs by itself.
Without CUDA it runs the tiny grid on the torch backend and says so.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time

import torch

from bench.common import CPU_WARNING, bench_device


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m profiles.case", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("op", choices=("lightning", "moe", "head", "model"))
    ap.add_argument("kind", help="prefill, decode, logprobs, logprobs_fwd_bwd, sample, ...")
    ap.add_argument("--param", action="append", default=[], metavar="K=V",
                    help="pick the grid point whose params match (e.g. T=32768, dtype=int8)")
    ap.add_argument("--impl", default="auto", help="implementation name as in the bench tables; "
                    "auto = the mm1 backend that backend=None picks here "
                    "(mk.resolve_backend), then the op's other backends that can run")
    ap.add_argument("--iters", type=int, default=3, help="calls inside the capture range")
    ap.add_argument("--tiny", action="store_true", help="the tiny grid (default without CUDA)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--model-layers", type=int, default=2)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    import mm1_kernels as mk
    from mm1_kernels import BackendUnavailableError, nvtx_range

    a = parse_args(argv)
    device = bench_device()
    cuda = device.type == "cuda"
    if not cuda:
        print(CPU_WARNING)
    module = importlib.import_module(f"bench.{a.op}")
    why = module.unavailable()
    if why:
        print(f"{a.op}: skipped: {why}")
        return 0
    args = argparse.Namespace(tiny=a.tiny or not cuda, backends=None, peers=True, tp=a.tp,
                              model_layers=a.model_layers)
    want = dict(kv.split("=", 1) for kv in a.param)
    matches = [c for c in module.cases(device, args) if c.kind == a.kind
               and all(str(c.params.get(k)) == v or c.params.get(k) == _value(v) for k, v in want.items())]
    if not matches:
        print(f"no {a.op} {a.kind} case matches {want}; the grid is in bench/{a.op}.py")
        return 2
    case = matches[0]
    impls = {i.name: i for i in module.impls(case, device, args)}
    inputs = module.make_inputs(case, device)
    if a.impl == "auto":
        mm1_op = getattr(module, "MM1_OPS", {}).get(case.kind)
        order = ((mk.resolve_backend(mm1_op, None, device),) + mk.available_backends(mm1_op, device)
                 if mm1_op else ())
        names = list(dict.fromkeys(n for n in order if n in impls)) or [next(iter(impls))]
    else:
        names = [a.impl]
    impl = None
    for name in names:
        if name not in impls:
            print(f"no implementation {name!r}; choose from {sorted(impls)}")
            return 2
        if impls[name].fn is None:
            print(f"{name}: cannot run: {impls[name].why_not}")
            continue
        try:
            impls[name].fn(inputs)  # warm-up: compilation and autotuning stay out of the capture
            impl = impls[name]
            break
        except BackendUnavailableError as exc:
            print(f"{name}: {exc}")
    if impl is None:
        return 2
    impl.fn(inputs)
    cost = module.cost(case, inputs)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    times = []
    if cuda:
        torch.cuda.profiler.start()
    with nvtx_range(f"profile:{case.name}:{impl.name}"):
        for _ in range(a.iters):
            t = time.perf_counter()
            impl.fn(inputs)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
    if cuda:
        torch.cuda.profiler.stop()
    ms = statistics.median(times)
    print(f"{case.name} impl={impl.name}: {a.iters} calls, host-timed median {ms:.3f} ms "
          f"(synchronized; use python -m bench for the measured numbers); "
          f"FLOPs {cost.flops:.4g}, minimum bytes {cost.bytes:.4g} ({cost.note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
