//! The U-Net decoder (Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image
//! Segmentation", MICCAI 2015, Fig. 1) over the levels of a pre-trained encoder: the paper's
//! 2D segmentation downstream, a U-Net whose encoder is the ResNet f_intra (Nguyen et al.,
//! AAAI 2023, Sec. 4), as segmentation_models_pytorch builds a U-Net on a ResNet.
//!
//! The decoder reads the encoder's levels (all of them, or those `levels` lists), shallow to
//! deep as the encoder declares them, with their widths and strides taken from the encoder,
//! never assumed. It starts at the deepest level read; each shallower level read is a skip
//! connection of one stage: bilinear upsampling to the skip's actual spatial size (so inputs
//! not divisible by the deepest stride, and a small-input ResNet whose first levels keep the
//! input size, both work), concatenation with the skip, then two 3x3 convolutions with batch
//! norm and ReLU to the stage's width. A last stage upsamples to the input size and applies
//! the same two convolutions, without a skip; a 1x1 convolution gives the class logits
//! `[N, K, H, W]`. So the decoder has one stage per level read: `channels` lists their
//! widths, deepest first (segmentation_models_pytorch's default 256, 128, 64, 32, 16 for
//! the five levels of a ResNet).
//!
//! Loss: pixel-wise cross-entropy plus `dice_weight` times the soft Dice loss of
//! [`crate::soft_dice`] (foreground classes present in the batch's targets or arg-max
//! prediction; background excluded).
//!
//! `memory_format = "channels_last"` lays the decoder's convolution weights out NHWC when it is
//! built and the encoder levels it reads at its entry, as `model.to(memory_format=
//! torch.channels_last)` in PyTorch ([`MemoryFormat`]); upsampling and concatenation keep the
//! layout, so every decoder convolution runs NHWC and the logits come out channels_last.

use crate::soft_dice::soft_dice_loss;
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UNetConfig {
    /// Width of each decoder stage, deepest first: one a level read (each skip stage, then
    /// the final stage at the input size).
    pub channels: Vec<i64>,
    /// Names of the encoder levels the decoder reads (the deepest is where it starts, the
    /// others are skips); empty reads every level.
    pub levels: Vec<String>,
    /// Weight of the soft Dice term beside cross-entropy (0 trains on cross-entropy alone).
    pub dice_weight: f64,
    /// Layout of the decoder's convolutions: `"contiguous"` (NCHW) or `"channels_last"`
    /// (NHWC); set it as the encoder's, or each level read is copied into it every step.
    pub memory_format: MemoryFormat,
}

impl Default for UNetConfig {
    fn default() -> Self {
        UNetConfig {
            channels: vec![256, 128, 64, 32, 16],
            levels: Vec::new(),
            dice_weight: 1.0,
            memory_format: MemoryFormat::Contiguous,
        }
    }
}

/// Two 3x3 convolutions, each followed by batch norm and ReLU (the paper's Fig. 1 blue
/// arrows, with batch norm as in every modern U-Net).
struct ConvBlock {
    layers: Vec<(nn::Conv2D, layers::BatchNorm)>,
}

impl ConvBlock {
    fn new(p: &nn::Path, c_in: i64, c_out: i64) -> ConvBlock {
        let conv = |p: nn::Path, c_in: i64| {
            let config = layers::Conv {
                padding: 1,
                // Batch norm follows, so a bias would only duplicate its shift.
                bias: false,
                weight: layers::KAIMING_NORMAL_FAN_OUT,
                ..Default::default()
            };
            layers::conv2d(p, c_in, c_out, 3, config)
        };
        let layers = vec![
            (conv(p / "conv1", c_in), layers::batch_norm2d(p / "bn1", c_out)),
            (conv(p / "conv2", c_out), layers::batch_norm2d(p / "bn2", c_out)),
        ];
        ConvBlock { layers }
    }

    fn convolutions(&self) -> impl Iterator<Item = &nn::Conv2D> {
        self.layers.iter().map(|(conv, _)| conv)
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.layers.iter().fold(x.shallow_clone(), |y, (conv, bn)| {
            y.apply(conv).apply_t(bn, train).relu()
        })
    }
}

/// One decoder stage: upsample to the skip's size (or the input size), concatenate the
/// skip, convolve.
struct Stage {
    /// Index of the skip level in the encoder's levels; `None` for the final stage.
    skip: Option<usize>,
    block: ConvBlock,
}

pub struct UNet {
    /// Index of the deepest level read, where decoding starts.
    start: usize,
    stages: Vec<Stage>,
    classifier: nn::Conv2D,
    dice_weight: f64,
    memory_format: MemoryFormat,
}

/// `x` resized to `size` (bilinear, corners not aligned, as `F.interpolate` by default);
/// unchanged when it already has that size.
fn resize(x: Tensor, size: [i64; 2]) -> Tensor {
    let current = x.size();
    if current[2..] == size {
        x
    } else {
        x.upsample_bilinear2d(size, false, None, None)
    }
}

impl UNet {
    /// The decoder for the encoder levels of `shape`; `key` is the config section's dotted
    /// key, for messages.
    pub fn new(p: &nn::Path, cfg: &UNetConfig, shape: &HeadShape, key: &str) -> Result<UNet> {
        let names: Vec<&str> = shape.levels.iter().map(|l| l.name.as_str()).collect();
        ensure!(
            !names.is_empty(),
            "the `unet` head needs an encoder that declares its feature levels; this one declares none"
        );
        ensure!(
            shape.num_classes >= 2,
            "the `unet` head predicts background and at least one structure: it needs at least 2 classes, \
             the task has {}",
            shape.num_classes
        );
        let read = levels_read(cfg, &names, key)?;
        let read_names: Vec<&str> = read.iter().map(|&i| names[i]).collect();
        ensure!(
            cfg.channels.len() == read.len(),
            "config key `{key}.channels` lists {} widths, but the decoder over the encoder levels [{}] has {} \
             stages (one per level read: a skip stage for each level shallower than `{}`, then the final stage at \
             the input size); give {} widths, deepest stage first",
            cfg.channels.len(),
            read_names.join(", "),
            read.len(),
            read_names[read_names.len() - 1],
            read.len()
        );
        if let Some(bad) = cfg.channels.iter().find(|&&c| c < 1) {
            bail!("config key `{key}.channels` must hold widths of at least 1, found {bad}");
        }
        ensure!(
            cfg.dice_weight.is_finite() && cfg.dice_weight >= 0.0,
            "config key `{key}.dice_weight` must be a finite number at least 0, found {}",
            cfg.dice_weight
        );

        let start = read[read.len() - 1];
        // Skips from deep to shallow, then the final stage without one.
        let skips = read[..read.len() - 1].iter().rev().map(|&i| Some(i)).chain([None]);
        let mut width = shape.levels[start].channels;
        let stages = skips
            .zip(&cfg.channels)
            .enumerate()
            .map(|(i, (skip, &out))| {
                let c_in = width + skip.map_or(0, |s| shape.levels[s].channels);
                width = out;
                Stage {
                    skip,
                    block: ConvBlock::new(&(p / "stages" / i.to_string()), c_in, out),
                }
            })
            .collect();
        let classifier = layers::conv2d(p / "classifier", width, shape.num_classes, 1, Default::default());
        let unet = UNet {
            start,
            stages,
            classifier,
            dice_weight: cfg.dice_weight,
            memory_format: cfg.memory_format,
        };
        let convolutions = unet.stages.iter().flat_map(|s| s.block.convolutions());
        for conv in convolutions.chain([&unet.classifier]) {
            unet.memory_format.convert_parameter(&conv.ws);
        }
        Ok(unet)
    }
}

/// Indices of the levels the decoder reads, in the encoder's (shallow to deep) order.
fn levels_read(cfg: &UNetConfig, names: &[&str], key: &str) -> Result<Vec<usize>> {
    if cfg.levels.is_empty() {
        return Ok((0..names.len()).collect());
    }
    let mut read = Vec::new();
    for level in &cfg.levels {
        let Some(index) = names.iter().position(|n| n == level) else {
            bail!(
                "config key `{key}.levels`: the encoder has no level `{level}`; its levels are: {}",
                names.join(", ")
            );
        };
        ensure!(
            !read.contains(&index),
            "config key `{key}.levels`: level `{level}` is listed twice"
        );
        read.push(index);
    }
    read.sort_unstable();
    Ok(read)
}

impl UNet {
    /// Class logits `[N, K, H, W]` at the input size; `train` selects batch-norm behaviour.
    pub fn logits(&self, input: &HeadInput, train: bool) -> Tensor {
        // The levels read in the decoder's layout (a copy only where the encoder's differs).
        let level = |i: usize| self.memory_format.apply(&input.encoder.levels[i]);
        let mut x = level(self.start);
        for stage in &self.stages {
            x = match stage.skip {
                Some(s) => {
                    let skip = level(s);
                    let size = skip.size();
                    Tensor::cat(&[resize(x, [size[2], size[3]]), skip], 1)
                }
                None => resize(x, input.image_size),
            };
            x = stage.block.forward(&x, train);
        }
        x.apply(&self.classifier)
    }

    /// Cross-entropy plus the weighted soft Dice of `logits` against class ids `targets`
    /// `[N, H, W]`.
    pub fn pixel_loss(&self, logits: &Tensor, targets: &Tensor) -> Tensor {
        let cross_entropy = logits.cross_entropy_loss::<Tensor>(targets, None, tch::Reduction::Mean, -100, 0.0);
        if self.dice_weight == 0.0 {
            cross_entropy
        } else {
            cross_entropy + soft_dice_loss(logits, targets) * self.dice_weight
        }
    }
}

impl Head for UNet {
    fn task(&self) -> Task {
        Task::Segmentation
    }

    fn loss(&self, input: &HeadInput, targets: &Targets, _seed: u64) -> Result<Tensor> {
        let targets = targets.classes("unet")?;
        let logits = self.logits(input, true);
        let size = logits.size();
        ensure!(
            targets.size() == [size[0], size[2], size[3]],
            "head `unet`: targets of shape {:?} for logits {size:?}; expected [N, H, W] class ids",
            targets.size()
        );
        Ok(self.pixel_loss(&logits, targets))
    }

    fn predict(&self, input: &HeadInput) -> Result<Prediction> {
        Ok(Prediction::Logits(self.logits(input, false)))
    }
}

fn build(section: &Section, p: nn::Path, shape: &HeadShape) -> Result<Box<dyn Head>> {
    ensure!(
        shape.spatial_dims == SpatialDims::Two,
        "head `unet` decodes a 2D encoder's feature maps of slices, but the run's encoder is {}: use a 3D head (e.g. `unetr`)",
        shape.spatial_dims
    );
    let cfg: UNetConfig = section.parse()?;
    cfg.memory_format
        .check_device(p.device(), &format!("{}.memory_format", section.key))?;
    Ok(Box::new(UNet::new(&p, &cfg, shape, &section.key)?))
}

register!(HEADS, UNET: HeadEntry = HeadEntry {
    name: "unet",
    about: "U-Net decoder over the encoder's levels (skips at every level read), cross-entropy + soft Dice",
    default_config: default_toml::<UNetConfig>,
    // Five widths: one a level of the registered (ResNet) encoders.
    smoke_configs: &[
        "channels = [8, 8, 4, 4, 4]",
        "channels = [6, 5, 4, 3, 2]\ndice_weight = 0.0\nmemory_format = \"channels_last\"",
    ],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::registry;
    use medssl_resnet as _;
    use tch::nn::OptimizerConfig;

    const HEAD_KEY: &str = "head";

    fn encoder(vs: &nn::VarStore, name: &str, body: &str) -> Box<dyn Encoder> {
        let section = Section::inline("encoder", name, body).unwrap();
        let entry = registry::encoders().get(name).unwrap();
        (entry.build)(&section, vs.root() / "encoder", &EncoderShape { in_channels: 1 }).unwrap()
    }

    fn shape_of(encoder: &dyn Encoder, classes: i64) -> HeadShape {
        HeadShape {
            in_channels: encoder.in_channels(),
            spatial_dims: encoder.spatial_dims(),
            levels: encoder.levels().to_vec(),
            embedding_dim: encoder.embedding_dim(),
            volume_dim: None,
            num_classes: classes,
        }
    }

    fn head(vs: &nn::VarStore, body: &str, shape: &HeadShape) -> Result<Box<dyn Head>> {
        let section = Section::inline(HEAD_KEY, "unet", body)?;
        (registry::heads().get("unet")?.build)(&section, vs.root() / "head", shape)
    }

    /// The decoder itself, for tests of its logits in both modes.
    fn unet(vs: &nn::VarStore, body: &str, shape: &HeadShape) -> Result<UNet> {
        let section = Section::inline(HEAD_KEY, "unet", body)?;
        UNet::new(&(vs.root() / "head"), &section.parse()?, shape, HEAD_KEY)
    }

    fn images(n: i64, h: i64, w: i64) -> Tensor {
        Tensor::randn([n, 1, h, w], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn logits_come_back_at_the_input_size_for_any_stem_and_odd_sizes() {
        tch::manual_seed(0);
        for (name, body) in [
            ("resnet18", "base_width = 4\nsmall_input = true"),
            ("resnet18", "base_width = 4\nsmall_input = false"),
            ("resnet50", "base_width = 2\nsmall_input = false"),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let encoder = encoder(&vs, name, body);
            let shape = shape_of(encoder.as_ref(), 3);
            assert_eq!(
                head(&vs, "channels = [8, 8, 4, 4, 4]", &shape).unwrap().task(),
                Task::Segmentation
            );
            let head = unet(&nn::VarStore::new(Device::Cpu), "channels = [8, 8, 4, 4, 4]", &shape).unwrap();
            for [h, w] in [[17, 23], [32, 32], [9, 40]] {
                let features = encoder.forward(&images(2, h, w), true);
                let input = HeadInput {
                    encoder: &features,
                    volume: None,
                    image_size: [h, w],
                    images: None,
                };
                for train in [true, false] {
                    let logits = head.logits(&input, train);
                    assert_eq!(logits.size(), [2, 3, h, w], "{name} {body} at {h}x{w}");
                }
            }
        }
    }

    /// An encoder that is no ResNet: three levels with odd widths and strides, and maps
    /// whose sizes are not the input size over the stride (as a padded convolution rounds).
    #[test]
    fn decodes_whatever_levels_an_encoder_declares() {
        let level = |name: &str, channels, stride| Level {
            name: name.into(),
            channels,
            stride,
        };
        let shape = HeadShape {
            in_channels: 1,
            spatial_dims: medssl_core::encoder::SpatialDims::Two,
            levels: vec![level("a", 3, 1), level("b", 7, 3), level("c", 5, 9)],
            embedding_dim: 5,
            volume_dim: None,
            num_classes: 4,
        };
        let features = EncoderOutput {
            levels: vec![
                images(2, 19, 19).repeat([1, 3, 1, 1]),
                images(2, 7, 7).repeat([1, 7, 1, 1]),
                images(2, 3, 3).repeat([1, 5, 1, 1]),
            ],
            pooled: Tensor::zeros([2, 5], (Kind::Float, Device::Cpu)),
        };
        let input = HeadInput {
            encoder: &features,
            volume: None,
            image_size: [19, 19],
            images: None,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let all = unet(&vs, "channels = [6, 4, 2]", &shape).unwrap();
        assert_eq!(all.logits(&input, true).size(), [2, 4, 19, 19]);
        let vs = nn::VarStore::new(Device::Cpu);
        let two = unet(&vs, "channels = [6, 4]\nlevels = [\"c\", \"a\"]", &shape).unwrap();
        assert_eq!(two.logits(&input, true).size(), [2, 4, 19, 19]);
        // One skip stage (a) and the final one; level b is not read.
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(names.iter().any(|n| n.starts_with("head.stages.1.")));
        assert!(!names.iter().any(|n| n.starts_with("head.stages.2.")));
        let first = &vs.variables()["head.stages.0.conv1.weight"];
        assert_eq!(first.size()[1], 5 + 3, "deepest width plus the skip's");
    }

    #[test]
    fn gradients_reach_every_head_parameter_and_the_encoder() {
        tch::manual_seed(1);
        for small_input in [true, false] {
            let vs = nn::VarStore::new(Device::Cpu);
            let encoder = encoder(&vs, "resnet18", &format!("base_width = 4\nsmall_input = {small_input}"));
            let head = head(&vs, "channels = [8, 8, 4, 4, 4]", &shape_of(encoder.as_ref(), 3)).unwrap();
            let features = encoder.forward(&images(2, 21, 18), true);
            let input = HeadInput {
                encoder: &features,
                volume: None,
                image_size: [21, 18],
                images: None,
            };
            let targets = Targets::Classes(Tensor::randint(3, [2, 21, 18], (Kind::Int64, Device::Cpu)));
            let loss = head.loss(&input, &targets, 0).unwrap();
            assert!(loss.double_value(&[]).is_finite());
            loss.backward();
            let mut encoder_norm = 0.0;
            // Batch-norm running statistics are buffers, not parameters.
            for (name, var) in vs.variables().into_iter().filter(|(_, v)| v.requires_grad()) {
                let grad = var.grad();
                let norm = if grad.defined() {
                    grad.norm().double_value(&[])
                } else {
                    0.0
                };
                if name.starts_with("head.") {
                    assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
                } else {
                    encoder_norm += norm;
                }
            }
            assert!(encoder_norm > 0.0);
        }
    }

    /// Largest absolute difference over the largest magnitude of `a`.
    fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
        let scale = a.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
        (a - b).abs().max().double_value(&[]) / scale
    }

    /// A ResNet-18 encoder and the decoder on it, both in `format`, with the weights `init`
    /// (every variable, by name) in `kind`: their logits and loss on `x` against `targets`
    /// in training mode, and every parameter's gradient sorted by name.
    fn unet_pass(
        format: MemoryFormat,
        init: &[(String, Tensor)],
        kind: Kind,
        x: &Tensor,
        targets: &Tensor,
    ) -> (Tensor, Tensor, Vec<Tensor>) {
        let layout = format!("memory_format = \"{}\"", format.name());
        let mut vs = nn::VarStore::new(Device::Cpu);
        let encoder = encoder(
            &vs,
            "resnet18",
            &format!("base_width = 4\nsmall_input = true\n{layout}"),
        );
        let head = unet(
            &vs,
            &format!("channels = [8, 8, 4, 4, 4]\n{layout}"),
            &shape_of(encoder.as_ref(), 3),
        )
        .unwrap();
        let variables = vs.variables();
        tch::no_grad(|| {
            for (name, t) in init {
                variables[name].shallow_clone().copy_(t);
            }
        });
        if kind == Kind::Double {
            vs.double();
        }
        for (name, t) in &vs.variables() {
            if t.dim() == 4 {
                assert!(format.holds(t), "{name} in {}: {:?}", format.name(), t.stride());
            }
        }
        let [h, w] = [x.size()[2], x.size()[3]];
        let features = encoder.forward(&x.to_kind(kind), true);
        let input = HeadInput {
            encoder: &features,
            volume: None,
            image_size: [h, w],
            images: None,
        };
        let logits = head.logits(&input, true);
        assert!(
            format.holds(&logits),
            "logits in {}: {:?}",
            format.name(),
            logits.stride()
        );
        let loss = head.pixel_loss(&logits, targets);
        loss.backward();
        let gradients = init
            .iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, _)| vs.variables()[name].grad())
            .collect();
        (logits, loss, gradients)
    }

    /// channels_last against contiguous for the whole network (encoder and decoder, the same
    /// weights): in fp32 the logits and the loss to 5e-5 of their largest magnitude
    /// (different summation orders, amplified by the batch norms of 4-channel stages;
    /// measured over 30 runs: logits 1.5e-6 to 1e-5, loss below 1e-7); in f64 those and
    /// every gradient to 1e-10 (measured at most 4e-14). fp32 gradients are not compared: a
    /// ReLU input within rounding of 0 is resolved either way by either order and moves
    /// whole gradients (the ResNet plugin's test of the same shows it against f64).
    #[test]
    fn channels_last_equals_contiguous_in_logits_loss_and_gradients() {
        let reference = nn::VarStore::new(Device::Cpu);
        let built = encoder(&reference, "resnet18", "base_width = 4\nsmall_input = true");
        unet(&reference, "channels = [8, 8, 4, 4, 4]", &shape_of(built.as_ref(), 3)).unwrap();
        let mut init: Vec<(String, Tensor)> = reference.variables().into_iter().collect();
        init.sort_by(|a, b| a.0.cmp(&b.0));
        // Sizes not divisible by the deepest stride: every stage resizes.
        let x = images(4, 37, 30);
        let targets = Tensor::randint(3, [4, 37, 30], (Kind::Int64, Device::Cpu));
        let mut measured = Vec::new();
        let mut fp32_gradients = 0.0;
        for (kind, tolerance) in [(Kind::Float, 5e-5), (Kind::Double, 1e-10)] {
            let (logits_a, loss_a, gradients_a) = unet_pass(MemoryFormat::Contiguous, &init, kind, &x, &targets);
            let (logits_b, loss_b, gradients_b) = unet_pass(MemoryFormat::ChannelsLast, &init, kind, &x, &targets);
            let gradients = gradients_a
                .iter()
                .zip(&gradients_b)
                .map(|(a, b)| relative_difference(a, b))
                .fold(0.0, f64::max);
            let name = if kind == Kind::Float { "fp32" } else { "f64" };
            measured.push((name, "logits", relative_difference(&logits_a, &logits_b), tolerance));
            measured.push((name, "loss", relative_difference(&loss_a, &loss_b), tolerance));
            match kind {
                Kind::Float => fp32_gradients = gradients,
                _ => measured.push((name, "gradients", gradients, tolerance)),
            }
        }
        eprintln!(
            "unet on resnet18, channels_last vs contiguous, relative: {} (fp32 gradients {fp32_gradients:.1e}, not compared)",
            measured
                .iter()
                .map(|(kind, what, diff, _)| format!("{kind} {what} {diff:.1e}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (kind, what, diff, tolerance) in measured {
            assert!(diff <= tolerance, "{kind} {what}: {diff:e} > {tolerance:e}");
        }
    }

    #[test]
    fn loss_falls_when_overfitting_a_fixed_batch() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let encoder = encoder(&vs, "resnet18", "base_width = 4\nsmall_input = true");
        let head = head(&vs, "channels = [16, 16, 8, 8, 8]", &shape_of(encoder.as_ref(), 3)).unwrap();
        // Two discs of different classes on a noisy background.
        let grid = Tensor::arange(20, (Kind::Float, Device::Cpu));
        let (y, x) = (grid.view([20, 1]), grid.view([1, 20]));
        let disc = |cy: f64, cx: f64, r: f64| ((&y - cy).square() + (&x - cx).square()).le(r * r);
        let targets = (disc(6.0, 6.0, 4.0).to_kind(Kind::Int64) + disc(13.0, 13.0, 4.0).to_kind(Kind::Int64) * 2)
            .unsqueeze(0)
            .repeat([2, 1, 1]);
        let images = targets.to_kind(Kind::Float).unsqueeze(1) + images(2, 20, 20) * 0.3;
        let targets = Targets::Classes(targets);
        let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        let mut losses = Vec::new();
        for _ in 0..25 {
            let features = encoder.forward(&images, true);
            let input = HeadInput {
                encoder: &features,
                volume: None,
                image_size: [20, 20],
                images: None,
            };
            let loss = head.loss(&input, &targets, 0).unwrap();
            opt.backward_step(&loss);
            losses.push(loss.double_value(&[]));
        }
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < first * 0.5, "loss went from {first} to {last}: {losses:?}");
    }

    #[test]
    fn config_errors_name_the_key_and_what_was_expected() {
        let vs = nn::VarStore::new(Device::Cpu);
        let encoder = encoder(&vs, "resnet18", "base_width = 4\nsmall_input = true");
        let shape = shape_of(encoder.as_ref(), 3);
        let message = |body: &str, shape: &HeadShape| {
            let vs = nn::VarStore::new(Device::Cpu);
            format!(
                "{:#}",
                head(&vs, body, shape)
                    .err()
                    .unwrap_or_else(|| panic!("`{body}` builds"))
            )
        };
        let wrong_length = message("channels = [8, 8]", &shape);
        assert!(
            wrong_length.contains("head.channels")
                && wrong_length.contains("[stem, layer1, layer2, layer3, layer4]")
                && wrong_length.contains("give 5 widths"),
            "{wrong_length}"
        );
        let subset = message("levels = [\"layer3\", \"layer4\"]", &shape);
        assert!(
            subset.contains("[layer3, layer4]") && subset.contains("give 2 widths"),
            "{subset}"
        );
        let unknown = message("levels = [\"layer5\"]\nchannels = [4]", &shape);
        assert!(
            unknown.contains("head.levels")
                && unknown.contains("layer5")
                && unknown.contains("stem, layer1, layer2, layer3, layer4"),
            "{unknown}"
        );
        let twice = message("levels = [\"layer4\", \"layer4\"]\nchannels = [4, 4]", &shape);
        assert!(twice.contains("head.levels") && twice.contains("twice"), "{twice}");
        let zero = message("channels = [8, 8, 0, 4, 4]", &shape);
        assert!(zero.contains("head.channels") && zero.contains("found 0"), "{zero}");
        let weight = message("dice_weight = -1.0", &shape);
        assert!(weight.contains("head.dice_weight") && weight.contains("-1"), "{weight}");
        let typo = message("chanels = [8]", &shape);
        assert!(typo.contains("chanels"), "{typo}");
        let layout = message("memory_format = \"nhwc\"", &shape);
        assert!(
            layout.contains("head.memory_format")
                && layout.contains("`contiguous`")
                && layout.contains("`channels_last`"),
            "{layout}"
        );
        let one_class = message(
            "",
            &HeadShape {
                num_classes: 1,
                ..shape.clone()
            },
        );
        assert!(one_class.contains("at least 2 classes"), "{one_class}");
        // The default builds on a five-level encoder.
        assert!(head(&vs, "", &shape).is_ok());
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::heads().get("unet")?;
        let section = Section::inline(HEAD_KEY, "unet", &(entry.default_config)())?;
        assert_eq!(section.parse::<UNetConfig>()?, UNetConfig::default());
        Ok(())
    }
}
