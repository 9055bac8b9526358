//! SimCLR's NT-Xent contrastive objective, at the slice or the volume level.

mod ntxent;

pub use ntxent::{NtXentConfig, NtXentObjective};
