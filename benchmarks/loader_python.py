"""The loader pipeline of `medssl bench loader`, written in Python for comparison.

Decodes every NIfTI volume of a folder with nibabel, clips to the 0.5-99.5 percentiles and
z-scores it, and makes two 3D views (random slice window, random resized in-plane crop,
trilinear resize to SLICES x SIZE x SIZE, flips, contrast/brightness jitter, noise) with
torch, in a DataLoader with the same number of worker processes.

    .venv/bin/pip install nibabel
    .venv/bin/python benchmarks/loader_python.py --data ../shared/data/hippocampus --threads 2

One untimed pass (--warmup), then three timed ones (--epochs), as `medssl bench loader`.
Prints one JSON line: volumes (through the timed epochs), epochs, seconds, volumes_per_s,
peak_rss_mb (main process plus the largest worker, as ru_maxrss reports them).
"""

import argparse
import json
import math
import pathlib
import random
import resource
import time

import nibabel
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class Volumes(Dataset):
    def __init__(self, folder, slices, size):
        self.files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
        self.slices, self.size = slices, size

    def __len__(self):
        return len(self.files)

    def view(self, volume, rng):
        d, h, w = volume.shape
        depth = max(1, min(d, round(d * rng.uniform(0.6, 1.0))))
        start = rng.randint(0, d - depth)
        area = h * w
        top, left, ch, cw = 0, 0, h, w
        for _ in range(10):
            target = area * rng.uniform(0.4, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw_, ch_ = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 1 <= cw_ <= w and 1 <= ch_ <= h:
                top, left, ch, cw = rng.randint(0, h - ch_), rng.randint(0, w - cw_), ch_, cw_
                break
        crop = volume[start:start + depth, top:top + ch, left:left + cw][None, None]
        x = torch.nn.functional.interpolate(crop, size=(self.slices, self.size, self.size), mode="trilinear", align_corners=False)[0]
        if rng.random() < 0.5:
            x = x.flip(-1)
        if rng.random() < 0.5:
            x = x.flip(-2)
        x = x * (1 + rng.uniform(-0.2, 0.2)) + rng.uniform(-0.1, 0.1)
        return x + 0.02 * torch.randn_like(x)

    def __getitem__(self, index):
        image = nibabel.load(str(self.files[index]))
        voxels = np.asarray(image.get_fdata(dtype=np.float32)).transpose(2, 0, 1)
        lo, hi = np.percentile(voxels, [0.5, 99.5])
        voxels = np.clip(voxels, lo, hi)
        voxels = (voxels - voxels.mean()) / max(float(voxels.std()), 1e-8)
        volume = torch.from_numpy(np.ascontiguousarray(voxels))
        rng = random.Random(index)
        return torch.stack([self.view(volume, rng), self.view(volume, rng)])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=pathlib.Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    parser.add_argument("--epochs", type=int, default=3, help="timed passes")
    args = parser.parse_args()
    folder = args.data / "imagesTr" if (args.data / "imagesTr").is_dir() else args.data
    dataset = Volumes(folder, args.slices, args.size)
    # Persistent workers: after the warm-up pass the timed epochs pay no process start-up,
    # Python's steady state (medssl starts its worker threads every epoch, timed).
    loader = DataLoader(
        dataset, batch_size=1, shuffle=True, num_workers=args.threads, prefetch_factor=2, persistent_workers=True
    )
    for _ in range(args.warmup):
        assert sum(batch.shape[0] for batch in loader) == len(dataset)
    started = time.perf_counter()
    seen = sum(batch.shape[0] for _ in range(args.epochs) for batch in loader)
    seconds = time.perf_counter() - started
    assert seen == len(dataset) * args.epochs
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"volumes": seen, "epochs": args.epochs, "seconds": seconds, "volumes_per_s": seen / seconds, "peak_rss_mb": main_mb + worker_mb}))


if __name__ == "__main__":
    main()
