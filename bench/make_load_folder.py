"""Writes an ImageFolder of JPEGs for `caf bench load`: the first N CIFAR-10 test images upscaled
bicubically to H×W by Pillow, JPEG quality 90, 4:2:0, under OUT/val/cLABEL/NNNNN.jpg.

Usage (from the repository root):
    bench/.venv/bin/python bench/make_load_folder.py OUT H W N
e.g. bench/.venv/bin/python bench/make_load_folder.py /tmp/loadbench/l375 375 500 1000
"""

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent.parent.parent / "shared/data/cifar10-jpeg/cifar-10-batches-bin"


def main():
    out, h, w, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    raw = np.fromfile(DATA / "test_batch.bin", dtype=np.uint8).reshape(-1, 3073)
    for i in range(min(n, len(raw))):
        label, img = raw[i, 0], raw[i, 1:].reshape(3, 32, 32).transpose(1, 2, 0)
        d = Path(out) / "val" / f"c{label}"
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).resize((w, h), Image.BICUBIC).save(
            d / f"{i:05d}.jpg", quality=90, subsampling=2
        )


if __name__ == "__main__":
    main()
