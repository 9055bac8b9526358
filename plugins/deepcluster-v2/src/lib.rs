//! DeepCluster-v2: k-means over a memory bank of projected embeddings at every epoch start,
//! then cross-entropy against the cluster assignments, at the slice or the volume level.

mod deepcluster_v2;
mod kmeans;

pub use deepcluster_v2::{cluster_loss, DeepClusterV2Config, DeepClusterV2Objective};
pub use kmeans::{initial_centroids, spherical_kmeans, KMeans};
