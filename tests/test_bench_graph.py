"""``python -m bench --cuda-graph``: decode cases also timed as a CUDA-graph replay, so the launch
overhead (eager − replay) is measured separately from the kernels' time."""
import pytest
import torch

from bench import common


def _ok_row(**extra):
    return dict(op="moe", kind="decode", params={"T": 1}, impl="triton", status="ok", median_ms=0.05,
                TFLOPs=1.0, GBps=100.0, fraction=0.5, bound="memory", **extra)


def test_rows_print_the_graph_time_and_the_launch_overhead():
    line = common.format_row(_ok_row(graph_ms=0.03, launch_overhead_ms=0.02))
    assert "graph 0.030 ms (launch overhead 0.020)" in line
    assert "graph" not in common.format_row(_ok_row())
    assert "graph: RuntimeError: sync" in common.format_row(_ok_row(graph_error="RuntimeError: sync"))


def test_cpu_runs_never_attempt_a_graph():
    from bench import moe

    device = torch.device("cpu")
    args = type("A", (), dict(tiny=True, tp=1, peers=False, backends=["torch"], backward=False))()
    case = next(c for c in moe.cases(device, args) if c.kind == "decode")
    policy = common.Policy.for_device(device, smoke=True)
    rows = common.run_case(case, lambda inputs: moe.cost(case, inputs), lambda: moe.make_inputs(case, device),
                           moe.impls(case, device, args), device, {"copy_GBps": 1.0, "matmul_bf16_TFLOPs": 1.0},
                           policy, cuda_graph=True)
    assert rows and all(r["status"] in ("ok", "skipped") for r in rows)
    assert not any("graph_ms" in r or "graph_error" in r for r in rows)


@pytest.mark.gpu
def test_moe_decode_graph_replay_is_timed_on_a_gpu():
    from bench import moe

    device = torch.device("cuda")
    args = type("A", (), dict(tiny=True, tp=1, peers=False, backends=["triton"], backward=False))()
    case = next(c for c in moe.cases(device, args) if c.kind == "decode")
    policy = common.Policy.for_device(device)
    ceilings = common.measure_ceilings(device, policy)
    rows = common.run_case(case, lambda inputs: moe.cost(case, inputs), lambda: moe.make_inputs(case, device),
                           moe.impls(case, device, args), device, ceilings, policy, cuda_graph=True)
    (row,) = [r for r in rows if r["impl"] == "triton" and r["status"] == "ok"]
    assert 0 < row["graph_ms"] and row["launch_overhead_ms"] == pytest.approx(row["median_ms"] - row["graph_ms"])
