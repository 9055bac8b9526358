//! The gated-attention slice aggregator: a learned, permutation-invariant weighting of the
//! slices (Ilse et al., ICML 2018) as an f_inter between mean pooling and a transformer.

mod attention_pool;

pub use attention_pool::{AttentionPoolAggregator, AttentionPoolConfig};
