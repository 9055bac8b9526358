"""PyTorch twin of `medssl bench kmeans`: DeepCluster-v2's clustering of a memory bank of
L2-normalised embeddings (default 20000 x 128) into each prototype set (default 3 x 3000),
10 spherical k-means iterations each: assign by largest cosine, centroid = normalised mean of
its members, an empty cluster keeps its centroid, then a last assignment; fp32, eager mode, the
straightforward vectorised form of the reference implementation's loop. Prints
{"ms": median over --repeats, "peak_rss_mib": ...} as the Rust command does.

    .venv/bin/python benchmarks/kmeans.py
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F


def spherical_kmeans(x, k, iterations, generator):
    init = torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)
    centroids = x[init]
    for it in range(iterations + 1):
        assignments = torch.mm(x, centroids.t()).max(dim=1).indices
        if it == iterations:
            return centroids, assignments
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)
        counts = torch.bincount(assignments, minlength=k)
        mask = counts > 0
        centroids = torch.where(mask[:, None], F.normalize(sums, dim=1), centroids)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=lambda s: [int(v) for v in s.split(",")], default=[3000, 3000, 3000])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(args.samples, args.dim, device=device), dim=1)
    times = []
    with torch.no_grad():
        for repeat in range(max(args.repeats, 1)):
            generator = torch.Generator().manual_seed(repeat)
            tick = time.perf_counter()
            for k in args.clusters:
                spherical_kmeans(bank, k, args.iterations, generator)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - tick) * 1e3)
    report = {
        "ms": statistics.median(times),
        # ru_maxrss is the peak resident set in KiB on Linux (VmHWM, as the Rust side reads).
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "min_ms": min(times),
        "max_ms": max(times),
        "repeats": len(times),
        "samples": args.samples,
        "dim": args.dim,
        "clusters": args.clusters,
        "iterations": args.iterations,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"k-means: {report['ms']:.0f} ms; peak memory {report['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
