"""Shared PyTorch pieces for caf's reference scripts.

The architecture is written out here (not imported from akamaster's repository) so the scripts
need nothing but torch and numpy; it follows akamaster/pytorch_resnet_cifar10 exactly:
conv3x3(3->16)+BN+ReLU, three stages of n BasicBlocks (widths 16/32/64, the first block of
stages 2 and 3 with stride 2), option-A shortcuts, global average pooling, linear(64->classes).
"""

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
EXACT100 = DATA / "cifar10-exact100" / "cifar-10-batches-bin" / "test_batch.bin"
WEIGHTS = {
    "resnet20": DATA / "pretrained" / "akamaster" / "resnet20-12fca82f.th",
    "resnet56": DATA / "pretrained" / "akamaster" / "resnet56-4bfd9763.th",
}
DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RECORD = 3073


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            pad = planes // 4
            # Option A: subsample spatially, zero-pad channels; no parameters.
            self.shortcut = LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth, num_classes=10):
        super().__init__()
        assert (depth - 2) % 6 == 0, depth
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        # Input in [0,1]; normalisation is part of the model, as in caf.
        x = (x - self.mean) / self.std
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def load_state_dict(path):
    """The akamaster `.th` files: legacy pickle, {'best_prec1', 'state_dict'}, 'module.' prefix."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # older torch, or a loader that refuses the legacy format
        obj = torch.load(path, map_location="cpu", weights_only=False)
    sd = obj.get("state_dict", obj)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def build(arch, weights=None):
    model = CifarResNet(DEPTHS[arch])
    if weights is not None:
        missing, unexpected = model.load_state_dict(load_state_dict(weights), strict=False)
        # mean/std are our own buffers, not part of the checkpoint.
        missing = [k for k in missing if k not in ("mean", "std")]
        if missing or unexpected:
            raise SystemExit(f"{weights}: missing {missing}, unexpected {unexpected}")
    return model.eval()


def read_cifar_batch(path):
    """(images float32 [N,3,32,32] in [0,1], labels int64 [N]) from a CIFAR-10 binary batch."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % RECORD:
        raise SystemExit(f"{path}: {raw.size} bytes is not a multiple of {RECORD}")
    raw = raw.reshape(-1, RECORD)
    labels = torch.from_numpy(raw[:, 0].astype(np.int64))
    images = torch.from_numpy(raw[:, 1:].astype(np.float32) / 255.0).view(-1, 3, 32, 32)
    return images, labels


def rel(path):
    return os.path.relpath(path, REPO)
