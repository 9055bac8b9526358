//! VICReg: variance-invariance-covariance regularisation, at the slice or the volume level.

mod vicreg;

pub use vicreg::{covariance, invariance, variance, VicRegConfig, VicRegObjective};
