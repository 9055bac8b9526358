//! The Vision Transformer over 3D patches (Dosovitskiy et al., "An Image is Worth 16x16
//! Words: Transformers for Image Recognition at Scale", ICLR 2021), as MONAI builds it for
//! volumes (`monai.networks.nets.ViT`, MONAI 1.6): the encoder of UNETR (Hatamizadeh et al.,
//! WACV 2022) and of MONAI's ViT reconstruction pre-training.
//!
//! A volume `[N, C, D, H, W]` is cut into non-overlapping cubes of `patch_size` voxels by one
//! 3D convolution (kernel = stride = patch), which gives one token a cube; a learned position
//! embedding is added to each token, and `num_layers` pre-norm transformer blocks follow
//! (`x + attn(norm1(x))`, then `x + mlp(norm2(x))`; attention softmax(q kᵀ / sqrt(d)) v over
//! `num_heads` heads, MLP with exact (erf) GELU), then a final LayerNorm.
//!
//! Parameter names are MONAI's, under the encoder's path: `patch_embedding.position_embeddings`,
//! `patch_embedding.patch_embeddings.{weight,bias}`, `blocks.N.{norm1, attn.qkv, attn.out_proj,
//! norm2, mlp.linear1, mlp.linear2, norm_cross_attn}`, `norm`, so a MONAI ViT's state_dict (or
//! a UNETR's `vit.` entries) loads strictly. MONAI 1.6 keeps `norm_cross_attn` in every block
//! even without cross-attention, which this encoder never uses; it is built here, unused, only
//! so that the two sets of names are equal.
//!
//! Initialisation as MONAI's: the position embeddings from a normal with std 0.02 truncated to
//! [-2, 2] (`PatchEmbeddingBlock`); its `_init_weights` reaches no other parameter, since the
//! block holds no Linear or LayerNorm under the default convolutional projection. Every other
//! layer keeps PyTorch's defaults: the patch convolution and the Linear layers
//! `kaiming_uniform_(a = sqrt(5))` with bias U(±1 / sqrt(fan_in)), LayerNorms scale 1 and shift
//! 0 ([`medssl_core::layers`]).
//!
//! What medssl does differently, on purpose:
//! - Levels. MONAI's `forward` returns the final normed tokens and the list of every block's
//!   output (`hidden_states_out`); UNETR reads `hidden_states_out[3]`, `[6]` and `[9]`, the
//!   outputs of `blocks.3`, `blocks.6` and `blocks.9` (0-based: the 4th, 7th and 10th of 12),
//!   before the final norm, and the normed output. Here `levels` lists the blocks whose outputs
//!   are levels (default [3, 6, 9], named `block3`, ...), and the final normed output is always
//!   the last level (`norm`). Each is the token sequence laid back on its patch grid,
//!   `[N, hidden_size, D / p, H / p, W / p]` (MONAI UNETR's `proj_feat`), so a 3D decoder reads
//!   it as it reads a convolutional feature map; every level has stride `patch_size`.
//! - Pooled embedding. MONAI's ViT without classification has none (its `cls_token` exists
//!   only with `classification = True`); here it is the mean over tokens of the final normed
//!   output, the volume embedding of runs that pre-train with a 3D encoder.
//! - One patch size on every axis (a level's stride is one number), and `img_size` a multiple
//!   of it on each axis: MONAI's convolutional projection would drop the remainder voxels,
//!   which UNETR's decoder could not give back.
//! - The attention is libtorch's `scaled_dot_product_attention` with MONAI's scale
//!   (head dim^-0.5): the same softmax(q kᵀ scale) v as MONAI's `SABlock` (which computes it
//!   with einsum unless `use_flash_attention`), with dropout on the attention weights at
//!   `dropout_rate` in training as `SABlock`'s `drop_weights`; it picks a fused kernel where
//!   one exists (flash or memory-efficient on CUDA), the same mathematics in fewer passes.

use medssl_core::encoder::SpatialDims;
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ViT3dConfig {
    /// `[D, H, W]` of the crops it takes: the learned position embeddings fix the patch grid,
    /// so this is the one input size (96³ in UNETR and MONAI's ViT pre-training).
    pub img_size: [i64; 3],
    /// Side of the cubic patches, the stride of every level (16 in UNETR, which assumes it).
    pub patch_size: i64,
    /// Token width (768 for ViT-Base).
    pub hidden_size: i64,
    /// Width of each block's MLP (3072 for ViT-Base).
    pub mlp_dim: i64,
    /// Transformer blocks (12 for ViT-Base).
    pub num_layers: i64,
    /// Attention heads; `hidden_size` must be a multiple of it.
    pub num_heads: i64,
    /// Dropout after the position embedding, on the attention weights, after the attention
    /// projection and after each MLP layer, as MONAI places it.
    pub dropout_rate: f64,
    /// A bias in the query-key-value projection (MONAI's default: none).
    pub qkv_bias: bool,
    /// Blocks (0-based) whose outputs are levels, ascending; the final normed output is
    /// always the last level. [3, 6, 9] are the blocks whose outputs UNETR's skip connections
    /// read (`hidden_states_out[3]`, `[6]`, `[9]`).
    pub levels: Vec<i64>,
}

impl Default for ViT3dConfig {
    fn default() -> Self {
        ViT3dConfig {
            img_size: [96, 96, 96],
            patch_size: 16,
            hidden_size: 768,
            mlp_dim: 3072,
            num_layers: 12,
            num_heads: 12,
            dropout_rate: 0.0,
            qkv_bias: false,
            levels: vec![3, 6, 9],
        }
    }
}

impl ViT3dConfig {
    /// Every constraint the module relies on, each failure naming its config key under `key`.
    fn validate(&self, key: &str) -> Result<()> {
        ensure!(
            self.patch_size >= 1,
            "config key `{key}.patch_size` must be at least 1, got {}",
            self.patch_size
        );
        for (axis, &size) in ["D", "H", "W"].iter().zip(&self.img_size) {
            ensure!(
                size >= self.patch_size && size % self.patch_size == 0,
                "config key `{key}.img_size`: {axis} = {size} must be a positive multiple of `{key}.patch_size` = {} \
                 (the patch grid tiles the crop exactly)",
                self.patch_size
            );
        }
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("mlp_dim", self.mlp_dim),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ] {
            ensure!(value >= 1, "config key `{key}.{name}` must be at least 1, got {value}");
        }
        ensure!(
            self.hidden_size % self.num_heads == 0,
            "config key `{key}.hidden_size` = {} must be a multiple of `{key}.num_heads` = {}",
            self.hidden_size,
            self.num_heads
        );
        ensure!(
            (0.0..=1.0).contains(&self.dropout_rate),
            "config key `{key}.dropout_rate` must lie in [0, 1], got {}",
            self.dropout_rate
        );
        for (i, &level) in self.levels.iter().enumerate() {
            ensure!(
                (0..self.num_layers).contains(&level),
                "config key `{key}.levels`: block {level} does not exist; blocks are 0..{} (`{key}.num_layers` = {})",
                self.num_layers - 1,
                self.num_layers
            );
            ensure!(
                i == 0 || self.levels[i - 1] < level,
                "config key `{key}.levels` must list blocks in ascending order without repeats, got {:?}",
                self.levels
            );
        }
        Ok(())
    }

    /// Patches along each axis.
    fn grid(&self) -> [i64; 3] {
        self.img_size.map(|s| s / self.patch_size)
    }
}

/// MONAI's `SABlock` with one combined query-key-value projection (`attn.qkv`, `attn.out_proj`).
struct Attention {
    qkv: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
    dropout: f64,
}

impl Attention {
    fn new(p: &nn::Path, cfg: &ViT3dConfig) -> Attention {
        let (hidden, qkv) = (cfg.hidden_size, 3 * cfg.hidden_size);
        let qkv = if cfg.qkv_bias {
            layers::linear(p / "qkv", hidden, qkv)
        } else {
            layers::linear_without_bias(p / "qkv", hidden, qkv)
        };
        Attention {
            qkv,
            out_proj: layers::linear(p / "out_proj", hidden, hidden),
            heads: cfg.num_heads,
            dropout: cfg.dropout_rate,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let size = x.size();
        let (n, length, width) = (size[0], size[1], size[2]);
        let head_dim = width / self.heads;
        // The projection's output axis is laid out (q|k|v, head, head_dim), as MONAI's
        // rearrange "b h (qkv l d) -> qkv b l h d" reads it: [3, N, heads, L, head_dim].
        let qkv = x
            .apply(&self.qkv)
            .reshape([n, length, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let dropout = if train { self.dropout } else { 0.0 };
        let scale = (head_dim as f64).powf(-0.5);
        let attended = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, dropout, false, scale, false);
        // Back to [N, L, heads * head_dim], heads outermost ("b l h d -> b h (l d)").
        let merged = attended.permute([0, 2, 1, 3]).reshape([n, length, width]);
        merged.apply(&self.out_proj).dropout(self.dropout, train)
    }
}

/// MONAI's `MLPBlock` in its "vit" dropout mode: dropout after the GELU and after `linear2`.
struct Mlp {
    linear1: nn::Linear,
    linear2: nn::Linear,
    dropout: f64,
}

impl Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        x.apply(&self.linear1)
            .gelu("none")
            .dropout(self.dropout, train)
            .apply(&self.linear2)
            .dropout(self.dropout, train)
    }
}

/// MONAI's pre-norm `TransformerBlock` without cross-attention.
struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    norm2: nn::LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(p: &nn::Path, cfg: &ViT3dConfig) -> Block {
        let hidden = cfg.hidden_size;
        // Built for its names only: MONAI 1.6 keeps it in every block's state_dict. It is
        // frozen, since nothing reads it: PyTorch's optimizers skip it too (its gradient stays
        // None), and the composition test's "every trainable tensor gets a gradient" holds.
        let norm_cross_attn = layers::layer_norm(p / "norm_cross_attn", vec![hidden]);
        for t in norm_cross_attn.ws.iter().chain(norm_cross_attn.bs.iter()) {
            let _ = t.shallow_clone().set_requires_grad(false);
        }
        Block {
            norm1: layers::layer_norm(p / "norm1", vec![hidden]),
            attn: Attention::new(&(p / "attn"), cfg),
            norm2: layers::layer_norm(p / "norm2", vec![hidden]),
            mlp: Mlp {
                linear1: layers::linear(p / "mlp" / "linear1", hidden, cfg.mlp_dim),
                linear2: layers::linear(p / "mlp" / "linear2", cfg.mlp_dim, hidden),
                dropout: cfg.dropout_rate,
            },
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x = x + self.attn.forward(&x.apply(&self.norm1), train);
        &x + self.mlp.forward(&x.apply(&self.norm2), train)
    }
}

pub struct ViT3d {
    cfg: ViT3dConfig,
    in_channels: i64,
    patch_embeddings: nn::Conv3D,
    position_embeddings: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    levels: Vec<Level>,
}

impl ViT3d {
    /// The encoder for `in_channels`-channel crops; `key` is its config section's dotted key,
    /// for messages.
    pub fn new(p: &nn::Path, cfg: ViT3dConfig, in_channels: i64, key: &str) -> Result<ViT3d> {
        cfg.validate(key)?;
        ensure!(
            in_channels >= 1,
            "encoder `vit3d` needs images with at least one channel, the data has {in_channels}"
        );
        let embedding = p / "patch_embedding";
        let conv = layers::Conv {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let patch_embeddings = layers::conv3d(
            &embedding / "patch_embeddings",
            in_channels,
            cfg.hidden_size,
            cfg.patch_size,
            conv,
        );
        let patches: i64 = cfg.grid().iter().product();
        let position_embeddings = layers::trunc_normal(
            &embedding,
            "position_embeddings",
            &[1, patches, cfg.hidden_size],
            0.0,
            0.02,
            [-2.0, 2.0],
        );
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(&(p / "blocks" / i.to_string()), &cfg))
            .collect();
        let norm = layers::layer_norm(p / "norm", vec![cfg.hidden_size]);
        let level = |name: String| Level {
            name,
            channels: cfg.hidden_size,
            stride: cfg.patch_size,
        };
        let levels = cfg
            .levels
            .iter()
            .map(|i| level(format!("block{i}")))
            .chain([level("norm".into())])
            .collect();
        Ok(ViT3d {
            cfg,
            in_channels,
            patch_embeddings,
            position_embeddings,
            blocks,
            norm,
            levels,
        })
    }

    /// Tokens `[N, L, C]` on their patch grid `[N, C, D / p, H / p, W / p]` (the tokens are
    /// in the convolution's D, H, W order), contiguous as MONAI UNETR's `proj_feat` makes them.
    fn on_grid(&self, tokens: &Tensor) -> Tensor {
        let [d, h, w] = self.cfg.grid();
        let n = tokens.size()[0];
        tokens
            .transpose(1, 2)
            .reshape([n, self.cfg.hidden_size, d, h, w])
            .contiguous()
    }
}

impl Encoder for ViT3d {
    fn in_channels(&self) -> i64 {
        self.in_channels
    }

    fn reference_library(&self) -> Option<ReferenceLibrary> {
        Some(ReferenceLibrary::Monai)
    }
    fn spatial_dims(&self) -> SpatialDims {
        SpatialDims::Three
    }

    fn input_size(&self) -> Option<Vec<i64>> {
        Some(self.cfg.img_size.to_vec())
    }

    fn levels(&self) -> &[Level] {
        &self.levels
    }

    fn embedding_dim(&self) -> i64 {
        self.cfg.hidden_size
    }

    fn forward(&self, images: &Tensor, train: bool) -> EncoderOutput {
        let size = images.size();
        let [d, h, w] = self.cfg.img_size;
        assert!(
            size.len() == 5 && size[1] == self.in_channels && size[2..] == [d, h, w],
            "encoder `vit3d` takes [N, {}, {d}, {h}, {w}] crops (`encoder.img_size` fixes the size: its position \
             embeddings are learned per patch), got {size:?}",
            self.in_channels
        );
        let tokens = images.apply(&self.patch_embeddings).flatten(2, -1).transpose(1, 2);
        let mut x = (tokens + &self.position_embeddings).dropout(self.cfg.dropout_rate, train);
        let mut levels = Vec::with_capacity(self.levels.len());
        let mut wanted = self.cfg.levels.iter().peekable();
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, train);
            if wanted.next_if(|&&l| l == i as i64).is_some() {
                levels.push(self.on_grid(&x));
            }
        }
        let normed = x.apply(&self.norm);
        let pooled = normed.mean_dim(1, false, normed.kind());
        levels.push(self.on_grid(&normed));
        EncoderOutput { levels, pooled }
    }
}

fn build(section: &Section, p: nn::Path, shape: &EncoderShape) -> Result<Box<dyn Encoder>> {
    let cfg: ViT3dConfig = section.parse()?;
    Ok(Box::new(ViT3d::new(&p, cfg, shape.in_channels, &section.key)?))
}

register!(ENCODERS, VIT3D: EncoderEntry = EncoderEntry {
    name: "vit3d",
    about: "3D ViT over volume patches (ViT-Base/16 on 96³ by default), MONAI's ViT names; levels on the patch grid",
    default_config: default_toml::<ViT3dConfig>,
    smoke_configs: &[
        "img_size = [32, 32, 32]\npatch_size = 16\nhidden_size = 24\nmlp_dim = 48\nnum_layers = 4\nnum_heads = 2\nlevels = [0, 1, 2]",
    ],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::reference_weights::{fill_from_names, smooth_input};
    use medssl_core::registry;

    /// A ViT small enough for a CPU test: 32³ crops, 8 patches, 4 blocks of width 24.
    const SMALL: &str = "img_size = [32, 32, 32]\npatch_size = 16\nhidden_size = 24\nmlp_dim = 48\nnum_layers = 4\n\
                         num_heads = 2\nlevels = [0, 1, 2]";

    fn build_vit(vs: &nn::VarStore, body: &str, in_channels: i64) -> Result<Box<dyn Encoder>> {
        let section = Section::inline("encoder", "vit3d", body)?;
        (registry::encoders().get("vit3d")?.build)(&section, vs.root(), &EncoderShape { in_channels })
    }

    fn parameters(vs: &nn::VarStore) -> i64 {
        vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    /// The names of MONAI 1.6.1's `ViT(in_channels=1, img_size=96, patch_size=16)` state_dict.
    fn monai_names(layers: usize) -> Vec<String> {
        let mut names: Vec<String> = [
            "patch_embedding.position_embeddings",
            "patch_embedding.patch_embeddings.weight",
            "patch_embedding.patch_embeddings.bias",
            "norm.weight",
            "norm.bias",
        ]
        .map(String::from)
        .to_vec();
        for i in 0..layers {
            for tail in [
                "mlp.linear1.weight",
                "mlp.linear1.bias",
                "mlp.linear2.weight",
                "mlp.linear2.bias",
                "norm1.weight",
                "norm1.bias",
                "attn.out_proj.weight",
                "attn.out_proj.bias",
                "attn.qkv.weight",
                "norm2.weight",
                "norm2.bias",
                "norm_cross_attn.weight",
                "norm_cross_attn.bias",
            ] {
                names.push(format!("blocks.{i}.{tail}"));
            }
        }
        names.sort();
        names
    }

    /// MONAI 1.6.1's ViT(in 1, 96³, patch 16, 768/3072/12/12, classification off): 88,359,168
    /// parameters in 161 state_dict tensors (`/work/shared/specs/voco-vit-unetr.md`,
    /// re-measured with MONAI 1.6.1 and torch 2.13.0), with exactly these names and shapes.
    #[test]
    fn vit_base_has_monais_parameter_count_names_and_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let started = std::time::Instant::now();
        let vit = build_vit(&vs, "", 1).unwrap();
        eprintln!("ViT-Base/16 on 96³ built in {:.2?}", started.elapsed());
        assert_eq!(parameters(&vs), 88_359_168);
        let vars = vs.variables();
        assert_eq!(vars.len(), 161);
        let mut names: Vec<String> = vars.keys().cloned().collect();
        names.sort();
        assert_eq!(names, monai_names(12));
        for (name, shape) in [
            ("patch_embedding.position_embeddings", vec![1, 216, 768]),
            ("patch_embedding.patch_embeddings.weight", vec![768, 1, 16, 16, 16]),
            ("blocks.0.attn.qkv.weight", vec![2304, 768]),
            ("blocks.11.mlp.linear1.weight", vec![3072, 768]),
            ("blocks.11.mlp.linear2.weight", vec![768, 3072]),
        ] {
            assert_eq!(vars[name].size(), shape, "{name}");
        }
        assert_eq!(vit.spatial_dims(), SpatialDims::Three);
        assert_eq!(vit.input_size(), Some(vec![96, 96, 96]));
        let names: Vec<&str> = vit.levels().iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["block3", "block6", "block9", "norm"]);
        assert!(vit.levels().iter().all(|l| l.channels == 768 && l.stride == 16));
        assert_eq!(vit.embedding_dim(), 768);
        // qkv_bias adds one bias per block.
        let vs = nn::VarStore::new(Device::Cpu);
        build_vit(&vs, &format!("{SMALL}\nqkv_bias = true"), 1).unwrap();
        assert!(vs.variables().contains_key("blocks.3.attn.qkv.bias"));
    }

    /// MONAI's initialisation: position embeddings N(0, 0.02²) (truncated at ±2, i.e. not at
    /// all), everything else PyTorch's defaults.
    #[test]
    fn initialisation_follows_monai() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        build_vit(
            &vs,
            "hidden_size = 192\nnum_heads = 3\nmlp_dim = 384\nnum_layers = 2\nlevels = [0]",
            1,
        )
        .unwrap();
        let vars = vs.variables();
        let std = |name: &str| vars[name].std(true).double_value(&[]);
        let max = |name: &str| vars[name].abs().max().double_value(&[]);
        let pos = std("patch_embedding.position_embeddings");
        assert!((pos / 0.02 - 1.0).abs() < 0.02, "position embeddings std {pos}");
        // U(±1 / sqrt(fan_in)): fan_in 16³ for the patch convolution, 192 and 384 for the
        // Linear layers.
        for (name, fan_in) in [
            ("patch_embedding.patch_embeddings.weight", 4096.0),
            ("patch_embedding.patch_embeddings.bias", 4096.0),
            ("blocks.0.attn.qkv.weight", 192.0),
            ("blocks.1.mlp.linear1.weight", 192.0),
            ("blocks.1.mlp.linear2.weight", 384.0),
            ("blocks.1.mlp.linear2.bias", 384.0),
        ] {
            let bound = 1.0 / f64::sqrt(fan_in);
            assert!(
                max(name) <= bound && max(name) > 0.9 * bound,
                "{name}: {} vs {bound}",
                max(name)
            );
        }
        for norm in ["norm", "blocks.0.norm1", "blocks.1.norm2", "blocks.1.norm_cross_attn"] {
            assert_eq!(vars[&format!("{norm}.weight")].mean(Kind::Float).double_value(&[]), 1.0);
            assert_eq!(max(&format!("{norm}.bias")), 0.0);
        }
    }

    #[test]
    fn levels_lie_on_the_patch_grid_and_gradients_reach_every_parameter() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let body = "img_size = [32, 48, 16]\npatch_size = 8\nhidden_size = 24\nmlp_dim = 48\nnum_layers = 3\n\
                    num_heads = 2\nlevels = [0, 2]\ndropout_rate = 0.1";
        let vit = build_vit(&vs, body, 2).unwrap();
        assert_eq!(vit.in_channels(), 2);
        let names: Vec<&str> = vit.levels().iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["block0", "block2", "norm"]);
        let x = Tensor::randn([3, 2, 32, 48, 16], (Kind::Float, Device::Cpu));
        let out = vit.forward(&x, true);
        assert_eq!(out.levels.len(), 3);
        for (t, level) in out.levels.iter().zip(vit.levels()) {
            assert_eq!(t.size(), [3, 24, 4, 6, 2], "{}", level.name);
        }
        assert_eq!(out.pooled.size(), [3, 24]);
        // Every level and the pooled embedding in the loss: every trainable parameter gets a
        // gradient; the unused norm_cross_attn is frozen.
        let mut loss = out.pooled.square().sum(Kind::Float);
        for level in &out.levels {
            loss += (level * level.randn_like()).sum(Kind::Float);
        }
        loss.backward();
        for (name, var) in vs.variables() {
            assert_eq!(var.requires_grad(), !name.contains("norm_cross_attn"), "{name}");
        }
        for (name, var) in vs.variables().into_iter().filter(|(_, v)| v.requires_grad()) {
            let grad = var.grad();
            let norm = if grad.defined() {
                grad.norm().double_value(&[])
            } else {
                0.0
            };
            if name.contains("norm_cross_attn") {
                assert_eq!(norm, 0.0, "{name} is not used");
            } else {
                assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
            }
        }
        // Evaluation mode is deterministic (no dropout).
        let a = vit.forward(&x, false).pooled;
        let b = vit.forward(&x, false).pooled;
        assert!(a.equal(&b));
    }

    /// The encoder's tokens as MONAI's ViT returns them: `[N, L, C]`.
    fn tokens(level: &Tensor) -> Tensor {
        level.flatten(2, -1).transpose(1, 2)
    }

    /// Sum, sum of squares and four elements of `t` against MONAI's.
    fn assert_matches(what: &str, t: &Tensor, sum: f64, squares: f64, at: &[(i64, f64)]) {
        let flat = t.to_kind(Kind::Double).flatten(0, -1);
        let (s, q) = (
            flat.sum(Kind::Double).double_value(&[]),
            flat.square().sum(Kind::Double).double_value(&[]),
        );
        assert!(
            (s - sum).abs() <= 1e-4 * squares.sqrt(),
            "{what}: sum {s} vs MONAI {sum}"
        );
        assert!(
            (q / squares - 1.0).abs() < 1e-5,
            "{what}: sum of squares {q} vs MONAI {squares}"
        );
        for &(i, expected) in at {
            let v = flat.double_value(&[i]);
            assert!((v - expected).abs() < 1e-5, "{what}[{i}]: {v} vs MONAI {expected}");
        }
    }

    /// The same weights and input as a reference run of MONAI 1.6.1 (torch 2.13.0, CPU) of
    /// `ViT(in_channels=1, img_size=32, patch_size=16, hidden_size=24, mlp_dim=48,
    /// num_layers=4, num_heads=2)` in eval mode give the same final output and
    /// `hidden_states_out[0]` and `[2]`, to fp32 rounding: the architecture, the token order,
    /// the head split of the qkv projection and the exact GELU agree, not only the names.
    #[test]
    fn forward_pass_equals_monais() {
        let vs = nn::VarStore::new(Device::Cpu);
        let vit = build_vit(&vs, &SMALL.replace("[0, 1, 2]", "[0, 2]"), 1).unwrap();
        fill_from_names(&vs, &[]);
        let out = vit.forward(&smooth_input(&[2, 1, 32, 32, 32], Kind::Float), false);
        let at = |values: [f64; 4]| [0, 7, 100, 383].into_iter().zip(values).collect::<Vec<_>>();
        assert_matches(
            "hidden_states_out[0]",
            &tokens(&out.levels[0]),
            1.7110712695866823,
            147.3261759710259,
            &at([
                -0.5938059091567993,
                -0.1414540857076645,
                -0.04534430801868439,
                0.8435611724853516,
            ]),
        );
        assert_matches(
            "hidden_states_out[2]",
            &tokens(&out.levels[1]),
            0.9597060196101665,
            230.73378399630002,
            &at([
                -0.44882863759994507,
                -0.22143392264842987,
                -0.37718355655670166,
                0.5101432204246521,
            ]),
        );
        assert_matches(
            "final",
            &tokens(&out.levels[2]),
            -0.14420995237014722,
            368.3675023807856,
            &at([
                -0.47524821758270264,
                -0.15086232125759125,
                -0.5356245636940002,
                0.38590553402900696,
            ]),
        );
        let mean = tokens(&out.levels[2]).mean_dim(1, false, Kind::Float);
        assert!(out.pooled.allclose(&mean, 1e-6, 1e-7, false));
    }

    #[test]
    #[should_panic(expected = "encoder `vit3d` takes [N, 1, 32, 32, 32] crops")]
    fn a_crop_of_another_size_is_refused_with_the_expected_shape() {
        let vs = nn::VarStore::new(Device::Cpu);
        let vit = build_vit(&vs, SMALL, 1).unwrap();
        vit.forward(&Tensor::zeros([1, 1, 32, 32, 16], (Kind::Float, Device::Cpu)), false);
    }

    #[test]
    fn bad_configs_are_clear_errors_naming_the_key() {
        let message = |body: &str| {
            let vs = nn::VarStore::new(Device::Cpu);
            format!(
                "{:#}",
                build_vit(&vs, body, 1)
                    .err()
                    .unwrap_or_else(|| panic!("`{body}` builds"))
            )
        };
        for (body, expected) in [
            (
                "img_size = [96, 96, 90]",
                &["encoder.img_size", "W = 90", "encoder.patch_size"][..],
            ),
            ("img_size = [96, 96]", &["encoder.img_size"]),
            ("hidden_size = 100", &["encoder.hidden_size", "encoder.num_heads"]),
            ("levels = [3, 12]", &["encoder.levels", "block 12", "0..11"]),
            ("levels = [6, 3]", &["encoder.levels", "ascending"]),
            ("dropout_rate = 1.5", &["encoder.dropout_rate"]),
            ("num_layers = 0", &["encoder.num_layers"]),
            ("patch = 8", &["encoder.patch", "patch_size"]),
        ] {
            let text = message(body);
            for e in expected {
                assert!(text.contains(e), "`{body}`: {text}");
            }
        }
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::encoders().get("vit3d")?;
        let section = Section::inline("encoder", "vit3d", &(entry.default_config)())?;
        assert_eq!(section.parse::<ViT3dConfig>()?, ViT3dConfig::default());
        for smoke in entry.smoke_configs {
            let vs = nn::VarStore::new(Device::Cpu);
            let vit = build_vit(&vs, smoke, 1)?;
            let size = vit.input_size().unwrap();
            let out = vit.forward(
                &Tensor::zeros([1, 1, size[0], size[1], size[2]], (Kind::Float, Device::Cpu)),
                true,
            );
            assert_eq!(out.levels.len(), 4);
        }
        Ok(())
    }
}
