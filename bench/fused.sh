#!/usr/bin/env bash
# Fused vs separate certification of K = 4 CAF adapters sharing the clean ResNet-20 and σ = 0.5.
# Trains 4 small adapters (the CPU default arch, differing in lr), then certifies 20 test images
# with n = 1,000: once as one `certify-fused` job, once as 4 separate studies. Prints the
# certification seconds of each (training excluded) and their ratio.
# Run from the repository root after `cargo build --release`.
set -euo pipefail
caf=./target/release/caf
work=$(mktemp -d)
cell() { # name, lr list
cat <<YAML
name: $1
seed: 0
data: {dataset: cifar10, root: ../shared/data/cifar10-jpeg}
backbones:
  r20:
    arch: resnet20
    weights: ../shared/data/pretrained/akamaster/resnet20-12fca82f.th
    normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
certify: {n0: 100, n: 1000, batch: 550, skip: 500}
grid:
  params: {backbone: r20, method: caf, sigma: 0.5, adapter: default, epochs: 1, max_train: 512, val_size: 256, train_batch: 64}
  axes: {lr: [$2]}
YAML
}
cell fused "0.0003, 0.001, 0.003, 0.01" > "$work/fused.yaml"
$caf run "$work/fused.yaml" --db "$work/fused.db" --artifacts "$work/art" -q
fused=$($caf status --db "$work/fused.db" --json | python3 -c "import json,sys; print(sum(j['run_seconds'] for j in json.load(sys.stdin)[0]['jobs'] if j['kind']=='certify-fused'))")
sep=0
for lr in 0.0003 0.001 0.003 0.01; do
  cell "sep-$lr" "$lr" > "$work/sep-$lr.yaml"
  $caf run "$work/sep-$lr.yaml" --db "$work/sep-$lr.db" --artifacts "$work/art" -q
  s=$($caf status --db "$work/sep-$lr.db" --json | python3 -c "import json,sys; print(sum(j['run_seconds'] for j in json.load(sys.stdin)[0]['jobs'] if j['kind']=='certify'))")
  sep=$(python3 -c "print($sep + $s)")
done
python3 -c "print(f'fused: {$fused:.1f} s  separate: {$sep:.1f} s  separate/fused: {$sep/$fused:.2f}')"
# The same job ids hold the same rows either way.
for lr in 0.0003 0.001 0.003 0.01; do $caf export --db "$work/sep-$lr.db" | tail -n +2; done | sort > "$work/sep.csv"
$caf export --db "$work/fused.db" | tail -n +2 | sort > "$work/fused.csv"
cmp "$work/sep.csv" "$work/fused.csv" && echo "per-image results identical"
