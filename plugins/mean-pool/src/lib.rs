//! The mean-pooling slice aggregator: the parameter-free baseline for f_inter.

mod mean_pool;

pub use mean_pool::{MeanPoolAggregator, MeanPoolConfig};
