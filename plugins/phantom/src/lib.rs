//! medssl-phantom: the `phantom` dataset format, deterministic synthetic anatomical volumes
//! for demos and tests that need no data on disk.

pub mod phantom;
