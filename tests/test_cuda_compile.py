"""CI compile check of the CUDA C++ sources (no GPU needed, only the machine's nvcc).

- every ``.cu`` under ``csrc/`` compiles for ``sm_90a`` with the extension's flags, and ptxas
  reports no local-memory spills and no stack frame in the hot kernels;
- ``csrc/lightning/lightning.h`` is torch-free plain C: a C file calling the C API compiles
  and links against the kernel objects and the CUDA runtime alone;
- ``csrc/torch_bindings.cpp`` compiles against torch's headers (fully with a CUDA torch;
  syntax-only with a CPU torch whose wheel ships the c10/cuda headers).

Skipped with a reason when nvcc is not installed. Compiles run two at a time.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
# Kernels whose every byte of local memory would cost bandwidth: no stack frame allowed.
HOT_KERNELS = ("lightning_decode_kernel", "lightning_prefill_kernel", "lightning_prefill_bf16_kernel",
               "head_stats_kernel", "head_dlogits_kernel")
ARCH_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a"]
# As setup.py, plus the defines torch's CUDAExtension adds to every nvcc call (its
# COMMON_NVCC_FLAGS): they remove __half/__nv_bfloat16 operators and conversions, so code that
# compiles without them can still fail in the real build.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
NVCC_FLAGS = ["-std=c++20", "-O3", "--use_fast_math", "-lineinfo", *TORCH_NVCC_DEFINES, *ARCH_FLAGS]


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)")


def _cuda_include_dir() -> Path:
    """The toolkit's include directory (nvcc may be a wrapper script outside the toolkit)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             str(Path(NVCC).resolve().parent.parent)]
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        homes.insert(2, CUDA_HOME)
    except Exception:  # torch missing or without CUDA: the other candidates remain
        pass
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    pytest.skip("CUDA headers (cuda_runtime.h) not found next to nvcc, CUDA_HOME or /usr/local/cuda")


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict[str, tuple[int, int, int]]:
    """Kernel (mangled name) -> (stack frame, spill store, spill load) bytes, from -Xptxas -v."""
    out: dict[str, tuple[int, int, int]] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            continue
        m = _STACK.search(line)
        if m and current is not None:
            out[current] = tuple(int(x) for x in m.groups())
            current = None
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every .cu once (two at a time); returns {path: (CompletedProcess, object file)}."""
    out_dir = tmp_path_factory.mktemp("cuda_objs")

    def compile_one(src: Path):
        obj = out_dir / (src.relative_to(CSRC).as_posix().replace("/", "__") + ".o")
        cmd = [NVCC, *NVCC_FLAGS, "-Xptxas", "-v", f"-I{CSRC}", "-c", str(src), "-o", str(obj)]
        return src, (_run(cmd), obj)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(compile_one, CU_FILES))


def test_there_are_cuda_sources():
    assert CU_FILES, "no .cu files under csrc/"


def test_parse_ptxas():
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n")
    assert parse_ptxas(log) == {"_Z3fooPf": (16, 8, 4)}


@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.relative_to(CSRC).as_posix())
def test_cu_compiles_without_spills(compiled, src):
    proc, _ = compiled[src]
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {src.name}:\n{log[-6000:]}"
    kernels = parse_ptxas(log)
    assert kernels, f"ptxas reported no kernels for {src.name} (was -Xptxas -v honoured?):\n{log[-3000:]}"
    spills = {k: v for k, v in kernels.items() if v[1] or v[2]}
    assert not spills, f"local-memory spills (stack, store, load bytes) in {src.name}: {spills}"
    hot_stack = {k: v[0] for k, v in kernels.items() if v[0] and any(h in k for h in HOT_KERNELS)}
    assert not hot_stack, f"hot kernels with a stack frame in {src.name}: {hot_stack}"
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, f"compiler warnings in {src.name}:\n" + "\n".join(warnings)


HOST_C = r"""
/* Plain C (no C++, no torch): the C API must be usable from any engine. */
#include <stdio.h>
#include "lightning/lightning.h"

int main(void) {
    /* Zero-sized calls launch nothing and need no GPU; they only prove the symbols link. */
    cudaError_t a = mm1_lightning_decode(MM1_DTYPE_BFLOAT16, 0, 0, 0, 0, 0, 0, 0, 4,
                                         0, 64, 128, 128, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    cudaError_t b = mm1_lightning_prefill(MM1_DTYPE_FLOAT32, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0,
                                          0, 0, 64, 128, 128, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                          0, 0, 0, 0, 0, 0, 0, 0);
    /* The split's workspace: a pure function of the sizes (8 heads, 128 x 128, 1000 tokens, L = 256:
       5 rows of a 512 KiB state). */
    size_t ws = mm1_lightning_prefill_workspace_bytes(1, 1, 1000, 8, 128, 128, 256);
    printf("%d %d %zu\n", (int)a, (int)b, ws);
    return (a == cudaSuccess && b == cudaSuccess && ws >= 5u * 8 * 128 * 128 * 4) ? 0 : 1;
}
"""


def test_c_api_header_is_torch_free_c(compiled, tmp_path):
    objs = []
    for src in CU_FILES:
        proc, obj = compiled[src]
        if proc.returncode != 0:
            pytest.fail(f"{src.name} did not compile; see test_cu_compiles_without_spills")
        objs.append(str(obj))
    host = tmp_path / "host.c"
    host.write_text(HOST_C)
    exe = tmp_path / "host"
    # nvcc hands .c files to the host C compiler as C; no torch include path anywhere.
    proc = _run([NVCC, f"-I{CSRC}", "-x", "c", "-c", str(host), "-o", str(tmp_path / "host.o")])
    assert proc.returncode == 0, f"C host program did not compile:\n{proc.stdout}{proc.stderr}"
    proc = _run([NVCC, *ARCH_FLAGS, str(tmp_path / "host.o"), *objs, "-o", str(exe)])
    assert proc.returncode == 0, f"C host program did not link:\n{proc.stdout}{proc.stderr}"
    # Running it needs only the CUDA runtime (statically linked) and, for zero-sized calls,
    # no device: both functions return before touching one.
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"zero-sized C API calls failed: {run.stdout}{run.stderr}"


def test_torch_bindings_compile(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    src = CSRC / "torch_bindings.cpp"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    torch_inc = Path(cpp_extension.include_paths()[0])
    py_inc = f"-I{sysconfig.get_paths()['include']}"
    cuda_inc = f"-I{_cuda_include_dir()}"
    cxx = os.environ.get("CXX", "c++")
    if torch.version.cuda is not None:
        cmd = [cxx, "-std=c++20", "-O0", "-fPIC", "-c", *includes, py_inc, cuda_inc, f"-I{CSRC}",
               str(src), "-o", str(tmp_path / "tb.o")]
    else:
        # A CPU torch wheel ships the c10/cuda headers but not the generated
        # cuda_cmake_macros.h; stub it and check the syntax only.
        if not (torch_inc / "c10" / "cuda" / "CUDAGuard.h").is_file():
            pytest.skip("CPU torch without c10/cuda headers: torch_bindings.cpp needs a CUDA torch to compile")
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
        cmd = [cxx, "-std=c++20", "-fsyntax-only", *includes, f"-I{tmp_path / 'shim'}", py_inc, cuda_inc,
               f"-I{CSRC}", str(src)]
    proc = _run(cmd)
    assert proc.returncode == 0, f"torch_bindings.cpp failed to compile:\n{proc.stderr[-6000:]}"
