"""ONNX backbones exported with `torch.onnx.export`, and PyTorch's outputs, for `arch: onnx`.

Each network is wrapped so the exported graph takes one input `x` ([B,3,H,W] in [0,1], batch
dimension dynamic) and returns two outputs: `feature` (what CAF reads, [B, D]) and `logits`
([B, classes]). Normalisation is inside the graph, so caf's spec `normalize:` stays the identity
(the default for `arch: onnx`). This is how a user exports their own model (see README,
"Bring your own backbone").

Outputs (tests/fixtures/onnx/, ~1.5 MB in all):
- resnet20.onnx: akamaster's pretrained CIFAR ResNet-20 (read from ../shared/data), feature =
  the 64-d pooled activations.
- vit_small_cifar.onnx: timm VisionTransformer(img_size=32, patch_size=4, embed_dim=64,
  depth=2, num_heads=2, num_classes=10), torch.manual_seed(0) init, feature = pre-logits
  (the class token after the final LayerNorm).
- unsupported.onnx: x -> Relu (node `relu0`) -> Det (node `det0`, the determinant of each
  32x32 channel), a standard operator tract lacks, for the error test.
- expected.json: for each network, PyTorch's logits and features on the first 8 images of
  cifar10-exact100, its predictions on all 100, and the ONNX operators the graph uses.

With --resnet18 DIR it also writes DIR/resnet18.onnx (torchvision ResNet-18, 1000 classes,
torch.manual_seed(0) init, 45 MB: never committed) and DIR/resnet18.json, its logits on two
exact100 images upsampled to 224; caf's ignored test `models::onnx::tests::torchvision_resnet18`
reads them from $CAF_ONNX_RESNET18.

Usage (from the repository root):
    /work/wt-data/bench/.venv/bin/python bench/make_onnx_fixtures.py [--resnet18 target/onnx]
"""

import argparse
import json
import os

import onnx
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from onnx import TensorProto, helper

import akamaster

OUT = akamaster.REPO / "tests" / "fixtures" / "onnx"


class ResNetTwoOutputs(nn.Module):
    """akamaster's forward, returning (pooled features, logits)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        n = self.net
        x = (x - n.mean) / n.std
        out = F.relu(n.bn1(n.conv1(x)))
        out = n.layer3(n.layer2(n.layer1(out)))
        feature = F.avg_pool2d(out, out.size()[3]).flatten(1)
        return feature, n.linear(feature)


class TimmTwoOutputs(nn.Module):
    """A timm ViT (0.5/0.5 normalisation inside), returning (pre-logits, logits)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        x = (x - 0.5) / 0.5
        feature = self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
        return feature, self.vit.head(feature)


class TvTwoOutputs(nn.Module):
    """A torchvision ResNet with ImageNet normalisation inside, returning (pooled, logits)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(akamaster.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(akamaster.STD).view(1, 3, 1, 1))

    def forward(self, x):
        n = self.net
        x = (x - self.mean) / self.std
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        feature = torch.flatten(n.avgpool(x), 1)
        return feature, n.fc(feature)


def export(module, example, path):
    module.eval()
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["feature", "logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        external_data=False,
    )
    model = onnx.load(str(path))
    return sorted({node.op_type for node in model.graph.node})


def record(module, images, labels, ops, n=8):
    with torch.no_grad():
        feature, logits = module(images[:n])
        _, all_logits = module(images)
    preds = all_logits.argmax(1)
    return {
        "ops": ops,
        "images": n,
        "logits": logits.tolist(),
        "features": feature.tolist(),
        "predictions": preds.tolist(),
        "correct": int((preds == labels).sum()),
    }


def unsupported(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu0"),
            helper.make_node("Det", ["r"], ["logits"], name="det0"),
        ],
        "unsupported",
        [x],
        [y],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resnet18", help="also export torchvision's ResNet-18 into this folder")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    images, labels = akamaster.read_cifar_batch(akamaster.EXACT100)
    expected = {"torch": torch.__version__, "timm": timm.__version__}

    resnet = ResNetTwoOutputs(akamaster.build("resnet20", akamaster.WEIGHTS["resnet20"]))
    ops = export(resnet, images[:2], OUT / "resnet20.onnx")
    expected["resnet20"] = record(resnet, images, labels, ops)

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10
    )
    vit = TimmTwoOutputs(vit)
    ops = export(vit, images[:2], OUT / "vit_small_cifar.onnx")
    expected["vit_small_cifar"] = record(vit, images, labels, ops)

    unsupported(OUT / "unsupported.onnx")
    with open(OUT / "expected.json", "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    for name in ("resnet20", "vit_small_cifar"):
        size = os.path.getsize(OUT / f"{name}.onnx")
        print(f"{name}: {size / 1e6:.2f} MB, ops {expected[name]['ops']}, "
              f"{expected[name]['correct']}/100 correct")

    if args.resnet18:
        out = akamaster.Path(args.resnet18)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        net = TvTwoOutputs(torchvision.models.resnet18())
        big = F.interpolate(images[:2], size=224, mode="bilinear", align_corners=False)
        ops = export(net, big, out / "resnet18.onnx")
        with torch.no_grad():
            feature, logits = net.eval()(big)
        with open(out / "resnet18.json", "w") as f:
            json.dump({"ops": ops, "input": big.tolist(), "logits": logits.tolist(),
                       "features": feature.tolist()}, f)
        print(f"resnet18: ops {ops}")


if __name__ == "__main__":
    main()
