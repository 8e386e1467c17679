"""The benchmark harness, its report and the profiling entry points run end to end on the CPU.

Runs ``python -m bench all`` in a subprocess from the checkout (bench/ and profiles/ are not
installed) with CUDA hidden and the Triton interpreter off (without CUDA the default is the
smoke run: tiny grids, torch backend, one call per implementation), then renders the report
from the JSON it wrote. The numbers mean nothing; the fields and files must exist.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(*args, cwd=REPO):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_bench_and_report_end_to_end_on_cpu(tmp_path):
    out = _run("-m", "bench", "all", "--no-progress", "--out", str(tmp_path))
    assert "CPU run: numbers are not GPU performance" in out
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.endswith("_cpu.json"), files  # git-ignored name
    run = json.loads(files[0].read_text())
    assert run["cpu_run"] is True and run["settings"]["smoke"] is True
    import mm1_kernels as mk
    assert run["env"]["mm1_kernels"] == mk.__version__
    for key in ("device_name", "torch", "triton", "cuda", "git_commit", "sm_count"):
        assert key in run["env"], key
    assert run["ceilings"]["copy_GBps"] > 0 and run["ceilings"]["matmul_bf16_TFLOPs"] > 0
    ok = [c for c in run["cases"] if c["status"] == "ok"]
    assert {c["op"] for c in ok} >= {"lightning"}, "the lightning torch backend must run"
    for op in ("moe", "head", "model"):  # either measured or skipped with a reason
        assert op in run["skipped_ops"] or any(c["op"] == op for c in run["cases"]), op
    for c in ok:
        for key in ("kind", "params", "impl", "median_ms", "flops", "bytes", "TFLOPs", "GBps",
                    "bound", "fraction", "floor_ms"):
            assert key in c, (key, c["op"], c["impl"])
        assert c["median_ms"] > 0 and c["flops"] > 0 and c["bytes"] > 0
    assert all(c["status"] in ("ok", "skipped", "error", "oom") for c in run["cases"])

    report = tmp_path / "report"
    out = _run("-m", "bench.report", str(tmp_path), "--out", str(report))
    assert str(files[0]) in out  # it names the run it found
    assert not (report / "report.md").exists()  # GPU devices only; this run is a CPU run
    md = (report / "report_cpu.md").read_text()
    assert "CPU run: numbers are not GPU performance" in md
    assert "#### lightning prefill" in md
    assert list(report.glob("*_lightning_prefill_cpu.png"))


def test_profile_entry_points_without_a_gpu(tmp_path):
    for tool in ("run_ncu", "run_nsys"):
        out = _run("-m", f"profiles.{tool}", "lightning", "prefill", "--dry-run", "--out", str(tmp_path))
        assert "-m profiles.case lightning prefill" in out
        out = _run("-m", f"profiles.{tool}", "lightning", "prefill", "--out", str(tmp_path))
        assert "not profiling" in out.lower()
    out = _run("-m", "profiles.case", "lightning", "prefill", "--tiny")
    assert "CPU run" in out


def test_model_generate_cost_runs_the_head_once_per_row():
    """generate samples through mk.head_sample: the head runs on each row's last prompt token
    (not on every prompt token) and writes no [T, V] logits; model(ids).logits does both."""
    from bench.common import Case
    from bench.model import cost, step_cost

    d = dict(layers=8, lightning_layers=7, softmax_layers=1, hidden=64, H=4, D=16, kvH=2, I=96, E=4,
             k=2, V=512)
    B, T = 4, 8
    gen = cost(Case("model", "generate", dict(B=B, T=T, new=1, **d), x="B"))
    full = step_cost(dict(B=B, **d), T, T)
    head_flops = 2 * d["V"] * d["hidden"]
    assert gen.flops == full.flops - (B * T - B) * head_flops
    assert gen.bytes == full.bytes - B * T * d["V"] * 4 + B * 12


def test_moe_backward_bench_on_cpu(tmp_path):
    """``python -m bench moe --backward``: forward+backward rows, FLOPs and bytes counted."""
    _run("-m", "bench", "moe", "--backward", "--no-peers", "--no-progress", "--out", str(tmp_path))
    run = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert run["settings"]["backward"] is True
    rows = [c for c in run["cases"] if c["op"] == "moe"]
    assert rows and all(c["kind"] == "fwd_bwd" for c in rows)
    ok = [c for c in rows if c["status"] == "ok"]
    assert any(c["impl"] == "torch" for c in ok)
    assert all(c["flops"] > 0 and c["bytes"] > 0 and c["median_ms"] > 0 for c in ok)


def test_lightning_backward_bench_on_cpu(tmp_path):
    """``python -m bench lightning --backward``: forward+backward rows, FLOPs and bytes counted;
    the fla peer is timed or skipped with a reason, never a crash."""
    _run("-m", "bench", "lightning", "--backward", "--no-progress", "--out", str(tmp_path))
    run = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert run["settings"]["backward"] is True
    rows = [c for c in run["cases"] if c["op"] == "lightning"]
    assert rows and all(c["kind"] == "fwd_bwd" for c in rows)
    ok = [c for c in rows if c["status"] == "ok"]
    assert any(c["impl"] == "torch" for c in ok)
    assert all(c["flops"] > 0 and c["bytes"] > 0 and c["median_ms"] > 0 for c in ok)
    assert any(c["impl"] == "fla chunk_simple_gla" and c["status"] in ("ok", "skipped") for c in rows)
