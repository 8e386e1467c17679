"""pytest-benchmark cases for the same ops: ``pytest bench/ --benchmark-only``.

On a GPU each case is the smallest M1-shaped point of the op's grid (bench/<op>.py), timed by
pytest-benchmark with a device synchronization inside the timed call. Without CUDA the cases
are the tiny ones and each runs once: a smoke test of the code paths, not a measurement.
``python -m bench`` is the harness that measures (ceilings, rotation, fractions).
"""
import argparse
import importlib

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (the [bench] extra)")

from mm1_kernels import BACKENDS

from bench.common import bench_device

DEVICE = bench_device()
CPU = DEVICE.type != "cuda"
# (op, kind, implementation name in bench/<op>.py)
CASES = [(op, kind, b) for op, kind in (("lightning", "prefill"), ("lightning", "decode"),
                                        ("moe", "prefill"), ("moe", "decode"), ("head", "logprobs"),
                                        ("head", "logprobs_fwd_bwd"), ("head", "sample")) for b in BACKENDS]
CASES += [("model", "prefill", "mm1_model")]


def _args(op):
    # the model benchmark's smallest GPU case is 27 GB of weights: keep pytest to the tiny model
    return argparse.Namespace(tiny=CPU or op == "model", backends=None, peers=False, tp=1, model_layers=2)


@pytest.mark.parametrize("op,kind,backend", CASES, ids=[f"{o}-{k}-{b.split()[-1]}" for o, k, b in CASES])
def test_op(benchmark, op, kind, backend):
    from mm1_kernels import BackendUnavailableError

    module = importlib.import_module(f"bench.{op}")
    why = module.unavailable()
    if why:
        pytest.skip(why)
    args = _args(op)
    case = next(c for c in module.cases(DEVICE, args) if c.kind == kind)
    impl = next((i for i in module.impls(case, DEVICE, args) if i.name == backend), None)
    if impl is None:
        pytest.skip(f"{op} {kind} has no implementation {backend!r}")
    if impl.fn is None:
        pytest.skip(impl.why_not)
    inputs = module.make_inputs(case, DEVICE)
    try:
        impl.fn(inputs)  # warm-up, and the availability check
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))

    def call():
        out = impl.fn(inputs)
        if not CPU:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(case=case.name, device=str(DEVICE))
    if CPU:
        benchmark.pedantic(call, rounds=1, iterations=1)
    else:
        benchmark.pedantic(call, rounds=20, warmup_rounds=3, iterations=1)
