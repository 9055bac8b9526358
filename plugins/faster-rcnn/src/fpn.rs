//! Feature pyramid network (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR
//! 2017, Sec. 3 and Fig. 3) over any encoder's declared levels.
//!
//! Each selected encoder level `C_l` gets a lateral 1x1 convolution to the pyramid width; from
//! the deepest level down, the running map is upsampled by nearest neighbour to the next
//! level's size and added to its lateral (the top-down pathway); a 3x3 convolution on every sum
//! gives the output `P_l` ("to reduce the aliasing effect of upsampling"). The paper uses
//! C2..C5 of a ResNet, so the default takes the encoder's last four levels. With `extra_pool`
//! a coarser level `P6` is a 1x1, stride-2 max-pool of the last output, as torchvision's
//! `LastLevelMaxPool` (used by the RPN only in the paper, Sec. 4.1).
//!
//! Strides come from what the encoder declares, never from the level's position, so an
//! encoder with a small-input stem (strides 1, 1, 2, 4, 8) gets a pyramid of those strides.
//! Upsampling goes to the lateral's actual size rather than by a factor of 2, so inputs
//! whose size is not a multiple of the coarsest stride still add up.
//!
//! Convolutions start as torchvision's FPN: Kaiming-uniform weights with `a = 1`, zero bias.

use anyhow::{bail, ensure, Result};
use medssl_core::encoder::Level;
use medssl_core::layers;
use medssl_core::memory_format::MemoryFormat;
use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

/// Keys of `[head.fpn]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FpnConfig {
    /// Names of the encoder levels the pyramid is built on, shallow to deep; empty takes the
    /// last four (C2..C5 of a ResNet, as in the paper), or all when there are fewer.
    pub levels: Vec<String>,
    /// Channels of every pyramid level (256 in the paper).
    pub width: i64,
    /// Add a level of twice the last stride by max-pooling the last output (P6).
    pub extra_pool: bool,
}

impl Default for FpnConfig {
    fn default() -> Self {
        FpnConfig {
            levels: Vec::new(),
            width: 256,
            extra_pool: true,
        }
    }
}

/// The pyramid: lateral and output convolutions per selected level.
#[derive(Debug)]
pub struct Fpn {
    /// Index in the encoder's levels of each pyramid input, shallow to deep.
    inputs: Vec<usize>,
    /// Layout of the convolution weights and of the inputs at entry.
    memory_format: MemoryFormat,
    lateral: Vec<nn::Conv2D>,
    output: Vec<nn::Conv2D>,
    strides: Vec<i64>,
    extra_pool: bool,
    width: i64,
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64) -> nn::Conv2D {
    // torchvision's FPN: kaiming_uniform_(a=1), i.e. bound sqrt(3 / fan_in), bias 0.
    let config = layers::Conv {
        padding: k / 2,
        weight: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Uniform,
            fan: nn::init::FanInOut::FanIn,
            non_linearity: nn::init::NonLinearity::Linear,
        },
        bias_init: Some(nn::Init::Const(0.0)),
        ..Default::default()
    };
    layers::conv2d(p, c_in, c_out, k, config)
}

impl Fpn {
    /// Builds the pyramid over `levels` (the encoder's, shallow to deep); parameters under
    /// `p` as `inner.{i}` (lateral) and `layer.{i}` (output).
    pub fn new(config: &FpnConfig, p: nn::Path, levels: &[Level]) -> Result<Fpn> {
        ensure!(
            config.width >= 1,
            "config key `head.fpn.width` must be at least 1, found {}",
            config.width
        );
        ensure!(
            !levels.is_empty(),
            "the encoder declares no feature levels to build a pyramid on"
        );
        let inputs: Vec<usize> = if config.levels.is_empty() {
            (levels.len().saturating_sub(4)..levels.len()).collect()
        } else {
            let mut inputs = Vec::with_capacity(config.levels.len());
            for name in &config.levels {
                match levels.iter().position(|l| &l.name == name) {
                    Some(index) => inputs.push(index),
                    None => bail!(
                        "config key `head.fpn.levels` names `{name}`, which the encoder does not have; its levels are {:?}",
                        levels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>()
                    ),
                }
            }
            inputs
        };
        let strides: Vec<i64> = inputs.iter().map(|&i| levels[i].stride).collect();
        ensure!(
            inputs.windows(2).all(|w| w[0] < w[1]) && strides.windows(2).all(|s| s[0] < s[1]),
            "config key `head.fpn.levels` must list encoder levels shallow to deep with increasing strides, found {:?} with strides {strides:?}",
            inputs.iter().map(|&i| levels[i].name.as_str()).collect::<Vec<_>>()
        );
        let mut lateral = Vec::with_capacity(inputs.len());
        let mut output = Vec::with_capacity(inputs.len());
        for (k, &i) in inputs.iter().enumerate() {
            lateral.push(conv(&p / "inner" / k, levels[i].channels, config.width, 1));
            output.push(conv(&p / "layer" / k, config.width, config.width, 3));
        }
        Ok(Fpn {
            inputs,
            memory_format: MemoryFormat::Contiguous,
            lateral,
            output,
            strides,
            extra_pool: config.extra_pool,
            width: config.width,
        })
    }

    /// The pyramid with its convolution weights in `format`, taking its inputs in it
    /// ([`MemoryFormat`]); its outputs come out in it.
    pub fn laid_out(mut self, format: MemoryFormat) -> Fpn {
        for conv in self.lateral.iter().chain(&self.output) {
            format.convert_parameter(&conv.ws);
        }
        self.memory_format = format;
        self
    }

    /// Strides of the pyramid's outputs, shallow to deep (the pooled level last).
    pub fn strides(&self) -> Vec<i64> {
        let mut strides = self.strides.clone();
        if self.extra_pool {
            strides.push(self.strides[self.strides.len() - 1] * 2);
        }
        strides
    }

    /// How many of the outputs come from encoder levels (the box head pools from these; the
    /// extra pooled level serves the RPN only, as in the paper).
    pub fn num_encoder_levels(&self) -> usize {
        self.inputs.len()
    }

    /// Channels of every output.
    pub fn width(&self) -> i64 {
        self.width
    }

    /// The pyramid from the encoder's feature maps (all its levels, in its order); returns
    /// one `[N, width, H_l, W_l]` map per entry of [`Fpn::strides`].
    pub fn forward(&self, encoder_levels: &[Tensor]) -> Vec<Tensor> {
        let laterals: Vec<Tensor> = self
            .inputs
            .iter()
            .zip(&self.lateral)
            // Only the levels the pyramid reads are laid out (a copy where the encoder's
            // layout differs).
            .map(|(&i, conv)| self.memory_format.apply(&encoder_levels[i]).apply(conv))
            .collect();
        let last = laterals.len() - 1;
        let mut outputs = Vec::with_capacity(laterals.len() + 1);
        let mut running = laterals[last].shallow_clone();
        outputs.push(running.apply(&self.output[last]));
        for k in (0..last).rev() {
            let size = laterals[k].size();
            running = &laterals[k] + running.upsample_nearest2d([size[2], size[3]], None, None);
            outputs.push(running.apply(&self.output[k]));
        }
        outputs.reverse();
        if self.extra_pool {
            let pooled = outputs[last].max_pool2d([1, 1], [2, 2], [0, 0], [1, 1], false);
            outputs.push(pooled);
        }
        outputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn levels(strides: &[i64], channels: &[i64]) -> Vec<Level> {
        strides
            .iter()
            .zip(channels)
            .enumerate()
            .map(|(i, (&stride, &channels))| Level {
                name: format!("c{i}"),
                channels,
                stride,
            })
            .collect()
    }

    #[test]
    fn outputs_have_the_width_and_the_declared_strides() {
        let declared = levels(&[2, 4, 8, 16, 32], &[3, 5, 6, 7, 9]);
        let vs = nn::VarStore::new(Device::Cpu);
        let fpn = Fpn::new(
            &FpnConfig {
                width: 8,
                ..Default::default()
            },
            vs.root(),
            &declared,
        )
        .unwrap();
        assert_eq!(fpn.strides(), vec![4, 8, 16, 32, 64]);
        assert_eq!(fpn.num_encoder_levels(), 4);
        // 72 is not a multiple of 32: the top-down sums must still line up.
        let size = 72;
        let maps: Vec<Tensor> = declared
            .iter()
            .map(|l| {
                let side = (size + l.stride - 1) / l.stride;
                Tensor::randn([2, l.channels, side, side], (Kind::Float, Device::Cpu))
            })
            .collect();
        let out = fpn.forward(&maps);
        assert_eq!(out.len(), 5);
        for (k, map) in out.iter().take(4).enumerate() {
            assert_eq!(
                map.size(),
                maps[k + 1]
                    .size()
                    .iter()
                    .enumerate()
                    .map(|(d, &v)| if d == 1 { 8 } else { v })
                    .collect::<Vec<_>>()
            );
        }
        let last = out[3].size();
        assert_eq!(out[4].size(), vec![2, 8, (last[2] + 1) / 2, (last[3] + 1) / 2]);
    }

    #[test]
    fn the_top_down_path_carries_deep_information_to_shallow_levels() {
        let declared = levels(&[4, 8], &[2, 2]);
        let vs = nn::VarStore::new(Device::Cpu);
        let fpn = Fpn::new(
            &FpnConfig {
                width: 4,
                extra_pool: false,
                ..Default::default()
            },
            vs.root(),
            &declared,
        )
        .unwrap();
        let shallow = Tensor::zeros([1, 2, 8, 8], (Kind::Float, Device::Cpu));
        let deep = Tensor::randn([1, 2, 4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let out = fpn.forward(&[shallow, deep.shallow_clone()]);
        out[0].sum(Kind::Float).backward();
        assert!(deep.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn bad_level_names_and_orders_are_errors_naming_the_key() {
        let declared = levels(&[4, 8, 16], &[2, 2, 2]);
        let vs = nn::VarStore::new(Device::Cpu);
        let unknown = FpnConfig {
            levels: vec!["c1".into(), "layer9".into()],
            ..Default::default()
        };
        let error = Fpn::new(&unknown, vs.root(), &declared).unwrap_err().to_string();
        assert!(
            error.contains("head.fpn.levels") && error.contains("layer9") && error.contains("c2"),
            "{error}"
        );
        let reversed = FpnConfig {
            levels: vec!["c2".into(), "c1".into()],
            ..Default::default()
        };
        let error = Fpn::new(&reversed, vs.root(), &declared).unwrap_err().to_string();
        assert!(error.contains("shallow to deep"), "{error}");
        let narrow = FpnConfig {
            width: 0,
            ..Default::default()
        };
        assert!(Fpn::new(&narrow, vs.root(), &declared)
            .unwrap_err()
            .to_string()
            .contains("head.fpn.width"));
        // Fewer than four levels: all of them.
        let fpn = Fpn::new(&FpnConfig::default(), vs.root(), &declared).unwrap();
        assert_eq!(fpn.strides(), vec![4, 8, 16, 32]);
    }
}
