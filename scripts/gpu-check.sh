#!/usr/bin/env bash
# The GPU check of issue 14, sized for one GPU machine with 16 cores (about 8 minutes, build
# included): builds with --features cuda, runs the CUDA-side tests, certifies the exact first
# 100 CIFAR-10 test images with the clean ResNet-20 at n = 10,000 on the GPU and on the CPU's
# fused path and compares them, benchmarks `caf bench forward|train-step --device cuda:0`, and
# prints one summary.
#
#   scripts/gpu-check.sh             on a GPU machine
#   scripts/gpu-check.sh --cpu-only  everything that runs without a GPU, so the script itself is
#                                    tested: a CPU build, the generic-path tests, and the
#                                    certification compare with the generic path (CAF_GENERIC_PATH=1)
#                                    standing in for the GPU, at a smaller n (CAF_GPU_CHECK_N,
#                                    CAF_GPU_CHECK_IMAGES)
# Output (TSVs, logs) goes to target/gpu-check/.
set -euo pipefail
cd "$(dirname "$0")/.."

cpu_only=0
case "${1:-}" in
    --cpu-only) cpu_only=1 ;;
    "") ;;
    *) echo "usage: $0 [--cpu-only]" >&2; exit 2 ;;
esac
out=target/gpu-check
mkdir -p "$out"
summary=()
note() { summary+=("$*"); echo "gpu-check: $*" >&2; }
t0=$(date +%s)
data=../shared/data/cifar10-exact100
weights=../shared/data/pretrained/akamaster/resnet20-12fca82f.th

if [ "$cpu_only" = 1 ]; then
    n=${CAF_GPU_CHECK_N:-300}
    images=${CAF_GPU_CHECK_IMAGES:-5}
    cargo build --release
    bin=target/release/caf
    note "build (CPU): $(($(date +%s) - t0)) s"
    t=$(date +%s)
    cargo test --release --lib models::generic_tests 2>&1 | tee "$out/tests.log" | tail -n 3
    note "generic-path tests (CPU): $(grep -E '^test result' "$out/tests.log" | tail -n1) in $(($(date +%s) - t)) s"
    other_device=cpu
    other_env=(env CAF_GENERIC_PATH=1)
    other_name="generic path on the CPU"
else
    n=${CAF_GPU_CHECK_N:-10000}
    images=${CAF_GPU_CHECK_IMAGES:-100}
    if [ -z "${CUDA_COMPUTE_CAP:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
        CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.')
        export CUDA_COMPUTE_CAP
    fi
    command -v nvidia-smi >/dev/null 2>&1 && note "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n1)"
    scripts/cuda-build.sh --no-clippy --tests
    eval "$(scripts/cuda-build.sh --env | grep '^export')"
    # Runtime libraries: the toolkit's (cuBLAS, cuRAND, NVRTC, cudart); the driver's libcuda.
    runtime_libs=$(scripts/cuda-build.sh --env | sed -n "s/^# runtime libraries.*LD_LIBRARY_PATH='\(.*\)'$/\1/p")
    export LD_LIBRARY_PATH="$runtime_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    bin=target/cuda/release/caf
    note "build (--features cuda, sm_${CUDA_COMPUTE_CAP:-80}): $(($(date +%s) - t0)) s"
    t=$(date +%s)
    cargo test --release --features cuda --lib models:: 2>&1 | tee "$out/tests.log" | tail -n 3
    note "model tests with --features cuda: $(grep -E '^test result' "$out/tests.log" | tail -n1) in $(($(date +%s) - t)) s"
    other_device=cuda:0
    other_env=(env)
    other_name="GPU"
fi

certify() { # device, out file, env prefix...
    local device=$1 file=$2
    shift 2
    "$@" "$bin" certify --arch resnet20 --weights "$weights" --data-root "$data" --sigma 0.25 \
        --n "$n" --n0 100 --batch 1000 --max "$images" --seed 0 --device "$device" --out "$file"
}
t=$(date +%s)
certify cpu "$out/cpu.tsv" env
note "certify $images images at n = $n on the CPU's fused path: $(($(date +%s) - t)) s"
t=$(date +%s)
certify "$other_device" "$out/other.tsv" "${other_env[@]}"
note "certify $images images at n = $n on the $other_name: $(($(date +%s) - t)) s"

# Predictions equal, radii within 1e-3; rows that differ are listed as rounding ties (a draw
# whose two top logits are within rounding can count for the other class), and more than two
# fail the check.
compare=$(python3 - "$out/cpu.tsv" "$out/other.tsv" <<'PY'
import csv, sys
def rows(p):
    with open(p) as f:
        return {r["idx"]: r for r in csv.DictReader(f, delimiter="\t")}
a, b = rows(sys.argv[1]), rows(sys.argv[2])
if a.keys() != b.keys() or not a:
    print(f"FAIL: different images ({len(a)} vs {len(b)})"); sys.exit(0)
diff = []
for k in a:
    ra, rb = a[k], b[k]
    if ra["predict"] != rb["predict"] or abs(float(ra["radius"]) - float(rb["radius"])) > 1e-3:
        diff.append(f'{k}: predict {ra["predict"]}/{rb["predict"]} radius {ra["radius"]}/{rb["radius"]} nA {ra.get("nA")}/{rb.get("nA")}')
status = "OK" if len(diff) <= 2 else "FAIL"
print(f"{status}: {len(a) - len(diff)}/{len(a)} images identical within 1e-3" + "".join(f"\n    tie? {d}" for d in diff))
PY
)
note "compare CPU vs $other_name: $compare"

if [ "$cpu_only" = 0 ]; then
    "$bin" bench forward --device cuda:0 --seconds 10 --batch 1000 --json >"$out/bench-forward.txt" 2>&1 || true
    note "caf bench forward --device cuda:0: $(grep -m1 'images/s' "$out/bench-forward.txt" || echo 'failed, see target/gpu-check/bench-forward.txt')"
    "$bin" bench train-step --method rs --device cuda:0 --seconds 10 --json >"$out/bench-train.txt" 2>&1 || true
    note "caf bench train-step --method rs --device cuda:0: $(grep -m1 'images/s' "$out/bench-train.txt" || echo 'failed, see target/gpu-check/bench-train.txt')"
    for script in forward train_step; do
        args=()
        [ "$script" = train_step ] && args=(--method rs)
        if grep -q -- '--device' "bench/pytorch_$script.py"; then
            python3 "bench/pytorch_$script.py" "${args[@]}" --device cuda --seconds 10 >"$out/pytorch-$script.txt" 2>&1 || true
            note "PyTorch $script --device cuda: $(grep -m1 -i 'images/s' "$out/pytorch-$script.txt" || echo 'failed')"
        else
            note "PyTorch $script: bench/pytorch_$script.py has no --device option yet; not run"
        fi
    done
fi

echo
echo "== gpu-check summary ($(($(date +%s) - t0)) s) =="
printf '  %s\n' "${summary[@]}"
case "$compare" in OK*) exit 0 ;; *) exit 1 ;; esac
