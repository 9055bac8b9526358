//! Swin UNETR's decoder (Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic
//! Segmentation of Brain Tumors in MRI Images", BrainLes 2021, Fig. 1) as MONAI builds it
//! (`monai/networks/nets/swin_unetr.py`, class `SwinUNETR` without its `swinViT`, MONAI 1.6),
//! over the levels of a 3D Swin encoder: the downstream of Swin UNETR's self-supervised
//! pre-training (Tang et al., CVPR 2022) and of VoCo's.
//!
//! It reads five encoder levels, shallow to deep, as MONAI's `SwinTransformer` returns them
//! (`hidden_states_out`, each layer-normed, which is the encoder's job): `hs0` .. `hs4` at
//! strides 2, 4, 8, 16 and 32 with `f`, `2f`, `4f`, `8f` and `16f` channels, `f` the feature
//! size, read from the encoder's first level rather than configured (the skips fix every
//! width of the decoder). It also reads the input crop itself (`HeadInput::images`), as
//! `SwinUNETR.forward` does:
//! - `encoder1` convolves the crop to `f` channels; `encoder2`, `encoder3`, `encoder4` and
//!   `encoder10` convolve `hs0`, `hs1`, `hs2` and `hs4` at their own width (MONAI's
//!   `UnetrBasicBlock`s: residual blocks of 3x3x3 convolutions, stride 1);
//! - `decoder5` (from `encoder10`'s output, skip `hs3` itself), `decoder4` (skip
//!   `encoder4`'s), `decoder3` (`encoder3`'s), `decoder2` (`encoder2`'s) and `decoder1`
//!   (`encoder1`'s): a 2x2x2 transposed convolution doubles the resolution, the skip is
//!   concatenated, a residual block mixes them (`8f`, `4f`, `2f`, `f`, `f` channels,
//!   MONAI's `UnetrUpBlock`s);
//! - `out`: a 1x1x1 convolution to the class logits `[N, K, D, H, W]` at the crop's size.
//!
//! Submodule and parameter names are MONAI's (`encoder1.layer.conv1.conv.weight`,
//! `encoder10.layer.conv2.conv.weight`, `decoder5.transp_conv.conv.weight`,
//! `decoder1.conv_block.conv3.conv.weight`, `out.conv.conv.weight`, ...), so a MONAI
//! SwinUNETR's state_dict without its `swinViT.` entries loads one-to-one into `head.*`. The
//! blocks are core's ([`medssl_core::unetr_blocks`], shared with `unetr`): instance norms
//! without variables, LeakyReLU 0.01, no convolution bias but `out`'s, PyTorch's default
//! initialisation (MONAI's SwinUNETR initialises only its encoder's relative position bias).
//!
//! Where medssl differs on purpose: MONAI fixes `res_block = True` for every block; the
//! `res_block` key keeps that default and can switch to MONAI's `UnetBasicBlock` (no
//! shortcut, no `conv3`), as the `unetr` head allows. MONAI refuses a feature size not
//! divisible by 12, a constraint of its encoder's attention heads (3, 6, 12, 24), not of the
//! decoder: this head takes any width the encoder declares.
//!
//! Input sizes: every side must be a multiple of 32 (MONAI's `_check_input_size`: a patch
//! embedding of 2 voxels and four 2x patch mergings), and the crop larger than 32 voxels
//! along at least one axis: at 32^3 the deepest level is one voxel, which `encoder10`'s
//! instance norm cannot normalise (PyTorch's `instance_norm` refuses it in MONAI; libtorch
//! would return zeros and no gradient). A fine-tune checks its crop size against both
//! before reading any data ([`Head::check_input_size`]).
//!
//! Loss: MONAI's `DiceCELoss(to_onehot_y=True, softmax=True)` with its defaults, as the Swin
//! UNETR tutorials train ([`medssl_core::dice_ce`], options under `[head.loss]`).

use medssl_core::dice_ce::{segmentation_loss, DiceCeConfig};
use medssl_core::encoder::SpatialDims;
use medssl_core::prelude::*;
use medssl_core::unetr_blocks::{NormName, UnetOutBlock, UnetrBasicBlock, UnetrUpBlock};
use serde::{Deserialize, Serialize};

/// The head's name, in its messages.
const NAME: &str = "swin-unetr";

/// Strides of the five levels: the encoder's patch embedding (2) and its four mergings.
const STRIDES: [i64; 5] = [2, 4, 8, 16, 32];

/// What every side of the input must be a multiple of: the deepest level's stride.
const INPUT_MULTIPLE: i64 = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SwinUnetrConfig {
    /// Normalisation of every decoder block: `"instance"` (MONAI's other choices are not built).
    pub norm_name: NormName,
    /// Residual blocks (MONAI's SwinUNETR always) rather than plain two-convolution blocks.
    pub res_block: bool,
    /// The Dice + cross-entropy loss.
    pub loss: DiceCeConfig,
}

impl Default for SwinUnetrConfig {
    fn default() -> Self {
        SwinUnetrConfig {
            norm_name: NormName::Instance,
            res_block: true,
            loss: DiceCeConfig::default(),
        }
    }
}

/// The refusal of an input size `[D, H, W]` the network cannot take, as the module
/// documentation explains.
fn check_size(size: &[i64]) -> Result<()> {
    ensure!(
        size.len() == 3 && size.iter().all(|&s| s >= INPUT_MULTIPLE && s % INPUT_MULTIPLE == 0),
        "head `{NAME}` takes 3D crops whose every side is a multiple of {INPUT_MULTIPLE} (MONAI's SwinUNETR: a \
         2-voxel patch embedding and four 2x patch mergings), got {size:?}"
    );
    ensure!(
        size.iter().map(|s| s / INPUT_MULTIPLE).product::<i64>() > 1,
        "head `{NAME}` takes crops larger than {INPUT_MULTIPLE} voxels along at least one axis (e.g. 64): at {size:?} \
         the deepest encoder level is a single voxel, which instance norm cannot normalise (MONAI refuses it too)"
    );
    Ok(())
}

pub struct SwinUnetr {
    in_channels: i64,
    /// `f`: the first level's width.
    feature_size: i64,
    /// `encoder1` on the crop, `encoder2`, `encoder3`, `encoder4` on the first three levels.
    encoders: [UnetrBasicBlock; 4],
    /// On the deepest level.
    encoder10: UnetrBasicBlock,
    /// `decoder5` .. `decoder1`, deep to shallow.
    decoders: [UnetrUpBlock; 5],
    out: UnetOutBlock,
    loss: DiceCeConfig,
}

impl SwinUnetr {
    /// The decoder for the encoder levels of `shape`; `key` is the config section's dotted
    /// key, for messages.
    pub fn new(p: &nn::Path, cfg: &SwinUnetrConfig, shape: &HeadShape, key: &str) -> Result<SwinUnetr> {
        ensure!(
            shape.spatial_dims == SpatialDims::Three,
            "head `{NAME}` segments volumes from a 3D Swin encoder's levels, but the run's encoder is {}: use a 2D \
             head (e.g. `unet`)",
            shape.spatial_dims
        );
        let f = shape.levels.first().map_or(0, |l| l.channels);
        let declared: Vec<String> = shape
            .levels
            .iter()
            .map(|l| format!("{} (stride {}, {} channels)", l.name, l.stride, l.channels))
            .collect();
        ensure!(
            f >= 1
                && shape.levels.len() == STRIDES.len()
                && shape
                    .levels
                    .iter()
                    .zip(STRIDES)
                    .enumerate()
                    .all(|(i, (l, stride))| l.stride == stride && l.channels == f << i),
            "the `{NAME}` head reads 5 encoder levels at strides 2, 4, 8, 16, 32 with f, 2f, 4f, 8f, 16f channels \
             (MONAI's SwinUNETR over its SwinTransformer's outputs, f the feature size); this encoder has {} \
             level(s): [{}]",
            shape.levels.len(),
            declared.join(", ")
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
        cfg.loss.validate(&format!("{key}.loss"))?;
        let basic = |name: &str, c_in: i64, c_out: i64| UnetrBasicBlock::new(&(p / name), c_in, c_out, cfg.res_block);
        let encoders = [
            basic("encoder1", shape.in_channels, f),
            basic("encoder2", f, f),
            basic("encoder3", 2 * f, 2 * f),
            basic("encoder4", 4 * f, 4 * f),
        ];
        let encoder10 = basic("encoder10", 16 * f, 16 * f);
        let decoders = [
            (5, 16 * f, 8 * f),
            (4, 8 * f, 4 * f),
            (3, 4 * f, 2 * f),
            (2, 2 * f, f),
            (1, f, f),
        ]
        .map(|(i, c_in, c_out)| UnetrUpBlock::new(&(p / format!("decoder{i}")), c_in, c_out, cfg.res_block));
        Ok(SwinUnetr {
            in_channels: shape.in_channels,
            feature_size: f,
            encoders,
            encoder10,
            decoders,
            out: UnetOutBlock::new(&(p / "out"), f, shape.num_classes),
            loss: cfg.loss.clone(),
        })
    }

    /// Class logits `[N, K, D, H, W]` at the crop's size.
    pub fn logits(&self, input: &HeadInput) -> Result<Tensor> {
        let Some(images) = input.images else {
            bail!("head `{NAME}` reads the input crops themselves (`encoder1`'s skip connection), but none were given");
        };
        let size = images.size();
        let levels = &input.encoder.levels;
        ensure!(
            size.len() == 5 && size[1] == self.in_channels && levels.len() == STRIDES.len(),
            "head `{NAME}` takes [N, {}, D, H, W] crops and {} encoder levels, got crops {size:?} and {} levels",
            self.in_channels,
            STRIDES.len(),
            levels.len()
        );
        check_size(&size[2..])?;
        for (i, (level, stride)) in levels.iter().zip(STRIDES).enumerate() {
            let mut expected = vec![size[0], self.feature_size << i];
            expected.extend(size[2..].iter().map(|s| s / stride));
            ensure!(
                level.size() == expected,
                "head `{NAME}`: encoder level {i} has shape {:?}, but crops {size:?} give {expected:?} at stride {stride}",
                level.size()
            );
        }
        let [encoder1, encoder2, encoder3, encoder4] = &self.encoders;
        let enc0 = encoder1.forward(images);
        let enc1 = encoder2.forward(&levels[0]);
        let enc2 = encoder3.forward(&levels[1]);
        let enc3 = encoder4.forward(&levels[2]);
        let dec4 = self.encoder10.forward(&levels[4]);
        let [decoder5, decoder4, decoder3, decoder2, decoder1] = &self.decoders;
        let dec3 = decoder5.forward(&dec4, &levels[3]);
        let dec2 = decoder4.forward(&dec3, &enc3);
        let dec1 = decoder3.forward(&dec2, &enc2);
        let dec0 = decoder2.forward(&dec1, &enc1);
        let out = decoder1.forward(&dec0, &enc0);
        Ok(self.out.forward(&out))
    }
}

impl Head for SwinUnetr {
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

    fn check_input_size(&self, size: &[i64]) -> Result<()> {
        check_size(size)
    }
}

fn build(section: &Section, p: nn::Path, shape: &HeadShape) -> Result<Box<dyn Head>> {
    let cfg: SwinUnetrConfig = section.parse()?;
    Ok(Box::new(SwinUnetr::new(&p, &cfg, shape, &section.key)?))
}

register!(HEADS, SWIN_UNETR: HeadEntry = HeadEntry {
    name: NAME,
    about: "Swin UNETR decoder (MONAI's names) over a 3D Swin encoder's 5 levels at strides 2-32 and the crop; MONAI Dice + CE",
    default_config: default_toml::<SwinUnetrConfig>,
    smoke_configs: &["", "res_block = false"],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::reference_weights::fill_from_names;
    use medssl_core::registry;

    const HEAD_KEY: &str = "head";

    /// A stand-in for a 3D Swin encoder with MONAI SwinTransformer's five levels: level 0 a
    /// 2x2x2 stride-2 convolution of the crop to `f` channels, each next one a 2x2x2 stride-2
    /// convolution of the last to twice its width (a patch merging's resolution and width).
    struct FakeSwin {
        levels: Vec<Level>,
        convs: Vec<nn::Conv3D>,
    }

    impl FakeSwin {
        fn new(p: &nn::Path, f: i64) -> FakeSwin {
            let config = layers::Conv {
                stride: 2,
                ..Default::default()
            };
            let convs = (0..5)
                .map(|i| {
                    let c_in = if i == 0 { 1 } else { f << (i - 1) };
                    layers::conv3d(p / format!("layers{i}"), c_in, f << i, 2, config)
                })
                .collect();
            let levels = STRIDES
                .iter()
                .enumerate()
                .map(|(i, &stride)| Level {
                    name: format!("x{i}"),
                    channels: f << i,
                    stride,
                })
                .collect();
            FakeSwin { levels, convs }
        }
    }

    impl Encoder for FakeSwin {
        fn in_channels(&self) -> i64 {
            1
        }
        fn spatial_dims(&self) -> SpatialDims {
            SpatialDims::Three
        }
        fn levels(&self) -> &[Level] {
            &self.levels
        }
        fn embedding_dim(&self) -> i64 {
            self.levels[4].channels
        }
        fn forward(&self, images: &Tensor, _train: bool) -> EncoderOutput {
            let mut x = images.shallow_clone();
            let levels: Vec<Tensor> = self
                .convs
                .iter()
                .map(|conv| {
                    x = x.apply(conv);
                    x.shallow_clone()
                })
                .collect();
            let pooled = x.mean_dim([2, 3, 4].as_slice(), false, x.kind());
            EncoderOutput { levels, pooled }
        }
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

    /// The levels of MONAI's `SwinTransformer` of feature size `f`, without building it.
    fn swin_shape(f: i64, classes: i64) -> HeadShape {
        let vs = nn::VarStore::new(Device::Cpu);
        shape_of(&FakeSwin::new(&vs.root(), f), classes)
    }

    fn head(vs: &nn::VarStore, body: &str, shape: &HeadShape) -> Result<Box<dyn Head>> {
        let section = Section::inline(HEAD_KEY, NAME, body)?;
        (registry::heads().get(NAME)?.build)(&section, vs.root() / "head", shape)
    }

    fn input<'a>(features: &'a EncoderOutput, images: &'a Tensor) -> HeadInput<'a> {
        HeadInput {
            encoder: features,
            volume: None,
            images: Some(images),
            image_size: [images.size()[3], images.size()[4]],
        }
    }

    /// Every tensor of MONAI 1.6.1's `SwinUNETR(in_channels=1, out_channels=14,
    /// feature_size=48)` state_dict outside `swinViT.`, with its shape: 33 tensors, 54,125,294
    /// parameters (62,187,296 in all, of which the `swinViT`'s are 8,062,002).
    const MONAI_DECODER: &[(&str, &[i64])] = &[
        ("encoder1.layer.conv1.conv.weight", &[48, 1, 3, 3, 3]),
        ("encoder1.layer.conv2.conv.weight", &[48, 48, 3, 3, 3]),
        ("encoder1.layer.conv3.conv.weight", &[48, 1, 1, 1, 1]),
        ("encoder2.layer.conv1.conv.weight", &[48, 48, 3, 3, 3]),
        ("encoder2.layer.conv2.conv.weight", &[48, 48, 3, 3, 3]),
        ("encoder3.layer.conv1.conv.weight", &[96, 96, 3, 3, 3]),
        ("encoder3.layer.conv2.conv.weight", &[96, 96, 3, 3, 3]),
        ("encoder4.layer.conv1.conv.weight", &[192, 192, 3, 3, 3]),
        ("encoder4.layer.conv2.conv.weight", &[192, 192, 3, 3, 3]),
        ("encoder10.layer.conv1.conv.weight", &[768, 768, 3, 3, 3]),
        ("encoder10.layer.conv2.conv.weight", &[768, 768, 3, 3, 3]),
        ("decoder5.transp_conv.conv.weight", &[768, 384, 2, 2, 2]),
        ("decoder5.conv_block.conv1.conv.weight", &[384, 768, 3, 3, 3]),
        ("decoder5.conv_block.conv2.conv.weight", &[384, 384, 3, 3, 3]),
        ("decoder5.conv_block.conv3.conv.weight", &[384, 768, 1, 1, 1]),
        ("decoder4.transp_conv.conv.weight", &[384, 192, 2, 2, 2]),
        ("decoder4.conv_block.conv1.conv.weight", &[192, 384, 3, 3, 3]),
        ("decoder4.conv_block.conv2.conv.weight", &[192, 192, 3, 3, 3]),
        ("decoder4.conv_block.conv3.conv.weight", &[192, 384, 1, 1, 1]),
        ("decoder3.transp_conv.conv.weight", &[192, 96, 2, 2, 2]),
        ("decoder3.conv_block.conv1.conv.weight", &[96, 192, 3, 3, 3]),
        ("decoder3.conv_block.conv2.conv.weight", &[96, 96, 3, 3, 3]),
        ("decoder3.conv_block.conv3.conv.weight", &[96, 192, 1, 1, 1]),
        ("decoder2.transp_conv.conv.weight", &[96, 48, 2, 2, 2]),
        ("decoder2.conv_block.conv1.conv.weight", &[48, 96, 3, 3, 3]),
        ("decoder2.conv_block.conv2.conv.weight", &[48, 48, 3, 3, 3]),
        ("decoder2.conv_block.conv3.conv.weight", &[48, 96, 1, 1, 1]),
        ("decoder1.transp_conv.conv.weight", &[48, 48, 2, 2, 2]),
        ("decoder1.conv_block.conv1.conv.weight", &[48, 96, 3, 3, 3]),
        ("decoder1.conv_block.conv2.conv.weight", &[48, 48, 3, 3, 3]),
        ("decoder1.conv_block.conv3.conv.weight", &[48, 96, 1, 1, 1]),
        ("out.conv.conv.weight", &[14, 48, 1, 1, 1]),
        ("out.conv.conv.bias", &[14]),
    ];

    #[test]
    fn decoder_has_monais_names_shapes_and_parameter_count() {
        let vs = nn::VarStore::new(Device::Cpu);
        let head = head(&vs, "", &swin_shape(48, 14)).unwrap();
        assert_eq!(head.task(), Task::VolumeSegmentation);
        let vars = vs.variables();
        let mut names: Vec<&str> = vars.keys().map(|n| n.strip_prefix("head.").unwrap()).collect();
        names.sort_unstable();
        let mut expected: Vec<&str> = MONAI_DECODER.iter().map(|(n, _)| *n).collect();
        expected.sort_unstable();
        assert_eq!(expected.len(), 33);
        assert_eq!(names, expected);
        for (name, shape) in MONAI_DECODER {
            assert_eq!(vars[&format!("head.{name}")].size(), *shape, "{name}");
        }
        let parameters: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(parameters, 54_125_294);
        assert_eq!(parameters + 8_062_002, 62_187_296);
    }

    /// `res_block = false`: MONAI's `UnetBasicBlock` everywhere, the same names without the
    /// shortcuts' `conv3`.
    #[test]
    fn plain_blocks_drop_only_the_shortcut_projections() {
        let vs = nn::VarStore::new(Device::Cpu);
        head(&vs, "res_block = false", &swin_shape(48, 14)).unwrap();
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort_unstable();
        let mut expected: Vec<String> = MONAI_DECODER
            .iter()
            .filter(|(n, _)| !n.contains(".conv3."))
            .map(|(n, _)| format!("head.{n}"))
            .collect();
        expected.sort_unstable();
        assert_eq!(expected.len(), 33 - 6);
        assert_eq!(names, expected);
    }

    /// With every head weight set by [`fill_from_names`] (the name without `head.`), level `i` (`[1, 12·2^i, 64 / 2^(i+1),
    /// ...]`) set to `1.5 sin(0.013 j + 0.5 i)` and the 64³ crop to `2 sin(0.01 j)` over their
    /// flat indices, this head gives the logits of MONAI 1.6.1's `SwinUNETR(in_channels=1,
    /// out_channels=3, feature_size=12)` in eval mode with its `swinViT` replaced by those
    /// levels (torch 2.13.0, CPU), to fp32 rounding: which level feeds which block, the
    /// concatenation order and the blocks' numerics agree, not only the names.
    #[test]
    fn logits_equal_monais_swin_unetr() {
        let (f, side) = (12, 64);
        let vs = nn::VarStore::new(Device::Cpu);
        let shape = swin_shape(f, 3);
        let head = SwinUnetr::new(&(vs.root() / "head"), &SwinUnetrConfig::default(), &shape, HEAD_KEY).unwrap();
        fill_from_names(&vs, &["head."]);
        let wave = |numel: i64, rate: f64, phase: f64, amplitude: f64| {
            let j = Tensor::arange(numel, (Kind::Double, Device::Cpu));
            ((j * rate + phase).sin() * amplitude).to_kind(Kind::Float)
        };
        let levels = (0..5)
            .map(|i| {
                let (c, s) = (f << i, side >> (i + 1));
                wave(c * s * s * s, 0.013, 0.5 * i as f64, 1.5).reshape([1, c, s, s, s])
            })
            .collect();
        let features = EncoderOutput {
            levels,
            pooled: Tensor::zeros([1, 16 * f], (Kind::Float, Device::Cpu)),
        };
        let images = wave(side * side * side, 0.01, 0.0, 2.0).reshape([1, 1, side, side, side]);
        let logits = tch::no_grad(|| head.logits(&input(&features, &images))).unwrap();
        assert_eq!(logits.size(), [1, 3, side, side, side]);
        let flat = logits.to_kind(Kind::Double).flatten(0, -1);
        let sum = flat.sum(Kind::Double).double_value(&[]);
        let squares = flat.square().sum(Kind::Double).double_value(&[]);
        assert!((sum / 39542.616931566154 - 1.0).abs() < 1e-5, "sum {sum}");
        assert!(
            (squares / 80298.03977156966 - 1.0).abs() < 1e-5,
            "sum of squares {squares}"
        );
        for (i, monai) in [
            (0, -0.060569509863853455),
            (1000, 0.2217985838651657),
            (200000, 0.06611849367618561),
            (786431, -0.1094171404838562),
        ] {
            let v = flat.double_value(&[i]);
            assert!((v - monai).abs() < 1e-5, "logits[{i}]: {v} vs MONAI {monai}");
        }
    }

    /// One class a box of `crop` (sides 32 or 64), another a second box, on a noisy
    /// background.
    fn boxes(n: i64, crop: [i64; 3]) -> (Tensor, Tensor) {
        let inside = |lo: i64, hi: i64, axis: usize| {
            let scale = crop[axis] / 32;
            let mut view = [1, 1, 1];
            view[axis] = crop[axis];
            let grid = Tensor::arange(crop[axis], (Kind::Int64, Device::Cpu));
            grid.ge(lo * scale).logical_and(&grid.lt(hi * scale)).view(view)
        };
        let cuboid = |lo: i64, hi: i64| {
            inside(lo, hi, 0)
                .logical_and(&inside(lo, hi, 1))
                .logical_and(&inside(lo, hi, 2))
                .to_kind(Kind::Int64)
        };
        let targets = (cuboid(4, 14) + cuboid(18, 28) * 2).unsqueeze(0).repeat([n, 1, 1, 1]);
        let mut size = vec![n, 1];
        size.extend(crop);
        let images = targets.to_kind(Kind::Float).unsqueeze(1) + Tensor::randn(size, (Kind::Float, Device::Cpu)) * 0.3;
        (images, targets)
    }

    /// At 32 x 64 x 64 the deepest level has 1 x 2 x 2 voxels, enough for `encoder10`'s
    /// instance norms to pass a gradient of some size (over 2 voxels they pass almost none).
    #[test]
    fn logits_come_back_at_the_crop_size_and_gradients_reach_every_parameter() {
        tch::manual_seed(0);
        for body in ["", "res_block = false"] {
            let vs = nn::VarStore::new(Device::Cpu);
            let encoder = FakeSwin::new(&(vs.root() / "encoder"), 2);
            let head = head(&vs, body, &shape_of(&encoder, 3)).unwrap();
            let (images, targets) = boxes(1, [32, 64, 64]);
            let features = encoder.forward(&images, true);
            let Prediction::Logits(logits) = head.predict(&input(&features, &images)).unwrap() else {
                panic!("logits expected")
            };
            assert_eq!(logits.size(), [1, 3, 32, 64, 64], "{body}");
            let loss = head
                .loss(&input(&features, &images), &Targets::Classes(targets), 0)
                .unwrap();
            assert!(loss.double_value(&[]).is_finite());
            loss.backward();
            for (name, var) in vs.variables() {
                let grad = var.grad();
                let norm = if grad.defined() {
                    grad.norm().double_value(&[])
                } else {
                    0.0
                };
                assert!(norm > 0.0 && norm.is_finite(), "`{body}`: {name} gradient norm {norm}");
            }
        }
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
        let base = swin_shape(6, 3);
        let flat = HeadShape {
            spatial_dims: SpatialDims::Two,
            ..base.clone()
        };
        let text = message("", &flat);
        assert!(
            text.contains("`swin-unetr`") && text.contains("3D Swin encoder") && text.contains("encoder is 2D"),
            "{text}"
        );
        let four = HeadShape {
            levels: base.levels[..4].to_vec(),
            ..base.clone()
        };
        let text = message("", &four);
        assert!(
            text.contains("`swin-unetr`") && text.contains("5 encoder levels") && text.contains("4 level(s)"),
            "{text}"
        );
        let mut strided = base.clone();
        strided.levels[2].stride = 16;
        let text = message("", &strided);
        assert!(
            text.contains("strides 2, 4, 8, 16, 32") && text.contains("x2 (stride 16, 24 channels)"),
            "{text}"
        );
        let mut narrow = base.clone();
        narrow.levels[4].channels = 64;
        let text = message("", &narrow);
        assert!(
            text.contains("f, 2f, 4f, 8f, 16f") && text.contains("x4 (stride 32, 64 channels)"),
            "{text}"
        );
        // The `unetr` head's encoder: four levels at stride 16.
        let mut vit = base.clone();
        vit.levels = (0..4)
            .map(|i| Level {
                name: format!("block{i}"),
                channels: 768,
                stride: 16,
            })
            .collect();
        assert!(message("", &vit).contains("this encoder has 4 level(s): [block0 (stride 16, 768 channels)"));
        let one = HeadShape {
            num_classes: 1,
            ..base.clone()
        };
        assert!(message("", &one).contains("at least 2 classes"));
        for (body, expected) in [
            ("norm_name = \"batch\"", &["head.norm_name", "batch", "instance"][..]),
            ("[loss]\nlambda_ce = -1.0", &["head.loss.lambda_ce", "-1"]),
            ("feature_size = 48", &["feature_size"]),
        ] {
            let text = message(body, &base);
            for e in expected {
                assert!(text.contains(e), "`{body}`: {text}");
            }
        }
    }

    #[test]
    fn refuses_crop_sizes_monai_refuses() {
        let vs = nn::VarStore::new(Device::Cpu);
        let encoder = FakeSwin::new(&(vs.root() / "encoder"), 2);
        let head = head(&vs, "", &shape_of(&encoder, 3)).unwrap();
        for size in [[64, 64, 64], [32, 32, 64], [96, 96, 96], [32, 64, 32]] {
            head.check_input_size(&size).unwrap();
        }
        for size in [&[96, 96, 80][..], &[16, 32, 64], &[0, 64, 64], &[64, 64]] {
            let text = format!("{:#}", head.check_input_size(size).unwrap_err());
            assert!(
                text.contains("`swin-unetr`") && text.contains("multiple of 32"),
                "{size:?}: {text}"
            );
        }
        let text = format!("{:#}", head.check_input_size(&[32, 32, 32]).unwrap_err());
        assert!(
            text.contains("single voxel") && text.contains("instance norm"),
            "{text}"
        );

        // The forward pass refuses the same, and levels that do not match the crop.
        let predict = |images: &Tensor, features: &EncoderOutput| {
            format!("{:#}", head.predict(&input(features, images)).err().unwrap())
        };
        let images = Tensor::zeros([1, 1, 32, 32, 48], (Kind::Float, Device::Cpu));
        let text = predict(&images, &encoder.forward(&images, false));
        assert!(text.contains("multiple of 32") && text.contains("48"), "{text}");
        let images = Tensor::zeros([1, 1, 32, 32, 64], (Kind::Float, Device::Cpu));
        let other = Tensor::zeros([1, 1, 64, 32, 64], (Kind::Float, Device::Cpu));
        let text = predict(&images, &encoder.forward(&other, false));
        assert!(
            text.contains("encoder level 0") && text.contains("[1, 2, 16, 16, 32]"),
            "{text}"
        );
        let features = encoder.forward(&images, false);
        let without = HeadInput {
            images: None,
            ..input(&features, &images)
        };
        let text = format!("{:#}", head.predict(&without).err().unwrap());
        assert!(text.contains("`swin-unetr`") && text.contains("input crops"), "{text}");
        let wrong = Targets::Classes(Tensor::zeros([1, 32, 32, 32], (Kind::Int64, Device::Cpu)));
        let text = format!("{:#}", head.loss(&input(&features, &images), &wrong, 0).err().unwrap());
        assert!(text.contains("[N, D, H, W]"), "{text}");
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::heads().get(NAME)?;
        let section = Section::inline(HEAD_KEY, NAME, &(entry.default_config)())?;
        assert_eq!(section.parse::<SwinUnetrConfig>()?, SwinUnetrConfig::default());
        Ok(())
    }
}
