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
}

impl Default for ResNetConfig {
    fn default() -> Self {
        ResNetConfig {
            input_channels: 1,
            base_width: 64,
            small_input: false,
            zero_init_residual: false,
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
        Ok(ResNet {
            cfg,
            conv1,
            bn1,
            layers,
            levels,
        })
    }
}

impl Encoder for ResNet {
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
        let pooled = y.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        EncoderOutput { levels, pooled }
    }
}

fn build(section: &Section, p: nn::Path, kind: Block, depths: [usize; 4]) -> Result<Box<dyn Encoder>> {
    let cfg: ResNetConfig = section.parse()?;
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
    smoke_configs: &["base_width = 2\nsmall_input = true", "base_width = 2\ninput_channels = 3"],
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
    }
}
