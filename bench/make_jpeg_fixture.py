"""Writes tests/fixtures/jpeg/: small JPEGs, Pillow's decode of each, and torchvision's eval
transform of one, which caf's decoder and preprocessing must match exactly (caf's JPEG decoder
reproduces Pillow's libjpeg-turbo bit for bit; the resize + centre crop is then compared on
caf's own decode).

The cases cover baseline and progressive coding, 4:4:4 / 4:2:2 / 4:2:0 and grey, restart
intervals, optimized (image-specific) Huffman tables, sizes that are not multiples of the MCU,
and extreme qualities.

Files (all pixel dumps are raw uint8):
    NAME.jpg            the JPEG
    NAME.rgb            Pillow's `Image.open(NAME.jpg).convert("RGB")`, H × W × 3
    eval.chw            torchvision `Resize(RESIZE)`, `CenterCrop(CROP)`, `ToTensor()` of EVAL_IMAGE,
                        times 255 (exact integers), C × H × W
    manifest.json       sizes, subsampling, quality, versions

Usage (from the repository root):
    bench/.venv/bin/python bench/make_jpeg_fixture.py
"""

import io
import json
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, features
from torchvision import transforms

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "jpeg"

# name, (height, width), quality, subsampling (Pillow: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0), grey,
# further options for Pillow's JPEG encoder. New cases go at the end: each draws from the one
# random generator, so earlier files stay byte-identical.
CASES = [
    ("rgb420_q75", (30, 40), 75, 2, False, {}),
    ("rgb444_q90", (33, 47), 90, 0, False, {}),
    ("rgb420_odd", (37, 29), 85, 2, False, {}),
    ("grey_q80", (24, 24), 80, 0, True, {}),
    ("eval_src", (48, 64), 90, 2, False, {}),
    ("prog420_q85", (40, 56), 85, 2, False, {"progressive": True}),
    ("prog444_opt", (25, 31), 90, 0, False, {"progressive": True, "optimize": True}),
    ("grey_prog", (27, 35), 80, 0, True, {"progressive": True}),
    ("rgb422_q90", (30, 45), 90, 1, False, {}),
    ("restart_rows", (33, 50), 85, 2, False, {"restart_marker_rows": 1}),
    ("restart_blocks", (24, 40), 85, 0, False, {"restart_marker_blocks": 3}),
    ("prog_restart", (35, 41), 85, 2, False, {"progressive": True, "restart_marker_blocks": 2}),
    ("optimize420", (29, 37), 85, 2, False, {"optimize": True}),
    ("odd_17x9", (9, 17), 85, 2, False, {}),
    ("one_px", (1, 1), 85, 2, False, {}),
    ("tall_8x200", (200, 8), 85, 2, False, {}),
    ("mid_120x97", (97, 120), 90, 2, False, {}),
    ("q100_420", (32, 32), 100, 2, False, {}),
    ("q20_420", (37, 29), 20, 2, False, {}),
    ("q100_prog444", (19, 23), 100, 0, False, {"progressive": True}),
]
EVAL_IMAGE = "eval_src"
RESIZE = 40
CROP = 32


def picture(h, w, rng):
    """Smooth colour gradients plus texture: what photographs look like to a JPEG coder."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0)
    g = 128 + 90 * np.cos((x + y) / 9.0)
    b = 255 * (x / max(w - 1, 1)) * (1 - y / max(h - 1, 1))
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, size=(h, w, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(15)
    manifest = {
        "generator": "bench/make_jpeg_fixture.py",
        "pillow_version": PIL.__version__,
        "libjpeg_turbo_version": features.version("libjpeg_turbo"),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "images": [],
        "eval": {"image": EVAL_IMAGE, "resize": RESIZE, "crop": CROP},
    }
    for name, (h, w), quality, subsampling, grey, options in CASES:
        arr = picture(h, w, rng)
        img = Image.fromarray(arr, "RGB")
        if grey:
            img = img.convert("L")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality, subsampling=subsampling, **options)
        (OUT / f"{name}.jpg").write_bytes(buf.getvalue())
        decoded = Image.open(OUT / f"{name}.jpg").convert("RGB")
        pixels = np.asarray(decoded, dtype=np.uint8)
        assert pixels.shape == (h, w, 3)
        (OUT / f"{name}.rgb").write_bytes(pixels.tobytes())
        manifest["images"].append(
            {"name": name, "height": h, "width": w, "quality": quality,
             "subsampling": ["4:4:4", "4:2:2", "4:2:0"][subsampling], "grey": grey,
             **options}
        )
    tf = transforms.Compose(
        [transforms.Resize(RESIZE), transforms.CenterCrop(CROP), transforms.ToTensor()]
    )
    src = Image.open(OUT / f"{EVAL_IMAGE}.jpg").convert("RGB")
    t = tf(src)
    assert tuple(t.shape) == (3, CROP, CROP)
    chw = torch.round(t * 255).to(torch.uint8).numpy()
    # ToTensor divides bytes by 255, so ×255 and rounding recovers them exactly.
    assert np.array_equal(chw.astype(np.float32) / 255, t.numpy())
    (OUT / "eval.chw").write_bytes(chw.tobytes())
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT.relative_to(REPO)} ({total} bytes)")


if __name__ == "__main__":
    main()
