"""The one-window GPU probe (``python -m bench.probe``) runs end to end on the CPU with ``--tiny``.

Runs it in a subprocess from the checkout (bench/ is not installed): every stage must end with a
recorded status (the GPU-only ones skipped with a reason), the correctness stages must pass on
the CPU (the Triton kernels through the interpreter against fp64), and the output must stay
within the device tool's limit of 8 files. Also: the stage budgets fit the 9-minute window, and
a stage past its timeout is killed with its whole process group and recorded as timed out.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATUSES = {"ok", "failed", "timed_out", "skipped"}


def test_probe_tiny_end_to_end_on_cpu(tmp_path):
    env = dict(os.environ)
    env.pop("OUT", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.probe", "--tiny", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["probe_logs.tar.gz", "probe_summary.json", "probe_summary.md"], files
    assert len(files) <= 8  # the device tool returns at most 8 files

    from bench.probe import STAGES
    s = json.loads((tmp_path / "probe_summary.json").read_text())
    assert s["cpu_run"] is True and s["settings"]["tiny"] is True
    assert set(s["stages"]) == {st.name for st in STAGES}
    for name, rec in s["stages"].items():
        assert rec["status"] in STATUSES, (name, rec)
        assert rec["budget_s"] > 0
        if rec["status"] == "skipped":
            assert rec.get("reason"), name
    for name in ("env", "correctness_lightning", "correctness_moe", "correctness_head", "consistency", "ceilings",
                 "timings_lightning", "timings_moe", "timings_head"):
        assert s["stages"][name]["status"] == "ok", (name, s["stages"][name])
    for name in ("build", "wheels", "correctness_lightning_cuda", "graphs", "tests"):
        assert s["stages"][name]["status"] == "skipped" and "GPU" in s["stages"][name]["reason"], name

    # correctness: the Triton kernels (interpreter) against fp64, every op, forward and backward
    assert s["correctness_ok"] is True
    checks = s["correctness"]
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    seen = {(c["op"], c["backend"]) for c in checks}
    for op in ("lightning_attention", "lightning_decode", "moe_route", "fused_moe", "head_logprobs"):
        assert (op, "triton") in seen, op
    assert {c["what"] for c in checks if c["op"] == "head_logprobs"} >= {"logprobs", "d weight"}
    assert any("varlen" in c["case"] for c in checks) and any("int8" in c["case"] for c in checks)
    # training gradients (issue 12): every input's gradient of both trainable ops, on Triton
    grads = {(c["op"], c["what"]) for c in checks if c["case"].startswith("backward") and c["backend"] == "triton"}
    assert grads >= {("lightning_attention", w) for w in ("dq", "dk", "dv", "dinit")} | \
        {("fused_moe", w) for w in ("dx", "dw13", "dw2", "dtopk_weights")}, grads
    assert {r["kind"] for r in s["cases"] if r["op"] in ("lightning", "moe")} >= {"fwd_bwd"}
    # consistent mode's claim (bench/consistency.py's measure, torch backend on the CPU): the
    # rollout's logprobs are the training forward's, bitwise; default mode's row is reported
    cons = [c for c in checks if c["op"] == "consistency"]
    assert {c["metric"] for c in cons} == {"max_abs_dlogprob", "frac_not_bitwise"}
    assert all(c["value"] == 0 for c in cons)
    rows = {r["mode"]: r for r in s["consistency"]}
    assert set(rows) == {"default", "consistent"} and all(r["backend"] == "torch" for r in rows.values())
    assert rows["consistent"]["frac_bitwise_equal"] == 1.0 and rows["consistent"]["tokens"] > 0
    assert rows["default"]["tokens"] == rows["consistent"]["tokens"]
    assert s["stages"]["consistency"]["seconds"] < 30, s["stages"]["consistency"]

    # the environment and the timings, in python -m bench's results schema
    for key in ("device_name", "torch", "triton", "cuda", "git_commit"):
        assert key in s["env"], key
    assert s["ceilings"]["copy_GBps"] > 0 and s["ceilings"]["matmul_bf16_TFLOPs"] > 0
    ok = [r for r in s["cases"] if r["status"] == "ok"]
    assert {r["op"] for r in ok} == {"lightning", "moe", "head"}
    assert {r["impl"] for r in ok} >= {"triton", "torch", "per-expert loop", "torch fp32 head"}
    for r in ok:
        assert r["median_ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0 and "fraction" in r

    md = (tmp_path / "probe_summary.md").read_text()
    for heading in ("## Stages", "## Correctness vs fp64", "## Consistency", "## Ceilings", "## Timings"):
        assert heading in md, heading
    with tarfile.open(tmp_path / "probe_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "probe_logs/logs/env.log" in names and "probe_logs/correctness_head.json" in names
    assert s["wall_s"] <= wall + 1 and s["wall_s"] < 240


def test_budgets_fit_the_window():
    from bench import probe
    assert probe.WORST_CASE_S < 540 and probe.DEADLINE_S < 540
    assert probe.BACKGROUND_S == probe.WHEELS.budget_s + probe.BUILD.budget_s
    names = [s.name for s in probe.STAGES]
    assert len(names) == len(set(names)) and set(names) - {"wheels", "build"} <= set(probe.WORKERS)


def test_a_stage_past_its_timeout_is_killed_and_recorded(tmp_path):
    from bench import probe
    p = probe.Probe(probe.parse_args(["--out", str(tmp_path)]))
    stage = probe.Stage("sleeper", probe.MIN_STAGE_S + 0.5, False)
    t0 = time.monotonic()
    rec = p.run_cmd(stage, ["bash", "-c", f"sleep 60 & echo $! > {tmp_path}/child; sleep 60"])
    assert rec["status"] == "timed_out" and time.monotonic() - t0 < 20, rec
    child = int((tmp_path / "child").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    rec = p.run_cmd(stage, ["bash", "-c", "echo broken; exit 3"])
    assert rec["status"] == "failed" and "exit code 3" in rec["message"]
    shutil.rmtree(p.work, ignore_errors=True)
