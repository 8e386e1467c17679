"""`python -m profiles.static` runs at one shape (CPU only) and writes sane figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "profiles.static", "--quick", "--out", str(out), "--jobs", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (out / "report.md").read_text().startswith("# Static roofline")
    return json.loads((out / "report.json").read_text())


def test_header(report):
    assert report["versions"]["triton"] and report["commit"]
    assert "estimate" in report["what"]


def test_kernel_fields_are_sane(report):
    (op,) = report["ops"]
    kernels = {r["triton_kernel"]: r for r in op["launches"]}
    assert set(kernels) == {"moe_align_kernel", "moe_gate_up_kernel", "moe_down_kernel", "moe_combine_kernel"}
    for r in kernels.values():
        assert 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] >= 0 and 0 <= r["shared_bytes"] <= 227 * 1024, r
        assert 1 <= r["ctas_per_sm"] <= 32, r
        assert r["bytes_l2"] <= r["bytes_no_reuse"] and r["bytes_l2"] > 0, r
    for name in ("moe_gate_up_kernel", "moe_down_kernel"):
        r = kernels[name]
        assert r["mma_kind"].startswith("HGMMA"), r["mma_kind"]
        # The SASS shapes agree with the TTGIR dots × their layouts, and padding rows only add.
        assert r["sass_matches_ttgir"], r
        assert r["issued_over_counted"] >= 1.0, r
    assert kernels["moe_align_kernel"]["mma_kind"] == "none"
    assert op["issued_over_counted"] >= 1.0 and op["bytes_over_min_l2"] >= 1.0
    for gpu in ("H100", "H200"):
        assert op["floors"][gpu]["floor_ms"] > 0
    assert op["floors"]["H200"]["memory_ms"] < op["floors"]["H100"]["memory_ms"]
