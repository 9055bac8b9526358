//! Masked slice-embedding prediction (the paper's L_mask): an objective over the sequence of
//! slice features that f_inter reads.

mod masked_prediction;

pub use masked_prediction::{
    batch_mask, mask_positions, masked_count, masked_l2, MaskedPredictionConfig, MaskedPredictionObjective,
};
