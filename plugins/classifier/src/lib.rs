//! Classification heads on the backbone's embeddings: the paper's 3D classification
//! downstream, f_intra + f_inter + two fully connected layers (Nguyen et al., AAAI 2023,
//! Sec. 4).

mod volume_classifier;

pub use volume_classifier::{VolumeClassifier, VolumeClassifierConfig};
