#!/usr/bin/env bash
# Compile every source of csrc/ against another torch release's headers, objects thrown away:
# g++ for csrc/**/*.cpp, nvcc -arch=sm_90 for csrc/cuda/*.cu. The GPU machine runs torch 2.11.0
# (the oldest release pyproject.toml claims), and CI builds against a newer one, so a newer ATen
# API, or a C++ feature the older release's standard lacks (torch 2.11 compiles extensions as
# C++17, 2.14 as C++20), would otherwise first fail in the GPU machine's one build.
#
#   scripts/compile_check.sh [torch version]     # default 2.11.0
#
# Only the wheel's include/ tree is needed: the wheel (~530 MB) is downloaded once, its headers
# (~62 MB) and the C++ standard its cpp_extension uses are kept in
# ${LSTM_FUSED_CACHE:-~/.cache/lstm_fused}/torch-<version>-headers, and the wheel is deleted.
# MAX_JOBS compilers run at once (default 2). Without nvcc the .cu files are skipped, said so.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.11.0}
cache=${LSTM_FUSED_CACHE:-$HOME/.cache/lstm_fused}
headers=$cache/torch-$version-headers
py=${PYTHON:-python}
command -v "$py" >/dev/null || py=python3
jobs=${MAX_JOBS:-2}

if [ ! -f "$headers/complete" ]; then
    rm -rf "$headers" && mkdir -p "$headers"
    download=$(mktemp -d)
    t0=$(date +%s)
    # /etc/xdg/pip may cap torch at the release installed here; this one download ignores it.
    PIP_CONFIG_FILE=/dev/null "$py" -m pip download -q --no-deps --only-binary=:all: "torch==$version" -d "$download"
    wheel=$(ls "$download"/torch-*.whl)
    echo "compile_check: downloaded $(basename "$wheel") ($(( $(stat -c %s "$wheel") / 1000000 )) MB) in $(( $(date +%s) - t0 ))s"
    unzip -q "$wheel" 'torch/include/*' 'torch/utils/cpp_extension.py' -d "$headers"
    # The standard cpp_extension passes when an extension names none (as setup.py does not).
    std=$(grep -oE "cpp_flag_prefix \+ 'c\+\+[0-9]+'" "$headers/torch/utils/cpp_extension.py" | grep -oE "c\+\+[0-9]+" | head -1)
    echo "${std:-c++17}" > "$headers/std"
    rm -rf "$download" "$headers/torch/utils"
    touch "$headers/complete"
fi
std=$(cat "$headers/std")
include=$headers/torch/include
cuda_home=${CUDA_HOME:-/usr/local/cuda}
python_include=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# The flags setup.py's build passes (torch.utils.cpp_extension's and ours), for the AVX-512 level.
common=(-I"$include" -I"$include/torch/csrc/api/include" -I"$python_include"
        -DTORCH_API_INCLUDE_EXTENSION_H -DPy_LIMITED_API=0x030A0000 -DTORCH_EXTENSION_NAME=_C -std="$std")
cxx_flags=("${common[@]}" -fPIC -fopenmp -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma
           -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 -fsyntax-only -Wall -Werror=return-type)
nvcc_flags=("${common[@]}" -I"$cuda_home/include" -DLSTM_FUSED_WITH_CUDA -D__CUDA_NO_HALF_OPERATORS__
            -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
            --expt-relaxed-constexpr -Xcompiler -fPIC -O3 -lineinfo -arch=sm_90 -c -o /dev/null)

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
jobs_file=$log/jobs
# One line per compilation: the file and whether the CUDA half of the build is on (cuda_missing.cpp
# is compiled either way, so both of its halves are checked).
while IFS= read -r src; do
    echo "cxx cuda $src" >> "$jobs_file"
    if grep -q LSTM_FUSED_WITH_CUDA "$src"; then echo "cxx nocuda $src" >> "$jobs_file"; fi
done < <(find csrc -name '*.cpp' | sort)
if [ -x "$cuda_home/bin/nvcc" ]; then
    find csrc/cuda -name '*.cu' | sort | sed 's/^/nvcc cuda /' >> "$jobs_file"
else
    echo "compile_check: no nvcc in $cuda_home: the .cu files are NOT checked"
fi

compile_one() {  # kind cuda src: compile, log to $log/<name>.log, print one line
    local kind=$1 cuda=$2 src=$3 name t0 status=0
    name=$(echo "$src-$cuda" | tr '/' '_')
    t0=$(date +%s)
    if [ "$kind" = cxx ]; then
        local defines=()
        [ "$cuda" = cuda ] && defines=(-DLSTM_FUSED_WITH_CUDA -I"$cuda_home/include")
        g++ "${cxx_flags[@]}" "${defines[@]}" "$src" > "$log/$name.log" 2>&1 || status=$?
    else
        "$cuda_home/bin/nvcc" "${nvcc_flags[@]}" "$src" > "$log/$name.log" 2>&1 || status=$?
    fi
    if [ "$status" = 0 ]; then echo "ok     $src ($cuda, $(( $(date +%s) - t0 ))s)"; else
        echo "FAILED $src ($cuda)"; head -40 "$log/$name.log"; fi
    return "$status"
}
export -f compile_one
export log cuda_home
# Arrays do not cross into the xargs children: pass them through files, one flag a line.
printf '%s\n' "${cxx_flags[@]}" > "$log/cxx_flags"
printf '%s\n' "${nvcc_flags[@]}" > "$log/nvcc_flags"
t0=$(date +%s)
status=0
xargs -P "$jobs" -L 1 bash -c 'mapfile -t cxx_flags < "$log/cxx_flags"; mapfile -t nvcc_flags < "$log/nvcc_flags";
    compile_one "$@"' _ < "$jobs_file" || status=$?
echo "compile_check: torch $version headers ($std), $(wc -l < "$jobs_file") compilations in $(( $(date +%s) - t0 ))s:" \
     "$([ "$status" = 0 ] && echo 'all compiled' || echo 'SOME FAILED')"
exit "$status"
