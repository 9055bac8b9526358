//! SwAV: swapped prediction of online cluster assignments (Sinkhorn-Knopp codes), at the
//! slice or the volume level, with multi-crop, prototype freezing and a queue.

mod swav;

pub use swav::{codes, sinkhorn_knopp, swapped_prediction, SwavConfig, SwavObjective};
