"""PyTorch twin of `medssl bench voco-step`: one VoCo training step as the large-scale
repository trains it (Luffy03/Large-Scale-Medical, Self-supervised/models/voco_head.py and
utils/voco_trans.py; notes in ../shared/specs/voco-vit-unetr.md), on the same shapes and the
same arithmetic as medssl's `voco` objective (plugins/voco/src/voco.rs, crops.rs) with its
defaults:

- the backbone is MONAI's `SwinUNETR(in_channels=1, out_channels=1, feature_size=F,
  use_v2=True).swinViT` (patch 2, window 7, depths 2-2-2-2, heads 3-6-12-24), called with
  `normalize=True` as SwinUNETR calls it;
- each of `--batch` random regions of `crop x grid*crop x grid*crop` (D, H, W) is cut into a
  `grid x grid` grid of base crops of `crop^3` and 2 random crops of the same size, each
  placed uniformly in (H, W), full depth; a random crop's label for base crop k is the area
  of their overlap over the crop's area. Every crop is flipped along each axis with p 0.2,
  turned by k * 90 degrees in (H, W) with p 0.2 and shifted in intensity by U(-0.1, 0.1)
  with p 0.5. The cutting is inside the timed step, as medssl's objective does it there;
- all crops (the random ones first) go through the backbone as one batch; a crop's
  embedding is the concatenation of the global average pools of hidden states 0, 1, 2 and 4;
- a student and a teacher head (Linear-BN-ReLU twice, then Linear, 1024 wide; BatchNorm1d
  without affine parameters or running statistics); the student reads the embedding through
  `dropout1d(0.2)` (whole embeddings on a 2D input), the teacher reads it whole without
  gradients after its EMA update t = 0.9 t + 0.1 s;
- with sim = ReLU(cos) and VoCo v2's ce(y, p) (positive term over the labels, -log(1 - p)
  negative term over the zero labels), per region r: intra = ce(y, sim(x_s, b_t)), inter =
  ce(sg(sim(x_t, b_t[r+1])), sim(x_s, b_s[r+1])), reg = mean over pairs k < l of
  sim(b_s[k], sg(b_s[l]))^2; loss = the means over regions of the three, summed;
- `zero_grad(set_to_none=True)`, backward, one `torch.optim.AdamW(lr=1e-4, amsgrad=True)`
  step over the backbone and the student, weight decay 0.01 on tensors of rank >= 2 and none
  on biases (medssl's optimizer's rule; core/src/optim.rs).

medssl's generators differ (ChaCha per crop; here Python's `random`), so the crops and labels
are not the same voxels, only the same work.

Prints {"ms_per_step": median over --steps after --warmup, "min_ms", "max_ms",
"peak_rss_mb": ru_maxrss / 1024, "parameters": backbone + both heads, ...}.

    .venv/bin/pip install --no-deps monai==1.6.1 einops numpy   # the Python side only
    .venv/bin/python benchmarks/voco_step.py --json
"""

import argparse
import itertools
import random
from collections import OrderedDict

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from torch import nn

import _timing

RANDOM_CROPS = 2
WIDTH = 1024
MOMENTUM = 0.9
FEATURE_DROPOUT = 0.2
POOLED_LEVELS = (0, 1, 2, 4)


def projection_head(widths):
    """VoCo's head: `layer1`, `layer2`, ... each a Sequential, BN-ReLU after all but the last."""
    blocks = OrderedDict()
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers = [nn.Linear(a, b)]
        if i < len(widths) - 2:
            layers += [nn.BatchNorm1d(b, affine=False, track_running_stats=False), nn.ReLU()]
        blocks[f"layer{i + 1}"] = nn.Sequential(*layers)
    return nn.Sequential(blocks)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def similarity(a, b):
    """ReLU of the cosines: [R, n, E] x [R, K, E] -> [R, n, K]."""
    return (unit(a) @ unit(b).transpose(1, 2)).relu()


def ce_loss(labels, logits):
    """VoCo v2's loss per region, [R, n, K] -> [R]."""
    dims = (1, 2)
    pos = (-labels * torch.log(1 + 1e-6 - (labels - logits).abs())).sum(dims) / (labels.sum(dims) + 1e-6)
    negatives = (labels == 0).to(logits.dtype)
    neg = (negatives * -torch.log(1 + 1e-6 - logits)).sum(dims) / (negatives.sum(dims) + 1e-6)
    return pos + neg


def regulariser(bases):
    """Mean over pairs k < l of sim(b_k, sg(b_l))^2 per region, [R, K, E] -> [R]."""
    k = bases.shape[1]
    cos = (unit(bases) @ unit(bases.detach()).transpose(1, 2)).relu()
    upper = torch.ones(k, k, dtype=cos.dtype, device=cos.device).triu(1)
    return (cos.square() * upper).sum((1, 2)) / (k * (k - 1) / 2)


def augment(crop, rng):
    """Flips along D, H, W (p 0.2 each), a turn in (H, W) (p 0.2), an intensity shift (p 0.5)."""
    axes = [axis + 1 for axis in range(3) if rng.random() < 0.2]
    if axes:
        crop = crop.flip(axes)
    if rng.random() < 0.2:
        crop = crop.rot90(rng.randint(1, 3), (2, 3))
    if rng.random() < 0.5:
        crop = crop + rng.uniform(-0.1, 0.1)
    return crop


def cut(regions, grid, crop, rng):
    """Random crops [R n, 1, c, c, c], base crops [R K, ...] and labels [R, n, K]."""
    room = grid * crop - crop
    base_starts = [(i * crop, j * crop) for i in range(grid) for j in range(grid)]

    def overlap(a, b):
        return max(min(a, b) + crop - max(a, b), 0)

    random_crops, bases, labels = [], [], []
    for region in regions:
        for h, w in base_starts:
            bases.append(augment(region[:, :, h : h + crop, w : w + crop], rng))
        for _ in range(RANDOM_CROPS):
            h, w = (rng.randrange(room) if room > 0 else 0 for _ in range(2))
            random_crops.append(augment(region[:, :, h : h + crop, w : w + crop], rng))
            labels.append([overlap(h, bh) * overlap(w, bw) / crop**2 for bh, bw in base_starts])
    shape = (len(regions), RANDOM_CROPS, len(base_starts))
    return torch.stack(random_crops), torch.stack(bases), torch.tensor(labels).view(shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="volumes a step, one region each")
    parser.add_argument("--crop", type=int, default=64, help="side of a base crop and the region's depth")
    parser.add_argument("--grid", type=int, default=3, help="base crops along H and along W")
    parser.add_argument("--feature-size", type=int, default=48, help="SwinUNETR's feature_size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    _timing.add_common_arguments(parser)
    args = parser.parse_args()

    device = _timing.setup(args)
    backbone = SwinUNETR(in_channels=1, out_channels=1, feature_size=args.feature_size, use_v2=True).swinViT
    backbone = backbone.to(device).train()
    fs = args.feature_size
    embedding = sum(fs * 2**level for level in POOLED_LEVELS)
    widths = [embedding, WIDTH, WIDTH, WIDTH]
    student = projection_head(widths).to(device).train()
    teacher = projection_head(widths).to(device).train()
    for t in teacher.parameters():
        t.requires_grad_(False)
    parameters = sum(p.numel() for m in (backbone, student, teacher) for p in m.parameters())

    trained = [p for m in (backbone, student) for p in m.parameters()]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trained if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-4,
        amsgrad=True,
    )

    b, c, g = args.batch, args.crop, args.grid
    regions = torch.rand(b, 1, c, g * c, g * c, device=device)
    # Each step draws its own crops, as medssl's objective does every epoch (a step each there).
    seeds = itertools.count()

    def step():
        random_crops, bases, labels = cut(regions, g, c, random.Random(next(seeds)))
        hidden = backbone(torch.cat([random_crops, bases]), normalize=True)
        embeddings = torch.cat([hidden[i].mean(dim=(2, 3, 4)) for i in POOLED_LEVELS], 1)
        z_student = student(F.dropout1d(embeddings, FEATURE_DROPOUT, training=True))
        with torch.no_grad():
            for s, t in zip(student.parameters(), teacher.parameters()):
                t.mul_(MOMENTUM).add_(s, alpha=1 - MOMENTUM)
            z_teacher = teacher(embeddings)
        n, k = b * RANDOM_CROPS, b * g * g

        def split(z):
            return z[:n].view(b, RANDOM_CROPS, -1), z[n:].view(b, g * g, -1)

        (x_s, b_s), (x_t, b_t) = split(z_student), split(z_teacher)
        assert n + k == z_student.shape[0]
        labels = labels.to(device=device, dtype=x_s.dtype)

        def partner(x):
            return x.roll(-1, 0) if b > 1 else x

        intra = ce_loss(labels, similarity(x_s, b_t)).mean()
        inter = ce_loss(similarity(x_t, partner(b_t)), similarity(x_s, partner(b_s))).mean()
        reg = regulariser(b_s).mean()
        loss = intra + inter + reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        assert value == value, f"loss {value}"

    times = _timing.time_steps(step, args.warmup, args.steps, device)
    result = _timing.report(
        "voco-step",
        times,
        device,
        warmup=args.warmup,
        batch=b,
        size=c,
        grid=g,
        feature_size=fs,
        parameters=parameters,
    )
    side = g * c
    summary = (
        f"voco step, {b} regions of {c} x {side} x {side}, feature size {fs}: "
        f"{result['ms_per_step']:.1f} ms; peak memory {result['peak_rss_mb']:.0f} MiB"
    )
    _timing.emit(result, args.json, summary)


if __name__ == "__main__":
    main()
