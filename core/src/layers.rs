//! The layers every model is built from, initialised as PyTorch and torchvision initialise
//! them, so that no module falls back to tch's defaults by accident.
//!
//! tch 0.26's defaults differ from PyTorch's in three places, each of which changes what a
//! run starts from:
//! - `BatchNormConfig::default()` draws the scale from U(0, 1) (an old PyTorch default);
//!   `torch.nn.BatchNorm*d` (and torchvision, SwAV, DeepCluster-v2, VICReg, SimCLR) start it
//!   at 1 with shift 0.
//! - `LinearConfig::default()` and `ConvConfig::default()` draw weights with Kaiming uniform
//!   for ReLU (bound sqrt(6 / fan_in)); `torch.nn.Linear` and `torch.nn.ConvNd` use
//!   `kaiming_uniform_(a = sqrt(5))` (bound 1 / sqrt(fan_in)), 2.45 times narrower
//!   (`torch/nn/modules/linear.py`, `conv.py`, `reset_parameters`).
//! - a convolution's bias starts at 0 in tch, at U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)) in
//!   PyTorch.
//!
//! Every constructor here gives PyTorch's initialisation unless its caller names another
//! ([`KAIMING_NORMAL_FAN_OUT`] for torchvision's ResNet, or an `nn::Init` its reference
//! uses, cited where it is written). `clippy.toml` forbids tch's own constructors
//! everywhere else, so a new module cannot silently take tch's defaults.
#![allow(clippy::disallowed_methods)]

use std::borrow::Borrow;
use tch::nn::{self, init::FanInOut, init::NonLinearity, init::NormalOrUniform, Init};

/// `torch.nn.Linear` / `torch.nn.ConvNd` weights: `kaiming_uniform_(a = sqrt(5))`, the gain
/// sqrt(2 / (1 + 5)) = 1 / sqrt(3), hence U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)).
pub const TORCH_DEFAULT: Init = Init::Kaiming {
    dist: NormalOrUniform::Uniform,
    fan: FanInOut::FanIn,
    non_linearity: NonLinearity::ExplicitGain(0.577_350_269_189_625_8),
};

/// torchvision's ResNet convolutions: `kaiming_normal_(mode = "fan_out", nonlinearity =
/// "relu")`, std sqrt(2 / fan_out) (`torchvision/models/resnet.py`, `ResNet.__init__`).
pub const KAIMING_NORMAL_FAN_OUT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: NonLinearity::ReLU,
};

/// PyTorch's bias initialisation for a layer with `fan_in` inputs.
fn torch_bias(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// `torch.nn.Linear(in_dim, out_dim)`: weight and bias as PyTorch initialises them.
pub fn linear<'a>(p: impl Borrow<nn::Path<'a>>, in_dim: i64, out_dim: i64) -> nn::Linear {
    linear_initialised(p, in_dim, out_dim, TORCH_DEFAULT, Some(torch_bias(in_dim)))
}

/// `torch.nn.Linear(in_dim, out_dim, bias=False)`.
pub fn linear_without_bias<'a>(p: impl Borrow<nn::Path<'a>>, in_dim: i64, out_dim: i64) -> nn::Linear {
    linear_initialised(p, in_dim, out_dim, TORCH_DEFAULT, None)
}

/// A linear layer whose reference initialises it otherwise (the caller cites it); `bias`
/// `None` builds none.
pub fn linear_initialised<'a>(
    p: impl Borrow<nn::Path<'a>>,
    in_dim: i64,
    out_dim: i64,
    weight: Init,
    bias: Option<Init>,
) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: weight,
        bs_init: bias,
        bias: bias.is_some(),
    };
    nn::linear(p, in_dim, out_dim, config)
}

/// A convolution's geometry and initialisation. The default is `torch.nn.ConvNd`'s: stride
/// 1, no padding, a bias, weight [`TORCH_DEFAULT`] and PyTorch's bias.
#[derive(Debug, Clone, Copy)]
pub struct Conv {
    pub stride: i64,
    pub padding: i64,
    pub dilation: i64,
    pub groups: i64,
    pub bias: bool,
    pub weight: Init,
    /// `None`: PyTorch's U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)).
    pub bias_init: Option<Init>,
}

impl Default for Conv {
    fn default() -> Self {
        Conv {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
            bias: true,
            weight: TORCH_DEFAULT,
            bias_init: None,
        }
    }
}

impl Conv {
    /// tch's config for a kernel of `kernel_volume` taps over `c_in` channels.
    fn config(&self, c_in: i64, kernel_volume: i64) -> nn::ConvConfig {
        let fan_in = c_in / self.groups.max(1) * kernel_volume;
        nn::ConvConfig {
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
            bias: self.bias,
            ws_init: self.weight,
            bs_init: self.bias_init.unwrap_or_else(|| torch_bias(fan_in)),
            ..Default::default()
        }
    }
}

/// `torch.nn.Conv1d`.
pub fn conv1d<'a>(p: impl Borrow<nn::Path<'a>>, c_in: i64, c_out: i64, kernel: i64, conv: Conv) -> nn::Conv1D {
    nn::conv1d(p, c_in, c_out, kernel, conv.config(c_in, kernel))
}

/// `torch.nn.Conv2d` with a square kernel.
pub fn conv2d<'a>(p: impl Borrow<nn::Path<'a>>, c_in: i64, c_out: i64, kernel: i64, conv: Conv) -> nn::Conv2D {
    nn::conv2d(p, c_in, c_out, kernel, conv.config(c_in, kernel * kernel))
}

/// `torch.nn.Conv3d` with a cubic kernel.
pub fn conv3d<'a>(p: impl Borrow<nn::Path<'a>>, c_in: i64, c_out: i64, kernel: i64, conv: Conv) -> nn::Conv3D {
    nn::conv3d(p, c_in, c_out, kernel, conv.config(c_in, kernel * kernel * kernel))
}

/// A transposed convolution's geometry and initialisation. The default is
/// `torch.nn.ConvTransposeNd`'s: stride 1, no padding, a bias, weight [`TORCH_DEFAULT`] and
/// PyTorch's bias.
///
/// Its weight is `[c_in, c_out / groups, k, ...]`, so PyTorch's fan-in (the size of axis 1
/// times the kernel volume, `torch.nn.init._calculate_fan_in_and_fan_out`) is the output
/// width's: both the weight bound and the bias bound are 1 / sqrt(c_out / groups * k^d).
/// tch's Kaiming fan-in reads the same axis, so only the bias needs computing here.
#[derive(Debug, Clone, Copy)]
pub struct ConvTranspose {
    pub stride: i64,
    pub padding: i64,
    pub output_padding: i64,
    pub groups: i64,
    pub bias: bool,
    pub weight: Init,
    /// `None`: PyTorch's U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)), fan-in as above.
    pub bias_init: Option<Init>,
}

impl Default for ConvTranspose {
    fn default() -> Self {
        ConvTranspose {
            stride: 1,
            padding: 0,
            output_padding: 0,
            groups: 1,
            bias: true,
            weight: TORCH_DEFAULT,
            bias_init: None,
        }
    }
}

/// `torch.nn.ConvTranspose3d` with a cubic kernel.
pub fn conv_transpose3d<'a>(
    p: impl Borrow<nn::Path<'a>>,
    c_in: i64,
    c_out: i64,
    kernel: i64,
    conv: ConvTranspose,
) -> nn::ConvTranspose3D {
    let fan_in = c_out / conv.groups.max(1) * kernel * kernel * kernel;
    let config = nn::ConvTransposeConfig {
        stride: conv.stride,
        padding: conv.padding,
        output_padding: conv.output_padding,
        groups: conv.groups,
        bias: conv.bias,
        dilation: 1,
        ws_init: conv.weight,
        bs_init: conv.bias_init.unwrap_or_else(|| torch_bias(fan_in)),
    };
    nn::conv_transpose3d(p, c_in, c_out, kernel, config)
}

/// A parameter `name` of shape `dims` drawn from the normal N(mean, std^2) truncated to
/// [a, b] (absolute bounds, not in units of std), as `torch.nn.init.trunc_normal_` and
/// MONAI's `trunc_normal_` draw it: inverse-CDF sampling of a uniform draw, then a clamp.
/// ViTs start their learned position embeddings so (std 0.02, bounds ±2, where the
/// truncation removes nothing measurable).
pub fn trunc_normal<'a>(
    p: impl Borrow<nn::Path<'a>>,
    name: &str,
    dims: &[i64],
    mean: f64,
    std: f64,
    [a, b]: [f64; 2],
) -> tch::Tensor {
    assert!(
        std > 0.0 && a < b,
        "trunc_normal: std {std} must be positive and {a} < {b}"
    );
    let cdf = |x: f64| {
        let erf = tch::Tensor::from_slice(&[x / std::f64::consts::SQRT_2]).erf();
        (1.0 + erf.double_value(&[0])) / 2.0
    };
    let (lo, up) = (cdf((a - mean) / std), cdf((b - mean) / std));
    let t = p.borrow().var(name, dims, Init::Const(0.0));
    tch::no_grad(|| {
        let mut t = t.shallow_clone();
        let _ = t.uniform_(2.0 * lo - 1.0, 2.0 * up - 1.0);
        let _ = t.erfinv_();
        let _ = t.g_mul_scalar_(std * std::f64::consts::SQRT_2);
        let _ = t.g_add_scalar_(mean);
        let _ = t.clamp_(a, b);
    });
    t
}

pub use crate::batch_norm::BatchNorm;

/// Batch norm as `torch.nn.BatchNorm*d`: scale 1, shift 0, momentum 0.1, eps 1e-5.
fn batch_norm_config(scale: f64) -> nn::BatchNormConfig {
    nn::BatchNormConfig {
        ws_init: Init::Const(scale),
        bs_init: Init::Const(0.0),
        ..Default::default()
    }
}

/// `torch.nn.BatchNorm1d(channels)`.
pub fn batch_norm1d<'a>(p: impl Borrow<nn::Path<'a>>, channels: i64) -> BatchNorm {
    BatchNorm::new(nn::batch_norm1d(p, channels, batch_norm_config(1.0)))
}

/// `torch.nn.BatchNorm2d(channels)`.
pub fn batch_norm2d<'a>(p: impl Borrow<nn::Path<'a>>, channels: i64) -> BatchNorm {
    BatchNorm::new(nn::batch_norm2d(p, channels, batch_norm_config(1.0)))
}

/// A `BatchNorm2d` whose scale starts at 0: the last one of a residual branch under
/// torchvision's `zero_init_residual`, so that every block starts as the identity (Goyal et
/// al., "Accurate, Large Minibatch SGD", 2017, Sec. 5.1).
pub fn zeroed_batch_norm2d<'a>(p: impl Borrow<nn::Path<'a>>, channels: i64) -> BatchNorm {
    BatchNorm::new(nn::batch_norm2d(p, channels, batch_norm_config(0.0)))
}

/// `torch.nn.LayerNorm(shape)`: scale 1, shift 0, eps 1e-5.
pub fn layer_norm<'a>(p: impl Borrow<nn::Path<'a>>, shape: Vec<i64>) -> nn::LayerNorm {
    let config = nn::LayerNormConfig {
        ws_init: Init::Const(1.0),
        bs_init: Init::Const(0.0),
        ..Default::default()
    };
    nn::layer_norm(p, shape, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    fn bounds(t: &Tensor) -> (f64, f64) {
        (t.min().double_value(&[]), t.max().double_value(&[]))
    }

    fn std(t: &Tensor) -> f64 {
        t.std(true).double_value(&[])
    }

    #[test]
    fn linear_is_uniform_within_one_over_root_fan_in() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let layer = linear(vs.root() / "l", 400, 300);
        let bound = 1.0 / 20.0;
        let (lo, hi) = bounds(&layer.ws);
        assert!(lo >= -bound && hi <= bound && hi > 0.99 * bound, "{lo} {hi}");
        // U(-b, b) has std b / sqrt(3).
        let expected = bound / 3f64.sqrt();
        assert!((std(&layer.ws) / expected - 1.0).abs() < 0.02, "{}", std(&layer.ws));
        let (lo, hi) = bounds(layer.bs.as_ref().unwrap());
        assert!(lo >= -bound && hi <= bound, "{lo} {hi}");
        assert!(linear_without_bias(vs.root() / "m", 4, 3).bs.is_none());
    }

    #[test]
    fn conv_bias_and_weight_follow_fan_in_over_groups() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        // Depthwise: fan_in = 1 channel x 9 taps.
        let depthwise = conv2d(
            vs.root() / "d",
            64,
            64,
            3,
            Conv {
                groups: 64,
                ..Default::default()
            },
        );
        let bound = 1.0 / 3.0;
        let (lo, hi) = bounds(&depthwise.ws);
        assert!(lo >= -bound && hi <= bound && hi > 0.95 * bound, "{lo} {hi}");
        let (lo, hi) = bounds(depthwise.bs.as_ref().unwrap());
        assert!(lo >= -bound && hi <= bound && hi - lo > 0.5 * bound, "{lo} {hi}");
        let kaiming = conv2d(
            vs.root() / "k",
            32,
            256,
            3,
            Conv {
                weight: KAIMING_NORMAL_FAN_OUT,
                bias: false,
                ..Default::default()
            },
        );
        let expected = (2.0f64 / (256.0 * 9.0)).sqrt();
        assert!((std(&kaiming.ws) / expected - 1.0).abs() < 0.02, "{}", std(&kaiming.ws));
        assert!(kaiming.bs.is_none());
    }

    #[test]
    fn conv3d_and_its_transpose_take_pytorchs_fan_in() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        // fan_in = 8 channels x 27 taps.
        let conv = conv3d(vs.root() / "c", 8, 16, 3, Default::default());
        assert_eq!(conv.ws.size(), [16, 8, 3, 3, 3]);
        let bound = 1.0 / 216f64.sqrt();
        let (lo, hi) = bounds(&conv.ws);
        assert!(lo >= -bound && hi <= bound && hi > 0.95 * bound, "{lo} {hi}");
        let (lo, hi) = bounds(conv.bs.as_ref().unwrap());
        assert!(lo >= -bound && hi <= bound, "{lo} {hi}");
        // The weight is [c_in, c_out, k, k, k]: fan_in = 4 outputs x 8 taps, not 64 inputs.
        let transposed = conv_transpose3d(vs.root() / "t", 64, 4, 2, Default::default());
        assert_eq!(transposed.ws.size(), [64, 4, 2, 2, 2]);
        let bound = 1.0 / 32f64.sqrt();
        let (lo, hi) = bounds(&transposed.ws);
        assert!(lo >= -bound && hi <= bound && hi > 0.9 * bound, "{lo} {hi}");
        // Four biases: within the bound, too few to approach it.
        let (lo, hi) = bounds(transposed.bs.as_ref().unwrap());
        assert!(lo >= -bound && hi <= bound, "{lo} {hi}");
        let without = ConvTranspose {
            bias: false,
            ..Default::default()
        };
        assert!(conv_transpose3d(vs.root() / "u", 4, 4, 2, without).bs.is_none());
    }

    #[test]
    fn trunc_normal_has_the_std_asked_and_stays_within_its_bounds() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let wide = trunc_normal(vs.root(), "wide", &[200, 500], 0.0, 0.02, [-2.0, 2.0]);
        assert!(wide.requires_grad());
        assert!((std(&wide) / 0.02 - 1.0).abs() < 0.01, "{}", std(&wide));
        assert!(wide.mean(Kind::Float).double_value(&[]).abs() < 1e-3);
        // Bounds at one std: N(0, 1) truncated to [-1, 1] has std 0.5379.
        let tight = trunc_normal(vs.root(), "tight", &[200, 500], 1.0, 1.0, [0.0, 2.0]);
        let (lo, hi) = bounds(&tight);
        assert!(lo >= 0.0 && hi <= 2.0 && lo < 0.01 && hi > 1.99, "{lo} {hi}");
        assert!((std(&tight) / 0.5379 - 1.0).abs() < 0.01, "{}", std(&tight));
    }

    #[test]
    fn norms_start_at_scale_one_and_shift_zero() {
        let vs = nn::VarStore::new(Device::Cpu);
        let one = Tensor::ones([8], (Kind::Float, Device::Cpu));
        let zero = Tensor::zeros([8], (Kind::Float, Device::Cpu));
        for bn in [batch_norm1d(vs.root() / "a", 8), batch_norm2d(vs.root() / "b", 8)] {
            assert!(bn.scale().unwrap().equal(&one));
            assert!(bn.shift().unwrap().equal(&zero));
        }
        let ln = layer_norm(vs.root() / "c", vec![8]);
        assert!(ln.ws.as_ref().unwrap().equal(&one));
        assert!(ln.bs.as_ref().unwrap().equal(&zero));
        let zeroed = zeroed_batch_norm2d(vs.root() / "d", 8);
        assert!(zeroed.scale().unwrap().equal(&zero));
    }
}
