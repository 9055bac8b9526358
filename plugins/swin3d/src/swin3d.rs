//! The Swin transformer over 3D volumes (Liu et al., "Swin Transformer: Hierarchical Vision
//! Transformer using Shifted Windows", ICCV 2021) as MONAI 1.6 builds it for SwinUNETR
//! (Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain
//! Tumors in MRI Images", BrainLes 2021; Tang et al., "Self-Supervised Pre-Training of Swin
//! Transformers for 3D Medical Image Analysis", CVPR 2022): `SwinUNETR.swinViT`, the
//! `SwinTransformer` of `monai/networks/nets/swin_unetr.py`, the encoder VoCo (Wu et al.,
//! CVPR 2024) pre-trains.
//!
//! A volume `[N, C, D, H, W]` is padded at its end to a multiple of `patch_size` on each axis
//! and cut into cubes by one convolution (kernel = stride = patch, `patch_embed.proj`), to
//! `feature_size` channels (an optional LayerNorm, `patch_norm`). Four stages follow, each of
//! `depths[i]` Swin blocks at width `feature_size * 2^i` and then a patch merging that halves
//! the grid and doubles the width. A block is pre-norm:
//! `x + attn(norm1(x))`, then `x + mlp(norm2(x))` (MLP ratio 4, exact GELU). Its attention
//! runs within windows of `window_size^3` tokens (Sec. 3.2): `softmax(q kᵀ / sqrt(d) + B) v`
//! per head, `B` read from a learned table of `(2w - 1)^3` rows per head through the
//! `relative_position_index` buffer (Eq. 4). Every second block shifts the grid cyclically
//! by `window_size / 2` first and masks the token pairs that the shift brought together from
//! opposite ends (-100 before the softmax, [`crate::windows`]). A grid that is not a multiple
//! of the window is padded with zeros after `norm1`, and the padded tokens take part in the
//! attention unmasked, as in MONAI; along an axis no longer than the window, the window
//! shrinks to it and that axis is not shifted (MONAI's `get_window_size`). The bias table is
//! then read through the first `tokens x tokens` entries of the full window's index, as
//! MONAI's `relative_position_index[:n, :n]` does (not the index of the smaller window), so
//! that the same weights give the same outputs.
//!
//! Patch merging (`downsample`): the grid is padded to even sizes, the 8 tokens of each
//! 2x2x2 cell are concatenated along channels, layer-normed and projected from 8C to 2C
//! without bias. SwinUNETR's default `downsample = "merging"` (MONAI's `PatchMerging`, the
//! v0.9.0 layout) concatenates the cells' offsets in (d, h, w) order (0,0,0), (1,0,0),
//! (0,1,0), (0,0,1), (1,1,0), (1,0,1), (0,1,1), (1,1,1); `"mergingv2"` (`PatchMergingV2`) in
//! lexicographic order. With `use_v2` (SwinUNETR-v2), a residual block of two 3x3x3
//! convolutions with instance norm and LeakyReLU (MONAI's `UnetrBasicBlock` with
//! `res_block=True`, `layersNc.0.layer.*`) runs before each stage.
//!
//! Levels: the five outputs MONAI's `SwinTransformer.forward` returns, SwinUNETR's
//! `hidden_states_out`: `hidden0` after the patch embedding (`feature_size` channels, stride
//! `patch_size`), `hidden1` .. `hidden4` after each stage with its merging (2, 4, 8, 16 times
//! `feature_size`, strides 2, 4, 8, 16 times `patch_size`: 2 to 32 by default). With
//! `normalize` (SwinUNETR passes `normalize=True`) each is layer-normed over channels without
//! affine parameters (`proj_out`). A grid that is not a multiple of the strides is rounded up
//! at every step (the padding above), so a level has `ceil(size / stride)` positions per axis
//! (40³ gives 20, 10, 5, 3 and 2). Pooled embedding: the mean of `hidden4` over its grid
//! (`[N, 16 feature_size]`), the volume embedding of runs that pre-train with this encoder;
//! MONAI's SwinTransformer has none.
//!
//! Parameter and buffer names are MONAI's `SwinUNETR.swinViT.state_dict()` names under the
//! encoder's path (`patch_embed.proj.weight`, `layers1.0.blocks.0.attn.qkv.weight`,
//! `layers1.0.blocks.1.attn.relative_position_bias_table`, `layers4.0.downsample.norm.bias`,
//! `layers1c.0.layer.conv1.conv.weight`, ...), so `medssl export --format monai --prefix
//! swinViT.` gives SwinUNETR's `swinViT.` sub-tree and `encoder.init` with `init_prefix =
//! "swinViT."` reads a SwinUNETR checkpoint strictly. `relative_position_index` is a
//! persistent buffer in MONAI (each block's state_dict holds it, int64), so it is a
//! non-trainable int64 variable here: it travels with every checkpoint and export, and a
//! strict load finds it on both sides.
//!
//! Initialisation as MONAI's: the relative position bias tables from a normal with std
//! 0.02, truncated at ±2 (`trunc_normal_`, i.e. not truncated); MONAI's SwinTransformer has
//! no other initialisation of its own, so every Linear, Conv and LayerNorm keeps PyTorch's
//! defaults ([`medssl_core::layers`]).
//!
//! Checked against MONAI 1.6.1 (torch 2.13.0, CPU, float64) with the same deterministic
//! weights (scripts/swin3d_monai_reference.py): the five levels of a `[2, 1, 40, 36, 34]` input
//! (default options, feature size 12) and of a `[1, 2, 13, 40, 47]` input (window 4, `use_v2`,
//! `"mergingv2"`, `patch_norm`, no `qkv_bias`, `normalize` off) agree with MONAI's within 1e-9
//! (`forward_pass_equals_monais`). Once, by hand: a SwinUNETR(feature_size=48) with MONAI's own
//! random initialisation, its state_dict saved as safetensors and loaded by `encoder.init` with
//! `init_prefix = "swinViT."` (strict, 126 tensors), and a random `[1, 1, 64, 64, 64]` input:
//! the five fp32 levels equal MONAI's bit for bit (max abs difference 0).
//!
//! What medssl does differently, on purpose:
//! - `window_size` and `patch_size` are one number each, the same on every axis (SwinUNETR's
//!   `ensure_tuple_rep` of an int); the four stages are fixed (MONAI's forward reads
//!   `layers1` .. `layers4`), so `depths` and `num_heads` have four entries.
//! - The input size is free, as in MONAI's SwinTransformer, which pads; SwinUNETR's own check
//!   that every axis is a multiple of `patch_size^5` belongs to its decoder (whose skip
//!   connections need it), not to this encoder.
//! - Stochastic depth (`dropout_path_rate`) draws from libtorch's generator, which the trainer
//!   reseeds every step, so a run with it resumes exactly.

use crate::windows::{self, padded, partition, relative_position_index, reverse, window_and_shift};
use medssl_core::encoder::SpatialDims;
use medssl_core::prelude::*;
use medssl_core::unetr_blocks::UnetrBasicBlock;
use serde::{Deserialize, Serialize};

/// The stages MONAI's SwinTransformer builds (`layers1` .. `layers4`).
const STAGES: usize = 4;

/// How patch merging orders the 8 tokens of a 2x2x2 cell (MONAI's `MERGING_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Merging {
    /// `PatchMerging` (SwinUNETR's default): offsets (0,0,0), (1,0,0), (0,1,0), (0,0,1),
    /// (1,1,0), (1,0,1), (0,1,1), (1,1,1) in (d, h, w).
    Merging,
    /// `PatchMergingV2`: offsets in lexicographic (d, h, w) order.
    Mergingv2,
}

impl Merging {
    /// The (d, h, w) offsets of the concatenated tokens, in order.
    fn offsets(self) -> [[i64; 3]; 8] {
        match self {
            Merging::Merging => [
                [0, 0, 0],
                [1, 0, 0],
                [0, 1, 0],
                [0, 0, 1],
                [1, 1, 0],
                [1, 0, 1],
                [0, 1, 1],
                [1, 1, 1],
            ],
            Merging::Mergingv2 => [
                [0, 0, 0],
                [0, 0, 1],
                [0, 1, 0],
                [0, 1, 1],
                [1, 0, 0],
                [1, 0, 1],
                [1, 1, 0],
                [1, 1, 1],
            ],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Swin3dConfig {
    /// Width of the patch embedding, doubled by every stage (SwinUNETR's `feature_size`;
    /// 48 in the SwinUNETR BTCV and VoCo models, 8.06M parameters with one input channel).
    pub feature_size: i64,
    /// Side of the cubic patches of the embedding (2 in SwinUNETR).
    pub patch_size: i64,
    /// Side of the cubic attention windows, in tokens (7 in SwinUNETR).
    pub window_size: i64,
    /// Swin blocks in each of the four stages; within a stage, blocks alternate unshifted and
    /// shifted windows, starting unshifted.
    pub depths: Vec<i64>,
    /// Attention heads in each stage; stage `i`'s width `feature_size * 2^i` must be a
    /// multiple of its count.
    pub num_heads: Vec<i64>,
    /// Width of each block's MLP over the block's width (`int(width * mlp_ratio)`).
    pub mlp_ratio: f64,
    /// A bias in the query-key-value projection.
    pub qkv_bias: bool,
    /// Dropout after the patch embedding, after each attention projection and after each
    /// MLP layer (MONAI's `drop_rate`).
    pub drop_rate: f64,
    /// Dropout on the attention weights (`attn_drop_rate`).
    pub attn_drop_rate: f64,
    /// Stochastic depth: block `j` of the `sum(depths)` drops its residual branches per sample
    /// with probability `dropout_path_rate * j / (sum(depths) - 1)` in training (MONAI's
    /// linear rule).
    pub dropout_path_rate: f64,
    /// Layer-norm each level over channels, without affine parameters (SwinUNETR calls its
    /// encoder with `normalize=True`).
    pub normalize: bool,
    /// A LayerNorm after the patch embedding (`patch_embed.norm`).
    pub patch_norm: bool,
    /// The patch merging layout: `"merging"` (SwinUNETR's default) or `"mergingv2"`.
    pub downsample: Merging,
    /// SwinUNETR-v2: a residual convolution block before each stage (`layers1c` ..).
    pub use_v2: bool,
}

impl Default for Swin3dConfig {
    fn default() -> Self {
        Swin3dConfig {
            feature_size: 48,
            patch_size: 2,
            window_size: 7,
            depths: vec![2, 2, 2, 2],
            num_heads: vec![3, 6, 12, 24],
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_rate: 0.0,
            attn_drop_rate: 0.0,
            dropout_path_rate: 0.0,
            normalize: true,
            patch_norm: false,
            downsample: Merging::Merging,
            use_v2: false,
        }
    }
}

impl Swin3dConfig {
    /// Every constraint the module relies on, each failure naming its config key under `key`.
    fn validate(&self, key: &str) -> Result<()> {
        for (name, value) in [
            ("feature_size", self.feature_size),
            ("patch_size", self.patch_size),
            ("window_size", self.window_size),
        ] {
            ensure!(value >= 1, "config key `{key}.{name}` must be at least 1, got {value}");
        }
        for (name, list) in [("depths", &self.depths), ("num_heads", &self.num_heads)] {
            ensure!(
                list.len() == STAGES && list.iter().all(|&v| v >= 1),
                "config key `{key}.{name}` must list {STAGES} positive numbers, one a stage (MONAI's SwinTransformer \
                 has four stages), got {list:?}"
            );
        }
        for (stage, &heads) in self.num_heads.iter().enumerate() {
            let width = self.width(stage);
            ensure!(
                width % heads == 0,
                "config key `{key}.num_heads`: stage {stage} has width {width} (`{key}.feature_size` = {} times \
                 2^{stage}), not a multiple of its {heads} heads",
                self.feature_size
            );
        }
        ensure!(
            self.mlp_ratio > 0.0 && (self.feature_size as f64 * self.mlp_ratio) as i64 >= 1,
            "config key `{key}.mlp_ratio` must give an MLP at least one unit wide, got {}",
            self.mlp_ratio
        );
        for (name, rate) in [
            ("drop_rate", self.drop_rate),
            ("attn_drop_rate", self.attn_drop_rate),
            ("dropout_path_rate", self.dropout_path_rate),
        ] {
            ensure!(
                (0.0..=1.0).contains(&rate),
                "config key `{key}.{name}` must lie in [0, 1], got {rate}"
            );
        }
        Ok(())
    }

    /// Channels of stage `stage`'s blocks.
    fn width(&self, stage: usize) -> i64 {
        self.feature_size << stage
    }
}

/// Dropout on whole residual branches, per sample, scaled by the keep probability (MONAI's
/// `DropPath`, from timm), in training only.
fn drop_path(x: &Tensor, rate: f64, train: bool) -> Tensor {
    if rate == 0.0 || !train {
        return x.shallow_clone();
    }
    let keep = 1.0 - rate;
    let mut shape = vec![1; x.dim()];
    shape[0] = x.size()[0];
    let mut mask = Tensor::empty(shape, (x.kind(), x.device()));
    let mask = mask.bernoulli_float_(keep);
    if keep > 0.0 {
        x * (mask / keep)
    } else {
        x * mask
    }
}

/// Layer norm over the last axis without affine parameters (MONAI's `F.layer_norm(x, [C])`).
fn plain_layer_norm(x: &Tensor) -> Tensor {
    let channels = *x.size().last().expect("a tensor with channels");
    x.layer_norm([channels], None::<Tensor>, None::<Tensor>, 1e-5, true)
}

/// MONAI's `WindowAttention`: multi-head self-attention within each window, with a learned
/// relative position bias.
struct WindowAttention {
    qkv: nn::Linear,
    proj: nn::Linear,
    /// `[(2w - 1)^3, heads]`.
    relative_position_bias_table: Tensor,
    /// `[w^3, w^3]` int64, a non-trainable variable (MONAI's persistent buffer).
    relative_position_index: Tensor,
    heads: i64,
    attn_drop: f64,
    proj_drop: f64,
}

impl WindowAttention {
    fn new(p: &nn::Path, width: i64, heads: i64, cfg: &Swin3dConfig) -> WindowAttention {
        let w = cfg.window_size;
        let window = [w; 3];
        let relative_position_bias_table = layers::trunc_normal(
            p,
            "relative_position_bias_table",
            &[(2 * w - 1).pow(3), heads],
            0.0,
            0.02,
            [-2.0, 2.0],
        );
        let relative_position_index = p.add(
            "relative_position_index",
            relative_position_index(window, p.device()),
            false,
        );
        let qkv = if cfg.qkv_bias {
            layers::linear(p / "qkv", width, 3 * width)
        } else {
            layers::linear_without_bias(p / "qkv", width, 3 * width)
        };
        WindowAttention {
            qkv,
            proj: layers::linear(p / "proj", width, width),
            relative_position_bias_table,
            relative_position_index,
            heads,
            attn_drop: cfg.attn_drop_rate,
            proj_drop: cfg.drop_rate,
        }
    }

    /// Windows `[B, n, C]` (B = volumes x windows, volume outermost) with an optional
    /// additive mask `[windows, n, n]` to `[B, n, C]`.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        let head_dim = c / self.heads;
        // The projection's outputs are laid out (q|k|v, head, head_dim), as MONAI reads them.
        let qkv = x
            .apply(&self.qkv)
            .reshape([b, n, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let q = q * (head_dim as f64).powf(-0.5);
        let rows = self
            .relative_position_index
            .narrow(0, 0, n)
            .narrow(1, 0, n)
            .reshape([-1]);
        let bias = self
            .relative_position_bias_table
            .index_select(0, &rows)
            .reshape([n, n, -1])
            .permute([2, 0, 1]);
        let mut attn = q.matmul(&k.transpose(-2, -1)) + bias.unsqueeze(0);
        if let Some(mask) = mask {
            let windows = mask.size()[0];
            let mask = mask.to_kind(attn.kind()).unsqueeze(1).unsqueeze(0);
            attn = (attn.reshape([b / windows, windows, self.heads, n, n]) + mask).reshape([b, self.heads, n, n]);
        }
        let attn = attn
            .softmax(-1, attn.kind())
            .dropout(self.attn_drop, train)
            .to_kind(v.kind());
        attn.matmul(&v)
            .transpose(1, 2)
            .reshape([b, n, c])
            .apply(&self.proj)
            .dropout(self.proj_drop, train)
    }
}

/// MONAI's `SwinTransformerBlock` on channels-last tokens `[N, D, H, W, C]`.
struct SwinBlock {
    norm1: nn::LayerNorm,
    attn: WindowAttention,
    norm2: nn::LayerNorm,
    linear1: nn::Linear,
    linear2: nn::Linear,
    window: [i64; 3],
    /// `[0; 3]` for the unshifted blocks.
    shift: [i64; 3],
    drop: f64,
    drop_path: f64,
}

impl SwinBlock {
    fn new(p: &nn::Path, width: i64, heads: i64, shifted: bool, drop_path: f64, cfg: &Swin3dConfig) -> SwinBlock {
        let hidden = (width as f64 * cfg.mlp_ratio) as i64;
        let w = cfg.window_size;
        SwinBlock {
            norm1: layers::layer_norm(p / "norm1", vec![width]),
            attn: WindowAttention::new(&(p / "attn"), width, heads, cfg),
            norm2: layers::layer_norm(p / "norm2", vec![width]),
            linear1: layers::linear(p / "mlp" / "linear1", width, hidden),
            linear2: layers::linear(p / "mlp" / "linear2", hidden, width),
            window: [w; 3],
            shift: if shifted { [w / 2; 3] } else { [0; 3] },
            drop: cfg.drop_rate,
            drop_path,
        }
    }

    /// `mask`: the stage's shifted-window mask, used where this block shifts.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Tensor {
        let size = x.size();
        let (n, grid) = (size[0], [size[1], size[2], size[3]]);
        let (window, shift) = window_and_shift(grid, self.window, self.shift);
        let [dp, hp, wp] = padded(grid, window);
        let padding = [dp - grid[0], hp - grid[1], wp - grid[2]];
        let mut y = x.apply(&self.norm1);
        if padding.iter().any(|&p| p > 0) {
            y = y.constant_pad_nd([0, 0, 0, padding[2], 0, padding[1], 0, padding[0]]);
        }
        let shifted = shift.iter().any(|&s| s > 0);
        if shifted {
            y = y.roll(shift.map(|s| -s), [1, 2, 3]);
        }
        let attended = self
            .attn
            .forward(&partition(&y, window), if shifted { mask } else { None }, train);
        let mut y = reverse(&attended, window, [n, dp, hp, wp]);
        if shifted {
            y = y.roll(shift, [1, 2, 3]);
        }
        if padding.iter().any(|&p| p > 0) {
            y = y.narrow(1, 0, grid[0]).narrow(2, 0, grid[1]).narrow(3, 0, grid[2]);
        }
        let x = x + drop_path(&y, self.drop_path, train);
        let mlp = x
            .apply(&self.norm2)
            .apply(&self.linear1)
            .gelu("none")
            .dropout(self.drop, train)
            .apply(&self.linear2)
            .dropout(self.drop, train);
        &x + drop_path(&mlp, self.drop_path, train)
    }
}

/// MONAI's `PatchMerging` / `PatchMergingV2` on `[N, D, H, W, C]`: to
/// `[N, ceil(D / 2), ceil(H / 2), ceil(W / 2), 2C]`.
struct PatchMerging {
    norm: nn::LayerNorm,
    reduction: nn::Linear,
    layout: Merging,
}

impl PatchMerging {
    fn new(p: &nn::Path, width: i64, layout: Merging) -> PatchMerging {
        PatchMerging {
            norm: layers::layer_norm(p / "norm", vec![8 * width]),
            reduction: layers::linear_without_bias(p / "reduction", 8 * width, 2 * width),
            layout,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let odd = [size[1] % 2, size[2] % 2, size[3] % 2];
        let x = if odd.iter().any(|&o| o > 0) {
            x.constant_pad_nd([0, 0, 0, odd[2], 0, odd[1], 0, odd[0]])
        } else {
            x.shallow_clone()
        };
        let cells: Vec<Tensor> = self
            .layout
            .offsets()
            .iter()
            .map(|&[d, h, w]| x.slice(1, d, None, 2).slice(2, h, None, 2).slice(3, w, None, 2))
            .collect();
        Tensor::cat(&cells, -1).apply(&self.norm).apply(&self.reduction)
    }
}

/// MONAI's `BasicLayer`: the blocks of one stage and its patch merging, on `[N, C, D, H, W]`.
struct Stage {
    blocks: Vec<SwinBlock>,
    downsample: PatchMerging,
    window: [i64; 3],
    shift: [i64; 3],
}

impl Stage {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let size = x.size();
        let grid = [size[2], size[3], size[4]];
        let (window, shift) = window_and_shift(grid, self.window, self.shift);
        // One mask for the stage's shifted blocks, as MONAI's `compute_mask` once a layer.
        let mask = (shift.iter().any(|&s| s > 0) && self.blocks.len() > 1)
            .then(|| windows::shifted_window_mask(padded(grid, window), window, shift, Kind::Float, x.device()));
        let mut tokens = x.permute([0, 2, 3, 4, 1]);
        for block in &self.blocks {
            tokens = block.forward(&tokens, mask.as_ref(), train);
        }
        self.downsample.forward(&tokens).permute([0, 4, 1, 2, 3])
    }
}

pub struct Swin3d {
    cfg: Swin3dConfig,
    /// Its config section's dotted key, for messages.
    key: String,
    in_channels: i64,
    patch_embed: nn::Conv3D,
    patch_norm: Option<nn::LayerNorm>,
    /// SwinUNETR-v2's blocks before each stage; empty without `use_v2`.
    /// SwinUNETR-v2's `layersNc.0`: MONAI's `UnetrBasicBlock(res_block=True)` at the stage's
    /// width before each stage.
    stage_inputs: Vec<UnetrBasicBlock>,
    stages: Vec<Stage>,
    levels: Vec<Level>,
}

impl Swin3d {
    /// The encoder for `in_channels`-channel volumes; `key` is its config section's dotted
    /// key, for messages.
    pub fn new(p: &nn::Path, cfg: Swin3dConfig, in_channels: i64, key: &str) -> Result<Swin3d> {
        cfg.validate(key)?;
        ensure!(
            in_channels >= 1,
            "encoder `swin3d` needs volumes with at least one channel, the data has {in_channels}"
        );
        let embed = p / "patch_embed";
        let geometry = layers::Conv {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let patch_embed = layers::conv3d(&embed / "proj", in_channels, cfg.feature_size, cfg.patch_size, geometry);
        let patch_norm = cfg
            .patch_norm
            .then(|| layers::layer_norm(&embed / "norm", vec![cfg.feature_size]));
        // MONAI's rates: `linspace(0, dropout_path_rate, sum(depths))`, one per block in order.
        let blocks: i64 = cfg.depths.iter().sum();
        let rate = |j: i64| match blocks {
            1 => 0.0,
            _ => cfg.dropout_path_rate * j as f64 / (blocks - 1) as f64,
        };
        let window = [cfg.window_size; 3];
        let mut first = 0;
        let mut stages = Vec::with_capacity(STAGES);
        let mut stage_inputs = Vec::new();
        for stage in 0..STAGES {
            let width = cfg.width(stage);
            let layer = p / format!("layers{}", stage + 1) / "0";
            let blocks = (0..cfg.depths[stage])
                .map(|i| {
                    let block = &layer / "blocks" / i.to_string();
                    SwinBlock::new(&block, width, cfg.num_heads[stage], i % 2 == 1, rate(first + i), &cfg)
                })
                .collect();
            first += cfg.depths[stage];
            stages.push(Stage {
                blocks,
                downsample: PatchMerging::new(&(&layer / "downsample"), width, cfg.downsample),
                window,
                shift: [cfg.window_size / 2; 3],
            });
            if cfg.use_v2 {
                let block = p / format!("layers{}c", stage + 1) / "0";
                stage_inputs.push(UnetrBasicBlock::new(&block, width, width, true));
            }
        }
        let levels = (0..=STAGES)
            .map(|i| Level {
                name: format!("hidden{i}"),
                channels: cfg.feature_size << i,
                stride: cfg.patch_size << i,
            })
            .collect();
        Ok(Swin3d {
            cfg,
            key: key.to_string(),
            in_channels,
            patch_embed,
            patch_norm,
            stage_inputs,
            stages,
            levels,
        })
    }

    /// MONAI's `PatchEmbed`: zero padding at the end of each axis to a multiple of the patch,
    /// the patch convolution, the optional norm over channels.
    fn embed(&self, images: &Tensor) -> Tensor {
        let size = images.size();
        let p = self.cfg.patch_size;
        let pad = |s: i64| (p - s % p) % p;
        let (pd, ph, pw) = (pad(size[2]), pad(size[3]), pad(size[4]));
        let x = if pd + ph + pw > 0 {
            images.constant_pad_nd([0, pw, 0, ph, 0, pd])
        } else {
            images.shallow_clone()
        };
        let x = x.apply(&self.patch_embed);
        match &self.patch_norm {
            Some(norm) => x.permute([0, 2, 3, 4, 1]).apply(norm).permute([0, 4, 1, 2, 3]),
            None => x,
        }
    }

    /// `proj_out`: a level as returned, layer-normed over channels with `normalize`.
    fn level(&self, x: &Tensor) -> Tensor {
        if self.cfg.normalize {
            plain_layer_norm(&x.permute([0, 2, 3, 4, 1]))
                .permute([0, 4, 1, 2, 3])
                .contiguous()
        } else {
            x.contiguous()
        }
    }
}

impl Encoder for Swin3d {
    fn in_channels(&self) -> i64 {
        self.in_channels
    }

    /// With `use_v2`, the block before each stage instance-normalises every channel over the
    /// stage's grid, which needs more than one position: PyTorch's `instance_norm` refuses one
    /// ("Expected more than 1 spatial element"), libtorch's would return zeros and no
    /// gradient. The deepest stage's grid is the binding one.
    fn check_input_size(&self, size: &[i64]) -> Result<()> {
        ensure!(
            size.len() == 3 && size.iter().all(|&s| s >= 1),
            "encoder `swin3d` takes [D, H, W] volumes, got a size of {size:?}"
        );
        if !self.cfg.use_v2 {
            return Ok(());
        }
        let p = self.cfg.patch_size;
        // The patch embedding and each merging pad to a multiple, so sizes round up.
        let mut grid: Vec<i64> = size.iter().map(|&s| (s + p - 1) / p).collect();
        for stage in 0..STAGES {
            ensure!(
                grid.iter().product::<i64>() > 1,
                "config key `{key}.use_v2`: the residual block before stage {} (`layers{}c`) instance-normalises its input, \
                 which crops of {size:?} voxels reduce to a single position ({grid:?}); instance norm cannot normalise one \
                 position (PyTorch refuses it). Use crops of at least {} voxels along one axis, or `use_v2 = false`",
                stage + 1,
                stage + 1,
                p * (1 << (STAGES - 1)) + 1,
                key = self.key
            );
            grid = grid.iter().map(|&g| (g + 1) / 2).collect();
        }
        Ok(())
    }

    fn reference_library(&self) -> Option<ReferenceLibrary> {
        Some(ReferenceLibrary::Monai)
    }

    fn spatial_dims(&self) -> SpatialDims {
        SpatialDims::Three
    }

    fn levels(&self) -> &[Level] {
        &self.levels
    }

    fn embedding_dim(&self) -> i64 {
        self.cfg.feature_size << STAGES
    }

    fn forward(&self, images: &Tensor, train: bool) -> EncoderOutput {
        let size = images.size();
        assert!(
            size.len() == 5 && size[1] == self.in_channels && size[2..].iter().all(|&s| s >= 1),
            "encoder `swin3d` takes [N, {}, D, H, W] volumes, got {size:?}",
            self.in_channels
        );
        let mut x = self.embed(images).dropout(self.cfg.drop_rate, train);
        let mut levels = Vec::with_capacity(STAGES + 1);
        levels.push(self.level(&x));
        for (i, stage) in self.stages.iter().enumerate() {
            if let Some(block) = self.stage_inputs.get(i) {
                x = block.forward(&x);
            }
            x = stage.forward(&x, train);
            levels.push(self.level(&x));
        }
        let last = levels.last().expect("five levels");
        let pooled = last.mean_dim(&[2i64, 3, 4][..], false, last.kind());
        EncoderOutput { levels, pooled }
    }
}

fn build(section: &Section, p: nn::Path, shape: &EncoderShape) -> Result<Box<dyn Encoder>> {
    let cfg: Swin3dConfig = section.parse()?;
    Ok(Box::new(Swin3d::new(&p, cfg, shape.in_channels, &section.key)?))
}

register!(ENCODERS, SWIN3D: EncoderEntry = EncoderEntry {
    name: "swin3d",
    about: "3D Swin transformer (SwinUNETR's swinViT, feature size 48, windows of 7³), MONAI's names; five levels, strides 2 to 32",
    default_config: default_toml::<Swin3dConfig>,
    smoke_configs: &["feature_size = 12\nwindow_size = 4\nnum_heads = [3, 3, 3, 3]"],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::reference_weights::{fill_from_names, smooth_input};
    use medssl_core::registry;

    fn build_swin(vs: &nn::VarStore, body: &str, in_channels: i64) -> Result<Box<dyn Encoder>> {
        let section = Section::inline("encoder", "swin3d", body)?;
        (registry::encoders().get("swin3d")?.build)(&section, vs.root(), &EncoderShape { in_channels })
    }

    fn parameters(vs: &nn::VarStore) -> i64 {
        vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    /// MONAI 1.6.1's `SwinUNETR.swinViT` state_dict names, in MONAI's order: per stage its
    /// blocks, then its merging; the v2 blocks after all stages.
    fn monai_names(depths: &[i64], use_v2: bool) -> Vec<String> {
        let mut names = vec![
            "patch_embed.proj.weight".to_string(),
            "patch_embed.proj.bias".to_string(),
        ];
        for (stage, &depth) in depths.iter().enumerate() {
            let layer = format!("layers{}.0", stage + 1);
            for block in 0..depth {
                for tail in [
                    "norm1.weight",
                    "norm1.bias",
                    "attn.relative_position_bias_table",
                    "attn.relative_position_index",
                    "attn.qkv.weight",
                    "attn.qkv.bias",
                    "attn.proj.weight",
                    "attn.proj.bias",
                    "norm2.weight",
                    "norm2.bias",
                    "mlp.linear1.weight",
                    "mlp.linear1.bias",
                    "mlp.linear2.weight",
                    "mlp.linear2.bias",
                ] {
                    names.push(format!("{layer}.blocks.{block}.{tail}"));
                }
            }
            for tail in ["reduction.weight", "norm.weight", "norm.bias"] {
                names.push(format!("{layer}.downsample.{tail}"));
            }
        }
        if use_v2 {
            for stage in 1..=STAGES {
                for conv in ["conv1", "conv2"] {
                    names.push(format!("layers{stage}c.0.layer.{conv}.conv.weight"));
                }
            }
        }
        names
    }

    /// MONAI 1.6.1 (torch 2.13.0): `SwinUNETR(in_channels=1, out_channels=14,
    /// feature_size=48).swinViT` has 8,062,002 parameters in 126 state_dict tensors (the 8
    /// `relative_position_index` buffers among them, int64 [343, 343]), the first
    /// `patch_embed.proj.weight`; with `use_v2=True`, 18,637,362 parameters in 134 tensors.
    #[test]
    fn swin_unetr_sizes_have_monais_parameter_counts_names_and_shapes() {
        for (body, use_v2, count, tensors) in [("", false, 8_062_002, 126), ("use_v2 = true", true, 18_637_362, 134)] {
            let vs = nn::VarStore::new(Device::Cpu);
            let swin = build_swin(&vs, body, 1).unwrap();
            assert_eq!(parameters(&vs), count, "{body}");
            let vars = vs.variables();
            assert_eq!(vars.len(), tensors, "{body}");
            let expected = monai_names(&[2, 2, 2, 2], use_v2);
            assert_eq!(expected.len(), tensors);
            let mut names: Vec<&String> = vars.keys().collect();
            let mut sorted = expected.clone();
            names.sort();
            sorted.sort();
            assert_eq!(names, sorted.iter().collect::<Vec<_>>(), "{body}");
            assert_eq!(expected[0], "patch_embed.proj.weight");
            for (name, shape) in [
                ("patch_embed.proj.weight", vec![48, 1, 2, 2, 2]),
                ("layers1.0.blocks.0.attn.relative_position_bias_table", vec![2197, 3]),
                ("layers4.0.blocks.1.attn.relative_position_bias_table", vec![2197, 24]),
                ("layers1.0.blocks.0.attn.relative_position_index", vec![343, 343]),
                ("layers2.0.blocks.0.attn.qkv.weight", vec![288, 96]),
                ("layers4.0.blocks.0.mlp.linear1.weight", vec![1536, 384]),
                ("layers1.0.downsample.reduction.weight", vec![96, 384]),
                ("layers4.0.downsample.norm.weight", vec![3072]),
            ] {
                assert_eq!(vars[name].size(), shape, "{name}");
            }
            let index = &vars["layers3.0.blocks.1.attn.relative_position_index"];
            assert_eq!(index.kind(), Kind::Int64);
            assert!(!index.requires_grad());
            if use_v2 {
                assert_eq!(vars["layers4c.0.layer.conv2.conv.weight"].size(), [384, 384, 3, 3, 3]);
            }
            assert_eq!(swin.spatial_dims(), SpatialDims::Three);
            assert_eq!(swin.input_size(), None);
            assert_eq!(swin.reference_library(), Some(ReferenceLibrary::Monai));
            let levels: Vec<(&str, i64, i64)> = swin
                .levels()
                .iter()
                .map(|l| (l.name.as_str(), l.channels, l.stride))
                .collect();
            assert_eq!(
                levels,
                [
                    ("hidden0", 48, 2),
                    ("hidden1", 96, 4),
                    ("hidden2", 192, 8),
                    ("hidden3", 384, 16),
                    ("hidden4", 768, 32)
                ]
            );
            assert_eq!(swin.embedding_dim(), 768);
        }
        // Options that change the names: a norm after the patch embedding, no qkv bias.
        let vs = nn::VarStore::new(Device::Cpu);
        build_swin(&vs, "feature_size = 12\npatch_norm = true\nqkv_bias = false", 1).unwrap();
        let vars = vs.variables();
        assert!(vars.contains_key("patch_embed.norm.weight"));
        assert!(!vars.contains_key("layers1.0.blocks.0.attn.qkv.bias"));
    }

    /// MONAI's initialisation: bias tables N(0, 0.02²), everything else PyTorch's defaults;
    /// the index buffers hold the relative positions.
    #[test]
    fn initialisation_follows_monai() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        build_swin(&vs, "feature_size = 24\nuse_v2 = true", 1).unwrap();
        let vars = vs.variables();
        let max = |name: &str| vars[name].abs().max().double_value(&[]);
        let table = vars["layers2.0.blocks.1.attn.relative_position_bias_table"]
            .std(true)
            .double_value(&[]);
        assert!((table / 0.02 - 1.0).abs() < 0.05, "bias table std {table}");
        for (name, fan_in) in [
            ("patch_embed.proj.weight", 8.0),
            ("patch_embed.proj.bias", 8.0),
            ("layers1.0.blocks.0.attn.qkv.weight", 24.0),
            ("layers2.0.blocks.1.mlp.linear2.weight", 192.0),
            ("layers3.0.downsample.reduction.weight", 8.0 * 96.0),
            ("layers2c.0.layer.conv1.conv.weight", 48.0 * 27.0),
        ] {
            let bound = 1.0 / f64::sqrt(fan_in);
            assert!(
                max(name) <= bound && max(name) > 0.8 * bound,
                "{name}: {} vs {bound}",
                max(name)
            );
        }
        for norm in [
            "layers1.0.blocks.0.norm1",
            "layers4.0.blocks.1.norm2",
            "layers2.0.downsample.norm",
        ] {
            assert_eq!(vars[&format!("{norm}.weight")].mean(Kind::Float).double_value(&[]), 1.0);
            assert_eq!(max(&format!("{norm}.bias")), 0.0);
        }
        let index = &vars["layers1.0.blocks.0.attn.relative_position_index"];
        assert!(index.equal(&relative_position_index([7, 7, 7], Device::Cpu)));
    }

    /// A naive window attention for one window: per head, softmax(q kᵀ / sqrt(d) + bias +
    /// mask) v, the bias looked up entry by entry.
    fn naive_window_attention(attn: &WindowAttention, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (n, c) = (x.size()[0], x.size()[1]);
        let d = c / attn.heads;
        let qkv = x.apply(&attn.qkv);
        let mut heads = Vec::new();
        for h in 0..attn.heads {
            let q = qkv.narrow(1, h * d, d);
            let k = qkv.narrow(1, c + h * d, d);
            let v = qkv.narrow(1, 2 * c + h * d, d);
            let mut scores = q.matmul(&k.tr()) / (d as f64).sqrt();
            let bias = Tensor::zeros([n, n], (Kind::Double, Device::Cpu));
            for i in 0..n {
                for j in 0..n {
                    let row = attn.relative_position_index.int64_value(&[i, j]);
                    let _ = bias
                        .get(i)
                        .get(j)
                        .fill_(attn.relative_position_bias_table.double_value(&[row, h]));
                }
            }
            scores += bias;
            if let Some(mask) = mask {
                scores += mask;
            }
            heads.push(scores.softmax(-1, Kind::Double).matmul(&v));
        }
        Tensor::cat(&heads, 1).apply(&attn.proj)
    }

    #[test]
    fn window_attention_equals_a_naive_per_window_attention() {
        tch::manual_seed(3);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let cfg = Swin3dConfig {
            window_size: 2,
            ..Default::default()
        };
        let attn = WindowAttention::new(&(vs.root() / "attn"), 6, 2, &cfg);
        vs.double();
        // Two windows of 8 tokens; the second one masked as a shifted window would be.
        let x = Tensor::randn([2, 8, 6], (Kind::Double, Device::Cpu));
        let mask = windows::shifted_window_mask([2, 2, 4], [2, 2, 2], [0, 0, 1], Kind::Double, Device::Cpu);
        assert!(mask.get(0).abs().max().double_value(&[]) == 0.0 && mask.get(1).abs().max().double_value(&[]) > 0.0);
        let out = attn.forward(&x, Some(&mask), false);
        for w in 0..2 {
            let naive = naive_window_attention(&attn, &x.get(w), Some(&mask.get(w)));
            let diff = (out.get(w) - naive).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "window {w}: {diff}");
        }
        // A window that shrank (4 of 8 tokens) reads the first 4 x 4 entries of the index.
        let small = Tensor::randn([1, 4, 6], (Kind::Double, Device::Cpu));
        let naive = naive_window_attention(&attn, &small.get(0), None);
        let diff = (attn.forward(&small, None, false).get(0) - naive)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-12, "{diff}");
    }

    /// One level against MONAI's: shape, `Σ x_j cos(0.37 j)`, `Σ x_j²` and four elements.
    type Reference = (&'static [i64], f64, f64, [(i64, f64); 4]);

    fn assert_matches(what: &str, t: &Tensor, (shape, weighted, squares, at): &Reference) {
        assert_eq!(t.size(), *shape, "{what}");
        let flat = t.flatten(0, -1);
        let j = Tensor::arange(flat.numel() as i64, (Kind::Double, Device::Cpu));
        let w = (&flat * (j * 0.37).cos()).sum(Kind::Double).double_value(&[]);
        let q = flat.square().sum(Kind::Double).double_value(&[]);
        assert!(
            (w - weighted).abs() < 1e-9 * squares.sqrt(),
            "{what}: weighted sum {w} vs MONAI {weighted}"
        );
        assert!(
            (q / squares - 1.0).abs() < 1e-10,
            "{what}: sum of squares {q} vs MONAI {squares}"
        );
        for &(i, expected) in at {
            let v = flat.double_value(&[i]);
            assert!((v - expected).abs() < 1e-9, "{what}[{i}]: {v} vs MONAI {expected}");
        }
    }

    /// The same weights and input as a reference run of MONAI 1.6.1's `SwinTransformer`
    /// (torch 2.13.0, CPU, float64, eval mode) give the same five levels within 1e-9:
    /// padding at the embedding and the mergings, shifted windows with their mask, windows
    /// shrunk to small stages (and the index they then read), both merging layouts, the v2
    /// blocks, the patch norm and `normalize` agree, not only the names.
    #[test]
    fn forward_pass_equals_monais() {
        let default: [Reference; 5] = [
            (
                &[2, 12, 20, 18, 17],
                1.3181093491243852,
                146685.55875517358,
                [
                    (0, 1.1796240854162312),
                    (48960, 0.970183051976648),
                    (97920, -1.5949099894755243),
                    (146879, -0.9755793267926596),
                ],
            ),
            (
                &[2, 24, 10, 9, 9],
                370.18879241394677,
                38878.1692461865,
                [
                    (0, -0.8229093552730117),
                    (12960, -1.3739832308417812),
                    (25920, 1.116134449662437),
                    (38879, -1.285071940190749),
                ],
            ),
            (
                &[2, 48, 5, 5, 5],
                17.461143289635725,
                11999.878078919479,
                [
                    (0, -0.2511092062684737),
                    (4000, 0.23852907172936294),
                    (8000, -1.392989682367769),
                    (11999, -1.19857499725305),
                ],
            ),
            (
                &[2, 96, 3, 3, 3],
                -4.13664533939315,
                5183.981037332231,
                [
                    (0, -0.9337478234696129),
                    (1728, -0.7516351330733201),
                    (3456, -0.8426145068646265),
                    (5183, -1.4108923225846988),
                ],
            ),
            (
                &[2, 192, 2, 2, 2],
                9.679859714082868,
                3071.997560635323,
                [
                    (0, -0.5314203993826835),
                    (1024, 0.3594316757628714),
                    (2048, -0.09166217335870158),
                    (3071, -1.0874712098549437),
                ],
            ),
        ];
        let options: [Reference; 5] = [
            (
                &[1, 12, 7, 20, 24],
                35.01879133560883,
                43749.817192560935,
                [
                    (0, 0.04413134958704247),
                    (13440, -1.6931745035119568),
                    (26880, -0.1854713544647524),
                    (40319, 1.308338332580518),
                ],
            ),
            (
                &[1, 24, 4, 10, 12],
                51.9610860319775,
                6519.22169158792,
                [
                    (0, 0.004108996271318819),
                    (3840, -0.0532385878479763),
                    (7680, 0.09446731643551236),
                    (11519, -1.302090375536385),
                ],
            ),
            (
                &[1, 48, 2, 5, 6],
                9.452569478161744,
                2151.5425505634466,
                [
                    (0, -0.6051083517618931),
                    (960, -1.4159528978372076),
                    (1920, 0.5479887712621749),
                    (2879, -0.9554648580636751),
                ],
            ),
            (
                &[1, 96, 1, 3, 3],
                3.49753454109724,
                1552.5736100338208,
                [
                    (0, -0.9213851354231773),
                    (288, -0.7932140785379111),
                    (576, -0.6598818763006787),
                    (863, -1.6029226082098535),
                ],
            ),
            (
                &[1, 192, 1, 2, 2],
                -4.626186377753333,
                12430.121920841084,
                [
                    (0, -2.3554583746127062),
                    (256, -0.7401441463392564),
                    (512, 0.9515984432273218),
                    (767, -4.337868569940281),
                ],
            ),
        ];
        // (case, config, input channels, input shape, levels, pooled[0, ..3]).
        type Case<'a> = (&'a str, &'a str, i64, &'a [i64], &'a [Reference; 5], [f64; 3]);
        let cases: [Case; 2] = [
            (
                "default",
                "feature_size = 12",
                1,
                &[2, 1, 40, 36, 34],
                &default,
                [-0.5587477574230507, 0.9864586162502901, -1.2553448192361198],
            ),
            (
                "options",
                "feature_size = 12\nwindow_size = 4\ndepths = [2, 1, 1, 2]\nnum_heads = [2, 2, 4, 4]\nmlp_ratio = 2.0\n\
                 qkv_bias = false\npatch_norm = true\ndownsample = \"mergingv2\"\nuse_v2 = true\nnormalize = false",
                2,
                &[1, 2, 13, 40, 47],
                &options,
                [-2.7234906884619523, 4.3301456582492595, -5.294186145721108],
            ),
        ];
        for (case, body, in_channels, shape, reference, pooled) in cases {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let swin = build_swin(&vs, body, in_channels).unwrap();
            vs.double();
            fill_from_names(&vs, &[]);
            let out = swin.forward(&smooth_input(shape, Kind::Double), false);
            assert_eq!(out.levels.len(), 5);
            for (i, (level, expected)) in out.levels.iter().zip(reference).enumerate() {
                assert_eq!(level.kind(), Kind::Double);
                assert_matches(&format!("{case} hidden{i}"), level, expected);
            }
            for (k, expected) in pooled.iter().enumerate() {
                let v = out.pooled.double_value(&[0, k as i64]);
                assert!(
                    (v - expected).abs() < 1e-9,
                    "{case} pooled[0, {k}]: {v} vs MONAI {expected}"
                );
            }
        }
    }

    /// A small encoder for shape and gradient tests.
    const TINY: &str = "feature_size = 12\nwindow_size = 4\nnum_heads = [3, 3, 3, 3]";

    #[test]
    fn levels_have_monais_shapes_for_even_and_odd_sizes() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let swin = build_swin(&vs, TINY, 1).unwrap();
        // MONAI 1.6.1's SwinTransformer(embed_dim=12) levels for these inputs.
        for (input, expected) in [
            (
                [1, 1, 32, 32, 32],
                [[16, 16, 16], [8, 8, 8], [4, 4, 4], [2, 2, 2], [1, 1, 1]],
            ),
            (
                [1, 1, 33, 40, 48],
                [[17, 20, 24], [9, 10, 12], [5, 5, 6], [3, 3, 3], [2, 2, 2]],
            ),
            (
                [2, 1, 16, 16, 16],
                [[8, 8, 8], [4, 4, 4], [2, 2, 2], [1, 1, 1], [1, 1, 1]],
            ),
        ] {
            let out = swin.forward(&Tensor::randn(input, (Kind::Float, Device::Cpu)), false);
            for (i, (level, grid)) in out.levels.iter().zip(expected).enumerate() {
                let mut shape = vec![input[0], 12 << i];
                shape.extend(grid);
                assert_eq!(level.size(), shape, "{input:?} hidden{i}");
            }
            assert_eq!(out.pooled.size(), [input[0], 192]);
            // Each position of a normalised level has mean 0 and variance 1 over channels.
            let last = out.levels.last().unwrap();
            let mean = last.mean_dim(1, false, Kind::Float).abs().max().double_value(&[]);
            assert!(mean < 1e-5, "{mean}");
            let pooled = last.mean_dim(&[2i64, 3, 4][..], false, Kind::Float);
            assert!(out.pooled.allclose(&pooled, 1e-6, 1e-7, false));
        }
    }

    #[test]
    fn v2_refuses_crops_that_leave_a_stage_one_position_to_normalise() {
        let (vs, vs2) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
        let plain = build_swin(&vs, TINY, 1).unwrap();
        let v2 = build_swin(&vs2, &format!("{TINY}\nuse_v2 = true"), 1).unwrap();
        // Patch 2, then three mergings before the last v2 block: 16 voxels leave it
        // [1, 1, 1], 17 leave it 2 along that axis.
        for size in [[16, 16, 16], [8, 8, 8], [1, 1, 1]] {
            plain.check_input_size(&size).unwrap();
            let text = format!("{:#}", v2.check_input_size(&size).unwrap_err());
            assert!(
                text.contains("encoder.use_v2")
                    && text.contains("at least 17 voxels")
                    && text.contains(&format!("{size:?}")),
                "{text}"
            );
        }
        let text = format!("{:#}", v2.check_input_size(&[16, 16, 16]).unwrap_err());
        assert!(
            text.contains("stage 4 (`layers4c`)") && text.contains("[1, 1, 1]"),
            "{text}"
        );
        let text = format!("{:#}", v2.check_input_size(&[4, 4, 4]).unwrap_err());
        assert!(text.contains("stage 2 (`layers2c`)"), "{text}");
        for size in [[17, 16, 16], [16, 16, 17], [32, 32, 32], [64, 64, 64]] {
            v2.check_input_size(&size).unwrap();
        }
        assert!(v2.check_input_size(&[16, 16]).is_err());
    }

    #[test]
    fn gradients_reach_every_parameter_and_evaluation_is_deterministic() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        // Dropout on, stochastic depth off: a branch dropped for every sample would get no
        // gradient (stochastic depth has its own test).
        let body = format!("{TINY}\nuse_v2 = true\npatch_norm = true\ndrop_rate = 0.1\nattn_drop_rate = 0.1");
        let swin = build_swin(&vs, &body, 2).unwrap();
        let x = Tensor::randn([2, 2, 20, 24, 18], (Kind::Float, Device::Cpu));
        let out = swin.forward(&x, true);
        let mut loss = out.pooled.square().sum(Kind::Float);
        for level in &out.levels {
            loss += (level * level.randn_like()).sum(Kind::Float);
        }
        loss.backward();
        for (name, var) in vs.variables() {
            if name.ends_with("relative_position_index") {
                assert!(!var.requires_grad(), "{name}");
                continue;
            }
            let grad = var.grad();
            let norm = if grad.defined() {
                grad.norm().double_value(&[])
            } else {
                0.0
            };
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
        }
        // Dropout acts in training only.
        let a = swin.forward(&x, false).pooled;
        let b = swin.forward(&x, false).pooled;
        assert!(a.equal(&b));
        let c = swin.forward(&x, true).pooled;
        assert!(!a.allclose(&c, 1e-6, 1e-6, false));
    }

    #[test]
    fn drop_path_drops_whole_samples_and_keeps_the_mean() {
        tch::manual_seed(4);
        let x = Tensor::ones([4000, 3, 2], (Kind::Float, Device::Cpu));
        let y = drop_path(&x, 0.25, true);
        // Each sample is all 0 or all 1 / 0.75.
        let per_sample = y.flatten(1, -1);
        let (lo, hi) = (per_sample.amin(1, false), per_sample.amax(1, false));
        assert!(lo.equal(&hi));
        let kept = hi.gt(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!((kept - 0.75).abs() < 0.03, "{kept}");
        assert!((y.mean(Kind::Float).double_value(&[]) - 1.0).abs() < 0.05);
        assert!(drop_path(&x, 0.25, false).equal(&x));
        assert_eq!(drop_path(&x, 1.0, true).abs().max().double_value(&[]), 0.0);
    }

    #[test]
    #[should_panic(expected = "encoder `swin3d` takes [N, 1, D, H, W] volumes")]
    fn an_image_of_another_rank_is_refused_with_the_expected_shape() {
        let vs = nn::VarStore::new(Device::Cpu);
        let swin = build_swin(&vs, TINY, 1).unwrap();
        swin.forward(&Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu)), false);
    }

    #[test]
    fn bad_configs_are_clear_errors_naming_the_key() {
        let message = |body: &str| {
            let vs = nn::VarStore::new(Device::Cpu);
            format!(
                "{:#}",
                build_swin(&vs, body, 1)
                    .err()
                    .unwrap_or_else(|| panic!("`{body}` builds"))
            )
        };
        for (body, expected) in [
            ("depths = [2, 2, 2]", &["encoder.depths", "4 positive"][..]),
            ("num_heads = [3, 6, 12, 0]", &["encoder.num_heads"]),
            (
                "feature_size = 10",
                &["encoder.num_heads", "stage 0", "width 10", "3 heads"],
            ),
            ("window_size = 0", &["encoder.window_size"]),
            ("dropout_path_rate = 1.5", &["encoder.dropout_path_rate"]),
            ("downsample = \"pool\"", &["encoder.downsample"]),
            ("drop_path_rate = 0.1", &["encoder.drop_path_rate"]),
        ] {
            let text = message(body);
            for e in expected {
                assert!(text.contains(e), "`{body}`: {text}");
            }
        }
    }

    /// What `medssl export --prefix swinViT.` writes, `encoder.init` with `init_prefix =
    /// "swinViT."` reads back strictly: every parameter and the int64 index buffers.
    #[test]
    fn weights_round_trip_through_a_swin_unetr_file_strictly() {
        tch::manual_seed(5);
        let (source, target) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
        build_swin(&source, TINY, 1).unwrap();
        build_swin(&target, TINY, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("swin_unetr.safetensors");
        let mut exported: Vec<(String, Tensor)> = source
            .variables()
            .into_iter()
            .map(|(name, t)| (format!("swinViT.{name}"), t))
            .collect();
        // A decoder tensor beside the encoder's, as in a SwinUNETR state_dict.
        exported.push((
            "encoder1.layer.conv1.conv.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ));
        medssl_core::checkpoint::write_safetensors(&file, &exported).unwrap();
        let variables: Vec<(String, Tensor)> = target.variables().into_iter().collect();
        let report = medssl_core::encoder_init::load(&file, "swinViT.", true, &variables).unwrap();
        assert_eq!(report.loaded, variables.len());
        for (name, t) in source.variables() {
            assert!(target.variables()[&name].equal(&t), "{name}");
        }
        // A file without the index buffers is refused strictly, naming one.
        let without: Vec<(String, Tensor)> = exported
            .into_iter()
            .filter(|(name, _)| !name.ends_with("relative_position_index"))
            .collect();
        medssl_core::checkpoint::write_safetensors(&file, &without).unwrap();
        let err = format!(
            "{:#}",
            medssl_core::encoder_init::load(&file, "swinViT.", true, &variables).unwrap_err()
        );
        assert!(
            err.contains("8 missing") && err.contains("relative_position_index"),
            "{err}"
        );
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::encoders().get("swin3d")?;
        let section = Section::inline("encoder", "swin3d", &(entry.default_config)())?;
        assert_eq!(section.parse::<Swin3dConfig>()?, Swin3dConfig::default());
        for smoke in entry.smoke_configs {
            let vs = nn::VarStore::new(Device::Cpu);
            let swin = build_swin(&vs, smoke, 1)?;
            let out = swin.forward(&Tensor::zeros([1, 1, 32, 32, 32], (Kind::Float, Device::Cpu)), true);
            assert_eq!(out.levels.len(), 5);
        }
        Ok(())
    }
}
