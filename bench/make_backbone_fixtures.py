"""Reference logits of the timm ViTs and torchvision's ResNet-50 for caf's backbone tests.

No weights are downloaded and no large weights are committed. Every tensor of each model's
state dict is filled with "formula weights": a splitmix64 hash of (FNV-1a of the tensor's name,
element index) mapped to [-1, 1) and scaled by a rule on the name (see `fill`), which caf
reproduces bit for bit in Rust (src/models/formula.rs). So the full-size configurations are
tested in caf without their 22-350 MB of weights: the fixture holds each model's parameter
names and shapes as timm/torchvision create them, and its logits on two formula images.

A real checkpoint file is also written for the loader: a tiny timm ViT (32x32, patch 8, width
32, one block) with torch's seeded random init, as safetensors and as a PyTorch .pth, with its
logits.

Outputs (tests/fixtures/): backbones.json, vit_micro.safetensors, vit_micro.pth.

Usage (from the repository root):
    /work/main/bench/.venv/bin/python bench/make_backbone_fixtures.py
"""

import json
import os

import numpy as np
import timm
import torch
import torchvision
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")

M64 = (1 << 64) - 1

# name -> (builder, input size). timm configs as registered in timm 1.0 (class token, learned
# position embedding, pre-norm blocks, LayerNorm eps 1e-6, erf GELU, qkv bias, token pooling).
ARCHS = {
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224"), 224),
    "vit_small_patch16_224": (lambda: timm.create_model("vit_small_patch16_224"), 224),
    "vit_base_patch16_224": (lambda: timm.create_model("vit_base_patch16_224"), 224),
    "vit_cifar_tiny_patch4_32": (
        lambda: timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10
        ),
        32,
    ),
    "resnet50": (lambda: torchvision.models.resnet50(), 224),
}


def fnv1a(name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def splitmix(x):
    """splitmix64 over a uint64 array (numpy wraps on overflow, as Rust's wrapping ops do)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(name, n):
    """n values in [-1, 1), each exact in f32 (24 random bits)."""
    idx = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = splitmix(np.uint64(fnv1a(name)) + idx)
    return (h >> np.uint64(40)).astype(np.float64) / float(1 << 24) * 2.0 - 1.0


def rule(name, shape):
    """(offset, scale): value = offset + scale * u, computed in f64 and rounded to f32."""
    if name.endswith("running_var"):
        return 1.0, 0.5
    if name.endswith("running_mean"):
        return 0.0, 0.1
    if name in ("cls_token", "pos_embed"):
        return 0.0, 0.5
    if len(shape) == 1:
        return (1.0, 0.1) if name.endswith("weight") else (0.0, 0.1)
    fan_in = int(np.prod(shape[1:]))
    return 0.0, float(np.sqrt(3.0 / fan_in))


def fill(name, shape):
    a, b = rule(name, shape)
    n = int(np.prod(shape)) if len(shape) else 1
    return (a + b * uniform(name, n)).astype(np.float32).reshape(shape)


def formula_images(size, count=2):
    u = uniform("input", count * 3 * size * size)
    return torch.from_numpy(((u + 1.0) / 2.0).astype(np.float32).reshape(count, 3, size, size))


# Normalisation is inside caf's models; the reference applies the same one before the network.
NORM = {
    "vit": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "resnet50": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


def normalise(arch, x):
    mean, std = NORM["resnet50" if arch == "resnet50" else "vit"]
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


def main():
    torch.set_grad_enabled(False)
    fixture = {"generator": __doc__.splitlines()[0], "torch": torch.__version__,
               "timm": timm.__version__, "torchvision": torchvision.__version__, "archs": {}}
    for arch, (build, size) in ARCHS.items():
        model = build().eval()
        sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        model.load_state_dict({k: torch.from_numpy(fill(k, tuple(v.shape))) for k, v in sd.items()},
                              strict=False)
        x = formula_images(size)
        logits = model(normalise(arch, x))
        print(f"{arch}: {len(sd)} tensors, logits {tuple(logits.shape)}, "
              f"max |logit| {logits.abs().max().item():.3f}, std {logits.std().item():.3f}")
        fixture["archs"][arch] = {
            "input_size": size,
            "tensors": [[k, list(v.shape)] for k, v in sd.items()],
            "logits": logits.tolist(),
        }

    # A real checkpoint for the loader, with torch's own seeded init (not formula weights).
    torch.manual_seed(0)
    micro = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10).eval()
    sd = {k: v.contiguous() for k, v in micro.state_dict().items()}
    save_file(sd, os.path.join(OUT, "vit_micro.safetensors"))
    torch.save(sd, os.path.join(OUT, "vit_micro.pth"))
    x = formula_images(32)
    fixture["micro"] = {
        "config": {"img_size": 32, "patch": 8, "dim": 32, "depth": 1, "heads": 2},
        "logits": micro(normalise("vit", x)).tolist(),
    }

    with open(os.path.join(OUT, "backbones.json"), "w") as f:
        json.dump(fixture, f)
        f.write("\n")


if __name__ == "__main__":
    main()
