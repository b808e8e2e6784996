#!/usr/bin/env python3
"""Compares two `caf certify --out` TSVs of the same images (one per device, say).

Predictions must be equal and radii within 1e-3. A row that differs is listed as a possible
rounding tie: a draw whose two top logits lie within rounding of each other can be counted for
the other class on another device, which moves n_A by one and the radius by a little. More than
two such rows fail the check (exit 1).

    scripts/compare-certificates.py cpu.tsv gpu.tsv
"""
import csv
import sys


def rows(path):
    with open(path) as f:
        return {r["idx"]: r for r in csv.DictReader(f, delimiter="\t")}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    try:
        a, b = rows(sys.argv[1]), rows(sys.argv[2])
    except (OSError, KeyError, csv.Error) as e:
        print(f"FAIL: cannot read the certificates: {e}")
        return 1
    if a.keys() != b.keys() or not a:
        print(f"FAIL: different images ({len(a)} vs {len(b)})")
        return 1
    diff = []
    for k, ra in a.items():
        rb = b[k]
        if ra["predict"] != rb["predict"] or abs(float(ra["radius"]) - float(rb["radius"])) > 1e-3:
            diff.append(f'{k}: predict {ra["predict"]}/{rb["predict"]} '
                        f'radius {ra["radius"]}/{rb["radius"]} nA {ra.get("nA")}/{rb.get("nA")}')
    status = "OK" if len(diff) <= 2 else "FAIL"
    # n_A itself, where both logs have it: the count the radius comes from.
    counts = [abs(int(a[k]["nA"]) - int(b[k]["nA"])) for k in a if a[k].get("nA") and b[k].get("nA")]
    same = sum(d == 0 for d in counts)
    print(f"{status}: {len(a) - len(diff)}/{len(a)} images identical within 1e-3"
          + (f"; n_A equal on {same}/{len(counts)}, largest difference {max(counts)}" if counts else "")
          + "".join(f"\n    tie? {d}" for d in diff))
    return 0 if status == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
