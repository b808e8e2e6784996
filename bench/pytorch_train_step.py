"""PyTorch reference for caf's training step (compare with `caf bench train-step`).

One step = a batch of B fixed pseudo-random images plus N(0, sigma^2) noise, forward in train
mode, cross-entropy on logits, backward, optimizer update:
  --method rs : the whole akamaster ResNet is trained (SGD lr 0.01, momentum 0.9, wd 1e-4);
  --method caf: the ResNet's features phi are frozen (eval mode, no grad) and a CIFAR ResNet-18
                adapter at 1/8 width (caf's CPU default: stem and stages 8/8/16/32/64, linear to
                64) plus a new 64->10 head are trained with Adam (lr 1e-3);
  --method denoised: a DnCNN (5 x 16, caf's CPU default; residual: x - net(x)) in front of the
                frozen ResNet (eval mode, weights without grad), stability loss: cross-entropy
                between f(D(x + noise)) and f's prediction on the clean batch; Adam (lr 1e-3).
Warm-up of seconds/10, then 5 windows of seconds/5; prints `images/s: X` (median window) for
the best of the contiguous and channels_last layouts (`--layout auto`, the default), naming it;
`--precision bf16` trains under bf16 autocast, `--device cuda` on a GPU (see torch_best.py).

Usage (from the repository root):
    bench/.venv/bin/python bench/pytorch_train_step.py --method caf --batch 128 --seconds 20 --threads 2
"""

import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from akamaster import MEAN, STD, WEIGHTS, build
import torch_best


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Adapter(nn.Module):
    """kuangliu-style CIFAR ResNet-18 with a width multiplier, output = feature width 64."""

    def __init__(self, width=0.125, out_dim=64):
        super().__init__()
        c = [max(1, round(64 * width)), max(1, round(64 * width)), max(1, round(128 * width)),
             max(1, round(256 * width)), max(1, round(512 * width))]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        layers, cin = [], c[0]
        for cout, stride in zip(c[1:], [1, 2, 2, 2]):
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, out_dim)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x):
        x = (x - self.mean) / self.std
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class DnCNN(nn.Module):
    def __init__(self, depth=5, width=16):
        super().__init__()
        layers = [nn.Conv2d(3, width, 3, 1, 1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers += [nn.Conv2d(width, 3, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return x - self.net(x)


def features(backbone, x):
    x = (x - backbone.mean) / backbone.std
    out = F.relu(backbone.bn1(backbone.conv1(x)))
    out = backbone.layer3(backbone.layer2(backbone.layer1(out)))
    return F.avg_pool2d(out, out.size()[3]).flatten(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["caf", "rs", "denoised"], required=True)
    ap.add_argument("--arch", choices=sorted(WEIGHTS), default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--json", action="store_true")
    torch_best.add_arguments(ap)
    args = ap.parse_args()
    if args.batch < 2 or args.seconds <= 0:
        ap.error("--batch must be >= 2 and --seconds > 0")
    dev = torch_best.device_of(args, ap)
    torch.set_num_threads(args.threads)
    results = []
    for layout in torch_best.layouts(args):
        median, windows = run(args, dev, layout)
        results.append({"layout": layout, "images_per_sec_median": median, "windows": windows})
    best = torch_best.report(results, dev, args.precision)
    if args.json:
        print(json.dumps({"images_per_sec_median": best["images_per_sec_median"],
                          "layout": best["layout"], "precision": args.precision,
                          "device": str(dev), "device_name": torch_best.device_name(dev),
                          "configurations": results, "batch": args.batch,
                          "threads": torch.get_num_threads(), "method": args.method,
                          "arch": args.arch, "torch_version": torch.__version__}))


def run(args, dev, layout):
    """Builds the models afresh (same seed) in `layout` and measures their training step."""
    torch.manual_seed(0)
    cl = lambda t: torch_best.to_layout(t, layout)  # noqa: E731
    backbone = cl(build(args.arch, WEIGHTS[args.arch]).to(dev))
    images = cl(torch.rand(args.batch, 3, 32, 32).to(dev))
    labels = torch.randint(0, 10, (args.batch,)).to(dev)

    if args.method == "rs":
        model = backbone.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def logits(x):
            return model(x)
    elif args.method == "denoised":
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        denoiser = cl(DnCNN().train().to(dev))
        opt = torch.optim.Adam(denoiser.parameters(), lr=1e-3)

        def logits(x):
            return backbone(denoiser(x))
    else:
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        adapter, head = cl(Adapter().train().to(dev)), nn.Linear(64, 10).to(dev)
        opt = torch.optim.Adam(list(adapter.parameters()) + list(head.parameters()), lr=1e-3)

        def logits(x):
            with torch.no_grad():
                phi = features(backbone, x)
            return head(phi + adapter(x))

    def step():
        x = cl(images + torch.randn_like(images) * args.sigma)
        y = labels
        with torch_best.autocast(dev, args.precision):
            if args.method == "denoised":
                # The stability target is recomputed per batch, as in training (caf does too).
                with torch.no_grad():
                    y = backbone(images).argmax(1)
            loss = F.cross_entropy(logits(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return torch_best.measure(step, args.batch, args.seconds, dev)


if __name__ == "__main__":
    main()
