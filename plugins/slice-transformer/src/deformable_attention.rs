//! Deformable attention over the slice axis: the paper's f_inter (Nguyen et al., AAAI 2023,
//! Sec. 3.2, Eq. 6-10), the 1D analogue of DAT (Xia et al., "Vision Transformer with
//! Deformable Attention", CVPR 2022). Attention runs over the SLICES of a volume; the
//! authors' released code applied it over the embedding axis, which we do not copy.
//!
//! Per layer, for `x` `[B, n, C]` (layer-normalised, positions already added):
//! - queries `q = x W_q` at every slice;
//! - an offset network on the queries: a depthwise 1D convolution with stride `r` and kernel
//!   `r + 2 offset_context` (each output sees its own window of `r` slices plus
//!   `offset_context` on either side), GELU, and a pointwise convolution to one offset per
//!   offset group; `tanh(.) * offset_range * r` bounds each offset to `offset_range`
//!   reference-grid steps (DAT bounds offsets by a factor times the grid spacing too);
//! - reference points at the centres of the `m = ceil(n / r)` windows of `r` slices (the
//!   last window may be shorter), shifted by the offsets and clamped to `[0, n - 1]` (the
//!   gradient passes the clamp straight through);
//! - keys and values from `x` sampled at the shifted points by linear interpolation along the
//!   slice axis (differentiable in the offsets); the heads are split into `offset_groups`
//!   groups, each with its own sampled points, and a group's keys are its points' features
//!   through its heads' rows of `W_k` (and `W_v`), so `m` points per group are projected
//!   instead of `n`;
//! - logits `q k^T / sqrt(d)` plus a per-head relative position bias from a table of
//!   `2 n - 1` entries, interpolated at each query-to-key displacement;
//! - heads concatenated and projected (`W_o`), then the shared block (residual, LayerNorm,
//!   GELU feed-forward).
//!
//! Padding: the offset network sees padding queries as zeros; a sampled key is usable only
//! when every slice it interpolates with non-zero weight is valid (so an integer position
//! needs only its own slice).

use crate::block::{
    ensure_positive, keys_or_all, HeadProjections, RelativePositionBias, SliceAttention, SliceTransformer, TrunkSpec,
};
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeformableAttentionConfig {
    /// Width of the transformer, of the contextual slice embeddings and of the volume
    /// embedding; the slice features are projected to it.
    pub width: i64,
    /// Transformer blocks.
    pub layers: i64,
    /// Attention heads; must divide `width`.
    pub heads: i64,
    /// Hidden width of each block's feed-forward network.
    pub ffn_dim: i64,
    /// Dropout on the attention and feed-forward outputs (training only).
    pub dropout: f64,
    /// Down-sampling factor of the slice sequence between consecutive blocks (masked mean
    /// over windows); `[]` for none, else one entry per gap (`layers - 1` entries).
    pub pyramid_strides: Vec<i64>,
    /// r: slices per reference point; each group samples `ceil(n / r)` keys.
    pub reference_stride: i64,
    /// Groups of heads sharing one set of sampled points; must divide `heads`.
    pub offset_groups: i64,
    /// Largest offset, in reference-grid steps (`r` slices each).
    pub offset_range: f64,
    /// Slices the offset network sees on either side of a reference point's window.
    pub offset_context: i64,
}

impl Default for DeformableAttentionConfig {
    fn default() -> Self {
        DeformableAttentionConfig {
            width: 640,
            layers: 4,
            heads: 8,
            ffn_dim: 1280,
            dropout: 0.0,
            pyramid_strides: Vec::new(),
            reference_stride: 4,
            offset_groups: 2,
            offset_range: 1.0,
            offset_context: 1,
        }
    }
}

impl DeformableAttentionConfig {
    pub fn trunk(&self) -> TrunkSpec {
        TrunkSpec {
            width: self.width,
            layers: self.layers,
            heads: self.heads,
            ffn_dim: self.ffn_dim,
            dropout: self.dropout,
            pyramid_strides: self.pyramid_strides.clone(),
        }
    }

    fn validate(&self) -> Result<()> {
        ensure_positive("reference_stride", self.reference_stride)?;
        ensure_positive("offset_groups", self.offset_groups)?;
        ensure!(
            self.heads % self.offset_groups == 0,
            "aggregator.heads = {} is not divisible by aggregator.offset_groups = {}: every offset group needs the same number of heads",
            self.heads,
            self.offset_groups
        );
        ensure!(
            self.offset_range.is_finite() && self.offset_range >= 0.0,
            "aggregator.offset_range must be a finite number >= 0, got {}",
            self.offset_range
        );
        ensure!(
            self.offset_context >= 0,
            "aggregator.offset_context must be >= 0, got {}",
            self.offset_context
        );
        Ok(())
    }
}

/// Features of `y` `[B, n, C]` sampled at fractional slice positions.
pub struct Sampled {
    /// `[groups, B, m, C]`: group-major, so each group's projection is one batched matmul
    /// with no broadcast copy of the weights.
    pub features: Tensor,
    /// The slices on either side, `[B, groups, m]` int64 (equal when `n = 1`).
    pub lower: Tensor,
    pub upper: Tensor,
    /// Interpolation weight towards `upper`, `[B, groups, m]` in `[0, 1]`.
    pub weight: Tensor,
}

/// Linear interpolation of `y` `[B, n, C]` along the slice axis at `positions`
/// `[B, groups, m]` (in slices, within `[0, n - 1]`). Exact at integer positions; the
/// gradient reaches `positions` through the interpolation weight.
pub fn sample_slices(y: &Tensor, positions: &Tensor) -> Sampled {
    let [b, n, c] = y.size()[..] else {
        unreachable!("slice sequences are [B, n, C]")
    };
    let [_, groups, m] = positions.size()[..] else {
        unreachable!("positions are [B, groups, m]")
    };
    let lower = positions.detach().floor().clamp(0, (n - 2).max(0)).to_kind(Kind::Int64);
    let upper = (&lower + 1).clamp_max(n - 1);
    let weight = positions - lower.to_kind(positions.kind());
    let batch_start = (Tensor::arange(b, (Kind::Int64, y.device())) * n).view([1, b, 1]);
    let rows = y.reshape([b * n, c]);
    let gather = |index: &Tensor| {
        rows.index_select(0, &(index.transpose(0, 1) + &batch_start).flatten(0, -1))
            .view([groups, b, m, c])
    };
    // lerp is exact at both ends (a + w (b - a) for w < 1/2, b - (1 - w)(b - a) above).
    // It wants one kind: under mixed precision `y` comes from a linear layer in bf16 or fp16
    // while the positions stay fp32 (the weight is taken in fp32 first, so a position deep
    // into a long volume keeps its fraction).
    let towards_upper = weight.transpose(0, 1).unsqueeze(-1).to_kind(y.kind());
    let features = gather(&lower).lerp_tensor(&gather(&upper), &towards_upper);
    Sampled {
        features,
        lower,
        upper,
        weight,
    }
}

/// Which sampled keys are usable, `[B, groups, m]` bool: every slice interpolated with a
/// non-zero weight is valid.
pub fn sampled_validity(valid: &Tensor, sampled: &Sampled) -> Tensor {
    let [b, groups, m] = sampled.lower.size()[..] else {
        unreachable!("positions are [B, groups, m]")
    };
    let at = |index: &Tensor| {
        valid
            .gather(1, &index.view([b, groups * m]), false)
            .view([b, groups, m])
    };
    let lower_ok = at(&sampled.lower).logical_or(&sampled.weight.eq(1.0));
    let upper_ok = at(&sampled.upper).logical_or(&sampled.weight.eq(0.0));
    lower_ok.logical_and(&upper_ok)
}

/// Centres of the `ceil(n / r)` windows of `r` slices, `[m]`.
pub fn reference_points(n: i64, stride: i64, device: Device) -> Tensor {
    let centres: Vec<f32> = (0..(n + stride - 1) / stride)
        .map(|j| {
            let first = j * stride;
            let last = (first + stride).min(n) - 1;
            (first + last) as f32 / 2.0
        })
        .collect();
    Tensor::from_slice(&centres).to_device(device)
}

/// The offset network: queries `[B, n, C]` to offsets `[B, groups, ceil(n / r)]` in slices.
#[derive(Debug)]
pub struct OffsetNetwork {
    pub depthwise: nn::Conv1D,
    pub pointwise: nn::Conv1D,
    stride: i64,
    context: i64,
    /// Largest offset in slices.
    range: f64,
}

impl OffsetNetwork {
    fn new(p: &nn::Path, width: i64, cfg: &DeformableAttentionConfig) -> Self {
        let stride = cfg.reference_stride;
        let depthwise = layers::conv1d(
            p / "depthwise",
            width,
            width,
            stride + 2 * cfg.offset_context,
            layers::Conv {
                stride,
                groups: width,
                ..Default::default()
            },
        );
        // No bias, as DAT: a query of zeros (padding) asks for no shift.
        let pointwise = layers::conv1d(
            p / "pointwise",
            width,
            cfg.offset_groups,
            1,
            layers::Conv {
                bias: false,
                ..Default::default()
            },
        );
        OffsetNetwork {
            depthwise,
            pointwise,
            stride,
            context: cfg.offset_context,
            range: cfg.offset_range * stride as f64,
        }
    }

    pub fn forward(&self, queries: &Tensor, valid: Option<&Tensor>) -> Tensor {
        let n = queries.size()[1];
        let queries = match valid {
            Some(valid) => queries.masked_fill(&valid.logical_not().unsqueeze(-1), 0.0),
            None => queries.shallow_clone(),
        };
        // Window j covers slices [j r - context, j r + r - 1 + context]: pad `context` on the
        // left and up to a whole last window plus `context` on the right.
        let points = (n + self.stride - 1) / self.stride;
        let right = points * self.stride - n + self.context;
        queries
            .transpose(1, 2)
            .constant_pad_nd([self.context, right])
            .apply(&self.depthwise)
            .gelu("none")
            .apply(&self.pointwise)
            .tanh()
            * self.range
    }
}

/// One layer of deformable attention over `slices` slices.
#[derive(Debug)]
pub struct DeformableAttention {
    pub projections: HeadProjections,
    pub bias: RelativePositionBias,
    pub offsets: OffsetNetwork,
    groups: i64,
}

impl DeformableAttention {
    pub fn new(p: &nn::Path, cfg: &DeformableAttentionConfig, slices: i64) -> Result<Self> {
        cfg.validate()?;
        ensure!(
            slices >= cfg.reference_stride,
            "aggregator.reference_stride = {}: fewer slices than r: a layer attends over {slices} slice(s) (data.views.volume_slices, divided by aggregator.pyramid_strides = {:?} before deeper layers); lower aggregator.reference_stride or use more slices",
            cfg.reference_stride,
            cfg.pyramid_strides
        );
        Ok(DeformableAttention {
            projections: HeadProjections::new(p, cfg.width, cfg.heads),
            bias: RelativePositionBias::new(p, cfg.heads, slices),
            offsets: OffsetNetwork::new(&(p / "offset"), cfg.width, cfg),
            groups: cfg.offset_groups,
        })
    }

    /// Projects each group's sampled features `[groups, B, m, C]` with that group's heads'
    /// rows of `linear`, to `[B, heads, m, head_dim]`.
    fn project_groups(&self, sampled: &Tensor, linear: &nn::Linear) -> Tensor {
        let [groups, b, m, c] = sampled.size()[..] else {
            unreachable!("[groups, B, m, C]")
        };
        let rows = c / groups;
        let weight = linear.ws.view([groups, rows, c]).transpose(1, 2);
        let projected = sampled.view([groups, b * m, c]).matmul(&weight);
        let projected = match &linear.bs {
            Some(bias) => projected + bias.view([groups, 1, rows]),
            None => projected,
        };
        let heads = &self.projections;
        projected
            .view([groups, b, m, heads.heads / groups, heads.head_dim])
            .permute([1, 0, 3, 2, 4])
            .reshape([b, heads.heads, m, heads.head_dim])
    }

    /// Sample positions `[B, groups, ceil(n / r)]` (in slices) of the keys of `x`.
    pub fn positions(&self, x: &Tensor, valid: Option<&Tensor>) -> Tensor {
        let queries = x.apply(&self.projections.query);
        self.positions_from(&queries, valid)
    }

    fn positions_from(&self, queries: &Tensor, valid: Option<&Tensor>) -> Tensor {
        let n = queries.size()[1];
        let reference = reference_points(n, self.offsets.stride, queries.device());
        let m = reference.size()[0];
        let shifted = self.offsets.forward(queries, valid) + reference.view([1, 1, m]);
        // Clamped in value, with the gradient passed straight through: under a hard clamp a
        // point pushed past the first or last slice has zero gradient and could never come
        // back. `shifted - shifted.detach()` is exactly zero, so the value is the clamp's.
        shifted.clamp(0.0, (n - 1) as f64) + (&shifted - shifted.detach())
    }
}

impl SliceAttention for DeformableAttention {
    fn forward(&self, x: &Tensor, valid: Option<&Tensor>) -> Tensor {
        let [b, n, _] = x.size()[..] else {
            unreachable!("slice sequences are [B, n, width]")
        };
        let heads = &self.projections;
        let queries = x.apply(&heads.query);
        let positions = self.positions_from(&queries, valid);
        let sampled = sample_slices(x, &positions);
        let keys = self.project_groups(&sampled.features, &heads.key);
        let values = self.project_groups(&sampled.features, &heads.value);
        let bias = self.bias.sampled(&positions, n);
        let key_valid = valid.map(|v| {
            let m = sampled.lower.size()[2];
            keys_or_all(&sampled_validity(v, &sampled))
                .view([b, self.groups, 1, 1, m])
                .expand([b, self.groups, heads.heads / self.groups, 1, m], false)
                .reshape([b, heads.heads, 1, m])
        });
        heads.attend(
            &heads.scaled_queries(&queries),
            &keys,
            &values,
            &bias,
            key_valid.as_ref(),
        )
    }
}

/// The `deformable-attention` aggregator.
pub type DeformableAttentionAggregator = SliceTransformer<DeformableAttention>;

impl DeformableAttentionAggregator {
    pub fn build(p: &nn::Path, cfg: &DeformableAttentionConfig, shape: &AggregatorShape) -> Result<Self> {
        let trunk = cfg.trunk();
        let lengths = trunk.level_lengths(shape)?;
        cfg.validate()?;
        SliceTransformer::new(p, &trunk, shape.input_dim, &lengths, |p, slices| {
            DeformableAttention::new(p, cfg, slices)
        })
    }
}

fn build(section: &Section, p: nn::Path, shape: &AggregatorShape) -> Result<Box<dyn Aggregator>> {
    let cfg: DeformableAttentionConfig = section.parse()?;
    Ok(Box::new(DeformableAttentionAggregator::build(&p, &cfg, shape)?))
}

register!(AGGREGATORS, DEFORMABLE_ATTENTION: AggregatorEntry = AggregatorEntry {
    name: "deformable-attention",
    about: "Deformable-attention transformer over the slices, the paper's f_inter (Eq. 6-10; 1D DAT)",
    default_config: default_toml::<DeformableAttentionConfig>,
    // r = 1: the composition test runs sequences of 2 slices, where r = 2 would leave one key
    // per group and no gradient for the queries.
    smoke_configs: &[
        "width = 16\nlayers = 1\nheads = 2\nffn_dim = 16\nreference_stride = 1\noffset_groups = 2",
        "width = 16\nlayers = 2\nheads = 2\nffn_dim = 16\nreference_stride = 1\noffset_groups = 1\noffset_context = 0",
    ],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::full_attention::{FullAttentionAggregator, FullAttentionConfig};
    use proptest::prelude::*;

    fn tiny(layers: i64, stride: i64, groups: i64) -> DeformableAttentionConfig {
        DeformableAttentionConfig {
            width: 8,
            layers,
            heads: 4,
            ffn_dim: 12,
            reference_stride: stride,
            offset_groups: groups,
            ..Default::default()
        }
    }

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn output_shapes_and_bias_table_size() {
        let vs = nn::VarStore::new(Device::Cpu);
        let shape = AggregatorShape {
            input_dim: 5,
            slices: 9,
        };
        let cfg = DeformableAttentionConfig {
            pyramid_strides: vec![2],
            ..tiny(2, 2, 2)
        };
        let agg = DeformableAttentionAggregator::build(&vs.root(), &cfg, &shape).unwrap();
        let out = agg.forward(&randn(&[3, 9, 5]), None, true);
        assert_eq!(out.slices.size(), [3, 9, 8]);
        assert_eq!(out.volume.size(), [3, 8]);
        assert_eq!((agg.input_dim(), agg.output_dim()), (5, 8));
        // 2 n - 1 entries per head at each layer's length (9, then ceil(9 / 2) = 5).
        assert_eq!(agg.attention(0).bias.table.size(), [4, 17]);
        assert_eq!(agg.attention(1).bias.entries(), 9);
        let x = randn(&[3, 9, 8]);
        assert_eq!(agg.attention(0).positions(&x, None).size(), [3, 2, 5]);
        assert_eq!(agg.attention(0).forward(&x, None).size(), [3, 9, 8]);
    }

    #[test]
    fn reference_points_are_window_centres() {
        let points = |n, r| Vec::<f32>::try_from(reference_points(n, r, Device::Cpu)).unwrap();
        assert_eq!(points(8, 4), [1.5, 5.5]);
        assert_eq!(points(9, 4), [1.5, 5.5, 8.0]);
        assert_eq!(points(3, 1), [0.0, 1.0, 2.0]);
    }

    #[test]
    fn bad_keys_are_errors_naming_the_key_and_value() {
        let shape = AggregatorShape {
            input_dim: 5,
            slices: 6,
        };
        for (cfg, expected) in [
            (tiny(1, 8, 1), "aggregator.reference_stride = 8: fewer slices than r"),
            (
                DeformableAttentionConfig {
                    pyramid_strides: vec![4],
                    ..tiny(2, 3, 1)
                },
                "aggregator.reference_stride = 3: fewer slices than r: a layer attends over 2 slice(s)",
            ),
            (
                DeformableAttentionConfig {
                    width: 10,
                    ..tiny(1, 1, 1)
                },
                "aggregator.width = 10 is not divisible by aggregator.heads = 4",
            ),
            (
                tiny(1, 1, 3),
                "aggregator.heads = 4 is not divisible by aggregator.offset_groups = 3",
            ),
            (tiny(1, 0, 1), "aggregator.reference_stride must be positive, got 0"),
            (tiny(1, 1, -2), "aggregator.offset_groups must be positive, got -2"),
            (
                DeformableAttentionConfig {
                    heads: 0,
                    ..tiny(1, 1, 1)
                },
                "aggregator.heads must be positive, got 0",
            ),
            (
                DeformableAttentionConfig {
                    width: -8,
                    ..tiny(1, 1, 1)
                },
                "aggregator.width must be positive, got -8",
            ),
            (
                DeformableAttentionConfig {
                    offset_range: f64::NAN,
                    ..tiny(1, 1, 1)
                },
                "aggregator.offset_range must be a finite number >= 0, got NaN",
            ),
            (
                DeformableAttentionConfig {
                    offset_context: -1,
                    ..tiny(1, 1, 1)
                },
                "aggregator.offset_context must be >= 0, got -1",
            ),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let err = DeformableAttentionAggregator::build(&vs.root(), &cfg, &shape)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn config_errors_from_toml_name_the_key() {
        let section = Section::inline("aggregator", "deformable-attention", "heads = 8\noffset_groups = 3").unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let err = build(
            &section,
            vs.root(),
            &AggregatorShape {
                input_dim: 4,
                slices: 8,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("aggregator.offset_groups = 3"), "{err}");
        let section = Section::inline("aggregator", "deformable-attention", "offset_group = 3").unwrap();
        let err = format!(
            "{:#}",
            build(
                &section,
                vs.root(),
                &AggregatorShape {
                    input_dim: 4,
                    slices: 8
                }
            )
            .err()
            .unwrap()
        );
        assert!(
            err.contains("aggregator.offset_group") && err.contains("unknown key"),
            "{err}"
        );
    }

    #[test]
    fn gradients_reach_the_offset_network_and_every_parameter() {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let shape = AggregatorShape {
            input_dim: 5,
            slices: 12,
        };
        let agg = DeformableAttentionAggregator::build(&vs.root(), &tiny(2, 3, 2), &shape).unwrap();
        let valid = Tensor::ones([2, 12], (Kind::Bool, Device::Cpu));
        let out = agg.forward(&randn(&[2, 12, 5]), Some(&valid), true);
        (out.volume * randn(&[2, 8])).sum(Kind::Float).backward();
        let mut offset_params = 0;
        // The batch norm's running statistics are buffers, not parameters.
        for (name, var) in vs.variables().into_iter().filter(|(_, v)| v.requires_grad()) {
            let grad = var.grad();
            let largest = if grad.defined() {
                grad.abs().max().double_value(&[])
            } else {
                0.0
            };
            assert!(largest > 0.0, "{name}: no gradient");
            offset_params += name.contains(".offset.") as usize;
        }
        // depthwise weight and bias, pointwise weight, in each of the 2 layers.
        assert_eq!(offset_params, 6);
    }

    #[test]
    fn points_clamped_at_the_last_slice_still_get_gradient() {
        tch::manual_seed(6);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = DeformableAttentionConfig {
            offset_range: 10.0,
            ..tiny(1, 1, 2)
        };
        let attention = DeformableAttention::new(&vs.root(), &cfg, 3).unwrap();
        // Every offset is tanh(gelu(1) * 1) * 10 ~ +6.9 slices: past the last slice.
        tch::no_grad(|| {
            let _ = attention.offsets.depthwise.ws.shallow_clone().zero_();
            let _ = attention
                .offsets
                .depthwise
                .bs
                .as_ref()
                .unwrap()
                .shallow_clone()
                .fill_(1.0);
            let _ = attention.offsets.pointwise.ws.shallow_clone().fill_(1.0 / 8.0);
        });
        let x = randn(&[2, 3, 8]);
        let positions = attention.positions(&x, None);
        assert_eq!(Vec::<f32>::try_from(positions.flatten(0, -1)).unwrap(), [2.0; 12]);
        (attention.forward(&x, None) * randn(&[2, 3, 8]))
            .sum(Kind::Float)
            .backward();
        for (name, var) in vs.variables() {
            if name.contains("offset") {
                assert!(var.grad().abs().max().double_value(&[]) > 0.0, "{name}");
            }
        }
    }

    #[test]
    fn sampled_keys_touching_padding_are_unusable() {
        let y = randn(&[1, 5, 3]);
        let valid = Tensor::from_slice(&[true, true, false, true, true]).view([1, 5]);
        let positions = Tensor::from_slice(&[0.0f32, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 3.5]).view([1, 1, 8]);
        let sampled = sample_slices(&y, &positions);
        let usable = Vec::<bool>::try_from(sampled_validity(&valid, &sampled).flatten(0, -1)).unwrap();
        assert_eq!(usable, [true, true, false, false, false, true, true, true]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn interpolation_at_integer_positions_returns_the_slices_exactly(
            b in 1i64..3, n in 1i64..10, groups in 1i64..3, m in 1i64..6, seed in 0i64..1000,
        ) {
            tch::manual_seed(seed);
            let y = randn(&[b, n, 4]);
            let index = Tensor::randint(n, [b, groups, m], (Kind::Int64, Device::Cpu));
            let sampled = sample_slices(&y, &index.to_kind(Kind::Float));
            for bi in 0..b {
                let expected = y.get(bi).index_select(0, &index.get(bi).flatten(0, -1)).view([groups, m, 4]);
                prop_assert!(sampled.features.select(1, bi).equal(&expected));
            }
        }

        #[test]
        fn interpolation_is_linear_between_slices(n in 2i64..10, t in 0.0f64..1.0, seed in 0i64..1000) {
            tch::manual_seed(seed);
            let y = randn(&[1, n, 3]);
            let at = t * (n - 1) as f64;
            let sampled = sample_slices(&y, &Tensor::from_slice(&[at as f32]).view([1, 1, 1]));
            let lo = (at.floor() as i64).min(n - 2);
            let w = at as f32 as f64 - lo as f64;
            let expected = y.get(0).get(lo) * (1.0 - w) + y.get(0).get(lo + 1) * w;
            prop_assert!(max_abs_diff(&sampled.features.view([3]), &expected) < 1e-5);
        }

        #[test]
        fn with_zero_offsets_and_r_1_it_equals_full_attention(
            b in 1i64..3, n in 1i64..8, groups_log in 0u32..3, layers in 1i64..3, seed in 0i64..1000,
            mask in proptest::collection::vec(any::<bool>(), 16),
        ) {
            tch::manual_seed(seed);
            let shape = AggregatorShape { input_dim: 5, slices: n };
            let cfg = DeformableAttentionConfig {
                offset_groups: 1 << groups_log,
                pyramid_strides: if layers == 2 { vec![2] } else { vec![] },
                ..tiny(layers, 1, 1)
            };
            let deformable_vs = nn::VarStore::new(Device::Cpu);
            let deformable = DeformableAttentionAggregator::build(&deformable_vs.root(), &cfg, &shape).unwrap();
            let full_cfg = FullAttentionConfig {
                width: cfg.width, layers, heads: cfg.heads, ffn_dim: cfg.ffn_dim,
                pyramid_strides: cfg.pyramid_strides.clone(), ..Default::default()
            };
            let mut full_vs = nn::VarStore::new(Device::Cpu);
            let full = FullAttentionAggregator::build(&full_vs.root(), &full_cfg, &shape).unwrap();
            tch::no_grad(|| {
                for layer in 0..layers as usize {
                    let _ = deformable.attention(layer).offsets.pointwise.ws.shallow_clone().zero_();
                }
            });
            full_vs.copy(&deformable_vs).unwrap();

            let x = randn(&[b, n, 5]);
            let valid = Tensor::from_slice(&mask[..(b * n) as usize]).view([b, n]);
            for valid in [None, Some(&valid)] {
                let d = deformable.forward(&x, valid, false);
                let f = full.forward(&x, valid, false);
                prop_assert!(max_abs_diff(&d.slices, &f.slices) < 1e-5, "{}", max_abs_diff(&d.slices, &f.slices));
                prop_assert!(max_abs_diff(&d.volume, &f.volume) < 1e-5);
            }
        }

        #[test]
        fn padding_never_changes_the_volume_embedding(
            b in 1i64..4, n in 4i64..12, stride in 1i64..4, pyramid in any::<bool>(), seed in 0i64..1000,
            mask in proptest::collection::vec(any::<bool>(), 48), train in any::<bool>(),
        ) {
            tch::manual_seed(seed);
            let vs = nn::VarStore::new(Device::Cpu);
            let cfg = DeformableAttentionConfig {
                pyramid_strides: if pyramid { vec![2] } else { vec![] },
                offset_range: 2.0,
                ..tiny(2, stride.min(if pyramid { n / 2 } else { n }), 2)
            };
            let agg = DeformableAttentionAggregator::build(&vs.root(), &cfg, &AggregatorShape { input_dim: 5, slices: n }).unwrap();
            let valid = Tensor::from_slice(&mask[..(b * n) as usize]).view([b, n]);
            let x = randn(&[b, n, 5]);
            let noisy = x.where_self(&valid.unsqueeze(-1), &(randn(&[b, n, 5]) * 100.0));
            let before = agg.forward(&x, Some(&valid), train);
            let after = agg.forward(&noisy, Some(&valid), train);
            prop_assert_eq!(max_abs_diff(&before.volume, &after.volume), 0.0);
            let kept = valid.unsqueeze(-1).expand([b, n, 8], false);
            let diff = (&before.slices - &after.slices).abs().masked_select(&kept);
            prop_assert!(diff.numel() == 0 || diff.max().double_value(&[]) == 0.0);
            prop_assert!(bool::try_from(before.slices.isfinite().all()).unwrap());
            prop_assert!(bool::try_from(before.volume.isfinite().all()).unwrap());
        }
    }
}
