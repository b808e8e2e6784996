#!/usr/bin/env bash
# caf vs PyTorch on one workload, alternated for ROUNDS rounds on the same machine, printing
# every figure and the medians (single runs move by ±10% on a shared VM, so compare medians of
# alternated runs). Needs a release build and bench/.venv (see bench/README.md).
#
#   bench/compare.sh forward resnet20 [ROUNDS] [SECONDS] [f32|bf16]
#   bench/compare.sh train-step caf|rs|denoised [ROUNDS] [SECONDS]
#
# PyTorch is measured at its best each round: both memory layouts (contiguous and channels_last)
# and the faster reported, and for bf16 under torch.autocast; each line names the layout it won
# with. The caf side names the CPU and the instruction sets its kernels used.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?forward or train-step}
arg=${2:?arch (forward) or method (train-step)}
rounds=${3:-3}
seconds=${4:-10}
precision=${5:-f32}
caf=./target/release/caf
py=bench/.venv/bin/python
case $what in
forward)
    caf_cmd=("$caf" bench forward --arch "$arg" --batch 400 --seconds "$seconds" --precision "$precision")
    py_cmd=("$py" bench/pytorch_forward.py --arch "$arg" --batch 400 --seconds "$seconds" --threads 2 --precision "$precision")
    ;;
train-step)
    caf_cmd=("$caf" bench train-step --method "$arg" --batch 128 --seconds "$seconds")
    py_cmd=("$py" bench/pytorch_train_step.py --method "$arg" --batch 128 --seconds "$seconds" --threads 2)
    ;;
*)
    echo "usage: $0 forward ARCH | train-step METHOD [ROUNDS] [SECONDS] [f32|bf16]" >&2
    exit 2
    ;;
esac
rate() { grep -m1 -o 'images/s: [0-9.]*' | awk '{print $2}'; }
caf_rates=() py_rates=()
for ((i = 1; i <= rounds; i++)); do
    out=$("${caf_cmd[@]}")
    c=$(rate <<<"$out")
    peak=$(grep -m1 -o 'GFLOP/s: .*' <<<"$out" || true)
    [ "$i" -eq 1 ] && grep -m1 '^machine: ' <<<"$out" || true
    py_out=$("${py_cmd[@]}" 2>&1)
    p=$(rate <<<"$py_out")
    how=$(grep -m1 -o 'images/s: [0-9.]* (.*)' <<<"$py_out" | sed 's/^[^(]*(//; s/)$//' || true)
    echo "round $i: caf $c, PyTorch $p images/s ($how); caf $peak"
    caf_rates+=("$c") py_rates+=("$p")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
c=$(median "${caf_rates[@]}") p=$(median "${py_rates[@]}")
echo "$what $arg $precision: median caf $c, PyTorch $p images/s, ratio $(awk -v c="$c" -v p="$p" 'BEGIN {printf "%.2f", c/p}')"
