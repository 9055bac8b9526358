//! The aggregator role: a sequence of slice embeddings to contextual slice embeddings and
//! one volume embedding.
//!
//! In the paper this is f_inter (Sec. 3.2, Eq. 6-10): a transformer over the slice axis whose
//! output is L2-normalised and pooled into the volume embedding.

use crate::section::Section;
use anyhow::Result;
use tch::{nn, Tensor};

/// What an aggregator returns.
pub struct AggregatorOutput {
    /// Contextual slice embeddings `[B, n, output_dim]`.
    pub slices: Tensor,
    /// The volume embedding `[B, output_dim]`.
    pub volume: Tensor,
}

pub trait Aggregator {
    /// Width of the slice embeddings it takes.
    fn input_dim(&self) -> i64;
    /// Width of what it returns.
    fn output_dim(&self) -> i64;
    /// Aggregates `[B, n, input_dim]`. `valid` (`[B, n]` bool), where given, marks real
    /// slices; padding slices must not change the volume embedding.
    fn forward(&self, slices: &Tensor, valid: Option<&Tensor>, train: bool) -> AggregatorOutput;
    /// Whether each output slice depends on the other slices (attention across the
    /// sequence). Objectives that predict a slice from its context (masked prediction) need
    /// it; pooling aggregators that treat each slice alone do not offer it.
    fn mixes_slices(&self) -> bool {
        false
    }
}

/// What the rest of the run asks of an aggregator.
#[derive(Debug, Clone, Copy)]
pub struct AggregatorShape {
    /// Width of each slice embedding it receives.
    pub input_dim: i64,
    /// Slices in every sequence it receives (`data.views.volume_slices`), for layers
    /// sized by the sequence length (relative position tables, strided sampling).
    pub slices: i64,
}

pub type BuildAggregator = fn(&Section, nn::Path, &AggregatorShape) -> Result<Box<dyn Aggregator>>;

pub struct AggregatorEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub default_config: fn() -> String,
    /// Small variants of the config (TOML) that build and run fast on a CPU; the
    /// composition test trains one step with each, against every compatible component.
    pub smoke_configs: &'static [&'static str],
    pub build: BuildAggregator,
}
crate::impl_registered!(AggregatorEntry);
