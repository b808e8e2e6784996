"""Writes tiny PyTorch checkpoints that exercise caf's weight reader beyond the akamaster files:
the zip format (torch >= 1.6) and the legacy format, each with strided and offset views,
float64 and float16 tensors, a long `num_batches_tracked`, a `module.` prefix and a
`{'state_dict': ..., 'epoch': ...}` wrapper.

Outputs tests/fixtures/torch_formats_{zip,legacy}.pt and torch_formats_expected.json
(name -> shape, dtype, values in row-major order, after the prefix is stripped).

Usage (from the repository root):
    bench/.venv/bin/python bench/make_weight_fixtures.py
"""

import json
from collections import OrderedDict

import torch

from akamaster import REPO


def main():
    base = torch.arange(12, dtype=torch.float32).view(3, 4) / 4 - 1
    tensors = OrderedDict(
        [
            ("contiguous", base),
            # Views of base's storage: caf must honour stride and offset, not read it flat.
            ("transposed", base.t()),
            ("row", base[1]),
            ("strided", base[:, 1::2]),
            ("double", torch.linspace(-2, 2, 6, dtype=torch.float64).view(2, 3)),
            ("half", torch.tensor([0.5, -1.25, 3.0, 1e-3], dtype=torch.float16)),
            ("bn.num_batches_tracked", torch.tensor(7, dtype=torch.long)),
            ("scalar", torch.tensor(2.5)),
        ]
    )
    sd = OrderedDict(("module." + k, v) for k, v in tensors.items())
    obj = {"epoch": 3, "state_dict": sd, "best_prec1": 91.5}
    out = REPO / "tests" / "fixtures"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(obj, out / "torch_formats_zip.pt")
    torch.save(obj, out / "torch_formats_legacy.pt", _use_new_zipfile_serialization=False)
    expected = {
        k: {
            "shape": list(v.shape),
            "dtype": str(v.dtype).removeprefix("torch."),
            "values": v.reshape(-1).tolist(),
        }
        for k, v in tensors.items()
    }
    (out / "torch_formats_expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    # Check that torch itself reads both back identically.
    for name in ("torch_formats_zip.pt", "torch_formats_legacy.pt"):
        back = torch.load(out / name, weights_only=True)["state_dict"]
        for k, v in tensors.items():
            assert torch.equal(back["module." + k], v), (name, k)
    print("wrote", ", ".join(p.name for p in sorted(out.glob("torch_formats_*"))))


if __name__ == "__main__":
    main()
