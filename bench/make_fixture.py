"""Writes tests/fixtures/pytorch_logits_{resnet20,resnet56}.json: PyTorch's logits on the first
8 images of cifar10-exact100 and its predictions on all 100, which caf's unit tests must match.

Usage (from the repository root):
    bench/.venv/bin/python bench/make_fixture.py
"""

import json

import torch

from akamaster import EXACT100, REPO, WEIGHTS, build, read_cifar_batch, rel, MEAN, STD

N_LOGITS = 8


def main():
    torch.set_grad_enabled(False)
    images, labels = read_cifar_batch(EXACT100)
    out_dir = REPO / "tests" / "fixtures"
    out_dir.mkdir(parents=True, exist_ok=True)
    for arch, weights in WEIGHTS.items():
        model = build(arch, weights)
        logits = model(images)
        preds = logits.argmax(dim=1)
        correct = int((preds == labels).sum())
        fixture = {
            "generator": "bench/make_fixture.py",
            "torch_version": torch.__version__,
            "arch": arch,
            "weights": rel(weights),
            "data": rel(EXACT100),
            "normalize": {"mean": MEAN, "std": STD},
            "logits_images": N_LOGITS,
            "logits": logits[:N_LOGITS].tolist(),
            "labels": labels.tolist(),
            "predictions": preds.tolist(),
            "correct": correct,
            "accuracy": correct / len(labels),
        }
        path = out_dir / f"pytorch_logits_{arch}.json"
        path.write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"{arch}: {correct}/{len(labels)} correct -> {rel(path)}")


if __name__ == "__main__":
    main()
