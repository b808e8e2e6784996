"""Writes two scratch corpora for bench/jpeg-decode (nothing here is committed data):

    OUT/exact/NAME.jpg + NAME.rgb   200 Pillow-encoded JPEGs (sizes 1×1 to 500×375, qualities
                                    1–100, 4:4:4 / 4:2:2 / 4:2:0, grey, progressive, optimized
                                    tables, restart intervals) and, when libjpeg-turbo's `cjpeg`
                                    is installed, 40 more with what Pillow cannot write (4:4:0,
                                    4:1:1, 3×1, luma smaller than chroma, RGB without transform,
                                    2×2 grey); NAME.rgb is Pillow's `convert("RGB")`, H × W × 3
    OUT/speed/NAME.jpg              200 JPEGs of 500×375, 4:2:0, quality 90

Usage (from the repository root):
    bench/.venv/bin/python bench/make_jpeg_corpus.py /tmp/jpeg
"""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def picture(h, w, rng):
    """Gradients and waves, hard-edged saturated patches (clamping, ringing), noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    k = rng.uniform(3, 40, size=6)
    r = 128 + 110 * np.sin(x / k[0] + rng.uniform(0, 6)) * np.cos(y / k[1])
    g = 128 + 100 * np.cos((x + y) / k[2])
    b = 255 * (x / max(w - 1, 1)) * (1 - y / max(h - 1, 1))
    img = np.stack([r, g, b], axis=-1)
    for _ in range(rng.integers(0, 6)):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        img[y0:y0 + rng.integers(1, 60), x0:x0 + rng.integers(1, 60)] = rng.choice([0, 255], size=3)
    img += rng.normal(0, rng.uniform(0, 30), size=(h, w, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def save_with_reference(out, name, data):
    (out / f"{name}.jpg").write_bytes(data)
    decoded = Image.open(out / f"{name}.jpg").convert("RGB")
    (out / f"{name}.rgb").write_bytes(np.asarray(decoded, dtype=np.uint8).tobytes())


def exact_corpus(out, rng):
    fixed = [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2), (5, 4), (8, 8), (16, 16), (17, 33), (375, 500)]
    written = 0
    for i in range(200):
        h, w = fixed[i] if i < len(fixed) else (int(rng.integers(1, 376)), int(rng.integers(1, 501)))
        img = Image.fromarray(picture(h, w, rng), "RGB")
        if rng.random() < 0.12:
            img = img.convert("L")
        quality = int(rng.choice([10, 20, 50, 75, 85, 90, 95, 100, int(rng.integers(1, 101))]))
        opts = dict(quality=quality, subsampling=int(rng.integers(0, 3)),
                    progressive=bool(rng.random() < 0.35), optimize=bool(rng.random() < 0.3))
        if rng.random() < 0.15:
            opts["restart_marker_blocks"] = int(rng.integers(1, 20))
        elif rng.random() < 0.1:
            opts["restart_marker_rows"] = int(rng.integers(1, 4))
        buf = io.BytesIO()
        try:
            img.save(buf, format="JPEG", **opts)
        except OSError as e:  # Pillow's encoder buffer can be too small for big optimized files
            print(f"skipped {h}×{w} {opts}: {e}")
            continue
        save_with_reference(out, f"pil{i:03d}", buf.getvalue())
        written += 1
    if shutil.which("cjpeg") is None:
        print("no cjpeg: only Pillow-encoded files")
        return written
    samplings = ["1x2", "4x1", "4x2", "2x2,1x1,1x1", "1x1,2x2,2x2", "2x1,1x2,1x1", "3x1",
                 "3x3,1x1,1x1", "1x4", "4x4", "2x4,1x2,1x2", "1x1,1x1,1x1", "2x2,2x1,1x2"]
    for j in range(40):
        h, w = int(rng.integers(1, 300)), int(rng.integers(1, 400))
        ppm = out / "source.ppm"
        Image.fromarray(picture(h, w, rng), "RGB").save(ppm)
        args = ["cjpeg", "-quality", str(int(rng.integers(20, 101)))]
        kind = j % 8
        if kind == 7:
            args += ["-rgb"]
        elif kind == 6:
            args += ["-grayscale", "-sample", "2x2"]
        else:
            args += ["-sample", samplings[j % len(samplings)]]
        if rng.random() < 0.4:
            args += ["-progressive"]
        if rng.random() < 0.3:
            args += ["-restart", f"{int(rng.integers(1, 5))}B"]
        if rng.random() < 0.3:
            args += ["-optimize"]
        res = subprocess.run(args + [str(ppm)], capture_output=True)
        ppm.unlink()
        if res.returncode != 0:  # e.g. more than 10 blocks in an MCU
            print(f"skipped {' '.join(args)}: {res.stderr.decode().strip()}")
            continue
        save_with_reference(out, f"cjpeg{j:03d}", res.stdout)
        written += 1
    return written


def speed_corpus(out, rng):
    for i in range(200):
        arr = picture(375, 500, rng)
        Image.fromarray(arr, "RGB").save(out / f"s{i:03d}.jpg", quality=90, subsampling=2)


def main():
    root = Path(sys.argv[1])
    rng = np.random.default_rng(2026)
    for sub in ["exact", "speed"]:
        (root / sub).mkdir(parents=True, exist_ok=True)
    n = exact_corpus(root / "exact", rng)
    speed_corpus(root / "speed", rng)
    print(f"wrote {n} files to {root / 'exact'}, 200 to {root / 'speed'}")


if __name__ == "__main__":
    main()
