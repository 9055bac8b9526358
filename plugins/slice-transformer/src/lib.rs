//! Transformers over the slice axis, the paper's f_inter (Nguyen et al., AAAI 2023, Sec. 3.2,
//! Eq. 6-10): `deformable-attention` (the paper's layer, a 1D analogue of Xia et al.'s DAT,
//! CVPR 2022) and `full-attention` (plain multi-head self-attention over every slice, the
//! baseline it is measured against). Both share the trunk in [`block`]: input projection,
//! sinusoidal positions, pre-norm blocks with a GELU feed-forward, optional pyramid
//! down-sampling, L2-normalised outputs and the masked mean that gives the volume embedding.

pub mod block;
mod deformable_attention;
mod full_attention;

pub use block::{SliceAttention, SliceTransformer};
pub use deformable_attention::{
    sample_slices, DeformableAttention, DeformableAttentionAggregator, DeformableAttentionConfig,
};
pub use full_attention::{FullAttention, FullAttentionAggregator, FullAttentionConfig};
