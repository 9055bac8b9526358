//! The dataset role: a reader that lists the samples of one source and decodes one on demand.
//!
//! Readers are called from loader threads, so they are `Send + Sync` and return owned CPU
//! tensors. Intensities come back as float32, normalised as the reader's config says.

use crate::section::Section;
use anyhow::Result;
use tch::Tensor;

/// One decoded sample: a volume `[D, H, W]` (a 2D image is a volume of one slice).
pub struct Volume {
    pub voxels: Tensor,
    /// Voxel spacing in mm along (D, H, W), where the format records it.
    pub spacing: Option<[f64; 3]>,
    /// Class label, for formats that carry one (MedMNIST, labelled folders).
    pub label: Option<i64>,
    /// Segmentation mask `[D, H, W]` (int64 class ids), for formats that pair one.
    pub mask: Option<Tensor>,
    /// The stored element type (`int16`, `float32`, ...), where the format says.
    pub dtype: Option<String>,
}

impl Volume {
    /// An unlabelled volume.
    pub fn new(voxels: Tensor, spacing: Option<[f64; 3]>) -> Volume {
        Volume {
            voxels,
            spacing,
            label: None,
            mask: None,
            dtype: None,
        }
    }
}

pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A name for sample `index` in messages (file path, series folder, ...).
    fn describe(&self, index: usize) -> String;
    /// Decodes sample `index` into a float32 CPU tensor `[D, H, W]`.
    fn load(&self, index: usize) -> Result<Volume>;
    /// What the file of sample `index` records beyond its voxels (DICOM: frames, bits,
    /// photometric interpretation, transfer syntax), for `medssl data inspect`; empty where
    /// the format has nothing to add.
    fn attributes(&self, _index: usize) -> Result<serde_json::Map<String, serde_json::Value>> {
        Ok(serde_json::Map::new())
    }
}

pub type BuildDataset = fn(&Section) -> Result<Box<dyn Dataset>>;

pub struct DatasetEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub default_config: fn() -> String,
    pub build: BuildDataset,
}
crate::impl_registered!(DatasetEntry);
