"""MONAI twin of `medssl bench reconstruction-step`: one training step of MONAI's ViT
reconstruction pre-training (Project-MONAI/tutorials,
self_supervised_pretraining/vit_unetr_ssl/ssl_train.ipynb) in PyTorch eager mode with MONAI's
own modules, on the same shapes as the Rust command: `ViTAutoEnc(in_channels=1, img_size=96,
patch_size=16)` with its defaults (hidden 768, MLP 3072, 12 layers, 12 heads, two
ConvTranspose3d 768 -> 16 -> 1 of kernel = stride = 4), `--batch` random crops of `--size`^3,
each corrupted twice, both copies through the network as one batch of 2 x batch (as medssl
does; the ViT has no batch statistics), loss = r + c * r with r = L1Loss(o1, crops) and
c = ContrastiveLoss(temperature=0.05)(flatten o1, flatten o2), `zero_grad(set_to_none=True)`,
backward, one `torch.optim.Adam(lr=1e-4)` step.

The two corrupted copies are computed once, before the timer, with the tutorial's MONAI
transforms (OneOf of in-painting `RandCoarseDropout(holes=6, spatial_size=5,
max_spatial_size=32, dropout_holes=True)` and out-painting `RandCoarseDropout(holes=6,
spatial_size=20, max_spatial_size=64, dropout_holes=False)`, then `RandCoarseShuffle(holes=10,
spatial_size=8, prob=0.8)`), and every step reuses them. medssl draws its corruption inside the
timed step (the objective owns it), so medssl's times include work that these exclude.

Prints {"ms_per_step": median over --steps after --warmup, "min_ms", "max_ms",
"peak_rss_mb": ru_maxrss / 1024, "parameters", ...}.

    .venv/bin/pip install --no-deps monai==1.6.1 einops numpy   # the Python side only
    .venv/bin/python benchmarks/reconstruction_step.py --json
"""

import argparse

import torch
from monai.losses import ContrastiveLoss
from monai.networks.nets import ViTAutoEnc
from monai.transforms import OneOf, RandCoarseDropout, RandCoarseShuffle
from monai.utils import convert_to_tensor

import _timing


def corruption():
    """The tutorial's train-time corruption of one view (its `RandCoarse*d` on the array)."""
    inpaint = RandCoarseDropout(prob=1.0, holes=6, spatial_size=5, dropout_holes=True, max_spatial_size=32)
    outpaint = RandCoarseDropout(prob=1.0, holes=6, spatial_size=20, dropout_holes=False, max_spatial_size=64)
    choose = OneOf(transforms=[inpaint, outpaint])
    shuffle = RandCoarseShuffle(prob=0.8, holes=10, spatial_size=8)
    # MONAI's random transforms draw from their own NumPy generators: seeded, the copies repeat.
    for i, t in enumerate([inpaint, outpaint, choose, shuffle]):
        t.set_random_state(seed=i)
    return lambda x: shuffle(choose(x))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="crops a step, each corrupted twice")
    parser.add_argument("--size", type=int, default=96, help="crop side (and ViTAutoEnc's img_size)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    _timing.add_common_arguments(parser)
    args = parser.parse_args()

    device = _timing.setup(args)
    model = ViTAutoEnc(in_channels=1, img_size=args.size, patch_size=16).to(device).train()
    parameters = sum(p.numel() for p in model.parameters())
    recon_loss = torch.nn.L1Loss()
    contrastive_loss = ContrastiveLoss(temperature=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    b, s = args.batch, args.size
    crops = torch.rand(b, 1, s, s, s)
    corrupt = corruption()
    copies = [torch.stack([convert_to_tensor(corrupt(crop), track_meta=False) for crop in crops]) for _ in range(2)]
    # Copy 1 first, as medssl's objective concatenates them.
    # Plain tensors (no MetaTensor), so the timed step pays no metadata tracking.
    corrupted = torch.cat(copies).float().contiguous().to(device)
    assert type(corrupted) is torch.Tensor
    gt = crops.to(device)

    def step():
        out, _hidden = model(corrupted)
        o1, o2 = out[:b], out[b:]
        r = recon_loss(o1, gt)
        c = contrastive_loss(o1.flatten(start_dim=1, end_dim=4), o2.flatten(start_dim=1, end_dim=4))
        loss = r + c * r
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        assert value == value, f"loss {value}"

    times = _timing.time_steps(step, args.warmup, args.steps, device)
    result = _timing.report(
        "reconstruction-step", times, device, warmup=args.warmup, batch=b, size=s, parameters=parameters
    )
    summary = f"reconstruction step: {result['ms_per_step']:.1f} ms; peak memory {result['peak_rss_mb']:.0f} MiB"
    _timing.emit(result, args.json, summary)


if __name__ == "__main__":
    main()
