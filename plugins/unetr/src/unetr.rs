//! UNETR's decoder (Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image
//! Segmentation", WACV 2022, Fig. 2) as MONAI builds it (`monai.networks.nets.UNETR`,
//! MONAI 1.6), over the levels of a 3D encoder: the downstream of MONAI's ViT
//! reconstruction pre-training, fine-tuned on BTCV.
//!
//! It reads four encoder levels, all at stride 16, shallow to deep (for the `vit3d` encoder
//! with its default `levels`, the outputs of blocks 3, 6 and 9 and the final normed output,
//! which MONAI's UNETR takes from `hidden_states_out[3]`, `[6]`, `[9]` and the ViT's output),
//! and the input crop itself (`HeadInput::images`: UNETR's first skip connection convolves the
//! raw voxels). With feature size `f`:
//! - `encoder1`: a residual block of 3x3x3 convolutions on the crop, to `f` channels, stride 1;
//! - `encoder2`, `encoder3`, `encoder4`: the first three levels brought up from stride 16 to
//!   2, 4 and 8 by 2x2x2 transposed convolutions (3, 2 and 1 of them, each after the first
//!   followed by a residual block), to `2f`, `4f` and `8f` channels;
//! - `decoder5` .. `decoder2`: from the last level, a transposed convolution doubles the
//!   resolution, the skip of that resolution is concatenated and a residual block mixes them
//!   (`8f`, `4f`, `2f`, `f` channels); `out`: a 1x1x1 convolution to the class logits
//!   `[N, K, D, H, W]` at the input's size.
//!
//! Submodule and parameter names are MONAI's (`encoder1.layer.conv1.conv.weight`,
//! `encoder2.transp_conv_init.conv.weight`, `encoder2.blocks.0.1.conv2.conv.weight`,
//! `decoder5.conv_block.conv3.conv.weight`, `out.conv.conv.weight`, ...), so a MONAI UNETR's
//! state_dict without its `vit.` entries loads one-to-one into `head.*` (and those into the
//! `vit3d` encoder). The blocks are MONAI's, shared with `swin-unetr` in
//! [`medssl_core::unetr_blocks`] (instance norms without variables, LeakyReLU 0.01, no
//! convolution bias but `out`'s, PyTorch's initialisation: MONAI sets none of its own); only
//! UNETR's `UnetrPrUpBlock` (`ProjectionUp`) is built here.
//!
//! MONAI's UNETR fixes the patch size at 16 and its decoder's depth to match (three
//! upsamplings to stride 2 for the shallowest skip, four from the deepest level to the
//! input), so this head refuses an encoder whose levels are not four at stride 16, and a 2D
//! encoder. The level widths are read from the encoder (768 for ViT-Base) rather than assumed.
//!
//! Loss: MONAI's `DiceCELoss(to_onehot_y=True, softmax=True)` with its defaults, as the
//! UNETR tutorials train ([`medssl_core::dice_ce`], options under `[head.loss]`).

use medssl_core::dice_ce::{segmentation_loss, DiceCeConfig};
use medssl_core::encoder::SpatialDims;
use medssl_core::prelude::*;
use medssl_core::unetr_blocks::{transposed_conv, NormName, UnetBlock, UnetOutBlock, UnetrBasicBlock, UnetrUpBlock};
use serde::{Deserialize, Serialize};

/// The head's name, in its messages.
const NAME: &str = "unetr";

/// The one stride of every level the decoder reads: MONAI's UNETR patch size.
const STRIDE: i64 = 16;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UnetrConfig {
    /// Width of the full-resolution stages (`f`: the stages have f, 2f, 4f and 8f channels).
    pub feature_size: i64,
    /// Normalisation of every decoder block: `"instance"` (MONAI's other choices are not built).
    pub norm_name: NormName,
    /// Residual blocks (UNETR's) rather than plain two-convolution blocks.
    pub res_block: bool,
    /// A convolution block after each transposed convolution of `encoder2`..`encoder4`
    /// beyond the first (UNETR's); without, those stages are transposed convolutions alone.
    pub conv_block: bool,
    /// The Dice + cross-entropy loss.
    pub loss: DiceCeConfig,
}

impl Default for UnetrConfig {
    fn default() -> Self {
        UnetrConfig {
            feature_size: 16,
            norm_name: NormName::Instance,
            res_block: true,
            conv_block: true,
            loss: DiceCeConfig::default(),
        }
    }
}

/// MONAI's `UnetrPrUpBlock`: a level brought up by `1 + blocks.len()` transposed convolutions
/// (`transp_conv_init`, then `blocks.i.0`), each after the first followed by a convolution
/// block (`blocks.i.1`) unless `conv_block` is off (then `blocks.i` is the transposed
/// convolution itself).
struct ProjectionUp {
    transp_conv_init: nn::ConvTranspose3D,
    blocks: Vec<(nn::ConvTranspose3D, Option<UnetBlock>)>,
}

impl ProjectionUp {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, layers: i64, cfg: &UnetrConfig) -> ProjectionUp {
        let blocks = (0..layers)
            .map(|i| {
                let b = p / "blocks" / i.to_string();
                if cfg.conv_block {
                    (
                        transposed_conv(&(&b / "0"), c_out, c_out),
                        Some(UnetBlock::new(&(&b / "1"), c_out, c_out, cfg.res_block)),
                    )
                } else {
                    // The transposed convolution is the list entry itself: `blocks.i.conv`.
                    (transposed_conv(&b, c_out, c_out), None)
                }
            })
            .collect();
        ProjectionUp {
            transp_conv_init: transposed_conv(&(p / "transp_conv_init"), c_in, c_out),
            blocks,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.blocks
            .iter()
            .fold(x.apply(&self.transp_conv_init), |y, (transposed, block)| {
                let y = y.apply(transposed);
                match block {
                    Some(block) => block.forward(&y),
                    None => y,
                }
            })
    }
}

pub struct Unetr {
    in_channels: i64,
    encoder1: UnetrBasicBlock,
    /// `encoder2`, `encoder3`, `encoder4`, on the first three levels.
    encoders: [ProjectionUp; 3],
    /// `decoder5`, `decoder4`, `decoder3`, `decoder2`, deep to shallow.
    decoders: [UnetrUpBlock; 4],
    out: UnetOutBlock,
    loss: DiceCeConfig,
}

impl Unetr {
    /// The decoder for the encoder levels of `shape`; `key` is the config section's dotted
    /// key, for messages.
    pub fn new(p: &nn::Path, cfg: &UnetrConfig, shape: &HeadShape, key: &str) -> Result<Unetr> {
        ensure!(
            shape.spatial_dims == SpatialDims::Three,
            "head `{NAME}` segments volumes from a 3D encoder's levels (such as `vit3d`), but the run's encoder is {}: use a 2D head (e.g. `unet`)",
            shape.spatial_dims
        );
        let strides: Vec<String> = shape
            .levels
            .iter()
            .map(|l| format!("{} (stride {})", l.name, l.stride))
            .collect();
        ensure!(
            shape.levels.len() == 4 && shape.levels.iter().all(|l| l.stride == STRIDE),
            "the `{NAME}` head reads 4 encoder levels at stride {STRIDE} (MONAI's UNETR: three intermediate ViT \
             blocks and the final output, patch size {STRIDE}); this encoder has {} level(s): [{}]",
            shape.levels.len(),
            strides.join(", ")
        );
        ensure!(
            shape.num_classes >= 2,
            "the `{NAME}` head predicts background and at least one structure: it needs at least 2 classes, \
             the task has {}",
            shape.num_classes
        );
        ensure!(
            shape.in_channels >= 1,
            "the `{NAME}` head convolves the input crop, which has {} channels",
            shape.in_channels
        );
        ensure!(
            cfg.feature_size >= 1,
            "config key `{key}.feature_size` must be at least 1, got {}",
            cfg.feature_size
        );
        cfg.loss.validate(&format!("{key}.loss"))?;
        let f = cfg.feature_size;
        let width = |i: usize| shape.levels[i].channels;
        let encoders = [(2, 2 * f, 2), (3, 4 * f, 1), (4, 8 * f, 0)].map(|(i, c_out, layers)| {
            ProjectionUp::new(&(p / format!("encoder{i}")), width(i - 2), c_out, layers, cfg)
        });
        let decoders = [
            (5, width(3), 8 * f),
            (4, 8 * f, 4 * f),
            (3, 4 * f, 2 * f),
            (2, 2 * f, f),
        ]
        .map(|(i, c_in, c_out)| UnetrUpBlock::new(&(p / format!("decoder{i}")), c_in, c_out, cfg.res_block));
        // Built before `encoder1`, so that a seed draws the initial weights it always drew.
        let out = UnetOutBlock::new(&(p / "out"), f, shape.num_classes);
        Ok(Unetr {
            in_channels: shape.in_channels,
            encoder1: UnetrBasicBlock::new(&(p / "encoder1"), shape.in_channels, f, cfg.res_block),
            encoders,
            decoders,
            out,
            loss: cfg.loss.clone(),
        })
    }

    /// Class logits `[N, K, D, H, W]` at the crop's size.
    pub fn logits(&self, input: &HeadInput) -> Result<Tensor> {
        let Some(images) = input.images else {
            bail!("head `{NAME}` reads the input crops themselves (its first skip connection), but none were given");
        };
        let size = images.size();
        let levels = &input.encoder.levels;
        ensure!(
            size.len() == 5 && size[1] == self.in_channels && levels.len() == 4,
            "head `{NAME}` takes [N, {}, D, H, W] crops and 4 encoder levels, got crops {size:?} and {} levels",
            self.in_channels,
            levels.len()
        );
        for level in levels {
            let grid: Vec<i64> = level.size()[2..].iter().map(|s| s * STRIDE).collect();
            ensure!(
                level.dim() == 5 && grid == size[2..],
                "head `{NAME}`: an encoder level of shape {:?} is not the {STRIDE}-voxel patch grid of crops {size:?}",
                level.size()
            );
        }
        let enc1 = self.encoder1.forward(images);
        let [enc2, enc3, enc4] = [0, 1, 2].map(|i| self.encoders[i].forward(&levels[i]));
        let [decoder5, decoder4, decoder3, decoder2] = &self.decoders;
        let x = decoder5.forward(&levels[3], &enc4);
        let x = decoder4.forward(&x, &enc3);
        let x = decoder3.forward(&x, &enc2);
        let x = decoder2.forward(&x, &enc1);
        Ok(self.out.forward(&x))
    }
}

impl Head for Unetr {
    fn task(&self) -> Task {
        Task::VolumeSegmentation
    }

    fn loss(&self, input: &HeadInput, targets: &Targets, _seed: u64) -> Result<Tensor> {
        let targets = targets.classes(NAME)?;
        segmentation_loss(NAME, &self.logits(input)?, targets, &self.loss)
    }

    fn predict(&self, input: &HeadInput) -> Result<Prediction> {
        Ok(Prediction::Logits(self.logits(input)?))
    }
}

fn build(section: &Section, p: nn::Path, shape: &HeadShape) -> Result<Box<dyn Head>> {
    let cfg: UnetrConfig = section.parse()?;
    Ok(Box::new(Unetr::new(&p, &cfg, shape, &section.key)?))
}

register!(HEADS, UNETR: HeadEntry = HeadEntry {
    name: NAME,
    about: "UNETR decoder (MONAI's names) over a 3D encoder's 4 levels at stride 16 and the crop; MONAI Dice + CE",
    default_config: default_toml::<UnetrConfig>,
    smoke_configs: &["feature_size = 4", "feature_size = 2\nres_block = false\nconv_block = false"],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::reference_weights::{fill_from_names, smooth_input};
    use medssl_core::registry;
    use medssl_vit3d as _;
    use tch::nn::OptimizerConfig;

    const HEAD_KEY: &str = "head";

    /// A small ViT: 32³ crops, patch 16, the given depth and levels, width 24.
    fn vit(vs: &nn::VarStore, layers: i64, levels: &str) -> Box<dyn Encoder> {
        let body = format!(
            "img_size = [32, 32, 32]\npatch_size = 16\nhidden_size = 24\nmlp_dim = 48\nnum_heads = 2\n\
             num_layers = {layers}\nlevels = {levels}"
        );
        let section = Section::inline("encoder", "vit3d", &body).unwrap();
        let entry = registry::encoders().get("vit3d").unwrap();
        (entry.build)(&section, vs.root() / "encoder", &EncoderShape { in_channels: 1 }).unwrap()
    }

    fn shape_of(encoder: &dyn Encoder, classes: i64) -> HeadShape {
        HeadShape {
            in_channels: encoder.in_channels(),
            spatial_dims: encoder.spatial_dims(),
            levels: encoder.levels().to_vec(),
            embedding_dim: encoder.embedding_dim(),
            volume_dim: Some(encoder.embedding_dim()),
            num_classes: classes,
        }
    }

    fn head(vs: &nn::VarStore, body: &str, shape: &HeadShape) -> Result<Box<dyn Head>> {
        let section = Section::inline(HEAD_KEY, NAME, body)?;
        (registry::heads().get(NAME)?.build)(&section, vs.root() / "head", shape)
    }

    /// The levels of MONAI's UNETR over ViT-Base/16: four of 768 channels at stride 16.
    fn vit_base_shape(classes: i64) -> HeadShape {
        let level = |name: &str| Level {
            name: name.into(),
            channels: 768,
            stride: 16,
        };
        HeadShape {
            in_channels: 1,
            spatial_dims: SpatialDims::Three,
            levels: ["block3", "block6", "block9", "norm"].map(level).to_vec(),
            embedding_dim: 768,
            volume_dim: Some(768),
            num_classes: classes,
        }
    }

    fn input<'a>(features: &'a EncoderOutput, images: &'a Tensor) -> HeadInput<'a> {
        HeadInput {
            encoder: features,
            volume: None,
            images: Some(images),
            image_size: [images.size()[3], images.size()[4]],
        }
    }

    /// Every tensor of MONAI 1.6.1's `UNETR(in_channels=1, out_channels=14, img_size=96,
    /// feature_size=16, norm_name="instance", res_block=True)` state_dict outside `vit.`, with
    /// its shape: 33 tensors, 4,443,310 parameters (92,802,478 in all, of which the ViT's are
    /// 88,359,168).
    const MONAI_DECODER: &[(&str, &[i64])] = &[
        ("encoder1.layer.conv1.conv.weight", &[16, 1, 3, 3, 3]),
        ("encoder1.layer.conv2.conv.weight", &[16, 16, 3, 3, 3]),
        ("encoder1.layer.conv3.conv.weight", &[16, 1, 1, 1, 1]),
        ("encoder2.transp_conv_init.conv.weight", &[768, 32, 2, 2, 2]),
        ("encoder2.blocks.0.0.conv.weight", &[32, 32, 2, 2, 2]),
        ("encoder2.blocks.0.1.conv1.conv.weight", &[32, 32, 3, 3, 3]),
        ("encoder2.blocks.0.1.conv2.conv.weight", &[32, 32, 3, 3, 3]),
        ("encoder2.blocks.1.0.conv.weight", &[32, 32, 2, 2, 2]),
        ("encoder2.blocks.1.1.conv1.conv.weight", &[32, 32, 3, 3, 3]),
        ("encoder2.blocks.1.1.conv2.conv.weight", &[32, 32, 3, 3, 3]),
        ("encoder3.transp_conv_init.conv.weight", &[768, 64, 2, 2, 2]),
        ("encoder3.blocks.0.0.conv.weight", &[64, 64, 2, 2, 2]),
        ("encoder3.blocks.0.1.conv1.conv.weight", &[64, 64, 3, 3, 3]),
        ("encoder3.blocks.0.1.conv2.conv.weight", &[64, 64, 3, 3, 3]),
        ("encoder4.transp_conv_init.conv.weight", &[768, 128, 2, 2, 2]),
        ("decoder5.transp_conv.conv.weight", &[768, 128, 2, 2, 2]),
        ("decoder5.conv_block.conv1.conv.weight", &[128, 256, 3, 3, 3]),
        ("decoder5.conv_block.conv2.conv.weight", &[128, 128, 3, 3, 3]),
        ("decoder5.conv_block.conv3.conv.weight", &[128, 256, 1, 1, 1]),
        ("decoder4.transp_conv.conv.weight", &[128, 64, 2, 2, 2]),
        ("decoder4.conv_block.conv1.conv.weight", &[64, 128, 3, 3, 3]),
        ("decoder4.conv_block.conv2.conv.weight", &[64, 64, 3, 3, 3]),
        ("decoder4.conv_block.conv3.conv.weight", &[64, 128, 1, 1, 1]),
        ("decoder3.transp_conv.conv.weight", &[64, 32, 2, 2, 2]),
        ("decoder3.conv_block.conv1.conv.weight", &[32, 64, 3, 3, 3]),
        ("decoder3.conv_block.conv2.conv.weight", &[32, 32, 3, 3, 3]),
        ("decoder3.conv_block.conv3.conv.weight", &[32, 64, 1, 1, 1]),
        ("decoder2.transp_conv.conv.weight", &[32, 16, 2, 2, 2]),
        ("decoder2.conv_block.conv1.conv.weight", &[16, 32, 3, 3, 3]),
        ("decoder2.conv_block.conv2.conv.weight", &[16, 16, 3, 3, 3]),
        ("decoder2.conv_block.conv3.conv.weight", &[16, 32, 1, 1, 1]),
        ("out.conv.conv.weight", &[14, 16, 1, 1, 1]),
        ("out.conv.conv.bias", &[14]),
    ];

    #[test]
    fn decoder_has_monais_names_shapes_and_parameter_count() {
        let vs = nn::VarStore::new(Device::Cpu);
        let head = head(&vs, "", &vit_base_shape(14)).unwrap();
        assert_eq!(head.task(), Task::VolumeSegmentation);
        let vars = vs.variables();
        let mut names: Vec<&str> = vars.keys().map(|n| n.strip_prefix("head.").unwrap()).collect();
        names.sort_unstable();
        let mut expected: Vec<&str> = MONAI_DECODER.iter().map(|(n, _)| *n).collect();
        expected.sort_unstable();
        assert_eq!(names, expected);
        for (name, shape) in MONAI_DECODER {
            assert_eq!(vars[&format!("head.{name}")].size(), *shape, "{name}");
        }
        let parameters: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(parameters, 4_443_310);
        assert_eq!(parameters + 88_359_168, 92_802_478);
    }

    /// MONAI 1.6.1's `UNETR(..., res_block=False, conv_block=False)` outside `vit.`: plain
    /// two-convolution blocks, and `encoderN.blocks.i` the transposed convolutions themselves.
    #[test]
    fn plain_blocks_take_monais_names_too() {
        let vs = nn::VarStore::new(Device::Cpu);
        head(&vs, "res_block = false\nconv_block = false", &vit_base_shape(14)).unwrap();
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort_unstable();
        let mut expected: Vec<String> = [
            "encoder1.layer.conv1.conv.weight",
            "encoder1.layer.conv2.conv.weight",
            "encoder2.transp_conv_init.conv.weight",
            "encoder2.blocks.0.conv.weight",
            "encoder2.blocks.1.conv.weight",
            "encoder3.transp_conv_init.conv.weight",
            "encoder3.blocks.0.conv.weight",
            "encoder4.transp_conv_init.conv.weight",
            "decoder5.transp_conv.conv.weight",
            "decoder5.conv_block.conv1.conv.weight",
            "decoder5.conv_block.conv2.conv.weight",
            "decoder4.transp_conv.conv.weight",
            "decoder4.conv_block.conv1.conv.weight",
            "decoder4.conv_block.conv2.conv.weight",
            "decoder3.transp_conv.conv.weight",
            "decoder3.conv_block.conv1.conv.weight",
            "decoder3.conv_block.conv2.conv.weight",
            "decoder2.transp_conv.conv.weight",
            "decoder2.conv_block.conv1.conv.weight",
            "decoder2.conv_block.conv2.conv.weight",
            "out.conv.conv.weight",
            "out.conv.conv.bias",
        ]
        .iter()
        .map(|n| format!("head.{n}"))
        .collect();
        expected.sort_unstable();
        assert_eq!(names, expected);
    }

    /// The `vit3d` encoder (12 blocks, levels [3, 6, 9]) and this head with the same weights
    /// and input as a reference run of MONAI 1.6.1 (torch 2.13.0, CPU) of `UNETR(in_channels=1,
    /// out_channels=3, img_size=32, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2)`
    /// in eval mode give its logits to fp32 rounding: the levels UNETR reads, the token-to-grid
    /// layout, every block's wiring and the norms and activations agree, not only the names.
    #[test]
    fn logits_equal_monais_unetr() {
        let vs = nn::VarStore::new(Device::Cpu);
        let encoder = vit(&vs, 12, "[3, 6, 9]");
        let head = Unetr::new(
            &(vs.root() / "head"),
            &Section::inline(HEAD_KEY, NAME, "feature_size = 4")
                .unwrap()
                .parse()
                .unwrap(),
            &shape_of(encoder.as_ref(), 3),
            HEAD_KEY,
        )
        .unwrap();
        fill_from_names(&vs, &["encoder.", "head."]);
        let images = smooth_input(&[1, 1, 32, 32, 32], Kind::Float);
        let features = encoder.forward(&images, false);
        let logits = head.logits(&input(&features, &images)).unwrap();
        assert_eq!(logits.size(), [1, 3, 32, 32, 32]);
        let flat = logits.to_kind(Kind::Double).flatten(0, -1);
        let sum = flat.sum(Kind::Double).double_value(&[]);
        let squares = flat.square().sum(Kind::Double).double_value(&[]);
        assert!((sum / 8332.20690193167 - 1.0).abs() < 1e-5, "sum {sum}");
        assert!(
            (squares / 6396.325984178484 - 1.0).abs() < 1e-5,
            "sum of squares {squares}"
        );
        for (i, monai) in [
            (0, 0.19580607116222382),
            (1000, 0.17801600694656372),
            (50000, -0.02917514368891716),
            (98303, 0.04318433254957199),
        ] {
            let v = flat.double_value(&[i]);
            assert!((v - monai).abs() < 1e-5, "logits[{i}]: {v} vs MONAI {monai}");
        }
    }

    /// One class a cube of the crop, on a noisy background.
    fn cubes(n: i64) -> (Tensor, Tensor) {
        let grid = Tensor::arange(32, (Kind::Int64, Device::Cpu));
        let inside = |lo: i64, hi: i64, shape: [i64; 3]| grid.ge(lo).logical_and(&grid.lt(hi)).view(shape);
        let cube = |lo, hi| {
            inside(lo, hi, [32, 1, 1])
                .logical_and(&inside(lo, hi, [1, 32, 1]))
                .logical_and(&inside(lo, hi, [1, 1, 32]))
                .to_kind(Kind::Int64)
        };
        let targets = (cube(4, 14) + cube(18, 28) * 2).unsqueeze(0).repeat([n, 1, 1, 1]);
        let images = targets.to_kind(Kind::Float).unsqueeze(1)
            + Tensor::randn([n, 1, 32, 32, 32], (Kind::Float, Device::Cpu)) * 0.3;
        (images, targets)
    }

    #[test]
    fn logits_come_back_at_the_crop_size_and_gradients_reach_every_head_parameter() {
        tch::manual_seed(0);
        for body in [
            "feature_size = 4",
            "feature_size = 2\nres_block = false\nconv_block = false",
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let encoder = vit(&vs, 4, "[0, 1, 2]");
            let head = head(&vs, body, &shape_of(encoder.as_ref(), 3)).unwrap();
            let (images, targets) = cubes(2);
            let features = encoder.forward(&images, true);
            let Prediction::Logits(logits) = head.predict(&input(&features, &images)).unwrap() else {
                panic!("logits expected")
            };
            assert_eq!(logits.size(), [2, 3, 32, 32, 32], "{body}");
            let loss = head
                .loss(&input(&features, &images), &Targets::Classes(targets), 0)
                .unwrap();
            assert!(loss.double_value(&[]).is_finite());
            loss.backward();
            let mut encoder_norm = 0.0;
            for (name, var) in vs.variables() {
                let grad = var.grad();
                let norm = if grad.defined() {
                    grad.norm().double_value(&[])
                } else {
                    0.0
                };
                if name.starts_with("head.") {
                    assert!(norm > 0.0 && norm.is_finite(), "{body}: {name} gradient norm {norm}");
                } else {
                    encoder_norm += norm;
                }
            }
            assert!(encoder_norm > 0.0);
        }
    }

    #[test]
    fn loss_falls_when_overfitting_a_fixed_batch() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let encoder = vit(&vs, 4, "[0, 1, 2]");
        let head = head(&vs, "feature_size = 4", &shape_of(encoder.as_ref(), 3)).unwrap();
        let (images, targets) = cubes(1);
        let targets = Targets::Classes(targets);
        let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        let mut losses = Vec::new();
        for _ in 0..20 {
            let features = encoder.forward(&images, true);
            let loss = head.loss(&input(&features, &images), &targets, 0).unwrap();
            opt.backward_step(&loss);
            losses.push(loss.double_value(&[]));
        }
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        assert!(last < first * 0.5, "loss went from {first} to {last}: {losses:?}");
    }

    #[test]
    fn refuses_encoders_it_cannot_decode_and_bad_configs() {
        let message = |body: &str, shape: &HeadShape| {
            let vs = nn::VarStore::new(Device::Cpu);
            format!(
                "{:#}",
                head(&vs, body, shape)
                    .err()
                    .unwrap_or_else(|| panic!("`{body}` builds"))
            )
        };
        let base = vit_base_shape(14);
        let flat = HeadShape {
            spatial_dims: SpatialDims::Two,
            ..base.clone()
        };
        let text = message("", &flat);
        assert!(
            text.contains("`unetr`") && text.contains("3D encoder") && text.contains("2D"),
            "{text}"
        );
        let three = HeadShape {
            levels: base.levels[1..].to_vec(),
            ..base.clone()
        };
        let text = message("", &three);
        assert!(
            text.contains("4 encoder levels") && text.contains("3 level(s)"),
            "{text}"
        );
        let mut strided = base.clone();
        strided.levels[0].stride = 8;
        let text = message("", &strided);
        assert!(
            text.contains("stride 16") && text.contains("block3 (stride 8)"),
            "{text}"
        );
        let one = HeadShape {
            num_classes: 1,
            ..base.clone()
        };
        assert!(message("", &one).contains("at least 2 classes"));
        for (body, expected) in [
            ("feature_size = 0", &["head.feature_size", "0"][..]),
            ("norm_name = \"batch\"", &["head.norm_name", "batch", "instance"]),
            ("[loss]\nsmooth_nr = -1.0", &["head.loss.smooth_nr", "-1"]),
            ("[loss]\nsquared_pred = true", &["squared_pred"]),
            ("featuresize = 4", &["featuresize", "feature_size"]),
        ] {
            let text = message(body, &base);
            for e in expected {
                assert!(text.contains(e), "`{body}`: {text}");
            }
        }
        // Crops missing from the input: a clear error, not a crash.
        let vs = nn::VarStore::new(Device::Cpu);
        let encoder = vit(&vs, 4, "[0, 1, 2]");
        let built = head(&vs, "feature_size = 2", &shape_of(encoder.as_ref(), 3)).unwrap();
        let (images, targets) = cubes(1);
        let features = encoder.forward(&images, false);
        let without = HeadInput {
            images: None,
            ..input(&features, &images)
        };
        let text = format!("{:#}", built.predict(&without).err().unwrap());
        assert!(text.contains("`unetr`") && text.contains("input crops"), "{text}");
        let wrong = Targets::Classes(targets.narrow(1, 0, 16));
        let text = format!("{:#}", built.loss(&input(&features, &images), &wrong, 0).err().unwrap());
        assert!(text.contains("[N, D, H, W]"), "{text}");
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::heads().get(NAME)?;
        let section = Section::inline(HEAD_KEY, NAME, &(entry.default_config)())?;
        assert_eq!(section.parse::<UnetrConfig>()?, UnetrConfig::default());
        Ok(())
    }
}
