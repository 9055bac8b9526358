"""MONAI twin of `medssl bench sliding-window`: MONAI's `UNETR(in_channels=1, out_channels=14,
img_size=96, feature_size=16, norm_name="instance", res_block=True)` (its other arguments at
their defaults: ViT-B/16, hidden 768, MLP 3072, 12 layers, 12 heads) in eval mode under
`torch.no_grad()`, over one random 1 x 1 x `--volume`^3 volume by
`monai.inferers.sliding_window_inference(x, (window,) * 3, sw_batch_size, model,
overlap=0.25, mode="constant")`, timed per whole pass.

`--sw-batch-size` is the number of windows per model call. medssl's bench calls its model with
`SlidingWindowConfig::default()`'s batch of 4 windows (core/src/sliding_window.rs), so 4 is the
like-for-like setting; 1 is MONAI's default.

Prints {"ms_per_step": median over --repeats passes, "min_ms", "max_ms", "peak_rss_mb":
ru_maxrss / 1024, "parameters", ...}.

    .venv/bin/pip install --no-deps monai==1.6.1 einops numpy   # the Python side only
    .venv/bin/python benchmarks/sliding_window.py --json
"""

import argparse

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNETR

import _timing


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", type=int, default=160, help="side of the (cubic) volume")
    parser.add_argument("--window", type=int, default=96, help="side of a window (UNETR's img_size)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=4, help="windows per model call (medssl's bench: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the volume (the median is reported)")
    _timing.add_common_arguments(parser)
    args = parser.parse_args()

    device = _timing.setup(args)
    w = args.window
    model = UNETR(
        in_channels=1, out_channels=14, img_size=w, feature_size=16, norm_name="instance", res_block=True
    ).to(device)
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    x = torch.rand(1, 1, args.volume, args.volume, args.volume, device=device)

    def one_pass():
        with torch.no_grad():
            out = sliding_window_inference(
                x, (w, w, w), args.sw_batch_size, model, overlap=args.overlap, mode="constant"
            )
            value = out.sum(dtype=torch.float64).item()
        assert value == value, "the prediction has NaNs"

    times = _timing.time_steps(one_pass, 0, max(args.repeats, 1), device)
    result = _timing.report(
        "sliding-window",
        times,
        device,
        batch=1,
        size=args.volume,
        window=w,
        sw_batch_size=args.sw_batch_size,
        parameters=parameters,
    )
    summary = f"sliding window: {result['ms_per_step']:.1f} ms a pass; peak memory {result['peak_rss_mb']:.0f} MiB"
    _timing.emit(result, args.json, summary)


if __name__ == "__main__":
    main()
