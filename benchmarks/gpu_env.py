"""The GPU check's first stage: what machine, software and source the record is about. Writes a
JSON file and prints `have_gpu=0|1` and `git_commit=<sha>` for benchmarks/gpu_check.sh to read. Needs torch but not lstm_fused (it runs before the build).

    python benchmarks/gpu_env.py env.json
"""
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_output(*command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def csrc_sha256():
    """A digest of every file under csrc/ (names and contents): names the source where .git is absent."""
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(os.path.join(ROOT, "csrc"))):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, ROOT).encode() + b"\0" + open(path, "rb").read())
    return digest.hexdigest()


def version_of(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    commit = os.environ.get("GIT_COMMIT") or command_output("git", "-C", ROOT, "rev-parse", "HEAD") or "unknown"
    dirty = command_output("git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no")
    env = {
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "csrc_sha256": csrc_sha256(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_defaults": {"cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                          "cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)},
        "python": sys.version.split()[0],
        "host_cpu": cpu_model(),
        "host_cores": os.cpu_count(),
        "nvcc": (command_output(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                                "--version") or "").splitlines()[-1:] or None,
        "compute_sanitizer": shutil.which("compute-sanitizer") or (
            "/usr/local/cuda/bin/compute-sanitizer" if os.path.exists("/usr/local/cuda/bin/compute-sanitizer") else None),
        "packages": {p: version_of(p) for p in ("pytest", "pytest-timeout", "pytest-xdist", "pytest-benchmark",
                                                "hypothesis", "numpy", "ninja")},
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), multiprocessors=props.multi_processor_count,
                   compute_capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   shared_memory_per_block_optin=getattr(props, "shared_memory_per_block_optin", None),
                   driver=command_output("nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem",
                                         "--format=csv,noheader"))
    with open(sys.argv[1], "w") as f:
        json.dump(env, f, indent=1)
    print(f"have_gpu={int(env['gpu'] is not None)}")
    print(f"git_commit={commit}")
    print(f"gpu: {env['gpu'] or 'none'}; torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}); "
          f"{env['host_cpu']}, {env['host_cores']} cores; commit {commit[:12]}", file=sys.stderr)


if __name__ == "__main__":
    main()
