"""One home for the plain-C callers of the CUDA C APIs (tests/test_cuda_emulation_{moe,head}.py):
find nvcc, build an op folder's .cu files to PTX-only objects (nothing is launched; SASS and
spills are test_cuda_compile's), compile a C host program against the headers, link and run it.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
from pathlib import Path


def find_nvcc() -> str | None:
    """nvcc on PATH, else under CUDA_HOME, CUDA_PATH or /usr/local/cuda; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def run_c_api_program(nvcc: str, csrc: Path, sources: list[Path], host_c: str, tmp_path: Path,
                      timeout: float) -> None:
    """Build ``sources`` (PTX only, sm_90a), compile ``host_c`` as C, link, run; asserts each step
    succeeds (the host program's own checks decide the exit status)."""
    flags = ["-std=c++20", "-O1", "-gencode=arch=compute_90a,code=compute_90a", f"-I{csrc}"]

    def build(src: Path) -> Path:
        obj = tmp_path / (src.stem + ".o")
        p = subprocess.run([nvcc, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True,
                           timeout=timeout)
        assert p.returncode == 0, p.stderr[-4000:]
        return obj

    host = tmp_path / "host.c"
    host.write_text(host_c)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        objs = list(ex.map(build, sources))
    p = subprocess.run([nvcc, f"-I{csrc}", "-x", "c", "-c", str(host), "-o", str(tmp_path / "host.o")],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"C host program did not compile:\n{p.stdout}{p.stderr}"
    exe = tmp_path / "host"
    p = subprocess.run([nvcc, "-gencode=arch=compute_90a,code=compute_90a", str(tmp_path / "host.o"),
                        *map(str, objs), "-o", str(exe)], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"C host program did not link:\n{p.stdout}{p.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"C API calls gave unexpected results:\n{run.stdout}{run.stderr}"
