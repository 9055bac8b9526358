"""PyTorch twin of `medssl bench swav-step`: one SwAV training step written in PyTorch eager
mode, the way SwAV's reference training loop does it, on the same shapes as the Rust command:
ResNet-50 (3 input channels, torchvision's layout), projection 2048 -> 2048 -> 128 with batch
norm and ReLU, 3000 prototypes, batch 16 with crops 2 x 96x96 + 4 x 48x48 (crops of one
resolution through the backbone together), Sinkhorn-Knopp with epsilon 0.05 and 3 iterations
on each global crop, swapped prediction over all crops at temperature 0.1, one SGD step
(lr 0.1, momentum 0.9, no weight decay), prototypes renormalised after the step.
Prints {"ms_per_step": median over --steps after --warmup, "peak_rss_mb": ...}.

--channels-last lays the model's 4D weights and the crops out NHWC, as PyTorch's channels-last
tutorial does it (`model.to(memory_format=torch.channels_last)`, then each input
`.contiguous(memory_format=torch.channels_last)`): the twin of `medssl bench swav-step
--memory-format channels_last`. --precision bf16 runs the step's forward and loss under
`torch.autocast(device_type, torch.bfloat16)` and the backward outside it, as the PyTorch AMP
docs recommend ("Automatic Mixed Precision", torch.amp; no gradient scaling for bf16); weights,
gradients and the optimizer stay fp32. The JSON names both (`memory_format`, `precision`).

torchvision is not needed (nor installed in the project's environment): the ResNet-50 below is
torchvision's v1.5 bottleneck layout, written out.

    .venv/bin/python benchmarks/swav_step.py --json
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, width, stride):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class ResNet50(nn.Module):
    def __init__(self, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, c_in = [], 64
        for i, depth in enumerate([3, 4, 6, 3]):
            width = 64 << i
            blocks = []
            for b in range(depth):
                blocks.append(Bottleneck(c_in, width, 2 if (b == 0 and i > 0) else 1))
                c_in = width * 4
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class SwAV(nn.Module):
    def __init__(self, hidden=2048, output=128, prototypes=3000):
        super().__init__()
        self.backbone = ResNet50(3)
        self.projection = nn.Sequential(
            nn.Linear(2048, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, output)
        )
        self.prototypes = nn.Linear(output, prototypes, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def head(self, embedding):
        z = F.normalize(self.projection(embedding), dim=1)
        return self.prototypes(z)


@torch.no_grad()
def sinkhorn(scores, epsilon, iterations):
    q = torch.exp(scores / epsilon).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def swav_loss(scores, batch, crops, global_crops, epsilon, iterations, temperature):
    loss = 0.0
    for crop in range(global_crops):
        q = sinkhorn(scores[batch * crop : batch * (crop + 1)].detach(), epsilon, iterations)
        subloss = 0.0
        for v in range(crops):
            if v == crop:
                continue
            x = scores[batch * v : batch * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (crops - 1)
    return loss / global_crops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--channels-last", action="store_true", help="weights and crops in torch.channels_last (NHWC)"
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: forward and loss under torch.autocast(device_type, torch.bfloat16)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SwAV().to(device).train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    # Only the 4D tensors (the convolution weights) change layout; linear layers keep theirs.
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    b = args.batch
    global_crops = torch.randn(2 * b, 3, 96, 96, device=device).contiguous(memory_format=memory_format)
    local_crops = torch.randn(4 * b, 3, 48, 48, device=device).contiguous(memory_format=memory_format)

    def autocast():
        # fp32 is the same region switched off: one code path, no cast.
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, phases = [], [[], [], [], []]
    for step in range(args.warmup + args.steps):
        tick = time.perf_counter()
        marks = []
        with autocast():
            embedding = torch.cat([model.backbone(global_crops), model.backbone(local_crops)])
        sync()
        marks.append(time.perf_counter())
        with autocast():
            scores = model.head(embedding)
            loss = swav_loss(scores, b, 6, 2, epsilon=0.05, iterations=3, temperature=0.1)
        sync()
        marks.append(time.perf_counter())
        optimizer.zero_grad()
        # Outside the autocast region: backward ops run in the kinds their forward ops chose.
        loss.backward()
        sync()
        marks.append(time.perf_counter())
        optimizer.step()
        with torch.no_grad():
            w = model.prototypes.weight
            w.copy_(F.normalize(w, dim=1))
        value = loss.item()
        assert value == value, f"loss {value} at step {step}"
        sync()
        marks.append(time.perf_counter())
        if step >= args.warmup:
            times.append((marks[-1] - tick) * 1e3)
            for phase, start, end in zip(phases, [tick] + marks[:-1], marks):
                phase.append((end - start) * 1e3)

    report = {
        "ms_per_step": statistics.median(times),
        # ru_maxrss is the peak resident set in KiB on Linux (VmHWM, as the Rust side reads).
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "min_ms": min(times),
        "max_ms": max(times),
        "phases_ms": dict(zip(["forward", "loss", "backward", "optimizer"], map(statistics.median, phases))),
        "steps": args.steps,
        "warmup": args.warmup,
        "batch": b,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "memory_format": "channels_last" if args.channels_last else "contiguous",
        "precision": args.precision,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"swav step: {report['ms_per_step']:.1f} ms; peak memory {report['peak_rss_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
