"""PyTorch reference for caf's certification inner loop (compare with caf's `bench_forward`).

Takes one test image (exact100 record 0), and repeatedly adds N(0, sigma^2) noise to a batch of
B copies, runs the eval-mode model and takes the argmax. A warm-up of seconds/10 is followed by
5 timed windows of seconds/5 each (at least one batch); each window's rate counts the whole
batches it ran. Prints `images/s: X` (the median window) and, with --json, the details.

The timm ViTs and torchvision's ResNet-50 (`--arch vit_cifar_tiny_patch4_32`, ...) are built as
in make_backbone_fixtures.py with torch's seeded random init (speed does not depend on the
weights), on the arch's input size, with the same normalisation caf applies inside its model.

PyTorch at its best: `--layout auto` (the default) measures the default (contiguous) layout and
channels_last and reports the faster, naming it; `--precision bf16` runs under bf16 autocast;
`--device cuda` runs on a GPU (see torch_best.py).

Usage (from the repository root):
    bench/.venv/bin/python bench/pytorch_forward.py --arch resnet20 --batch 400 --seconds 20 --threads 2
    bench/.venv/bin/python bench/pytorch_forward.py --arch vit_cifar_tiny_patch4_32 --batch 100
    bench/.venv/bin/python bench/pytorch_forward.py --arch resnet20 --precision bf16 --device cuda
"""

import argparse
import json

import torch

from akamaster import EXACT100, WEIGHTS, build, read_cifar_batch
from make_backbone_fixtures import ARCHS as BACKBONES
from make_backbone_fixtures import normalise
import torch_best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(WEIGHTS) + sorted(BACKBONES), default="resnet20")
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--json", action="store_true", help="also print the details as JSON")
    torch_best.add_arguments(ap)
    args = ap.parse_args()
    if args.batch < 1 or args.seconds <= 0 or args.sigma < 0:
        ap.error("--batch must be >= 1, --seconds > 0, --sigma >= 0")
    dev = torch_best.device_of(args, ap)

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    if args.arch in BACKBONES:
        make, size = BACKBONES[args.arch]
        net = make().eval().to(dev)
        arch = args.arch

        def model(x):
            return net(normalise(arch, x))

        image = torch.rand(1, 3, size, size) if size != 32 else read_cifar_batch(EXACT100)[0][:1]
        batch_shape = (args.batch, 3, size, size)
    else:
        net = build(args.arch, WEIGHTS[args.arch]).to(dev)
        model = net
        images, _ = read_cifar_batch(EXACT100)
        image = images[:1]
        batch_shape = (args.batch, 3, 32, 32)

    image = image.to(dev)
    results = []
    for layout in torch_best.layouts(args):
        torch_best.to_layout(net, layout)
        img = torch_best.to_layout(image, layout)

        def step():
            noise = torch.randn(batch_shape, device=dev) * args.sigma
            x = torch_best.to_layout(img + noise, layout)
            with torch_best.autocast(dev, args.precision):
                preds = model(x).argmax(dim=1)
            # The counts live on the host in caf too; this also forces the work to finish.
            preds = preds.tolist()
            assert len(preds) == args.batch

        with torch.inference_mode():
            median, windows = torch_best.measure(step, args.batch, args.seconds, dev)
        results.append({"layout": layout, "images_per_sec_median": median, "windows": windows})
    best = torch_best.report(results, dev, args.precision)
    if args.json:
        details = {
            "images_per_sec_median": best["images_per_sec_median"],
            "layout": best["layout"],
            "precision": args.precision,
            "device": str(dev),
            "device_name": torch_best.device_name(dev),
            "configurations": results,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "arch": args.arch,
            "sigma": args.sigma,
            "torch_version": torch.__version__,
        }
        print(json.dumps(details))


if __name__ == "__main__":
    main()
