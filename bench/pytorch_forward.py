"""PyTorch reference for caf's certification inner loop (compare with caf's `bench_forward`).

Takes one test image (exact100 record 0), and repeatedly adds N(0, sigma^2) noise to a batch of
B copies, runs the eval-mode model and takes the argmax. A warm-up of seconds/10 is followed by
5 timed windows of seconds/5 each (at least one batch); each window's rate counts the whole
batches it ran. Prints `images/s: X` (the median window) and, with --json, the details.

The timm ViTs and torchvision's ResNet-50 (`--arch vit_cifar_tiny_patch4_32`, ...) are built as
in make_backbone_fixtures.py with torch's seeded random init (speed does not depend on the
weights), on the arch's input size, with the same normalisation caf applies inside its model.

Usage (from the repository root):
    bench/.venv/bin/python bench/pytorch_forward.py --arch resnet20 --batch 400 --seconds 20 --threads 2
    bench/.venv/bin/python bench/pytorch_forward.py --arch vit_cifar_tiny_patch4_32 --batch 100
"""

import argparse
import json
import statistics
import time

import torch

from akamaster import EXACT100, WEIGHTS, build, read_cifar_batch
from make_backbone_fixtures import ARCHS as BACKBONES
from make_backbone_fixtures import normalise

WINDOWS = 5


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(WEIGHTS) + sorted(BACKBONES), default="resnet20")
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--json", action="store_true", help="also print the details as JSON")
    args = ap.parse_args()
    if args.batch < 1 or args.seconds <= 0 or args.sigma < 0:
        ap.error("--batch must be >= 1, --seconds > 0, --sigma >= 0")

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    if args.arch in BACKBONES:
        make, size = BACKBONES[args.arch]
        net = make().eval()
        arch = args.arch

        def model(x):
            return net(normalise(arch, x))

        image = torch.rand(1, 3, size, size) if size != 32 else read_cifar_batch(EXACT100)[0][:1]
        batch_shape = (args.batch, 3, size, size)
    else:
        model = build(args.arch, WEIGHTS[args.arch])
        images, _ = read_cifar_batch(EXACT100)
        image = images[:1]
        batch_shape = (args.batch, 3, 32, 32)

    def step():
        x = image + torch.randn(batch_shape) * args.sigma
        preds = model(x).argmax(dim=1)
        # The counts live on the host in caf too; this also forces the work to finish.
        preds = preds.tolist()
        assert len(preds) == args.batch

    def run_for(budget):
        start = time.perf_counter()
        batches = 0
        while True:
            step()
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                return batches * args.batch / elapsed

    with torch.inference_mode():
        run_for(args.seconds / 10)
        windows = [run_for(args.seconds / WINDOWS) for _ in range(WINDOWS)]
    median = statistics.median(windows)
    print(f"images/s: {median:.1f}")
    if args.json:
        details = {
            "images_per_sec_median": median,
            "windows": windows,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "arch": args.arch,
            "sigma": args.sigma,
            "torch_version": torch.__version__,
        }
        print(json.dumps(details))


if __name__ == "__main__":
    main()
