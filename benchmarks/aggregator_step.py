"""`medssl bench aggregator-step` in PyTorch eager, for comparison: the same slice
transformers (plugins/slice-transformer), op for op, with the same shapes, defaults, timing
and memory method, and the same JSON.

    .venv/bin/python benchmarks/aggregator_step.py --attention deformable --slices 64,128,256,512
    .venv/bin/python benchmarks/aggregator_step.py --attention full --slices 64 --set layers=2

One step: forward of a batch of random slice features (all slices valid) through the
aggregator, loss = sum(volume embedding * fixed random tensor), backward, gradients zeroed in
place. The median of --steps timed steps after --warmup untimed ones. Each slice count runs
in a fresh process, which reads VmRSS once the model and inputs exist and VmHWM after the
steps; step_memory_mib is the difference. Pyramid down-sampling is not implemented here (the
benchmark does not use it).
"""

import argparse
import json
import math
import subprocess
import sys
import time

import torch
from torch import nn

DEFAULTS = {
    "deformable": dict(width=640, layers=4, heads=8, ffn_dim=1280, dropout=0.0, reference_stride=4,
                       offset_groups=2, offset_range=1.0, offset_context=1),
    "full": dict(width=640, layers=4, heads=8, ffn_dim=1280, dropout=0.0),
}


class HeadProjections(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.query, self.key, self.value, self.output = (nn.Linear(width, width) for _ in range(4))
        self.heads, self.head_dim = heads, width // heads

    def split_heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def scaled_queries(self, projected):
        return self.split_heads(projected) * self.head_dim ** -0.5

    def attend(self, queries, keys, values, bias, key_valid):
        logits = queries @ keys.transpose(-2, -1)
        logits += bias
        if key_valid is not None:
            logits.masked_fill_(~key_valid, float("-inf"))
        b, _, n, _ = queries.shape
        out = (logits.softmax(-1) @ values).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.output(out)


def keys_or_all(key_valid):
    return key_valid | ~key_valid.any(-1, keepdim=True)


class RelativePositionBias(nn.Module):
    def __init__(self, heads, slices):
        super().__init__()
        self.table = nn.Parameter(torch.randn(heads, 2 * slices - 1) * 0.02)
        self.slices = slices

    def column(self, displacement):
        return (displacement + (self.slices - 1)).clamp(0, 2 * self.slices - 2)

    def dense(self, n):
        positions = torch.arange(n)
        displacement = positions.view(1, n) - positions.view(n, 1)
        return self.table.index_select(1, self.column(displacement).flatten()).view(1, -1, n, n)

    def sampled(self, positions, n):
        b, groups, m = positions.shape
        heads, entries = self.table.shape
        per_group = heads // groups
        queries = torch.arange(n, dtype=positions.dtype).view(1, 1, n, 1)
        column = positions.view(b, groups, 1, m) - queries + (self.slices - 1)
        x = column * (2.0 / max(entries - 1, 1)) - 1.0
        grid = torch.stack([x, torch.zeros_like(x)], -1).view(b * groups, n, m, 2)
        table = (self.table.view(1, groups, per_group, 1, entries).expand(b, groups, per_group, 1, entries)
                 .reshape(b * groups, per_group, 1, entries))
        # bilinear (0), border padding (1), align_corners: the op F.grid_sample calls.
        return torch.grid_sampler(table, grid, 0, 1, True).view(b, heads, n, m)


def sinusoidal_positions(n, width):
    sines = width - width // 2
    frequencies = (torch.arange(sines, dtype=torch.float32) * (-math.log(10000.0) / sines)).exp()
    angles = torch.arange(n, dtype=torch.float32).view(n, 1) * frequencies.view(1, sines)
    return torch.cat([angles.sin(), angles.cos()[:, : width // 2]], 1)


class FullAttention(nn.Module):
    def __init__(self, cfg, slices):
        super().__init__()
        self.projections = HeadProjections(cfg["width"], cfg["heads"])
        self.bias = RelativePositionBias(cfg["heads"], slices)

    def forward(self, x, valid):
        b, n, _ = x.shape
        h = self.projections
        queries = h.scaled_queries(h.query(x))
        keys, values = h.split_heads(h.key(x)), h.split_heads(h.value(x))
        key_valid = None if valid is None else keys_or_all(valid).view(b, 1, 1, n)
        return h.attend(queries, keys, values, self.bias.dense(n), key_valid)


def sample_slices(y, positions):
    b, n, c = y.shape
    _, groups, m = positions.shape
    lower = positions.detach().floor().clamp(0, max(n - 2, 0)).long()
    upper = (lower + 1).clamp(max=n - 1)
    weight = positions - lower.to(positions.dtype)
    batch_start = (torch.arange(b) * n).view(1, b, 1)
    rows = y.reshape(b * n, c)

    def gather(index):
        return rows.index_select(0, (index.transpose(0, 1) + batch_start).flatten()).view(groups, b, m, c)

    features = torch.lerp(gather(lower), gather(upper), weight.transpose(0, 1).unsqueeze(-1))
    return features, lower, upper, weight


def sampled_validity(valid, lower, upper, weight):
    b, groups, m = lower.shape

    def at(index):
        return valid.gather(1, index.view(b, groups * m)).view(b, groups, m)

    return (at(lower) | (weight == 1.0)) & (at(upper) | (weight == 0.0))


def reference_points(n, stride):
    return torch.tensor([(j * stride + min(j * stride + stride, n) - 1) / 2 for j in range((n + stride - 1) // stride)],
                        dtype=torch.float32)


class OffsetNetwork(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width, stride, context = cfg["width"], cfg["reference_stride"], cfg["offset_context"]
        self.depthwise = nn.Conv1d(width, width, stride + 2 * context, stride=stride, groups=width)
        self.pointwise = nn.Conv1d(width, cfg["offset_groups"], 1, bias=False)
        self.stride, self.context, self.range = stride, context, cfg["offset_range"] * stride

    def forward(self, queries, valid):
        n = queries.shape[1]
        if valid is not None:
            queries = queries.masked_fill(~valid.unsqueeze(-1), 0.0)
        points = (n + self.stride - 1) // self.stride
        right = points * self.stride - n + self.context
        x = nn.functional.pad(queries.transpose(1, 2), (self.context, right))
        return self.pointwise(nn.functional.gelu(self.depthwise(x))).tanh() * self.range


class DeformableAttention(nn.Module):
    def __init__(self, cfg, slices):
        super().__init__()
        self.projections = HeadProjections(cfg["width"], cfg["heads"])
        self.bias = RelativePositionBias(cfg["heads"], slices)
        self.offset = OffsetNetwork(cfg)
        self.groups = cfg["offset_groups"]

    def project_groups(self, sampled, linear):
        groups, b, m, c = sampled.shape
        rows = c // groups
        h = self.projections
        projected = (sampled.view(groups, b * m, c) @ linear.weight.view(groups, rows, c).transpose(1, 2)
                     + linear.bias.view(groups, 1, rows))
        return (projected.view(groups, b, m, h.heads // groups, h.head_dim).permute(1, 0, 3, 2, 4)
                .reshape(b, h.heads, m, h.head_dim))

    def forward(self, x, valid):
        b, n, _ = x.shape
        h = self.projections
        queries = h.query(x)
        reference = reference_points(n, self.offset.stride)
        shifted = self.offset(queries, valid) + reference.view(1, 1, -1)
        positions = shifted.clamp(0.0, n - 1) + (shifted - shifted.detach())
        features, lower, upper, weight = sample_slices(x, positions)
        keys = self.project_groups(features, h.key)
        values = self.project_groups(features, h.value)
        bias = self.bias.sampled(positions, n)
        key_valid = None
        if valid is not None:
            m = lower.shape[2]
            key_valid = (keys_or_all(sampled_validity(valid, lower, upper, weight))
                         .view(b, self.groups, 1, 1, m)
                         .expand(b, self.groups, h.heads // self.groups, 1, m)
                         .reshape(b, h.heads, 1, m))
        return h.attend(h.scaled_queries(queries), keys, values, bias, key_valid)


class Block(nn.Module):
    def __init__(self, cfg, attention):
        super().__init__()
        width = cfg["width"]
        self.norm_attention, self.attention = nn.LayerNorm(width), attention
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn_in, self.ffn_out = nn.Linear(width, cfg["ffn_dim"]), nn.Linear(cfg["ffn_dim"], width)
        self.dropout = cfg["dropout"]

    def forward(self, x, valid):
        drop = (lambda t: nn.functional.dropout(t, self.dropout, self.training)) if self.dropout > 0 else (lambda t: t)
        x = x + drop(self.attention(self.norm_attention(x), valid))
        return x + drop(self.ffn_out(nn.functional.gelu(self.ffn_in(self.norm_ffn(x)))))


class SliceTransformer(nn.Module):
    def __init__(self, cfg, attention, input_dim, slices):
        super().__init__()
        self.width = cfg["width"]
        self.input = nn.Linear(input_dim, self.width)
        self.input_norm = nn.BatchNorm1d(self.width)
        layer = DeformableAttention if attention == "deformable" else FullAttention
        self.layers = nn.ModuleList(Block(cfg, layer(cfg, slices)) for _ in range(cfg["layers"]))
        self.norm = nn.LayerNorm(self.width)

    def normalised_content(self, projected, valid):
        # Batch norm over the valid slices of the batch; padding rows zero.
        b, n, width = projected.shape
        flat = projected.reshape(b * n, width)
        if valid is None:
            return self.input_norm(flat).view(b, n, width)
        rows = valid.flatten().nonzero().squeeze(1)
        out = flat.new_zeros(flat.shape)
        return out.index_copy(0, rows, self.input_norm(flat.index_select(0, rows))).view(b, n, width)

    def forward(self, slices, valid):
        n = slices.shape[1]
        if valid is not None:
            slices = slices.masked_fill(~valid.unsqueeze(-1), 0.0)
        x = self.normalised_content(self.input(slices), valid) + sinusoidal_positions(n, self.width)
        for block in self.layers:
            x = block(x, valid)
        x = self.norm(x)
        x = x / x.norm(2, -1, keepdim=True).clamp_min(1e-12)
        if valid is None:
            return x, x.mean(1)
        weight = valid.to(x.dtype).unsqueeze(-1)
        return x, (x * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def status_mib(field):
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(field))
    return int(line.split()[1]) / 1024.0


def measure(args, cfg, slices):
    torch.manual_seed(0)
    model = SliceTransformer(cfg, args.attention, args.input_dim, slices)
    model.train()
    x = torch.randn(args.batch, slices, args.input_dim)
    valid = torch.ones(args.batch, slices, dtype=torch.bool)
    probe = torch.randn(args.batch, cfg["width"])
    baseline = status_mib("VmRSS:")

    def step():
        started = time.perf_counter()
        _, volume = model(x, valid)
        (volume * probe).sum().backward()
        model.zero_grad(set_to_none=False)
        return (time.perf_counter() - started) * 1e3

    for _ in range(args.warmup):
        step()
    times = sorted(step() for _ in range(args.steps))
    mid = len(times) // 2
    median = times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2
    peak = status_mib("VmHWM:")
    return dict(slices=slices, median_ms=median, min_ms=times[0], max_ms=times[-1], baseline_rss_mib=baseline,
                peak_rss_mib=peak, step_memory_mib=peak - baseline)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", choices=["deformable", "full"], default="deformable")
    parser.add_argument("--slices", default="64,128,256,512")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--input-dim", type=int, default=3904)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = dict(DEFAULTS[args.attention])
    for raw in args.set:
        key, value = raw.split("=", 1)
        if key not in cfg:
            sys.exit(f"--set {raw}: unknown key `{key}`; expected one of: {', '.join(cfg)}")
        cfg[key] = type(cfg[key])(value)
    counts = [int(s) for s in args.slices.split(",")]
    if len(counts) == 1:
        results = [measure(args, cfg, counts[0])]
    else:
        results = []
        for slices in counts:
            command = [sys.executable, __file__, "--attention", args.attention, "--slices", str(slices),
                       "--batch", str(args.batch), "--input-dim", str(args.input_dim), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]
            for raw in args.set:
                command += ["--set", raw]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out)["results"][0])
    print(json.dumps(dict(implementation="pytorch-eager", aggregator=f"{args.attention}-attention",
                          config=dict(cfg, name=f"{args.attention}-attention"), batch=args.batch,
                          input_dim=args.input_dim, threads=torch.get_num_threads(), steps=args.steps,
                          warmup=args.warmup, results=results)))


if __name__ == "__main__":
    main()
