"""Build lstm_fused._C: a CUDAExtension when a CUDA toolkit is usable, else a CppExtension.

Environment switches:
  LSTM_FUSED_CPU_ONLY=1   never compile the CUDA sources
  FORCE_CUDA=1            a missing or unusable CUDA toolkit is an error, not a fallback
  CUDA_HOME               the toolkit to use (found automatically when unset)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default below when no GPU is visible)
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


# The CPU kernels compiled once per SIMD level (csrc/cpu/cpu_kernels.h); the rest of csrc/cpu
# (the run-time dispatcher) is compiled once, with the baseline flags.
CPU_KERNEL_SOURCES = ["csrc/cpu/lstm_cpu.cpp", "csrc/cpu/gru_cpu.cpp"]


def cpu_levels():
    """{level: flags} for the per-level objects, in link order (see BuildWithCpuLevels).
    at::vec picks its implementation from the CPU_CAPABILITY_* defines at compile time, and puts
    it in `inline namespace CPU_CAPABILITY`; the kernels' own code goes in the same namespace."""
    levels = {"DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]}
    if is_x86():
        levels["AVX2"] = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        levels["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                            "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    return levels


def is_x86():
    return platform.machine().lower() in ("x86_64", "amd64")


def make_build_ext(base):
    """BuildExtension that also compiles CPU_KERNEL_SOURCES once per level (setuptools compiles
    every source of an extension with the same flags) and links those objects in.

    Link order: the baseline objects (the other sources), then the levels from DEFAULT up. Inline
    functions that the levels share outside their namespaces (c10, ATen, the standard library,
    layer_loops.h) are merged by the linker, which keeps the first copy it meets: the baseline
    one, which every CPU can run."""

    class BuildWithCpuLevels(base):
        def build_extension(self, ext):
            if ext.name != "lstm_fused._C":  # the SIMT test module has no CPU kernels
                super().build_extension(ext)
                return
            level_objects = []
            for level, flags in cpu_levels().items():
                extra = {key: list(value) for key, value in ext.extra_compile_args.items()}
                extra["cxx"] = extra["cxx"] + flags
                level_objects += self.compiler.compile(
                    CPU_KERNEL_SOURCES,
                    output_dir=os.path.join(self.build_temp, "cpu_" + level.lower()),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=extra,
                    depends=ext.depends,
                )
            ext.extra_objects = level_objects + [o for o in ext.extra_objects if o not in level_objects]
            super().build_extension(ext)

    return BuildWithCpuLevels


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

    if os.environ.get("LSTM_FUSED_CPU_CAPABILITY", "").strip():
        print("lstm_fused: LSTM_FUSED_CPU_CAPABILITY is read when the library loads, not at build "
              "time: the build compiles the CPU kernels for every SIMD level.")
    sources = sorted(
        set(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")) - set(CPU_KERNEL_SOURCES)
    )
    cxx_flags = ["-O3", "-fdiagnostics-color=always"]
    extra_link_args = []
    if torch.backends.openmp.is_available() and platform.system() == "Linux":
        # at::parallel_for is header code whose `#pragma omp parallel` is compiled into each caller:
        # without -fopenmp it runs on one thread. libgomp.so.1 resolves by soname to the copy that
        # libtorch already loaded, so there is one OpenMP runtime in the process.
        cxx_flags.append("-fopenmp")
        extra_link_args.append("-fopenmp")
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = [("LSTM_FUSED_CPU_LEVELS_X86", None)] if is_x86() else []
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
        # The per-level kernel sources are compiled by BuildWithCpuLevels; listed here so that a
        # change to them (or to a header) triggers the rebuild.
        depends=CPU_KERNEL_SOURCES + sorted(glob.glob("csrc/**/*.h", recursive=True)),
        py_limited_api=True,
    )
    return ext, make_build_ext(cpp_extension.BuildExtension)


def make_simt_extension():
    """lstm_fused._simt: csrc/cuda/*.cu (host code and kernels) compiled as plain C++ against the
    SIMT emulator, so that the tests run the CUDA sources on any machine. Test-only: nothing that
    `import lstm_fused` loads. Needs no CUDA toolkit."""
    if os.environ.get("LSTM_FUSED_SIMT", "1").strip() == "0":
        print("lstm_fused: LSTM_FUSED_SIMT=0, not building the SIMT emulator's test module.")
        return None
    from torch.utils import cpp_extension

    sources = [f"csrc/simt/{name}.cpp" for name in ("simt_ops", "lstm_cuda_simt", "gru_cuda_simt", "lstm_persistent_simt")]
    sources += ["csrc/layer_args.cpp", "csrc/gradient_gemms.cpp"]
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
