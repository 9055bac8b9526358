//! VICReg: variance-invariance-covariance regularisation, at the slice or the volume level.

mod vicreg;

pub use vicreg::{VicRegConfig, VicRegObjective};
