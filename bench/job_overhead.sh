#!/usr/bin/env bash
# Per-job overhead of a sweep of short jobs (issue 13's "short jobs at scale"): N one-image
# certify jobs of ResNet-20 (n0 = 10, n = 20) plus the clean-accuracy job, one `caf run`, one
# slot, on a fresh database; overhead = (wall time of the whole run − the certification seconds
# the store recorded) / jobs. Needs a release build, ../shared/data, and sqlite3 or psql.
#
#   bench/job_overhead.sh sqlite [JOBS]                 # a fresh SQLite file in a temp dir
#   bench/job_overhead.sh postgres://USER@HOST:PORT/DB [JOBS]   # DB is dropped and re-created
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?sqlite or a postgres:// URL}
jobs=${2:-1000}
caf=$PWD/target/release/caf
data=$(cd ../shared/data && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

alphas=$(python3 -c "print(', '.join(f'{0.001 + i * 1e-7:.7f}' for i in range($jobs)))")
cat >"$tmp/short.yaml" <<SPEC
name: short-jobs
seed: 0
data:
  dataset: cifar10
  root: $data/cifar10-jpeg
backbones:
  resnet20:
    arch: resnet20
    weights: $data/pretrained/akamaster/resnet20-12fca82f.th
certify: {n0: 10, n: 20, batch: 30, max: 1}
grid:
  params: {method: smooth, backbone: resnet20, sigma: 0.25}
  axes:
    alpha: [$alphas]
SPEC

case $target in
sqlite)
    db=$tmp/short.db
    query() { sqlite3 "$db" "$1"; }
    ;;
postgres://*)
    db=$target
    admin=${target%/*}/postgres
    name=${target##*/}
    psql -q "$admin" -c "DROP DATABASE IF EXISTS \"$name\"" -c "CREATE DATABASE \"$name\"" >/dev/null
    query() { psql -qtA "$db" -c "$1"; }
    ;;
*)
    echo "usage: $0 sqlite|postgres://… [JOBS]" >&2
    exit 2
    ;;
esac

start=$(date +%s.%N)
"$caf" run "$tmp/short.yaml" --db "$db" --artifacts "$tmp/artifacts" -q
end=$(date +%s.%N)
cert=$(query "SELECT SUM(seconds) FROM cert_results")
done_jobs=$(query "SELECT COUNT(*) FROM jobs WHERE status = 'done'")
python3 -c "
wall = $end - $start; cert = $cert; n = $done_jobs
print(f'{n} jobs: wall {wall:.2f} s, certification {cert:.2f} s, overhead {1000 * (wall - cert) / n:.2f} ms/job')"
