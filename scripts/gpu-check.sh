#!/usr/bin/env bash
# The GPU check, sized for one GPU machine with 16 cores: builds with --features cuda (or takes
# binaries built elsewhere), runs the CUDA-side tests, certifies the exact first 100 CIFAR-10
# test images with the clean ResNet-20 at n = 10,000 on the GPU and compares them with the CPU's
# fused path, benchmarks caf and PyTorch (at its best: both layouts, bf16 autocast, cuDNN
# autotuning) on the GPU, and prints one summary.
#
#   scripts/gpu-check.sh                 on a GPU machine with a Rust toolchain
#   scripts/gpu-check.sh --prebuilt DIR  on a GPU machine without one: DIR holds `caf` and
#                                        `caf-lib-tests` (or their .xz), built on any x86-64
#                                        Linux machine by scripts/gpu-check.sh --package DIR;
#                                        the CUDA libraries are looked up where the toolkit,
#                                        the driver or Python's nvidia wheels put them
#   scripts/gpu-check.sh --package DIR   no GPU needed: build (scripts/cuda-build.sh; set
#                                        CUDA_COMPUTE_CAP to the GPU's, e.g. 90 for an H100)
#                                        and put the two binaries, stripped and xz-compressed,
#                                        into DIR
#   scripts/gpu-check.sh --cpu-only      everything that runs without a GPU, so the script itself
#                                        is tested: a CPU build, the generic-path tests, and the
#                                        certification compare with the generic path
#                                        (CAF_GENERIC_PATH=1) standing in for the GPU, at a
#                                        smaller n (CAF_GPU_CHECK_N, CAF_GPU_CHECK_IMAGES)
# Options: --cpu-reference TSV  the CPU's certificates of the same images and arguments, made
#                               earlier (e.g. on a machine whose CPU time costs less); without it
#                               the CPU certifies them here
#          --no-compare         certify on the GPU only; compare later with
#                               scripts/compare-certificates.py CPU.tsv OUT/other.tsv
#          --out DIR            where the TSVs, logs and summary go (default target/gpu-check)
# Environment: CAF_GPU_CHECK_SECONDS (each benchmark's length, default 5),
#   CAF_GPU_CHECK_STEP_TIMEOUT (seconds any one step may take, default 600),
#   CAF_GPU_CHECK_DATA (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
prebuilt=""
package=""
cpu_reference=""
out=target/gpu-check
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-only) mode=cpu ;;
        --prebuilt) prebuilt=${2:?--prebuilt needs a folder}; shift ;;
        --package) mode=package; package=${2:?--package needs a folder}; shift ;;
        --cpu-reference) cpu_reference=${2:?--cpu-reference needs a file}; shift ;;
        --no-compare) cpu_reference=none ;;
        --out) out=${2:?--out needs a folder}; shift ;;
        *) echo "usage: $0 [--cpu-only | --prebuilt DIR | --package DIR] [--cpu-reference TSV] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done

if [ "$mode" = package ]; then
    scripts/cuda-build.sh --no-clippy >&2
    eval "$(scripts/cuda-build.sh --env | grep '^export')"
    # The library's test binary (the one holding models::cuda_tests), named by cargo itself.
    tests=$(cargo test --release --features cuda --lib --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
    mkdir -p "$package"
    # Stripped and xz-compressed: about 15 MB each instead of 350 (debug info, PTX), for the copy
    # to the GPU machine.
    strip -o "$package/caf" "$CARGO_TARGET_DIR/release/caf"
    strip -o "$package/caf-lib-tests" "$tests"
    xz -T0 -6 -f "$package/caf" "$package/caf-lib-tests"
    ls -l "$package" >&2
    exit 0
fi

mkdir -p "$out"
summary=()
note() { summary+=("$*"); echo "gpu-check: $*" >&2; }
t0=$(date +%s)
seconds=${CAF_GPU_CHECK_SECONDS:-5}
# No step may hang the check: each gets this long (a stuck driver call, say).
step_timeout=${CAF_GPU_CHECK_STEP_TIMEOUT:-600}
shared=${CAF_GPU_CHECK_DATA:-../shared/data}
data=$shared/cifar10-exact100
weights=$shared/pretrained/akamaster/resnet20-12fca82f.th

# The directories holding the shared libraries `bin` needs and the loader does not find
# (a prebuilt binary on a machine whose CUDA libraries live in a toolkit or in Python wheels).
runtime_lib_dirs() {
    local bin=$1 missing lib dir found dirs=()
    missing=$(ldd "$bin" | awk '/not found/ {print $1}')
    for lib in $missing; do
        found=""
        for dir in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
            $(python3 -c 'import nvidia, sys; print(" ".join(nvidia.__path__))' 2>/dev/null); do
            found=$(find -L "$dir" -maxdepth 3 -name "$lib" 2>/dev/null | head -n1)
            [ -n "$found" ] && break
        done
        if [ -z "$found" ]; then
            echo "gpu-check: $lib (needed by $bin) not found" >&2
        else
            dirs+=("$(dirname "$found")")
        fi
    done
    [ ${#dirs[@]} -gt 0 ] && printf '%s\n' "${dirs[@]}" | sort -u | paste -sd:
    return 0
}

case "$mode" in
cpu)
    n=${CAF_GPU_CHECK_N:-300}
    images=${CAF_GPU_CHECK_IMAGES:-5}
    cargo build --release
    bin=target/release/caf
    note "build (CPU): $(($(date +%s) - t0)) s"
    t=$(date +%s)
    cargo test --release --lib models::generic_tests 2>&1 | tee "$out/tests.log" | tail -n 3
    note "generic-path tests (CPU): $(grep -E '^test result' "$out/tests.log" | tail -n1) in $(($(date +%s) - t)) s"
    other_device=cpu
    other_env=(env CAF_GENERIC_PATH=1 CAF_NOISE_PIPELINE=1)
    other_name="generic path on the CPU"
    ;;
gpu)
    n=${CAF_GPU_CHECK_N:-10000}
    images=${CAF_GPU_CHECK_IMAGES:-100}
    if [ -z "${CUDA_COMPUTE_CAP:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
        CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.')
        export CUDA_COMPUTE_CAP
    fi
    command -v nvidia-smi >/dev/null 2>&1 && note "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n1)"
    note "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    if [ -n "$prebuilt" ]; then
        mkdir -p "$out/bin"
        for b in caf caf-lib-tests; do
            if [ -f "$prebuilt/$b.xz" ]; then
                # Python's lzma where the machine has no xz.
                xz -dc "$prebuilt/$b.xz" >"$out/bin/$b" 2>/dev/null ||
                    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                        "$prebuilt/$b.xz" "$out/bin/$b"
            else
                cp "$prebuilt/$b" "$out/bin/$b"
            fi
            chmod +x "$out/bin/$b"
        done
        bin=$out/bin/caf
        # The tests look for the data beside the checkout they were built in, unless told.
        test_cmd=(env CAF_TEST_SHARED_DATA="$(cd "$shared" && pwd)" "$out/bin/caf-lib-tests")
        dirs=$(runtime_lib_dirs "$bin")
        [ -n "$dirs" ] && export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        ldd "$bin" >"$out/ldd.txt"
        note "prebuilt binaries from $prebuilt; libraries from ${dirs:-the default search path}"
    else
        scripts/cuda-build.sh --no-clippy --tests
        eval "$(scripts/cuda-build.sh --env | grep '^export')"
        # Runtime libraries: the toolkit's (cuBLAS, cuRAND, NVRTC, cudart); the driver's libcuda.
        runtime_libs=$(scripts/cuda-build.sh --env | sed -n "s/^# runtime libraries.*LD_LIBRARY_PATH='\(.*\)'$/\1/p")
        export LD_LIBRARY_PATH="$runtime_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        bin=$CARGO_TARGET_DIR/release/caf
        test_cmd=(cargo test --release --features cuda --lib --)
        note "build (--features cuda, sm_${CUDA_COMPUTE_CAP:-80}): $(($(date +%s) - t0)) s"
    fi
    t=$(date +%s)
    timeout "$step_timeout" "${test_cmd[@]}" models::cuda_tests --nocapture 2>&1 | tee "$out/tests.log" | tail -n 3 || true
    note "CUDA tests: $(grep -E '^test result' "$out/tests.log" | tail -n1 || echo 'did not run, see tests.log') in $(($(date +%s) - t)) s"
    grep -E 'difference|bf16' "$out/tests.log" | sed 's/^/    /' >&2 || true
    other_device=cuda:0
    other_env=(env)
    other_name="GPU"
    ;;
esac

# How busy the GPU was during a step (nvidia-smi dmon's SM utilisation, one sample a second):
# low figures mean the host (noise, launches, copies) kept it waiting.
dmon_pid=""
gpu_busy_start() { # name
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    nvidia-smi dmon -s u -o T >"$out/dmon-$1.txt" 2>/dev/null &
    dmon_pid=$!
}
gpu_busy_stop() { # name; sets busy, e.g. "SM busy 87 % (41 one-second samples)"
    busy=""
    [ -n "$dmon_pid" ] || return 0
    kill "$dmon_pid" 2>/dev/null || true
    wait "$dmon_pid" 2>/dev/null || true
    dmon_pid=""
    busy=$(awk '!/^#/ && NF >= 3 {s += $3; n++} END {if (n) printf "SM busy %.0f %% (%d one-second samples)", s / n, n}' "$out/dmon-$1.txt")
}

# Noisy images a second when `images` images took `secs` seconds (n + n0 draws each).
rate() { python3 -c "print(round($1 * ($n + 100) / max($2, 1)))"; }

certify() { # device, images, out file, env prefix...
    local device=$1 count=$2 file=$3
    shift 3
    timeout "$step_timeout" "$@" "$bin" certify --arch resnet20 --weights "$weights" --data-root "$data" --sigma 0.25 \
        --n "$n" --n0 100 --batch 1000 --max "$count" --seed 0 --device "$device" --out "$file" \
        2>"$file.log"
}
t=$(date +%s)
[ "$mode" = gpu ] && gpu_busy_start certify
if certify "$other_device" "$images" "$out/other.tsv" "${other_env[@]}"; then
    secs=$(($(date +%s) - t))
    gpu_busy_stop certify
    note "certify $images images at n = $n on the $other_name: $secs s ($(rate "$images" "$secs") noisy images/s end to end) $busy"
else
    gpu_busy_stop certify
    note "certify on the $other_name FAILED: $(head -n 2 "$out/other.tsv.log")"
fi
if [ "$cpu_reference" = none ]; then
    compare="not compared here (--no-compare)"
elif [ -n "$cpu_reference" ]; then
    cp "$cpu_reference" "$out/cpu.tsv"
    note "CPU certificates from $cpu_reference"
else
    t=$(date +%s)
    certify cpu "$images" "$out/cpu.tsv" env
    note "certify $images images at n = $n on the CPU's fused path: $(($(date +%s) - t)) s"
fi
[ "$cpu_reference" = none ] ||
    compare=$(python3 scripts/compare-certificates.py "$out/cpu.tsv" "$out/other.tsv" || true)
note "compare CPU vs $other_name: $compare"

if [ "$mode" = gpu ]; then
    # What drawing the next batch's noise during the GPU's work gains (the default on a GPU):
    # the first 20 images again with the noise drawn in line; the same certificates.
    t=$(date +%s)
    gpu_busy_start inline
    if certify cuda:0 20 "$out/inline.tsv" env CAF_NOISE_PIPELINE=0; then
        secs=$(($(date +%s) - t))
        gpu_busy_stop inline
        note "certify 20 images with the noise drawn in line (CAF_NOISE_PIPELINE=0): $secs s ($(rate 20 "$secs") noisy images/s, $busy); same certificates as pipelined: $(head -n 21 "$out/other.tsv" | python3 scripts/compare-certificates.py /dev/stdin "$out/inline.tsv" | head -n1)"
    fi
    gpu_busy_stop inline

    # The whole pipeline on a GPU slot: a study recorded in SQLite, its jobs run by the scheduler
    # on cuda:0 (the DEVICE column says where each ran).
    cat >"$out/study.yaml" <<EOF
name: gpu-check
seed: 0
data: {dataset: cifar10, root: $data}
backbones:
  resnet20:
    arch: resnet20
    weights: $weights
    normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
certify: {n0: 100, n: 2000, alpha: 0.001, batch: 1000}
grid:
  params: {method: smooth, backbone: resnet20}
  axes: {sigma: [0.25, 0.5]}
EOF
    rm -f "$out/study.db"
    t=$(date +%s)
    if timeout "$step_timeout" "$bin" run "$out/study.yaml" --db "$out/study.db" --device cuda -q \
        >"$out/study.log" 2>&1; then
        "$bin" status --db "$out/study.db" >>"$out/study.log" 2>&1 || true
        note "caf run --device cuda (3 jobs: eval, certify at σ = 0.25 and 0.5, 100 images, n = 2,000): $(($(date +%s) - t)) s"
        sed -n '/JOB/,$p' "$out/study.log" | head -n 8 | sed 's/^/    /' >&2
    else
        note "caf run --device cuda FAILED: $(tail -n 3 "$out/study.log")"
    fi

    bench() { # name, command...
        local name=$1
        shift
        timeout "$step_timeout" "$@" >"$out/$name.txt" 2>&1 || true
        note "$name: $(grep -m1 'images/s' "$out/$name.txt" || echo "failed, see $out/$name.txt")"
    }
    # Same batches for both: 1,000 noisy copies per forward (certify's --batch), 128 per step.
    for precision in f32 bf16; do
        bench "caf-forward-$precision" "$bin" bench forward --device cuda:0 --seconds "$seconds" \
            --batch 1000 --precision "$precision"
        bench "pytorch-forward-$precision" python3 bench/pytorch_forward.py --device cuda \
            --seconds "$seconds" --batch 1000 --precision "$precision"
    done
    for method in rs caf denoised; do
        bench "caf-train-$method" "$bin" bench train-step --method "$method" --device cuda:0 \
            --seconds "$seconds" --batch 128
        bench "pytorch-train-$method" python3 bench/pytorch_train_step.py --method "$method" \
            --device cuda --seconds "$seconds" --batch 128
    done
    # What experiments/paper-cifar10-full.yaml trains (README estimates its GPU time from these):
    # the ResNet-18 adapter, the 17 × 64 DnCNN and the whole ResNet-20, at its batch of 256.
    bench caf-train-caf-resnet18 "$bin" bench train-step --method caf --adapter resnet18:1 \
        --device cuda:0 --seconds "$seconds" --batch 256
    bench caf-train-denoised-paper "$bin" bench train-step --method denoised --denoiser dncnn-paper \
        --device cuda:0 --seconds "$seconds" --batch 256
    bench caf-train-rs-256 "$bin" bench train-step --method rs --device cuda:0 \
        --seconds "$seconds" --batch 256
fi

echo
echo "== gpu-check summary ($(($(date +%s) - t0)) s) ==" | tee "$out/summary.txt"
printf '  %s\n' "${summary[@]}" | tee -a "$out/summary.txt"
case "$compare" in OK* | "not compared"*) exit 0 ;; *) exit 1 ;; esac
