//! medssl-core: the four role traits (encoder, aggregator, objective, head) and the dataset
//! role, their link-time registries, layered config, the data pipeline, the training loop
//! with checkpoints and exact resume, run metrics, and frozen-feature evaluation (probes).
//! No model code lives here: models are plugins that depend on this crate only.

pub mod activity;
pub mod aggregator;
pub mod assemble;
pub mod batch_norm;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod contrastive;
pub mod dataset;
pub mod detection;
pub mod device;
pub mod dice_ce;
pub mod distributed;
pub mod encoder;
pub mod encoder_init;
pub mod eval;
pub mod finetune;
pub mod head;
pub mod inspect;
pub mod layers;
pub mod loader;
pub mod loss_scaling;
pub mod memory_format;
pub mod metrics;
pub mod objective;
pub mod ops;
pub mod optim;
pub mod paths;
pub mod precision;
pub mod probe;
pub mod projection_head;
pub mod reference_weights;
pub mod registry;
pub mod resize;
pub mod rng;
pub mod run_dir;
pub mod section;
pub mod segmentation;
pub mod slice_features;
pub mod sliding_window;
pub mod sources;
pub mod tensorboard;
pub mod train;
pub mod unetr_blocks;
pub mod views;
pub mod volume_crops;
pub mod weight_format;

pub use anyhow;
pub use serde;
pub use tch;
pub use toml;

/// What a plugin needs, in one import.
pub mod prelude {
    pub use crate::aggregator::{Aggregator, AggregatorEntry, AggregatorOutput, AggregatorShape};
    pub use crate::dataset::{Dataset, DatasetEntry, Volume};
    pub use crate::detection::{Detections, ImageTargets};
    pub use crate::distributed;
    pub use crate::encoder::{
        Encoder, EncoderEntry, EncoderOutput, EncoderShape, Level, ReferenceLibrary, SpatialDims,
    };
    pub use crate::head::{Head, HeadEntry, HeadInput, HeadShape, Prediction, Targets, Task};
    pub use crate::layers;
    pub use crate::memory_format::MemoryFormat;
    pub use crate::objective::{
        Consumes, Loss, Objective, ObjectiveEntry, ObjectiveShape, Progress, StepInput, ViewLevel,
    };
    pub use crate::ops::l2_normalize;
    pub use crate::precision::loss_kind;
    pub use crate::projection_head::{projection_head, projection_head_without_first_bias};
    pub use crate::register;
    pub use crate::registry::default_toml;
    pub use crate::section::Section;
    pub use anyhow::{bail, ensure, Context, Result};
    pub use tch::{nn, Device, Kind, Tensor};
}
