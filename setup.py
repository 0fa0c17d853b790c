"""Build of int4kit's native extension `int4kit._C` against the installed torch.

    pip install --no-build-isolation -e .

CPU kernels are always built: the scalar/dispatch code with no ISA flags, each ISA's translation
unit as its own static library with exactly that ISA's -m flags (never -march=native), linked into
the extension. CUDA sources are added when INT4KIT_CUDA allows it:
    INT4KIT_CUDA=auto (default)  build them when torch has CUDA and nvcc is found
    INT4KIT_CUDA=1               require them (fail if torch or nvcc lacks CUDA)
    INT4KIT_CUDA=0               CPU only
    INT4KIT_CUDA_ARCHS           e.g. "8.0;8.6;8.9;9.0a" (the default); no GPU is needed to build
"""
import os
import shutil
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
CXX_FLAGS = ["-O3", "-std=c++20", "-fPIC", "-Wall", "-Wextra", "-Wno-unused-parameter"]
INCLUDE_DIRS = [str(ROOT / "csrc" / "include"), str(ROOT / "csrc")]

# AVX-512 without BF16 (Cascade Lake and Ice Lake run that path); AMX CPUs all have BF16 as well
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"]
# One static library per instruction set: (name, sources, ISA flags). Static libraries are linked
# in this order, so each must come before the ones it calls: the dispatcher first, then AMX (which
# falls back to AVX-512), AVX-512 BF16 (likewise), AVX-512, AVX2.
ISA_LIBRARIES = [
    ("int4kit_cpu_base", ["csrc/cpu/format_ref.cpp", "csrc/cpu/linear_ref.cpp", "csrc/cpu/gptq.cpp",
                          "csrc/cpu/dispatch.cpp"], []),
    ("int4kit_cpu_amx", ["csrc/cpu/linear_amx.cpp"],
     AVX512_FLAGS + ["-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8"]),
    ("int4kit_cpu_avx512bf16", ["csrc/cpu/linear_avx512bf16.cpp"], AVX512_FLAGS + ["-mavx512bf16"]),
    ("int4kit_cpu_avx512", ["csrc/cpu/linear_avx512.cpp"], AVX512_FLAGS),
    ("int4kit_cpu_avx2", ["csrc/cpu/linear_avx2.cpp"], ["-mavx2", "-mfma", "-mf16c"]),
]


def find_cuda_home():
    """CUDA_HOME first, else /usr/local/cuda; torch's own guess from the nvcc on PATH can be wrong."""
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    return None


def want_cuda():
    mode = os.environ.get("INT4KIT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"INT4KIT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    cuda_home = find_cuda_home()
    available = torch.version.cuda is not None and cuda_home is not None
    if mode == "1" and not available:
        raise SystemExit(
            "INT4KIT_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc found under {cuda_home!r}")
    if available:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # the module computed its guess at import time
    return available


def gencode_flags(archs):
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    if not flags:
        raise SystemExit(f"INT4KIT_CUDA_ARCHS={archs!r} names no architecture")
    # PTX of the oldest portable arch too, so GPUs newer than the list JIT-compile the kernels
    # instead of failing with "no kernel image" (arch-specific "a" targets do not carry forward)
    portable = sorted(a.strip() for a in archs.replace(",", ";").split(";")
                      if a.strip() and not a.strip().endswith("a"))
    if portable:
        num = portable[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


# at::parallel_for is inline OpenMP in torch's headers: without -fopenmp the glue would run it
# serially. Compile-only on purpose: the GOMP symbols then resolve to the OpenMP runtime torch
# already loaded (through libtorch_cpu), so one thread pool serves both and torch.set_num_threads
# governs int4kit too. Linking -fopenmp would load a second runtime with its own pool.
GLUE_CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]


def make_extension():
    ext_sources = ["csrc/ops.cpp", "csrc/cpu/ops_cpu.cpp"]
    libraries = [name for name, _, _ in ISA_LIBRARIES]
    if want_cuda():
        archs = os.environ.get("INT4KIT_CUDA_ARCHS", "8.0;8.6;8.9;9.0a")
        print(f"int4kit: building CUDA sources for {archs} with {cpp_extension.CUDA_HOME}")
        ext_sources += ["csrc/cuda/ops_cuda.cpp", "csrc/cuda/format.cu", "csrc/cuda/layout.cu",
                        "csrc/cuda/linear.cu"]
        return cpp_extension.CUDAExtension(
            "int4kit._C", ext_sources, include_dirs=INCLUDE_DIRS, libraries=libraries,
            define_macros=[("INT4KIT_CUDA_BUILT", "1")],
            extra_compile_args={"cxx": GLUE_CXX_FLAGS,
                                "nvcc": ["-O3", "-std=c++20", "-Xptxas=-v", *gencode_flags(archs)]})
    print("int4kit: building CPU kernels only")
    return cpp_extension.CppExtension(
        "int4kit._C", ext_sources, include_dirs=INCLUDE_DIRS, libraries=libraries,
        extra_compile_args={"cxx": GLUE_CXX_FLAGS})


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build_ext, building the ISA static libraries first: `pip install -e .` with an older
    setuptools runs build_ext alone, and the link then finds no int4kit_cpu_* library."""

    def run(self):
        self.run_command("build_clib")  # a no-op when it already ran in this invocation
        super().run()


if shutil.which("ninja") is None:
    print("int4kit: ninja not found, the build will compile one file at a time")

setup(
    name="int4kit",
    version="0.1.0",
    description="INT4 weight quantization for PyTorch with hand-written CPU and CUDA kernels",
    package_dir={"": "python"},
    packages=["int4kit", "int4kit.quant", "int4kit.formats"],
    python_requires=">=3.10",
    install_requires=["safetensors"],
    entry_points={"console_scripts": ["int4kit = int4kit.cli:main"]},
    libraries=[(name, {"sources": srcs, "include_dirs": INCLUDE_DIRS, "cflags": CXX_FLAGS + flags})
               for name, srcs, flags in ISA_LIBRARIES],
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
)
