//! What the two slice transformers share (Nguyen et al., AAAI 2023, Sec. 3.2): the input
//! projection of the slice features (Eq. 9's multi-level concatenation, `input_dim` wide) to
//! `width` and a batch norm over the batch's slices, sinusoidal positions along the slice
//! axis, `layers` pre-norm blocks (attention and a GELU feed-forward, each LayerNorm ->
//! sub-layer -> residual), optional pyramid down-sampling between blocks, a final LayerNorm,
//! L2-normalised slice outputs and their masked mean as the volume embedding (Eq. 10). The
//! two components differ only in their attention, a [`SliceAttention`].
//!
//! Padding (`valid = false`) slices: their features are zeroed before the input projection,
//! so everything after depends on where padding is, never on what it holds; the input batch
//! norm's statistics, the attentions' keys, pyramid pooling and the volume mean skip them.
//! Hence the volume embedding is exactly independent of padding contents.
//!
//! Pre-norm rather than the post-norm of Vaswani et al.: it trains without warm-up tricks and
//! is what DAT (Xia et al., CVPR 2022) uses; the final LayerNorm plays post-norm's part for
//! the output.

use medssl_core::prelude::*;

/// `aggregator.<key> must be positive` unless `value > 0`.
pub fn ensure_positive(key: &str, value: i64) -> Result<()> {
    ensure!(value > 0, "aggregator.{key} must be positive, got {value}");
    Ok(())
}

/// The keys both transformers have, validated in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct TrunkSpec {
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub ffn_dim: i64,
    pub dropout: f64,
    pub pyramid_strides: Vec<i64>,
}

impl TrunkSpec {
    /// Checks the keys against the run's shape and returns the sequence length each layer
    /// attends over (`shape.slices`, divided by each pyramid stride in turn, rounded up).
    pub fn level_lengths(&self, shape: &AggregatorShape) -> Result<Vec<i64>> {
        ensure_positive("width", self.width)?;
        ensure_positive("layers", self.layers)?;
        ensure_positive("heads", self.heads)?;
        ensure_positive("ffn_dim", self.ffn_dim)?;
        ensure!(
            self.width % self.heads == 0,
            "aggregator.width = {} is not divisible by aggregator.heads = {}: every head needs an equal share of the width",
            self.width,
            self.heads
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "aggregator.dropout must be in [0, 1), got {}",
            self.dropout
        );
        let gaps = self.layers as usize - 1;
        ensure!(
            self.pyramid_strides.is_empty() || self.pyramid_strides.len() == gaps,
            "aggregator.pyramid_strides = {:?}: expected [] or one stride per gap between layers ({gaps} for aggregator.layers = {})",
            self.pyramid_strides,
            self.layers
        );
        for (i, &stride) in self.pyramid_strides.iter().enumerate() {
            ensure!(
                stride > 0,
                "aggregator.pyramid_strides[{i}] must be positive, got {stride}"
            );
        }
        ensure!(
            shape.input_dim > 0,
            "the slice features entering the aggregator must have a positive width, got {} (see aggregator.levels)",
            shape.input_dim
        );
        ensure!(
            shape.slices > 0,
            "data.views.volume_slices must be positive for a slice transformer, got {}",
            shape.slices
        );
        let mut lengths = vec![shape.slices];
        for &stride in &self.pyramid_strides {
            let last = *lengths.last().expect("non-empty");
            lengths.push((last + stride - 1) / stride);
        }
        lengths.resize(self.layers as usize, *lengths.last().expect("non-empty"));
        Ok(lengths)
    }
}

/// One layer's attention over the slice axis.
pub trait SliceAttention {
    /// `x` `[B, n, width]` (layer-normalised), `valid` `[B, n]` bool where given; returns
    /// `[B, n, width]`. Invalid slices must never be used as keys.
    fn forward(&self, x: &Tensor, valid: Option<&Tensor>) -> Tensor;
}

/// Query, key, value and output projections of multi-head attention, and the attention
/// itself once keys are chosen. Both attentions use these names, so the weights of one can be
/// copied into the other.
#[derive(Debug)]
pub struct HeadProjections {
    pub query: nn::Linear,
    pub key: nn::Linear,
    pub value: nn::Linear,
    pub output: nn::Linear,
    pub heads: i64,
    pub head_dim: i64,
}

impl HeadProjections {
    pub fn new(p: &nn::Path, width: i64, heads: i64) -> Self {
        let linear = |name: &str| layers::linear(p / name, width, width);
        HeadProjections {
            query: linear("query"),
            key: linear("key"),
            value: linear("value"),
            output: linear("output"),
            heads,
            head_dim: width / heads,
        }
    }

    /// `[B, n, width]` to `[B, heads, n, head_dim]`.
    pub fn split_heads(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        x.view([size[0], size[1], self.heads, self.head_dim]).transpose(1, 2)
    }

    /// Queries `[B, heads, n, head_dim]`, already scaled by 1/sqrt(head_dim) (cheaper on
    /// `n x head_dim` than on the logits).
    pub fn scaled_queries(&self, projected: &Tensor) -> Tensor {
        self.split_heads(projected) * (self.head_dim as f64).powf(-0.5)
    }

    /// softmax(q k^T + bias) v over the heads, concatenated and projected: `[B, n, width]`.
    /// `key_valid` (bool, broadcastable to the logits) marks usable keys; a row must have one.
    pub fn attend(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        bias: &Tensor,
        key_valid: Option<&Tensor>,
    ) -> Tensor {
        // In place: matmul's backward needs its inputs, not its output, and each copy would
        // be one more `[B, heads, n, m]` tensor at the peak.
        let mut logits = queries.matmul(&keys.transpose(-2, -1));
        let _ = logits.g_add_(bias);
        if let Some(valid) = key_valid {
            let _ = logits.masked_fill_(&valid.logical_not(), f64::NEG_INFINITY);
        }
        let size = queries.size();
        logits
            .softmax(-1, logits.kind())
            .matmul(values)
            .transpose(1, 2)
            .reshape([size[0], size[2], self.heads * self.head_dim])
            .apply(&self.output)
    }
}

/// Where a row of keys has none valid (a sequence of padding only), every key is allowed:
/// softmax over nothing is NaN, and those keys are built from zeroed padding, so nothing of
/// the padding's content leaks in.
pub fn keys_or_all(key_valid: &Tensor) -> Tensor {
    key_valid.logical_or(&key_valid.any_dim(-1, true).logical_not())
}

/// A learned bias per head for every relative displacement between a query and a key slice:
/// a table of `2 n - 1` entries for a sequence of `n` slices (displacements `-(n-1)` to
/// `n-1`), read directly at integer displacements and linearly interpolated at fractional
/// ones (DAT's bias interpolation, in 1D).
#[derive(Debug)]
pub struct RelativePositionBias {
    /// `[heads, 2 slices - 1]`.
    pub table: Tensor,
    slices: i64,
}

impl RelativePositionBias {
    pub fn new(p: &nn::Path, heads: i64, slices: i64) -> Self {
        // Small random values (as DAT and Swin) rather than zeros: a bias that is not flat
        // from the start makes equivalence tests between attentions meaningful.
        let table = p.var(
            "relative_bias",
            &[heads, 2 * slices - 1],
            nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        );
        RelativePositionBias { table, slices }
    }

    /// Entries per head: `2 n - 1`.
    pub fn entries(&self) -> i64 {
        2 * self.slices - 1
    }

    /// Table column of each displacement (key minus query); a sequence longer than the one
    /// the table was built for reads the edge entries beyond it.
    fn column(&self, displacement: &Tensor) -> Tensor {
        (displacement + (self.slices - 1)).clamp(0, self.entries() - 1)
    }

    /// Bias `[1, heads, n, n]` of every query slice against every key slice.
    pub fn dense(&self, n: i64) -> Tensor {
        let positions = Tensor::arange(n, (Kind::Int64, self.table.device()));
        let displacement = positions.view([1, n]) - positions.view([n, 1]);
        let heads = self.table.size()[0];
        self.table
            .index_select(1, &self.column(&displacement).flatten(0, -1))
            .view([1, heads, n, n])
    }

    /// Bias `[B, heads, n, m]` of the `n` query slices against keys at fractional slice
    /// `positions` (`[B, groups, m]`); heads are split evenly over the groups. The table is
    /// read by `grid_sampler` (bilinear on a one-row image, border padding = the clamp of
    /// [`Self::dense`], `align_corners` so that -1 and 1 are the first and last entries): the
    /// backward pass keeps only the sampling grid, where gathering both neighbours would keep
    /// two `[B, heads, n, m]` tensors and their int64 indices.
    pub fn sampled(&self, positions: &Tensor, n: i64) -> Tensor {
        let [b, groups, m] = positions.size()[..] else {
            unreachable!("sample positions are [B, groups, m]")
        };
        let heads = self.table.size()[0];
        let per_group = heads / groups;
        let entries = self.entries();
        let queries = Tensor::arange(n, (positions.kind(), positions.device())).view([1, 1, n, 1]);
        let column = positions.view([b, groups, 1, m]) - queries + (self.slices - 1) as f64;
        let x = column * (2.0 / (entries - 1).max(1) as f64) - 1.0;
        let grid = Tensor::stack(&[&x, &x.zeros_like()], -1).view([b * groups, n, m, 2]);
        self.table
            .view([1, groups, per_group, 1, entries])
            .expand([b, groups, per_group, 1, entries], false)
            .reshape([b * groups, per_group, 1, entries])
            .grid_sampler(&grid, 0, 1, true)
            .view([b, heads, n, m])
    }
}

/// Sinusoidal positions `[n, width]` (Vaswani et al.): sines in the first half of the width,
/// cosines in the second, at frequencies 10000^(-k / half). `options`: kind and device.
pub fn sinusoidal_positions(n: i64, width: i64, options: (Kind, Device)) -> Tensor {
    let sines = width - width / 2;
    let frequencies = (Tensor::arange(sines, options) * (-(10000f64.ln()) / sines as f64)).exp();
    let angles = Tensor::arange(n, options).view([n, 1]) * frequencies.view([1, sines]);
    Tensor::cat(&[angles.sin(), angles.cos().narrow(1, 0, width / 2)], 1)
}

/// Masked mean over windows of `stride` slices (the last window may be shorter): `[B, n, C]`
/// to `[B, ceil(n / stride), C]`, and the pooled validity (a window with any valid slice).
fn pyramid_pool(x: &Tensor, valid: &Tensor, stride: i64) -> (Tensor, Tensor) {
    let [b, n, c] = x.size()[..] else {
        unreachable!("[B, n, C]")
    };
    let pooled = (n + stride - 1) / stride;
    let pad = pooled * stride - n;
    let weight = valid.to_kind(x.kind()).unsqueeze(-1);
    let sum = (x * &weight)
        .constant_pad_nd([0, 0, 0, pad])
        .view([b, pooled, stride, c])
        .sum_dim_intlist(2, false, x.kind());
    let count = weight
        .constant_pad_nd([0, 0, 0, pad])
        .view([b, pooled, stride, 1])
        .sum_dim_intlist(2, false, x.kind());
    (sum / count.clamp_min(1.0), count.squeeze_dim(-1).gt(0.0))
}

/// One pre-norm transformer block: attention and a GELU feed-forward, each with a residual.
#[derive(Debug)]
pub struct Block<A> {
    norm_attention: nn::LayerNorm,
    pub attention: A,
    norm_ffn: nn::LayerNorm,
    ffn_in: nn::Linear,
    ffn_out: nn::Linear,
}

impl<A: SliceAttention> Block<A> {
    fn forward(&self, x: &Tensor, valid: Option<&Tensor>, dropout: f64, train: bool) -> Tensor {
        let drop = |t: Tensor| {
            if dropout > 0.0 {
                t.dropout(dropout, train)
            } else {
                t
            }
        };
        let x = x + drop(self.attention.forward(&x.apply(&self.norm_attention), valid));
        let ffn = x
            .apply(&self.norm_ffn)
            .apply(&self.ffn_in)
            .gelu("none")
            .apply(&self.ffn_out);
        &x + drop(ffn)
    }
}

/// The aggregator: a slice transformer with attention `A` in every layer.
#[derive(Debug)]
pub struct SliceTransformer<A> {
    input_dim: i64,
    width: i64,
    dropout: f64,
    input: nn::Linear,
    input_norm: layers::BatchNorm,
    blocks: Vec<Block<A>>,
    pyramid_strides: Vec<i64>,
    norm: nn::LayerNorm,
}

impl<A: SliceAttention> SliceTransformer<A> {
    /// Builds the trunk under `p`; `attention(path, slices)` builds layer `i`'s attention
    /// under `path` for a sequence of `level_lengths[i]` slices.
    pub fn new(
        p: &nn::Path,
        spec: &TrunkSpec,
        input_dim: i64,
        level_lengths: &[i64],
        mut attention: impl FnMut(&nn::Path, i64) -> Result<A>,
    ) -> Result<Self> {
        let width = spec.width;
        let blocks = level_lengths
            .iter()
            .enumerate()
            .map(|(i, &slices)| {
                let p = p / "layers" / i;
                Ok(Block {
                    norm_attention: layers::layer_norm(&p / "norm_attention", vec![width]),
                    attention: attention(&(&p / "attention"), slices)?,
                    norm_ffn: layers::layer_norm(&p / "norm_ffn", vec![width]),
                    ffn_in: layers::linear(&p / "ffn_in", width, spec.ffn_dim),
                    ffn_out: layers::linear(&p / "ffn_out", spec.ffn_dim, width),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SliceTransformer {
            input_dim,
            width,
            dropout: spec.dropout,
            input: layers::linear(p / "input", input_dim, width),
            input_norm: layers::batch_norm1d(p / "input_norm", width),
            blocks,
            pyramid_strides: spec.pyramid_strides.clone(),
            norm: layers::layer_norm(p / "norm", vec![width]),
        })
    }

    /// The projected slice features `[B, n, width]` batch-normalised over the valid slices
    /// of the batch (padding rows come out zero). Two failures of the first joint demo
    /// (volume embedding std 0.003 of the 0.088 an isotropic embedding has) make this
    /// necessary: default-initialised, the projection of L2-normalised levels is about
    /// 0.02 an entry against the sinusoids' 0.7, so positions shared by every volume decided
    /// the output; and slice features pooled from ReLU maps point mostly the same way in
    /// every volume, a shared part that a per-slice LayerNorm keeps (std 0.005 with it) and
    /// batch statistics remove, as in the projection heads of SwAV and SimCLR. A single
    /// valid slice in training has no batch statistics and uses the running ones.
    fn normalised_content(&self, projected: &Tensor, valid: Option<&Tensor>, train: bool) -> Tensor {
        let [b, n, width] = projected.size()[..] else {
            unreachable!("[B, n, width]")
        };
        let flat = projected.view([b * n, width]);
        let Some(valid) = valid else {
            return flat.apply_t(&self.input_norm, train && b * n > 1).view([b, n, width]);
        };
        let rows = valid.flatten(0, -1).nonzero().squeeze_dim(1);
        let count = rows.size()[0];
        if count == 0 {
            return projected.zeros_like();
        }
        let normalised = flat
            .index_select(0, &rows)
            .apply_t(&self.input_norm, train && count > 1);
        flat.zeros_like().index_copy(0, &rows, &normalised).view([b, n, width])
    }

    /// The attention of layer `i`.
    pub fn attention(&self, layer: usize) -> &A {
        &self.blocks[layer].attention
    }

    /// Contextual slice embeddings `[B, n, width]` before L2 normalisation.
    pub fn contextual(&self, slices: &Tensor, valid: Option<&Tensor>, train: bool) -> Tensor {
        let n = slices.size()[1];
        let valid = valid.map(|v| v.to_kind(Kind::Bool));
        let slices = match &valid {
            Some(valid) => slices.masked_fill(&valid.logical_not().unsqueeze(-1), 0.0),
            None => slices.shallow_clone(),
        };
        let content = self.normalised_content(&slices.apply(&self.input), valid.as_ref(), train);
        let mut x = sinusoidal_positions(n, self.width, (content.kind(), slices.device())) + content;
        let mut level_valid = valid;
        let mut factor = 1;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, level_valid.as_ref(), self.dropout, train);
            if let Some(&stride) = self.pyramid_strides.get(i).filter(|&&s| s > 1) {
                let valid = level_valid
                    .take()
                    .unwrap_or_else(|| Tensor::ones([x.size()[0], x.size()[1]], (Kind::Bool, x.device())));
                let (pooled, pooled_valid) = pyramid_pool(&x, &valid, stride);
                x = pooled;
                level_valid = Some(pooled_valid);
                factor *= stride;
            }
        }
        let x = x.apply(&self.norm);
        if factor > 1 {
            // Every slice takes the embedding of the coarse window it fell into.
            let coarse = Tensor::arange(n, (Kind::Int64, x.device())).divide_scalar_mode(factor, "floor");
            x.index_select(1, &coarse)
        } else {
            x
        }
    }
}

impl<A: SliceAttention> Aggregator for SliceTransformer<A> {
    fn input_dim(&self) -> i64 {
        self.input_dim
    }

    fn output_dim(&self) -> i64 {
        self.width
    }

    fn mixes_slices(&self) -> bool {
        true
    }

    fn forward(&self, slices: &Tensor, valid: Option<&Tensor>, train: bool) -> AggregatorOutput {
        let slices = l2_normalize(&self.contextual(slices, valid, train));
        let volume = match valid {
            Some(valid) => {
                let weight = valid.to_kind(slices.kind()).unsqueeze(-1);
                (&slices * &weight).sum_dim_intlist(1, false, slices.kind())
                    / weight.sum_dim_intlist(1, false, slices.kind()).clamp_min(1.0)
            }
            None => slices.mean_dim(1, false, slices.kind()),
        };
        AggregatorOutput { slices, volume }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pyramid_pooling_averages_valid_slices_per_window() {
        let x = Tensor::from_slice(&[1f32, 2., 3., 4., 5.]).view([1, 5, 1]);
        let valid = Tensor::from_slice(&[true, false, true, true, false]).view([1, 5]);
        let (pooled, pooled_valid) = pyramid_pool(&x, &valid, 2);
        assert_eq!(Vec::<f32>::try_from(pooled.flatten(0, -1)).unwrap(), [1.0, 3.5, 0.0]);
        assert_eq!(
            Vec::<bool>::try_from(pooled_valid.flatten(0, -1)).unwrap(),
            [true, true, false]
        );
    }

    #[test]
    fn the_dense_bias_reads_the_table_at_key_minus_query() {
        let vs = nn::VarStore::new(Device::Cpu);
        let bias = RelativePositionBias::new(&vs.root(), 2, 4);
        let dense = bias.dense(4);
        for (i, j, h) in [(0, 3, 0), (3, 0, 1), (2, 2, 0), (1, 3, 1)] {
            let expected = bias.table.double_value(&[h, j - i + 3]);
            assert_eq!(dense.double_value(&[0, h, i, j]), expected);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn the_sampled_bias_interpolates_the_dense_one(
            n in 1i64..12, groups_log in 0u32..2, seed in 0i64..1000, t in 0.0f64..1.0,
        ) {
            tch::manual_seed(seed);
            let vs = nn::VarStore::new(Device::Cpu);
            let bias = RelativePositionBias::new(&vs.root(), 4, n);
            let dense = bias.dense(n);
            let groups = 1 << groups_log;
            let keys = Tensor::arange(n, (Kind::Float, Device::Cpu)).view([1, 1, n]).repeat([2, groups, 1]);
            // At integer positions: the dense bias (up to grid_sampler's rounding).
            let at_slices = bias.sampled(&keys, n);
            prop_assert_eq!(at_slices.size(), vec![2, 4, n, n]);
            prop_assert!((&at_slices - &dense).abs().max().double_value(&[]) < 1e-6);
            // Between two slices: linear in the position.
            if n > 1 {
                let at = t * (n - 1) as f64;
                let lo = (at.floor() as i64).min(n - 2);
                let w = at - lo as f64;
                let between = bias.sampled(&Tensor::full([1, groups, 1], at, (Kind::Float, Device::Cpu)), n);
                let expected = dense.narrow(3, lo, 1) * (1.0 - w) + dense.narrow(3, lo + 1, 1) * w;
                prop_assert!((between - expected).abs().max().double_value(&[]) < 1e-5);
            }
        }

        #[test]
        fn sinusoidal_positions_are_bounded_and_distinct(n in 1i64..40, width in 1i64..24) {
            let pe = sinusoidal_positions(n, width, (Kind::Float, Device::Cpu));
            prop_assert_eq!(pe.size(), vec![n, width]);
            prop_assert!(pe.abs().max().double_value(&[]) <= 1.0);
            if n > 1 && width > 1 {
                // Two positions never share an encoding (the lowest frequency is 1 rad/slice).
                let d = (pe.unsqueeze(0) - pe.unsqueeze(1)).abs().sum_dim_intlist(-1, false, Kind::Float)
                    + Tensor::eye(n, (Kind::Float, Device::Cpu));
                prop_assert!(d.min().double_value(&[]) > 1e-3);
            }
        }

        #[test]
        fn level_lengths_divide_by_each_stride_rounding_up(
            slices in 1i64..70, strides in proptest::collection::vec(1i64..4, 0..4),
        ) {
            let spec = TrunkSpec {
                width: 8, layers: strides.len() as i64 + 1, heads: 2, ffn_dim: 8, dropout: 0.0,
                pyramid_strides: strides.clone(),
            };
            let lengths = spec.level_lengths(&AggregatorShape { input_dim: 4, slices }).unwrap();
            prop_assert_eq!(lengths.len(), strides.len() + 1);
            prop_assert_eq!(lengths[0], slices);
            for (i, s) in strides.iter().enumerate() {
                prop_assert_eq!(lengths[i + 1], (lengths[i] + s - 1) / s);
            }
        }
    }
}
