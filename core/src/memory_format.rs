//! The memory layout of 4D activations and convolution weights: `contiguous` (NCHW, row-major
//! over `[N, C, H, W]`) or `channels_last` (NHWC: the channels of one pixel adjacent), as
//! PyTorch's `torch.channels_last` ("(beta) Channels Last Memory Format in PyTorch", the
//! PyTorch tutorials; `torch.Tensor.contiguous(memory_format=...)`).
//!
//! A tensor's layout is only its strides: its shape stays `[N, C, H, W]` and every op computes
//! the same values in either layout. libtorch picks each convolution's kernel from the
//! layouts of its input and weight: NHWC when either is channels_last
//! (`mkldnn_conv_use_channels_last` on the CPU, `cudnn_conv_suggest_memory_format` on CUDA),
//! and batch norm, ReLU, pooling, upsampling, concatenation and elementwise ops keep the
//! layout they are given. oneDNN's CPU convolutions and cuDNN's tensor-core kernels on CUDA
//! read and write NHWC activations natively, so a network whose weights and input are
//! channels_last runs every convolution without reordering its activations (whether that is
//! faster depends on the machine: measure with `medssl bench swav-step --memory-format`).
//! What a module does with the format, as
//! `model.to(memory_format=torch.channels_last)` and `x.to(memory_format=...)` do in PyTorch:
//! - [`MemoryFormat::convert_parameter`] on its 4D convolution weights when it is built: the
//!   variable itself changes layout (every handle sees it, the optimizer's included). The
//!   layout then survives everything that writes into a variable in place: optimizer updates,
//!   `copy_` of a checkpoint's tensors, dtype and device moves (`to` keeps the layout), and
//!   each weight's gradient takes its layout (PyTorch's gradient layout contract).
//! - [`MemoryFormat::apply`] on the 4D input at its entry.
//!
//! Checkpoints hold ordinary row-major tensors whatever the layout (`checkpoint` writes
//! `contiguous()` data), so a checkpoint loads into a model of either format.
//!
//! tch 0.26 exposes no memory-format argument, so a tensor is laid out channels_last as
//! libtorch does it: a copy into an empty tensor with strides `[H W C, 1, W C, C]`, exactly
//! those of `x.contiguous(memory_format=torch.channels_last)` (`get_channels_last_strides_2d`
//! in c10).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use tch::{Device, Tensor};

/// The config value `memory_format`: `"contiguous"` (the default) or `"channels_last"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryFormat {
    /// NCHW, libtorch's default layout.
    #[default]
    Contiguous,
    /// NHWC strides on a `[N, C, H, W]` tensor.
    ChannelsLast,
}

impl MemoryFormat {
    /// The name as the config writes it.
    pub fn name(self) -> &'static str {
        match self {
            MemoryFormat::Contiguous => "contiguous",
            MemoryFormat::ChannelsLast => "channels_last",
        }
    }

    /// `x` laid out in this format, as `x.contiguous(memory_format=...)`: a copy only where
    /// its layout differs (autograd flows through it). Tensors other than 4D are returned as
    /// they are: channels_last is defined for `[N, C, H, W]` only.
    pub fn apply(self, x: &Tensor) -> Tensor {
        if x.dim() != 4 || self.holds(x) {
            return x.shallow_clone();
        }
        // As libtorch's own `contiguous(memory_format)` (a clone into `empty_like` of that
        // format): an empty tensor with the format's strides, then a copy into it. A
        // permute-contiguous-permute round trip would keep the strides of size-1 dimensions
        // (a 1x1 kernel `[O, C, 1, 1]` kept `[C, 1, 1, 1]`), which libtorch reads as NCHW.
        let size = x.size();
        let strides = self.strides(&size);
        let mut laid_out = Tensor::empty_strided(size.as_slice(), strides.as_slice(), (x.kind(), x.device()));
        laid_out.copy_(x);
        laid_out
    }

    /// Whether `x` (4D) has exactly this format's strides: row-major for `contiguous`,
    /// `[H W C, 1, W C, C]` for `channels_last`.
    pub fn holds(self, x: &Tensor) -> bool {
        x.dim() == 4 && x.stride() == self.strides(&x.size())
    }

    /// This format's strides for a `[N, C, H, W]` tensor of `size`.
    pub fn strides(self, size: &[i64]) -> Vec<i64> {
        let &[_, c, h, w] = size else {
            panic!(
                "MemoryFormat::strides of a {}-D size; it takes [N, C, H, W]",
                size.len()
            );
        };
        match self {
            MemoryFormat::Contiguous => vec![c * h * w, h * w, w, 1],
            MemoryFormat::ChannelsLast => vec![h * w * c, 1, w * c, c],
        }
    }

    /// Lays out a parameter (a 4D convolution weight) in this format, in place: its data is
    /// replaced by a copy in the new layout (libtorch's `set_data`, what `param.data = ...`
    /// and `module.to(memory_format=...)` do), so every handle on the variable (the module's,
    /// the variable store's, the optimizer's) sees the new layout. Values, name, trainability
    /// and autograd identity are kept. Call it when the module is built, before an optimizer
    /// has state for the variable; other than 4D tensors are left alone.
    pub fn convert_parameter(self, parameter: &Tensor) {
        if parameter.dim() != 4 || self.holds(parameter) {
            return;
        }
        let laid_out = tch::no_grad(|| self.apply(&parameter.detach()));
        parameter.shallow_clone().set_data(&laid_out);
    }
}

/// Whether libtorch's CPU kernels run channels_last training correctly on this CPU. On x86
/// CPUs without AVX-512, libtorch 2.13's oneDNN picks `jit_avx2_1x1_convolution_bwd_weights_t`
/// for the weight gradient of a 1x1 convolution over NHWC tensors, and that kernel writes past
/// its buffer (valgrind shows the invalid writes; PyTorch 2.13 itself corrupts its heap with
/// one `Conv2d(kernel_size=1)` in channels_last there): docs/precision.md, "Caveats". CPUs
/// with AVX-512 take the AVX-512 kernel, which does not; other architectures use other
/// kernels.
pub fn cpu_runs_channels_last_safely() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

impl MemoryFormat {
    /// Refuses a format this machine cannot run on `device` (channels_last on a CPU without
    /// AVX-512, see [`cpu_runs_channels_last_safely`]); `key` is the config key that chose
    /// it, for the message. Modules call it when they are built, so the run stops before any
    /// step and no checkpoint is touched.
    pub fn check_device(self, device: Device, key: &str) -> Result<()> {
        if self == MemoryFormat::ChannelsLast && device == Device::Cpu && !cpu_runs_channels_last_safely() {
            bail!(
                "config key `{key}` = \"channels_last\" is refused on this CPU: it has no AVX-512, and there \
                 libtorch 2.13's oneDNN backward of 1x1 convolutions over channels_last tensors writes out of \
                 bounds and corrupts memory (docs/precision.md, Caveats); use \"contiguous\" here, or channels_last \
                 on CUDA or an AVX-512 CPU"
            );
        }
        Ok(())
    }
}

/// The config's names, for command-line flags (`medssl bench swav-step --memory-format`).
impl FromStr for MemoryFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast]
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown memory format `{s}`; expected `contiguous` or `channels_last`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Kind};

    #[test]
    fn channels_last_on_the_cpu_is_refused_exactly_where_it_is_unsafe() {
        assert!(MemoryFormat::Contiguous
            .check_device(Device::Cpu, "encoder.memory_format")
            .is_ok());
        assert!(MemoryFormat::ChannelsLast
            .check_device(Device::Cuda(0), "encoder.memory_format")
            .is_ok());
        let on_cpu = MemoryFormat::ChannelsLast.check_device(Device::Cpu, "head.memory_format");
        assert_eq!(on_cpu.is_ok(), cpu_runs_channels_last_safely());
        if let Err(e) = on_cpu {
            let message = e.to_string();
            assert!(
                message.contains("`head.memory_format`") && message.contains("AVX-512"),
                "{message}"
            );
        }
    }

    #[test]
    fn channels_last_has_nhwc_strides_and_the_same_values() {
        let x = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let y = MemoryFormat::ChannelsLast.apply(&x);
        assert_eq!(y.size(), x.size());
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
        assert!(MemoryFormat::ChannelsLast.holds(&y) && !MemoryFormat::Contiguous.holds(&y));
        assert!(y.equal(&x));
        // Back to row-major, and a no-op (same storage) where the layout already is the one asked.
        let z = MemoryFormat::Contiguous.apply(&y);
        assert!(MemoryFormat::Contiguous.holds(&z) && z.equal(&x));
        assert_eq!(MemoryFormat::ChannelsLast.apply(&y).data_ptr(), y.data_ptr());
        // A 1x1 kernel too: the strides of its size-1 dimensions are what libtorch reads.
        let kernel = Tensor::randn([8, 4, 1, 1], (Kind::Float, Device::Cpu));
        assert_eq!(MemoryFormat::ChannelsLast.apply(&kernel).stride(), vec![4, 1, 4, 4]);
        // Autograd flows through the copy.
        let leaf = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (MemoryFormat::ChannelsLast.apply(&leaf) * 2.0)
            .sum(Kind::Float)
            .backward();
        assert!(leaf.grad().equal(&leaf.full_like(2.0)));
        // Not 4D: unchanged.
        let v = Tensor::randn([2, 3], (Kind::Float, Device::Cpu));
        assert_eq!(MemoryFormat::ChannelsLast.apply(&v).stride(), vec![3, 1]);
    }

    #[test]
    fn a_converted_parameter_changes_layout_for_every_handle_and_keeps_training() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().randn("w", &[4, 3, 3, 3], 0.0, 1.0);
        let before = w.detach().copy();
        MemoryFormat::ChannelsLast.convert_parameter(&w);
        let stored = &vs.variables()["w"];
        assert!(MemoryFormat::ChannelsLast.holds(stored), "{:?}", stored.stride());
        assert!(stored.requires_grad() && stored.equal(&before));
        let trainable = &vs.trainable_variables()[0];
        assert!(MemoryFormat::ChannelsLast.holds(trainable));
        // Its gradient takes its layout, and in-place updates and copies keep it.
        let x = MemoryFormat::ChannelsLast.apply(&Tensor::randn([2, 3, 6, 6], (Kind::Float, Device::Cpu)));
        x.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
            .sum(None)
            .backward();
        assert!(MemoryFormat::ChannelsLast.holds(&w.grad()), "{:?}", w.grad().stride());
        tch::no_grad(|| {
            let mut p = w.shallow_clone();
            let _ = p.f_sub_(&(w.grad() * 0.1)).unwrap();
            p.copy_(&before);
        });
        assert!(MemoryFormat::ChannelsLast.holds(&w) && w.equal(&before));
    }

    #[test]
    fn the_config_names_are_snake_case() {
        #[derive(Deserialize)]
        struct Section {
            memory_format: MemoryFormat,
        }
        let parsed: Section = toml::from_str("memory_format = \"channels_last\"").unwrap();
        assert_eq!(parsed.memory_format, MemoryFormat::ChannelsLast);
        assert_eq!(MemoryFormat::ChannelsLast.name(), "channels_last");
        let err = toml::from_str::<Section>("memory_format = \"nhwc\"")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("contiguous") && err.contains("channels_last"), "{err}");
        assert_eq!("channels_last".parse::<MemoryFormat>(), Ok(MemoryFormat::ChannelsLast));
        let err = "nhwc".parse::<MemoryFormat>().unwrap_err();
        assert!(err.contains("`nhwc`") && err.contains("`channels_last`"), "{err}");
    }
}
