"""What both PyTorch reference scripts share: the device, and running a workload in every memory
layout (and precision) PyTorch offers so that caf is compared against PyTorch at its best.

A configuration is (layout, precision): layout `contiguous` (NCHW, PyTorch's default) or
`channels_last` (NHWC, what oneDNN and cuDNN prefer for convolutions), precision `f32` or
`bf16` (torch.autocast to bfloat16, which on a CPU with AMX or AVX-512 BF16 runs oneDNN's bf16
kernels). `--layout auto` measures each layout in turn and reports the fastest, naming it.
"""

import platform
import statistics
import time

import torch

WINDOWS = 5
LAYOUTS = ("contiguous", "channels_last")


def add_arguments(ap):
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--layout", choices=("auto",) + LAYOUTS, default="auto",
                    help="memory layout; auto measures both and reports the faster")
    ap.add_argument("--precision", choices=("f32", "bf16"), default="f32",
                    help="bf16: torch.autocast to bfloat16")


def device_of(args, ap):
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        ap.error(f"--device: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this PyTorch sees no GPU")
    if dev.type == "cuda":
        # At its best: cuDNN picks the fastest algorithm per shape (the warm-up pays for it),
        # and f32 matmuls/convolutions stay f32 (no TF32), as caf's f32 does.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev


def device_name(dev):
    """The GPU's name, or the CPU's model and the vector instructions ATen's kernels picked
    (`AVX512`, `AVX2`, ...; `ATEN_CPU_CAPABILITY` caps them, as `CAF_KERNELS` caps caf's)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        return f"{model}, ATen {torch.backends.cpu.get_cpu_capability()}"
    except AttributeError:
        return model


def layouts(args):
    return LAYOUTS if args.layout == "auto" else (args.layout,)


def to_layout(t, layout):
    """A 4-d tensor or a module in `layout`."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.to(memory_format=fmt)


def autocast(dev, precision):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(step, batch, seconds, dev):
    """Warm-up of seconds/10, then WINDOWS windows of seconds/WINDOWS: (median, windows)."""

    def run_for(budget):
        start = time.perf_counter()
        batches = 0
        while True:
            step()
            batches += 1
            sync(dev)
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                return batches * batch / elapsed

    run_for(seconds / 10)
    windows = [run_for(seconds / WINDOWS) for _ in range(WINDOWS)]
    return statistics.median(windows), windows


def report(results, dev, precision):
    """Prints `images/s: X` for the best configuration, naming it, then every one measured."""
    best = max(results, key=lambda r: r["images_per_sec_median"])
    print(f"images/s: {best['images_per_sec_median']:.1f} (PyTorch {torch.__version__}, "
          f"{best['layout']}, {precision}, {dev}: {device_name(dev)})")
    if len(results) > 1:
        for r in results:
            print(f"  {r['layout']}: {r['images_per_sec_median']:.1f} images/s")
    return best
