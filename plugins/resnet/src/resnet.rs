//! ResNet-18/34/50 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
//! Table 1), the paper's f_intra (Nguyen et al., AAAI 2023, Sec. 3.1).
//!
//! Parameter names and layout follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`,
//! `layer1.0.downsample.0`, ...), so weights can be exchanged through safetensors. The
//! classifier (`fc`) is left out: the encoder returns its feature levels and the globally
//! average-pooled last level. Options for medical data: 1-channel input (3-channel weights
//! take a grey image repeated), a small-input stem for 28-64 px images (3x3 stride-1 conv, no
//! max-pool, as for CIFAR in the ResNet paper, Sec. 4.2), and a base width below 64 for
//! tests and laptops.
//!
//! Initialisation as torchvision's `ResNet.__init__`: convolutions Kaiming normal (fan_out,
//! ReLU) without bias, batch norms scale 1 and shift 0, and with `zero_init_residual` the
//! last batch norm of every residual branch at scale 0 (torchvision's flag, off by default
//! there and here).
//!
//! `memory_format = "channels_last"` lays every convolution weight out NHWC when the encoder
//! is built and makes the input batch NHWC at its entry, as
//! `model.to(memory_format=torch.channels_last)` with `x.to(memory_format=...)` in PyTorch's
//! channels-last tutorial, so every convolution runs in oneDNN's (CPU) and cuDNN's tensor-core
//! (GPU) preferred layout; the feature levels come out channels_last, the values as
//! contiguous's within float rounding ([`medssl_core::memory_format`]).

use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResNetConfig {
    /// Channels of the first convolution: 1 for grey-scale, 3 to match ImageNet weights (a
    /// 1-channel input is then repeated).
    pub input_channels: i64,
    /// Width of the stem and of layer1's 3x3 convolutions (64 in the paper).
    pub base_width: i64,
    /// 3x3 stride-1 stem without max-pool, for 28-64 px inputs.
    pub small_input: bool,
    /// Start the last batch norm of each residual branch at scale 0, so every block starts
    /// as the identity (torchvision's `zero_init_residual`).
    pub zero_init_residual: bool,
    /// Layout of the convolution weights and activations: `"contiguous"` (NCHW) or
    /// `"channels_last"` (NHWC).
    pub memory_format: MemoryFormat,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        ResNetConfig {
            input_channels: 1,
            base_width: 64,
            small_input: false,
            zero_init_residual: false,
            memory_format: MemoryFormat::Contiguous,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Block {
    Basic,
    Bottleneck,
}

impl Block {
    fn expansion(self) -> i64 {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let conv = layers::Conv {
        stride,
        padding,
        bias: false,
        weight: layers::KAIMING_NORMAL_FAN_OUT,
        ..Default::default()
    };
    layers::conv2d(p, c_in, c_out, k, conv)
}

/// One residual block: convolutions with batch norm, and a projection shortcut where the
/// shape changes.
struct Residual {
    convs: Vec<(nn::Conv2D, layers::BatchNorm)>,
    downsample: Option<(nn::Conv2D, layers::BatchNorm)>,
}

impl Residual {
    fn new(p: &nn::Path, kind: Block, c_in: i64, width: i64, stride: i64, zero_init_residual: bool) -> Residual {
        let c_out = width * kind.expansion();
        let bn = |p: nn::Path, c: i64| layers::batch_norm2d(p, c);
        let last_bn = |p: nn::Path, c: i64| {
            if zero_init_residual {
                layers::zeroed_batch_norm2d(p, c)
            } else {
                layers::batch_norm2d(p, c)
            }
        };
        let convs = match kind {
            Block::Basic => vec![
                (conv(p / "conv1", c_in, width, 3, stride, 1), bn(p / "bn1", width)),
                (conv(p / "conv2", width, width, 3, 1, 1), last_bn(p / "bn2", width)),
            ],
            // torchvision v1.5: the stride sits on the 3x3 convolution.
            Block::Bottleneck => vec![
                (conv(p / "conv1", c_in, width, 1, 1, 0), bn(p / "bn1", width)),
                (conv(p / "conv2", width, width, 3, stride, 1), bn(p / "bn2", width)),
                (conv(p / "conv3", width, c_out, 1, 1, 0), last_bn(p / "bn3", c_out)),
            ],
        };
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            (
                conv(p / "downsample" / "0", c_in, c_out, 1, stride, 0),
                bn(p / "downsample" / "1", c_out),
            )
        });
        Residual { convs, downsample }
    }

    fn convolutions(&self) -> impl Iterator<Item = &nn::Conv2D> {
        self.convs.iter().chain(&self.downsample).map(|(c, _)| c)
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut y = x.shallow_clone();
        for (i, (c, b)) in self.convs.iter().enumerate() {
            y = y.apply(c).apply_t(b, train);
            if i < last {
                y = y.relu();
            }
        }
        let shortcut = match &self.downsample {
            Some((c, b)) => x.apply(c).apply_t(b, train),
            None => x.shallow_clone(),
        };
        (y + shortcut).relu()
    }
}

pub struct ResNet {
    cfg: ResNetConfig,
    conv1: nn::Conv2D,
    bn1: layers::BatchNorm,
    layers: Vec<Vec<Residual>>,
    levels: Vec<Level>,
}

impl ResNet {
    fn new(p: nn::Path, cfg: ResNetConfig, kind: Block, depths: [usize; 4]) -> Result<ResNet> {
        ensure!(
            cfg.input_channels == 1 || cfg.input_channels == 3,
            "encoder.input_channels must be 1 or 3, got {}",
            cfg.input_channels
        );
        ensure!(
            cfg.base_width >= 1,
            "encoder.base_width must be at least 1, got {}",
            cfg.base_width
        );
        let w = cfg.base_width;
        let (conv1, stem_stride, pool_stride) = if cfg.small_input {
            (conv(&p / "conv1", cfg.input_channels, w, 3, 1, 1), 1, 1)
        } else {
            (conv(&p / "conv1", cfg.input_channels, w, 7, 2, 3), 2, 2)
        };
        let bn1 = layers::batch_norm2d(&p / "bn1", w);
        let mut levels = vec![Level {
            name: "stem".into(),
            channels: w,
            stride: stem_stride,
        }];
        let mut layers = Vec::new();
        let mut c_in = w;
        let mut stride_so_far = stem_stride * pool_stride;
        for (i, &depth) in depths.iter().enumerate() {
            let width = w << i;
            let stride = if i == 0 { 1 } else { 2 };
            stride_so_far *= stride;
            let lp = &p / format!("layer{}", i + 1);
            let blocks: Vec<Residual> = (0..depth)
                .map(|b| {
                    let block = Residual::new(
                        &(&lp / b.to_string()),
                        kind,
                        c_in,
                        width,
                        if b == 0 { stride } else { 1 },
                        cfg.zero_init_residual,
                    );
                    c_in = width * kind.expansion();
                    block
                })
                .collect();
            layers.push(blocks);
            levels.push(Level {
                name: format!("layer{}", i + 1),
                channels: c_in,
                stride: stride_so_far,
            });
        }
        let resnet = ResNet {
            cfg,
            conv1,
            bn1,
            layers,
            levels,
        };
        for conv in resnet.convolutions() {
            resnet.cfg.memory_format.convert_parameter(&conv.ws);
        }
        Ok(resnet)
    }

    /// Every convolution, the stem's first.
    fn convolutions(&self) -> impl Iterator<Item = &nn::Conv2D> {
        std::iter::once(&self.conv1).chain(self.layers.iter().flatten().flat_map(Residual::convolutions))
    }
}

impl Encoder for ResNet {
    fn reference_library(&self) -> Option<ReferenceLibrary> {
        Some(ReferenceLibrary::Torchvision)
    }
    fn in_channels(&self) -> i64 {
        1
    }

    fn levels(&self) -> &[Level] {
        &self.levels
    }

    fn embedding_dim(&self) -> i64 {
        self.levels.last().map(|l| l.channels).unwrap_or(0)
    }

    fn forward(&self, images: &Tensor, train: bool) -> EncoderOutput {
        let x = if self.cfg.input_channels == 3 && images.size()[1] == 1 {
            images.repeat([1, 3, 1, 1])
        } else {
            images.shallow_clone()
        };
        // The batch in the weights' layout, so the first convolution already runs in it.
        let x = self.cfg.memory_format.apply(&x);
        let stem = x.apply(&self.conv1).apply_t(&self.bn1, train).relu();
        let mut y = if self.cfg.small_input {
            stem.shallow_clone()
        } else {
            stem.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
        };
        let mut levels = vec![stem];
        for layer in &self.layers {
            for block in layer {
                y = block.forward(&y, train);
            }
            levels.push(y.shallow_clone());
        }
        // [N, C, 1, 1] in either layout flattens to a row-major [N, C].
        let pooled = y.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        EncoderOutput { levels, pooled }
    }
}

fn build(section: &Section, p: nn::Path, kind: Block, depths: [usize; 4]) -> Result<Box<dyn Encoder>> {
    let cfg: ResNetConfig = section.parse()?;
    cfg.memory_format
        .check_device(p.device(), &format!("{}.memory_format", section.key))?;
    Ok(Box::new(ResNet::new(p, cfg, kind, depths)?))
}

fn build_resnet18(s: &Section, p: nn::Path, _: &EncoderShape) -> Result<Box<dyn Encoder>> {
    build(s, p, Block::Basic, [2, 2, 2, 2])
}
fn build_resnet34(s: &Section, p: nn::Path, _: &EncoderShape) -> Result<Box<dyn Encoder>> {
    build(s, p, Block::Basic, [3, 4, 6, 3])
}
fn build_resnet50(s: &Section, p: nn::Path, _: &EncoderShape) -> Result<Box<dyn Encoder>> {
    build(s, p, Block::Bottleneck, [3, 4, 6, 3])
}

register!(ENCODERS, RESNET18: EncoderEntry = EncoderEntry {
    name: "resnet18",
    about: "ResNet-18 (basic blocks 2-2-2-2), torchvision parameter names, levels stem..layer4",
    default_config: default_toml::<ResNetConfig>,
    smoke_configs: &["base_width = 4\nsmall_input = true"],
    build: build_resnet18,
});
register!(ENCODERS, RESNET34: EncoderEntry = EncoderEntry {
    name: "resnet34",
    about: "ResNet-34 (basic blocks 3-4-6-3), torchvision parameter names, levels stem..layer4",
    default_config: default_toml::<ResNetConfig>,
    smoke_configs: &["base_width = 2\nsmall_input = true"],
    build: build_resnet34,
});
register!(ENCODERS, RESNET50: EncoderEntry = EncoderEntry {
    name: "resnet50",
    about: "ResNet-50 (bottlenecks 3-4-6-3), the paper's f_intra; torchvision names, levels stem..layer4",
    default_config: default_toml::<ResNetConfig>,
    // The second also runs channels_last levels through every aggregator, objective and head.
    smoke_configs: &[
        "base_width = 2\nsmall_input = true",
        "base_width = 2\ninput_channels = 3\nmemory_format = \"channels_last\"",
    ],
    build: build_resnet50,
});

#[cfg(test)]
mod tests {
    use super::*;

    fn build_named(name: &str, body: &str) -> (nn::VarStore, Box<dyn Encoder>) {
        let vs = nn::VarStore::new(Device::Cpu);
        let section = Section::inline("encoder", name, body).unwrap();
        let entry = medssl_core::registry::encoders().get(name).unwrap();
        let enc = (entry.build)(&section, vs.root(), &EncoderShape { in_channels: 1 }).unwrap();
        (vs, enc)
    }

    #[test]
    fn resnet50_declares_the_papers_widths_and_torchvision_names() {
        let (vs, enc) = build_named("resnet50", "");
        let widths: Vec<i64> = enc.levels().iter().map(|l| l.channels).collect();
        assert_eq!(widths, vec![64, 256, 512, 1024, 2048]);
        let strides: Vec<i64> = enc.levels().iter().map(|l| l.stride).collect();
        assert_eq!(strides, vec![2, 4, 8, 16, 32]);
        let vars = vs.variables();
        for name in [
            "conv1.weight",
            "bn1.running_mean",
            "layer1.0.downsample.0.weight",
            "layer4.2.conv3.weight",
            "layer3.5.bn2.bias",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
        // torchvision's resnet50 has 23,508,032 parameters without fc (25,557,032 - 2,049,000),
        // minus 6,272 for a 1-channel conv1 (64 * 2 * 7 * 7).
        let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(params, 23_508_032 - 6_272);
    }

    #[test]
    fn resnet18_parameter_count_matches_torchvision() {
        let (vs, _) = build_named("resnet18", "input_channels = 3");
        let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        // torchvision resnet18: 11,689,512 with fc (513,000).
        assert_eq!(params, 11_689_512 - 513_000);
    }

    #[test]
    fn feature_maps_follow_the_declared_levels() {
        for (name, body, size) in [
            ("resnet18", "base_width = 4", 64),
            ("resnet34", "base_width = 4\nsmall_input = true", 32),
            ("resnet50", "base_width = 2", 64),
        ] {
            let (_, enc) = build_named(name, body);
            let x = Tensor::randn([2, 1, size, size], (Kind::Float, Device::Cpu));
            let out = enc.forward(&x, true);
            assert_eq!(out.levels.len(), enc.levels().len());
            for (t, level) in out.levels.iter().zip(enc.levels()) {
                assert_eq!(
                    t.size(),
                    vec![2, level.channels, size / level.stride, size / level.stride],
                    "{name} {}",
                    level.name
                );
            }
            assert_eq!(out.pooled.size(), vec![2, enc.embedding_dim()]);
        }
    }

    #[test]
    fn three_channel_weights_accept_grey_images() {
        let (_, enc) = build_named("resnet18", "base_width = 4\ninput_channels = 3");
        let out = enc.forward(&Tensor::randn([1, 1, 32, 32], (Kind::Float, Device::Cpu)), false);
        assert_eq!(out.pooled.size(), vec![1, 32]);
    }

    #[test]
    fn zero_init_residual_zeroes_the_last_norm_of_each_branch_only() {
        for (name, last) in [("resnet18", "bn2"), ("resnet50", "bn3")] {
            let (vs, _) = build_named(name, "base_width = 4\nzero_init_residual = true");
            for (var, t) in vs.variables() {
                let Some(norm) = var.strip_suffix(".weight").filter(|_| t.dim() == 1) else {
                    continue;
                };
                let zero = norm.starts_with("layer") && norm.ends_with(last) && !norm.contains("downsample");
                let expected = if zero { 0.0 } else { 1.0 };
                assert!(t.eq(expected).all().int64_value(&[]) == 1, "{name} {var}");
            }
        }
    }

    /// Largest absolute difference over the largest magnitude of `a` (`b` taken at `a`'s kind).
    fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
        let scale = a.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
        (a - b.to_kind(a.kind())).abs().max().double_value(&[]) / scale
    }

    /// The largest [`relative_difference`] of tensors paired by position.
    fn worst<'a>(pairs: impl IntoIterator<Item = (&'a Tensor, &'a Tensor)>) -> f64 {
        pairs
            .into_iter()
            .map(|(a, b)| relative_difference(a, b))
            .fold(0.0, f64::max)
    }

    /// One training-mode forward and backward: the levels, the pooled embedding, a loss that
    /// reads all of them, every parameter's gradient and the batch-norm statistics after
    /// it, each sorted by variable name.
    struct Pass {
        outputs: Vec<Tensor>,
        loss: Tensor,
        gradients: Vec<Tensor>,
        statistics: Vec<Tensor>,
    }

    /// [`Pass`] of encoder `name` configured by `body`, with the weights `init`, in `kind`,
    /// on `x`; `probe` weighs each level in the loss.
    fn pass(name: &str, body: &str, init: &[(String, Tensor)], kind: Kind, x: &Tensor, probe: &[Tensor]) -> Pass {
        let (mut vs, enc) = build_named(name, body);
        let variables = vs.variables();
        tch::no_grad(|| {
            for (var, t) in init {
                variables[var].shallow_clone().copy_(t);
            }
        });
        if kind == Kind::Double {
            vs.double();
        }
        let out = enc.forward(&x.to_kind(kind), true);
        let mut loss = out.pooled.square().mean(kind);
        for (level, w) in out.levels.iter().zip(probe) {
            loss += (level * w.to_kind(kind)).mean(kind);
        }
        loss.backward();
        let mut outputs = out.levels;
        outputs.push(out.pooled);
        let (mut gradients, mut statistics) = (Vec::new(), Vec::new());
        for (var, _) in init {
            let t = &vs.variables()[var];
            if t.requires_grad() {
                gradients.push(t.grad());
            } else {
                statistics.push(t.shallow_clone());
            }
        }
        Pass {
            outputs,
            loss,
            gradients,
            statistics,
        }
    }

    /// f64 tolerance of channels_last against contiguous, relative to each tensor's largest
    /// magnitude (measured: at most 5e-11, on ResNet-50's gradients).
    const F64_TOLERANCE: f64 = 1e-9;

    /// channels_last against contiguous with the same weights and input, in training mode:
    /// the levels and the pooled embedding, a loss over all of them, the batch-norm
    /// statistics after the step, and every parameter's gradient.
    ///
    /// In f64 all four agree to rounding. In fp32 the two layouts sum in different orders
    /// (oneDNN's NHWC convolutions, libtorch's channels-last CPU batch-norm kernels; the
    /// latter measure 1.5 to 4 times further from f64 than the NCHW ones), so the forward
    /// pass, the loss and the statistics are compared to a tolerance per network: the thin
    /// 50-layer network amplifies rounding through its batch norms (its contiguous fp32
    /// forward pass is itself 5e-5 to 8e-5 from f64, channels_last's 7e-5 to 1.5e-4;
    /// ResNet-18's 1e-6 to 3e-6). fp32
    /// gradients are not compared: a ReLU input or a max-pool pair within rounding of a tie
    /// is resolved either way by either summation order and moves whole gradients (by up to
    /// 3e-1 here, as much between contiguous fp32 and f64), which f64 does not see.
    #[test]
    fn channels_last_equals_contiguous_in_forward_loss_gradients_and_statistics() {
        for (name, body, channels, size, fp32_tolerance) in [
            // Measured at most, over 30 runs: forward 5e-6, loss 5e-7, statistics 2.3e-5.
            ("resnet18", "base_width = 4\nsmall_input = true", 1, 24, 5e-5),
            // Measured at most, over 30 runs: forward 1.2e-4, loss 4e-6, statistics 3e-5.
            ("resnet50", "base_width = 8\ninput_channels = 3", 3, 64, 4e-4),
        ] {
            let channels_last = format!("{body}\nmemory_format = \"channels_last\"");
            let (vs, enc) = build_named(name, body);
            let mut init: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            init.sort_by(|a, b| a.0.cmp(&b.0));
            let x = Tensor::randn([8, channels, size, size], (Kind::Float, Device::Cpu));
            let probe: Vec<Tensor> = enc.forward(&x, true).levels.iter().map(|l| l.randn_like()).collect();

            let mut measured = Vec::new();
            let mut fp32_gradients = 0.0;
            for kind in [Kind::Float, Kind::Double] {
                let contiguous = pass(name, body, &init, kind, &x, &probe);
                let nhwc = pass(name, &channels_last, &init, kind, &x, &probe);
                let (levels, pooled) = nhwc.outputs.split_at(nhwc.outputs.len() - 1);
                for (t, level) in levels.iter().zip(enc.levels()) {
                    assert!(
                        MemoryFormat::ChannelsLast.holds(t),
                        "{name} {}: {:?}",
                        level.name,
                        t.stride()
                    );
                }
                assert!(pooled[0].is_contiguous(), "{name}: pooled {:?}", pooled[0].stride());
                let (label, tolerance) = match kind {
                    Kind::Float => ("fp32", fp32_tolerance),
                    _ => ("f64", F64_TOLERANCE),
                };
                let gradients = worst(contiguous.gradients.iter().zip(&nhwc.gradients));
                measured.extend([
                    (
                        label,
                        "forward",
                        worst(contiguous.outputs.iter().zip(&nhwc.outputs)),
                        tolerance,
                    ),
                    (
                        label,
                        "loss",
                        relative_difference(&contiguous.loss, &nhwc.loss),
                        tolerance,
                    ),
                    (
                        label,
                        "statistics",
                        worst(contiguous.statistics.iter().zip(&nhwc.statistics)),
                        tolerance,
                    ),
                ]);
                match kind {
                    Kind::Float => fp32_gradients = gradients,
                    _ => measured.push((label, "gradients", gradients, tolerance)),
                }
            }
            eprintln!(
                "{name}, channels_last vs contiguous, relative: {} (fp32 gradients {fp32_gradients:.1e}, not compared)",
                measured
                    .iter()
                    .map(|(kind, what, diff, _)| format!("{kind} {what} {diff:.1e}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for (kind, what, diff, tolerance) in measured {
                assert!(diff <= tolerance, "{name} {kind} {what}: {diff:e} > {tolerance:e}");
            }
        }
    }

    #[test]
    fn channels_last_weights_stay_so_through_optimizer_steps_and_a_checkpoint_round_trip() -> Result<()> {
        use medssl_core::{checkpoint, config::OptimizerConfig, optim::Optimizer, run_dir};
        let body = "base_width = 4\nsmall_input = true\nmemory_format = \"channels_last\"";
        let (vs, enc) = build_named("resnet18", body);
        let cfg = OptimizerConfig {
            name: "adamw".into(),
            lr: 1e-2,
            weight_decay: 0.05,
            ..Default::default()
        };
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let mut optimizer = Optimizer::new(&cfg, params)?;
        let x = Tensor::randn([4, 1, 16, 16], (Kind::Float, Device::Cpu));
        for _ in 0..2 {
            optimizer.zero_grad();
            enc.forward(&x, true).pooled.square().mean(Kind::Float).backward();
            optimizer.step(cfg.lr);
        }
        let convs: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(n, t)| n.ends_with("weight") && t.dim() == 4)
            .collect();
        assert_eq!(
            convs.len(),
            1 + 8 * 2 + 3,
            "stem, two per basic block, three projections"
        );
        for (name, t) in &convs {
            assert!(
                MemoryFormat::ChannelsLast.holds(t),
                "{name} after steps: {:?}",
                t.stride()
            );
        }

        // Saved as ordinary row-major tensors with the logical [O, I, kH, kW] values.
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("tensors.safetensors");
        let mut saved: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        saved.sort_by(|a, b| a.0.cmp(&b.0));
        checkpoint::write_safetensors(&file, &saved)?;
        let stored = checkpoint::read_safetensors(&file)?;
        for (name, t) in &stored {
            let original = &vs.variables()[name];
            assert!(t.is_contiguous() && t.equal(original), "{name} as stored");
        }
        let reference = enc.forward(&x, false).pooled;

        // Loaded into a channels_last model the weights keep its layout, and it computes
        // exactly what the saved model did; loaded into a contiguous one, theirs, and it
        // computes the same within fp32 rounding.
        for (format, body, tolerance) in [
            (MemoryFormat::ChannelsLast, body, 0.0),
            (MemoryFormat::Contiguous, "base_width = 4\nsmall_input = true", 1e-5),
        ] {
            let (loaded_vs, loaded) = build_named("resnet18", body);
            let variables: Vec<(String, Tensor)> = loaded_vs.variables().into_iter().collect();
            run_dir::load_variables(&variables, &stored, "", &[], &file)?;
            for (name, _) in &convs {
                let t = &loaded_vs.variables()[name];
                assert!(
                    format.holds(t),
                    "{name} loaded into {}: {:?}",
                    format.name(),
                    t.stride()
                );
                assert!(t.equal(&vs.variables()[name]), "{name} loaded");
            }
            let pooled = loaded.forward(&x, false).pooled;
            let diff = relative_difference(&reference, &pooled);
            assert!(
                diff <= tolerance,
                "{} model from the checkpoint: {diff:e}",
                format.name()
            );
        }
        Ok(())
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let section = Section::inline("encoder", "resnet18", "input_channels = 2").unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let err = build(&section, vs.root(), Block::Basic, [2, 2, 2, 2])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("input_channels") && err.contains('2'), "{err}");
        let section = Section::inline("encoder", "resnet18", "widht = 2").unwrap();
        let err = format!(
            "{:#}",
            build(&section, vs.root(), Block::Basic, [2, 2, 2, 2]).err().unwrap()
        );
        assert!(err.contains("encoder.widht") && err.contains("base_width"), "{err}");
        let section = Section::inline("encoder", "resnet18", "memory_format = \"nhwc\"").unwrap();
        let err = format!(
            "{:#}",
            build(&section, vs.root(), Block::Basic, [2, 2, 2, 2]).err().unwrap()
        );
        assert!(
            err.contains("encoder.memory_format") && err.contains("`contiguous`") && err.contains("`channels_last`"),
            "{err}"
        );
    }
}
