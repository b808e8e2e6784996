#!/usr/bin/env bash
# Compiles caf with `--features cuda` (candle's CUDA backend) on a machine with no GPU and, where
# none is installed, no CUDA toolkit, so the CUDA build is checked in CI and cannot rot.
#
# Toolkit: an nvcc on PATH (or CUDA_ROOT/CUDA_HOME with bin/nvcc) is used as it is. Otherwise
# NVIDIA's PyPI wheels are installed into a local venv (target/cuda/toolkit-venv): compiler,
# runtime, NVRTC, CCCL headers (cuda_fp16.h includes <nv/target>), cuBLAS, cuRAND. CUDA 13.0, because
#   * only the CUDA 13 wheels ship `nvcc` itself (the -cu12 ones carry ptxas and libnvvm alone);
#   * candle 0.11's cudarc 0.19 accepts 11.4-13.4 (it reads `nvcc --version`);
#   * candle loads its kernels as PTX through the driver, and a driver rejects PTX from a newer
#     toolkit than its own: the GPU machines this project is lent run driver 580 (CUDA 13.0).
# cudarc links dynamically (libcuda, libnvrtc, libcublas, libcublasLt, libcurand, libcudart).
# The wheels carry only versioned sonames, and libcuda comes with the driver, not the toolkit, so
# this script adds the unversioned link names and a link-time stub libcuda.so (soname
# libcuda.so.1, like the toolkit's own lib64/stubs), which the real driver replaces at run time.
#
# Usage: scripts/cuda-build.sh [--no-clippy | --check] [--tests] [--env]
#   --no-clippy  build only          --tests  also build (not run) the test binaries
#   --check      clippy only (type-checks and lints every target, compiles the PTX of candle's
#                kernels through nvcc, but generates no code and links nothing): what CI runs
#   --env        only set up the toolkit and print the exports, e.g. eval "$(scripts/cuda-build.sh --env)"
# Environment: CUDA_COMPUTE_CAP (default 80: PTX for sm_80 is JIT-compiled for newer GPUs too;
#   bf16 kernels need >= 80), CAF_CUDA_TARGET_DIR (default target/cuda, apart from the CPU build;
#   target/cuda-check for --check).
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VERSION_PIN="13.0"
clippy=1
build=1
tests=0
env_only=0
for arg in "$@"; do
    case "$arg" in
        --no-clippy) clippy=0 ;;
        --check) build=0 ;;
        --tests) tests=1 ;;
        --env) env_only=1 ;;
        *) echo "usage: $0 [--no-clippy | --check] [--tests] [--env]" >&2; exit 2 ;;
    esac
done

log() { echo "cuda-build: $*" >&2; }

venv=target/cuda/toolkit-venv
root=""
if [ -n "${CUDA_ROOT:-}" ] && [ -x "$CUDA_ROOT/bin/nvcc" ]; then
    root=$CUDA_ROOT
elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    root=$CUDA_HOME
elif command -v nvcc >/dev/null 2>&1; then
    root=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
else
    # Written after a complete install, listing what was installed: a changed list reinstalls.
    marker="$venv/caf-installed-cuda-$CUDA_VERSION_PIN-cccl"
    if [ ! -f "$marker" ]; then
        log "no CUDA toolkit found; installing CUDA $CUDA_VERSION_PIN from PyPI into $venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            "nvidia-cuda-nvcc==$CUDA_VERSION_PIN.*" "nvidia-cuda-crt==$CUDA_VERSION_PIN.*" \
            "nvidia-nvvm==$CUDA_VERSION_PIN.*" "nvidia-cuda-runtime==$CUDA_VERSION_PIN.*" \
            "nvidia-cuda-nvrtc==$CUDA_VERSION_PIN.*" "nvidia-cuda-cccl==$CUDA_VERSION_PIN.*" \
            "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*" >&2
        "$venv/bin/python" -m pip list 2>/dev/null | grep -i nvidia >"$marker"
    fi
    root=$(readlink -f "$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13)")
fi
root=$(readlink -f "$root")

# Link names for the versioned libraries, and the driver stub, in a folder of our own (the
# toolkit may be read-only); cudarc searches $CUDA_ROOT/lib and $CUDA_ROOT/lib/stubs, so the
# folder is laid out as a CUDA root: bin, include and nvvm link to the toolkit's.
shim=$PWD/target/cuda/root
mkdir -p "$shim/lib/stubs"
for d in bin include nvvm; do
    [ -e "$root/$d" ] && ln -sfn "$root/$d" "$shim/$d"
done
libdirs=()
for d in "$root/lib64" "$root/lib" "$root/targets/x86_64-linux/lib"; do
    [ -d "$d" ] && libdirs+=("$d")
done
for lib in cudart nvrtc cublas cublasLt curand; do
    if [ ! -e "$shim/lib/lib$lib.so" ]; then
        found=""
        for d in "${libdirs[@]}"; do
            found=$(ls "$d"/lib$lib.so "$d"/lib$lib.so.[0-9]* 2>/dev/null | head -n1 || true)
            [ -n "$found" ] && break
        done
        if [ -z "$found" ]; then
            log "error: lib$lib.so not found under $root"
            exit 1
        fi
        ln -sfn "$found" "$shim/lib/lib$lib.so"
    fi
done
if [ ! -e "$shim/lib/stubs/libcuda.so" ]; then
    real_stub=$(ls "$root"/lib64/stubs/libcuda.so "$root"/lib/stubs/libcuda.so 2>/dev/null | head -n1 || true)
    if [ -n "$real_stub" ]; then
        ln -sfn "$real_stub" "$shim/lib/stubs/libcuda.so"
    else
        # Every driver-API entry point cudarc declares, each failing with CUDA_ERROR_UNKNOWN
        # should the stub ever be loaded instead of the driver.
        cudarc_dir=$(cargo metadata --format-version 1 --features cuda 2>/dev/null |
            python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')
        grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc_dir/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u |
            awk '{print "int " $1 "(void) { return 999; }"}' >"$shim/lib/stubs/libcuda_stub.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$shim/lib/stubs/libcuda.so" "$shim/lib/stubs/libcuda_stub.c"
    fi
fi

nvcc_version=$("$shim/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
# A check's kernels are not the build's (see below): its own target dir, so a later full build
# never links them.
target_dir=$PWD/target/cuda
[ "$build" = 0 ] && target_dir=$PWD/target/cuda-check
exports="export CUDA_ROOT='$shim' CUDA_COMPUTE_CAP='${CUDA_COMPUTE_CAP:-80}' PATH='$shim/bin':\"\$PATH\" CARGO_TARGET_DIR='${CAF_CUDA_TARGET_DIR:-$target_dir}'"
if [ "$env_only" = 1 ]; then
    echo "$exports"
    echo "# runtime libraries (not the link stubs): export LD_LIBRARY_PATH='${libdirs[*]// /:}'"
    exit 0
fi
eval "$exports"
if [ "$build" = 0 ]; then
    # candle-kernels compiles, besides the PTX of the kernels caf runs (binary, unary, conv, reduce,
    # ...: compiled for real here), a static library of GGUF-quantized and mixture-of-experts
    # kernels (moe_*.cu, mmq_*.cu, mmvq_gguf.cu) that caf never calls. Compiling those 15 files
    # to sm_80 code is most of the check: on the 2-core Zen 3 the first six took 430 s. Nothing
    # is linked in a check, so an nvcc wrapper compiles an empty unit in their place; the whole
    # check then took 413 s (toolkit already installed). Full builds compile them for real.
    check_bin=$shim/check/bin
    mkdir -p "$check_bin"
    ln -sfn "$root/include" "$shim/check/include"
    : >"$shim/check/empty.cu"
    cat >"$check_bin/nvcc" <<WRAP
#!/usr/bin/env bash
args=()
for a in "\$@"; do
    case "\${a##*/}" in
        moe_*.cu | mmq_*.cu | mmvq_gguf.cu) args+=("$shim/check/empty.cu") ;;
        *) args+=("\$a") ;;
    esac
done
exec "$shim/bin/nvcc" "\${args[@]}"
WRAP
    chmod +x "$check_bin/nvcc"
    export NVCC=$check_bin/nvcc
fi
# CUDA_HOME and friends would be searched too; one root keeps the link names unambiguous.
unset CUDA_HOME CUDA_PATH CUDA_TOOLKIT_ROOT_DIR
log "toolkit $root (nvcc $nvcc_version), compute capability $CUDA_COMPUTE_CAP, target dir $CARGO_TARGET_DIR"

if [ "$build" = 0 ] && [ "$clippy" = 0 ]; then
    log "error: --check and --no-clippy leave nothing to do"
    exit 2
fi
start=$(date +%s)
if [ "$build" = 1 ]; then
    cargo build --release --features cuda
    log "cargo build --release --features cuda: $(($(date +%s) - start)) s"
fi
if [ "$tests" = 1 ]; then
    t=$(date +%s)
    cargo test --release --features cuda --no-run
    log "cargo test --release --features cuda --no-run: $(($(date +%s) - t)) s"
fi
if [ "$clippy" = 1 ]; then
    t=$(date +%s)
    # --release: the same profile as the build, so candle's kernels (its build script) are not
    # compiled a second time for clippy's dev profile.
    cargo clippy --release --features cuda --all-targets -- -D warnings
    log "cargo clippy --release --features cuda --all-targets: $(($(date +%s) - t)) s"
fi
log "done in $(($(date +%s) - start)) s"
