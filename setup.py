"""Build lstm_fused._C: a CUDAExtension when a CUDA toolkit is usable, else a CppExtension.

Environment switches:
  LSTM_FUSED_CPU_ONLY=1   never compile the CUDA sources
  FORCE_CUDA=1            a missing or unusable CUDA toolkit is an error, not a fallback
  CUDA_HOME               the toolkit to use (found automatically when unset)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default below when no GPU is visible)
  LSTM_FUSED_CPU_CAPABILITY  avx512 | avx2 | default: SIMD level of the CPU kernels
                          (default: the best the build machine supports)
  LSTM_FUSED_PTXAS_VERBOSE=1  print each CUDA kernel's registers, shared memory and spills
  LSTM_FUSED_SIMT=0       skip lstm_fused._simt, the test-only build of the CUDA sources that runs
                          them on the CPU in the SIMT emulator (csrc/simt; tests marked simt)
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    sys.exit(
        "lstm_fused: PyTorch must be installed before building this extension "
        "(pip install torch), and the build must see it: "
        "pip install --no-build-isolation -e ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
# Hopper is the target we tune for; +PTX keeps newer GPUs working through the JIT.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(path):
    """A real CUDA toolkit has nvcc and the runtime headers; a wrapper directory such as
    /usr/local (whose bin/nvcc forwards to the toolkit) does not have the headers."""
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for path in candidates:
        if _is_toolkit(path):
            return os.path.realpath(path)
    return None


def nvcc_version(cuda_home):
    out = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True
    ).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def decide_cuda():
    """Return CUDA_HOME when the CUDA sources should be compiled, else None (with a message)."""
    force = _env_flag("FORCE_CUDA")
    if _env_flag("LSTM_FUSED_CPU_ONLY"):
        if force:
            sys.exit("lstm_fused: FORCE_CUDA=1 and LSTM_FUSED_CPU_ONLY=1 contradict each other.")
        print("lstm_fused: LSTM_FUSED_CPU_ONLY=1, building the CPU kernels only.")
        return None

    def fallback(reason):
        if force:
            sys.exit(f"lstm_fused: FORCE_CUDA=1 but {reason}.")
        print(f"lstm_fused: {reason}; building the CPU kernels only.")
        return None

    if torch.version.cuda is None:
        return fallback(f"this torch ({torch.__version__}) is a CPU-only build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return fallback("no CUDA toolkit (nvcc with its headers) was found; set CUDA_HOME")
    found = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if found is None:
        return fallback(f"could not read the version of {cuda_home}/bin/nvcc")
    if found[0] != torch_major:
        sys.exit(
            f"lstm_fused: nvcc in {cuda_home} is CUDA {found[0]}.{found[1]} but torch "
            f"{torch.__version__} was built with CUDA {torch.version.cuda}; the major versions must "
            "match. Point CUDA_HOME at a matching toolkit, or set LSTM_FUSED_CPU_ONLY=1."
        )
    return cuda_home


def cpu_capability_flags():
    """SIMD flags for the CPU kernels. at::vec::Vectorized picks its implementation from the
    CPU_CAPABILITY_* defines at compile time, so the extension is built for one level."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    wanted = os.environ.get("LSTM_FUSED_CPU_CAPABILITY", "").strip().lower()
    if not wanted:
        try:
            with open("/proc/cpuinfo") as f:
                cpu_flags = set(re.findall(r"\w+", f.read()))
        except OSError:
            cpu_flags = set()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= cpu_flags:
            wanted = "avx512"
        elif {"avx2", "fma"} <= cpu_flags:
            wanted = "avx2"
        else:
            wanted = "default"
    if wanted == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if wanted == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if wanted == "default":
        return []
    sys.exit(f"lstm_fused: LSTM_FUSED_CPU_CAPABILITY={wanted!r}; use avx512, avx2 or default.")


def make_extension():
    cuda_home = decide_cuda()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported, and on machines where
        # `nvcc` on PATH is a wrapper its guess is wrong: settle it before the import.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
            print(f"lstm_fused: no GPU visible, TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST}")

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fdiagnostics-color=always"] + cpu_capability_flags()
    extra_link_args = []
    if torch.backends.openmp.is_available() and platform.system() == "Linux":
        # at::parallel_for is header code whose `#pragma omp parallel` is compiled into each caller:
        # without -fopenmp it runs on one thread. libgomp.so.1 resolves by soname to the copy that
        # libtorch already loaded, so there is one OpenMP runtime in the process.
        cxx_flags.append("-fopenmp")
        extra_link_args.append("-fopenmp")
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = []
    if cuda_home is not None:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        if _env_flag("LSTM_FUSED_PTXAS_VERBOSE"):
            extra_compile_args["nvcc"].append("-Xptxas=-v")
        define_macros.append(("LSTM_FUSED_WITH_CUDA", None))
        ext_class = cpp_extension.CUDAExtension
    else:
        ext_class = cpp_extension.CppExtension
    ext = ext_class(
        "lstm_fused._C",
        sources,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        define_macros=define_macros,
        py_limited_api=True,
    )
    return ext, cpp_extension.BuildExtension


def make_simt_extension():
    """lstm_fused._simt: csrc/cuda/*.cu (host code and kernels) compiled as plain C++ against the
    SIMT emulator, so that the tests run the CUDA sources on any machine. Test-only: nothing that
    `import lstm_fused` loads. Needs no CUDA toolkit."""
    if os.environ.get("LSTM_FUSED_SIMT", "1").strip() == "0":
        print("lstm_fused: LSTM_FUSED_SIMT=0, not building the SIMT emulator's test module.")
        return None
    from torch.utils import cpp_extension

    sources = [f"csrc/simt/{name}.cpp" for name in ("simt_ops", "lstm_cuda_simt", "gru_cuda_simt", "lstm_persistent_simt")]
    sources.append("csrc/layer_args.cpp")
    return cpp_extension.CppExtension(
        "lstm_fused._simt",
        sources,
        extra_compile_args={"cxx": ["-O2", "-pthread", "-Wno-unknown-pragmas", "-fdiagnostics-color=always"]},
        extra_link_args=["-pthread"],
        py_limited_api=True,
    )


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    extension, build_ext = make_extension()
    simt_extension = make_simt_extension()
    setup(
        packages=find_packages(include=["lstm_fused", "lstm_fused.*"]),
        ext_modules=[extension] + ([simt_extension] if simt_extension is not None else []),
        cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
