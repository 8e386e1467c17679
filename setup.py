"""Builds the CUDA extension ``mm1_kernels._C``; everything else is in pyproject.toml.

The extension is built only when the installed torch is a CUDA build and
``MM1_SKIP_CUDA_BUILD`` is not set; ``MM1_CUDA_ARCHS`` picks the targets (default ``90a``,
i.e. ``sm_90a``; a list such as ``"90a;100a"`` builds several). A failed CUDA build warns and
installs without it unless ``MM1_REQUIRE_CUDA_BUILD=1``. The C++ standard is C++20, torch's
own default. Install with ``pip install --no-build-isolation -e .`` so pip never resolves a
second torch into a build environment.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_extensions():
    if os.environ.get("MM1_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources += [os.path.join("csrc", "torch_bindings.cpp")]
    if not os.path.exists(os.path.join(ROOT, sources[-1])):
        return [], {}
    archs = os.environ.get("MM1_CUDA_ARCHS", "90a").replace(",", ";").split(";")
    gencode = []
    for arch in filter(None, (a.strip() for a in archs)):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]

    class OptionalBuildExtension(BuildExtension):
        """A failed CUDA build leaves a working pure-Python install (the Triton and torch
        backends, with backend="cuda" reporting why it is unavailable) instead of no install.
        MM1_REQUIRE_CUDA_BUILD=1 makes the failure fatal, for CI of the extension itself."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if os.environ.get("MM1_REQUIRE_CUDA_BUILD", "0") == "1":
                    raise
                print(f"WARNING: building {ext.name} failed ({exc}); installing without the CUDA "
                      f"backend. Set MM1_REQUIRE_CUDA_BUILD=1 to make this an error.")

    ext = CUDAExtension(
        name="mm1_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", *gencode],
        },
    )
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
