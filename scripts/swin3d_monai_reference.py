# Reference numbers of plugins/swin3d's `forward_pass_equals_monais`: MONAI 1.6.1's
# SwinTransformer (SwinUNETR.swinViT) with the test's deterministic weights, float64, eval
# mode. Run once with MONAI installed (`pip install --no-deps monai==1.6.1 einops`); the Rust
# test holds the printed numbers and needs no Python.
import torch
from monai.networks.nets.swin_unetr import SwinTransformer

torch.set_default_dtype(torch.float64)

def fill(model):
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            phase = sum(name.encode()) % 97
            j = torch.arange(t.numel(), dtype=torch.float64)
            v = torch.sin(j * 0.7 + 0.3 * phase) * 0.1
            parts = name.split(".")
            if len(parts) >= 2 and "norm" in parts[-2] and name.endswith(".weight"):
                v += 1.0
            t.copy_(v.reshape(t.shape))

def smooth(shape):
    n = 1
    for s in shape:
        n *= s
    return (torch.sin(torch.arange(n, dtype=torch.float64) * 0.01) * 2.0).reshape(shape)

cases = {
    "default": dict(kw=dict(in_chans=1, embed_dim=12, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
                            num_heads=(3, 6, 12, 24)), normalize=True, shape=(2, 1, 40, 36, 34)),
    "options": dict(kw=dict(in_chans=2, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(2, 1, 1, 2),
                            num_heads=(2, 2, 4, 4), mlp_ratio=2.0, qkv_bias=False, patch_norm=True,
                            downsample="mergingv2", use_v2=True), normalize=False, shape=(1, 2, 13, 40, 47)),
}
for case, c in cases.items():
    m = SwinTransformer(**c["kw"]).eval()
    fill(m)
    with torch.no_grad():
        outs = m(smooth(c["shape"]), c["normalize"])
    print(f"// {case}: {c}")
    for i, o in enumerate(outs):
        flat = o.flatten()
        n = flat.numel()
        at = [0, n // 3, 2 * n // 3, n - 1]
        weighted = (flat * torch.cos(torch.arange(n, dtype=torch.float64) * 0.37)).sum().item()
        print(f"  ({list(o.shape)}, {weighted!r}, {flat.square().sum().item()!r}, "
              f"[{', '.join(f'({k}, {flat[k].item()!r})' for k in at)}]),")
    pooled = outs[4].mean(dim=(2, 3, 4))
    print("  pooled[0,:3]", pooled[0, :3].tolist())
