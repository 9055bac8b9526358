//! The `voco` objective: VoCo's volume contrast (Wu et al., CVPR 2024, "VoCo: A
//! Simple-yet-Effective Volume Contrastive Learning Framework for 3D Medical Image Analysis",
//! Sec. 3; defaults as its large-scale version, Luffy03/Large-Scale-Medical,
//! `Self-supervised/models/voco_head.py` `VoCoHead`, with the crops of `utils/voco_trans.py`,
//! [`crate::crops`]). Each region the data path delivers (`data.views.crop_size`, one per
//! volume and view) is cut into K base crops and n random crops with overlap labels y [n, K];
//! all crops of the step go through the encoder as one batch (v2's `cat([img, crops])`, the
//! random crops first); the embedding of a crop is the concatenation of the global average
//! pools of the encoder levels `pooled_levels`; a student and a teacher projection head
//! (Linear-BN-ReLU twice, then Linear, 1024 wide; batch norm without scale, shift or running
//! statistics) map it to z. With sim(a, b) = ReLU(cos(a, b)) and, per region r,
//!
//! - ce(y, p) = Σ -y log(1 - |y - p| + 1e-6) / (Σ y + 1e-6) + Σ_{y = 0} -log(1 - p + 1e-6) /
//!   (#{y = 0} + 1e-6), summed over the region's n x K entries (`ce_loss`);
//! - intra = ce(y, sim(x_student, bases_teacher)): each random crop predicts its overlaps
//!   with its own region's base crops;
//! - inter = ce(sg(sim(x_teacher, bases_teacher_j)), sim(x_student, bases_student_j)), j =
//!   (r + 1) mod R: the student's similarities to another region's base crops follow the
//!   teacher's;
//! - reg = mean over pairs k < l of sim(bases_student_k, sg(bases_student_l))²: base crops of
//!   one region are pushed apart;
//!
//! loss = mean over regions of intra + inter + reg. The student reads the embedding through
//! `Dropout1d(0.2)`; the teacher reads it whole, without gradients, and is the EMA of the
//! student, t ← m t + (1 - m) s with m = 0.9, updated at the start of each step before its
//! forward pass, as `_EMA_update_encoder_teacher` runs inside v2's forward. Each term is
//! logged, with `intra_baseline`: the intra term of a content-blind prediction, p_k = the
//! expected label of base crop k over the random crops' placement ([`RegionGrid::expected_labels`]);
//! an intra term below it means the embeddings tell where a crop lies.
//!
//! `variant = "v1"` is the CVPR 2024 loss (Luffy03/VoCo `models/voco_head.py`): logits =
//! (sim(x_student, bases_teacher) + sim(x_teacher, bases_student)) / 2, the negative term
//! Σ_{y = 0} p² / (#{y = 0} + 1e-6), no inter term; with `grid = [4, 4]` over a 384 x 384 x
//! 96 region, `crop_resize = [64, 64, 64]`, 2048-wide heads and `feature_dropout = 0` it
//! follows v1's settings. v1 trains two full networks (the teacher an EMA of the whole
//! student, backbone included); on medssl's one shared encoder only the heads are
//! student and teacher, as in v2, so that part of v1 is not reproduced.
//!
//! Where medssl differs on purpose, and why:
//! - The embedding. v2 pools SwinUNETR's residual conv blocks (`encoder1..4`, `encoder10`)
//!   applied to the raw input and to hidden states 0, 1, 2 and 4 (48 + 48 + 96 + 192 + 768 =
//!   1152 wide for feature size 48). In medssl those blocks belong to the `swin-unetr` head,
//!   not to the encoder, so the objective pools the encoder's own levels: `pooled_levels =
//!   "voco"` takes every level but the second deepest of an encoder with five levels or more
//!   (a Swin's [0, 1, 2, 4], v2's choice of hidden states) and every level of a smaller one
//!   (all four of `vit3d`); `"all"` or a list of level indices choose otherwise.
//! - Dropout1d on v2's 2D input `[N, F]` treats it as one unbatched sample of N channels:
//!   torch 2.13 zeroes whole rows (embeddings) with probability 0.2 and scales the rest by
//!   1 / 0.8 (checked with torch 2.13.0: `Dropout1d(0.5)` on ones `[6, 5]` gives rows of
//!   all 0 or all 2, no warning). medssl does exactly that, from libtorch's generator
//!   (reseeded every step). v2 builds the module inside forward, so it is always in training
//!   mode; here too, since the objective runs only in training steps.
//! - The teacher head is drawn independently of the student, as v2 (and v1) build two heads
//!   and never copy one into the other; `teacher_from_student = true` starts it as a copy.
//!   Its variables are saved in every checkpoint, and no optimizer sees them (PyTorch's skips
//!   them too: their gradient stays None).
//! - Cosines divide each vector by its norm clamped at 1e-8 (ATen's `cosine_similarity`),
//!   computed as one matrix product per region pair; the losses are in fp32 (f64 for f64
//!   inputs), vectorised over regions.
//! - Regions: each of a volume's `data.views.volume_views` crops is a region, ordered view
//!   by view, so region r + 1, the inter term's partner, is another volume's wherever the
//!   batch has several. With one region a step the inter term compares a region with itself,
//!   as v2 does at batch 1.
//! - An encoder that fixes its input size (a ViT's `img_size`) gets every crop resized to it
//!   (trilinear), as v1 resizes its 96³ crops to 64³; `crop_resize` sets the size otherwise.

use crate::crops::{self, CropAugmentation, RegionCoordinates, RegionGrid};
use medssl_core::objective::VolumeCrops;
use medssl_core::prelude::*;
use medssl_core::projection_head::projection_head_with_batch_statistics;
use serde::{Deserialize, Serialize};

const NAME: &str = "voco";

/// Which VoCo loss.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// CVPR 2024: symmetric logits, squared negative term, no inter term.
    V1,
    /// Large-Scale-Medical: intra, inter and the regulariser, -log(1 - p) negative term.
    V2,
}

/// Which encoder levels the embedding pools.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PooledLevels {
    Rule(LevelRule),
    /// Level indices, shallow = 0.
    Indices(Vec<usize>),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LevelRule {
    /// Every level but the second deepest where there are five or more (VoCo v2 on a Swin),
    /// else every level.
    Voco,
    All,
}

impl PooledLevels {
    /// The indices this choice gives for an encoder of `levels` levels.
    fn resolve(&self, levels: &[Level], key: &str) -> Result<Vec<usize>> {
        let n = levels.len();
        ensure!(
            n > 0,
            "objective `{key}` ({NAME}) pools the encoder's levels, but the encoder declares none"
        );
        let indices = match self {
            PooledLevels::Rule(LevelRule::All) => (0..n).collect(),
            PooledLevels::Rule(LevelRule::Voco) if n >= 5 => (0..n).filter(|&i| i != n - 2).collect(),
            PooledLevels::Rule(LevelRule::Voco) => (0..n).collect(),
            PooledLevels::Indices(indices) => indices.clone(),
        };
        let names: Vec<String> = levels
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{i}: {}", l.name))
            .collect();
        ensure!(
            !indices.is_empty(),
            "config key `objectives.{key}.pooled_levels` chooses no level; the encoder's are [{}]",
            names.join(", ")
        );
        for (at, &i) in indices.iter().enumerate() {
            ensure!(
                i < n,
                "config key `objectives.{key}.pooled_levels` names level {i}, but the encoder has {n} levels: [{}]",
                names.join(", ")
            );
            ensure!(
                !indices[..at].contains(&i),
                "config key `objectives.{key}.pooled_levels` names level {i} twice"
            );
        }
        Ok(indices)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VocoConfig {
    /// `"v2"` (Large-Scale-Medical) or `"v1"` (CVPR 2024).
    pub variant: Variant,
    /// Base crops along (H, W) of each region (`voco_trans.py`'s `num_crops = 3`); the base
    /// crop is the region divided by the grid, full depth.
    pub grid: [i64; 2],
    /// Random crops a region (`sw_batch_size = 2`).
    pub random_crops: usize,
    /// The size `[D, H, W]` every crop is resized to before the encoder; unset: as cut, or
    /// the size an encoder that fixes one takes.
    pub crop_resize: Option<[i64; 3]>,
    /// The encoder levels pooled into the embedding: `"voco"`, `"all"` or indices.
    pub pooled_levels: PooledLevels,
    /// Width of the heads' hidden layers.
    pub hidden_dim: i64,
    /// Width of the heads' output.
    pub output_dim: i64,
    /// EMA momentum of the teacher head.
    pub momentum: f64,
    /// Start the teacher as a copy of the student (the references draw it independently).
    pub teacher_from_student: bool,
    /// Probability of dropping a whole embedding from the student's input (`Dropout1d`).
    pub feature_dropout: f64,
    /// Flips, turns and intensity shifts of every crop.
    pub augmentation: CropAugmentation,
}

impl Default for VocoConfig {
    fn default() -> Self {
        VocoConfig {
            variant: Variant::V2,
            grid: [3, 3],
            random_crops: 2,
            crop_resize: None,
            pooled_levels: PooledLevels::Rule(LevelRule::Voco),
            hidden_dim: 1024,
            output_dim: 1024,
            momentum: 0.9,
            teacher_from_student: false,
            feature_dropout: 0.2,
            augmentation: CropAugmentation::default(),
        }
    }
}

/// The loss terms of one step, each averaged over regions.
pub struct Terms {
    pub intra: Tensor,
    /// `None` under v1.
    pub inter: Option<Tensor>,
    pub reg: Tensor,
}

pub struct VocoObjective {
    cfg: VocoConfig,
    key: String,
    levels: Vec<usize>,
    encoder_input: Option<[i64; 3]>,
    student: nn::SequentialT,
    teacher: nn::SequentialT,
    /// (student, teacher) variable pairs, for the EMA.
    pairs: Vec<(Tensor, Tensor)>,
    seed: u64,
}

impl VocoObjective {
    pub fn new(p: nn::Path, cfg: VocoConfig, shape: &ObjectiveShape, key: &str) -> Result<Self> {
        ensure!(
            shape.spatial_dims == SpatialDims::Three,
            "objective `{key}` ({NAME}) cuts 3D crops for a 3D encoder, but the run's encoder is {}",
            shape.spatial_dims
        );
        ensure!(
            cfg.grid.iter().all(|&g| g >= 1) && cfg.grid[0] * cfg.grid[1] >= 2,
            "config key `objectives.{key}.grid` needs at least 2 base crops (its regulariser compares pairs), got {:?}",
            cfg.grid
        );
        ensure!(
            cfg.random_crops >= 1,
            "config key `objectives.{key}.random_crops` must be at least 1"
        );
        ensure!(
            cfg.hidden_dim >= 1 && cfg.output_dim >= 1,
            "config keys `objectives.{key}.hidden_dim` and `output_dim` must be positive, got {} and {}",
            cfg.hidden_dim,
            cfg.output_dim
        );
        ensure!(
            (0.0..=1.0).contains(&cfg.momentum),
            "config key `objectives.{key}.momentum` must lie in [0, 1], got {}",
            cfg.momentum
        );
        ensure!(
            (0.0..1.0).contains(&cfg.feature_dropout),
            "config key `objectives.{key}.feature_dropout` is a probability below 1, got {}",
            cfg.feature_dropout
        );
        cfg.augmentation.validate(&format!("objectives.{key}.augmentation"))?;
        if let Some(size) = cfg.crop_resize {
            ensure!(
                size.iter().all(|&s| s >= 1),
                "config key `objectives.{key}.crop_resize` must be positive, got {size:?}"
            );
        }
        let fixed: Option<[i64; 3]> = shape.input_size.as_ref().and_then(|s| s.as_slice().try_into().ok());
        let encoder_input = match (cfg.crop_resize, fixed) {
            (Some(resize), Some(fixed)) => {
                ensure!(
                    resize == fixed,
                    "config key `objectives.{key}.crop_resize` is {resize:?}, but the encoder takes inputs of exactly {fixed:?} voxels; set it to that or leave it out"
                );
                Some(fixed)
            }
            (resize, fixed) => resize.or(fixed),
        };
        let levels = cfg.pooled_levels.resolve(&shape.levels, key)?;
        let input_dim: i64 = levels.iter().map(|&i| shape.levels[i].channels).sum();
        let widths = [input_dim, cfg.hidden_dim, cfg.hidden_dim, cfg.output_dim];
        let student = projection_head_with_batch_statistics(&p / "student", &widths);
        let teacher = projection_head_with_batch_statistics(&p / "teacher", &widths);
        let mut pairs = Vec::new();
        for block in 1..widths.len() {
            for leaf in ["weight", "bias"] {
                let name = |head: &str| (&p / head / format!("layer{block}") / 0).get(leaf);
                let (Some(s), Some(t)) = (name("student"), name("teacher")) else {
                    bail!("{NAME}: the projection heads lack `layer{block}.0.{leaf}`");
                };
                pairs.push((s, t.set_requires_grad(false)));
            }
        }
        if cfg.teacher_from_student {
            tch::no_grad(|| {
                for (s, t) in &pairs {
                    t.shallow_clone().copy_(s);
                }
            });
        }
        Ok(VocoObjective {
            cfg,
            key: key.to_string(),
            levels,
            encoder_input,
            student,
            teacher,
            pairs,
            seed: shape.seed,
        })
    }

    /// t ← m t + (1 - m) s for every teacher variable.
    pub fn update_teacher(&self) {
        let m = self.cfg.momentum;
        tch::no_grad(|| {
            for (s, t) in &self.pairs {
                let updated = t * m + s * (1.0 - m);
                t.shallow_clone().copy_(&updated);
            }
        });
    }

    /// The embedding of every crop: the global average pool of each chosen level, concatenated.
    fn embed(&self, out: &EncoderOutput) -> Result<Tensor> {
        let mut pooled = Vec::new();
        for &i in &self.levels {
            let level = out.levels.get(i).ok_or_else(|| {
                anyhow::anyhow!(
                    "{NAME}: the encoder returned {} levels, but objective `{}` pools level {i}",
                    out.levels.len(),
                    self.key
                )
            })?;
            let spatial: Vec<i64> = (2..level.dim() as i64).collect();
            pooled.push(level.mean_dim(spatial.as_slice(), false, loss_kind(level)));
        }
        Ok(Tensor::cat(&pooled, 1))
    }

    /// `Dropout1d(p)` on `[N, F]` as torch 2.13 applies it there: whole rows.
    fn drop_rows(&self, x: &Tensor) -> Tensor {
        let p = self.cfg.feature_dropout;
        if p == 0.0 {
            return x.shallow_clone();
        }
        let mut keep = Tensor::empty([x.size()[0], 1], (x.kind(), x.device()));
        let _ = keep.bernoulli_float_(1.0 - p);
        x * keep / (1.0 - p)
    }

    /// The loss terms from the heads' outputs: `x_*` `[R, n, E]` of the random crops, `b_*`
    /// `[R, K, E]` of the base crops, `labels` `[R, n, K]`.
    pub fn terms(
        &self,
        x_student: &Tensor,
        b_student: &Tensor,
        x_teacher: &Tensor,
        b_teacher: &Tensor,
        labels: &Tensor,
    ) -> Terms {
        let regions = x_student.size()[0];
        let (x_teacher, b_teacher) = (x_teacher.detach(), b_teacher.detach());
        let reg = regulariser(b_student);
        match self.cfg.variant {
            Variant::V2 => {
                let intra = ce_loss(labels, &similarity(x_student, &b_teacher), NegativeTerm::Log).mean(None);
                // Region r against region r + 1's base crops.
                let next = |b: &Tensor| {
                    if regions > 1 {
                        b.roll([-1], [0])
                    } else {
                        b.shallow_clone()
                    }
                };
                let target = similarity(&x_teacher, &next(&b_teacher));
                let inter = ce_loss(&target, &similarity(x_student, &next(b_student)), NegativeTerm::Log).mean(None);
                Terms {
                    intra,
                    inter: Some(inter),
                    reg: reg.mean(None),
                }
            }
            Variant::V1 => {
                let logits = (similarity(x_student, &b_teacher) + similarity(&x_teacher, b_student)) * 0.5;
                Terms {
                    intra: ce_loss(labels, &logits, NegativeTerm::Squared).mean(None),
                    inter: None,
                    reg: reg.mean(None),
                }
            }
        }
    }

    /// The grid of base crops over a delivered region `[D, H, W]`, refused where the grid does
    /// not divide it or the augmentation cannot turn its crops.
    fn grid_over(&self, region: [i64; 3]) -> Result<RegionGrid> {
        let grid = RegionGrid::new(region, self.cfg.grid, &self.key)?;
        ensure!(
            self.cfg.augmentation.rotate90 == 0.0 || grid.base[1] == grid.base[2],
            "config key `objectives.{}.augmentation.rotate90` turns crops in the (H, W) plane, which needs square base crops, but they are {:?} (`data.views.crop_size` over `objectives.{}.grid`)",
            self.key,
            grid.base,
            self.key
        );
        Ok(grid)
    }
}

/// sim(a, b) = ReLU(cos): `[R, n, E]` x `[R, K, E]` -> `[R, n, K]`.
pub fn similarity(a: &Tensor, b: &Tensor) -> Tensor {
    unit(a).matmul(&unit(b).transpose(1, 2)).relu()
}

/// Each vector over its norm clamped at 1e-8.
fn unit(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-8)
}

/// The negative term of [`ce_loss`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegativeTerm {
    /// v2: -log(1 - p + 1e-6).
    Log,
    /// v1: p².
    Squared,
}

/// VoCo's `ce_loss` per region: `labels`, `logits` `[R, n, K]` -> `[R]`.
pub fn ce_loss(labels: &Tensor, logits: &Tensor, negative: NegativeTerm) -> Tensor {
    let kind = logits.kind();
    let labels = labels.to_kind(kind);
    let dims = [1i64, 2];
    let sum = |t: &Tensor| t.sum_dim_intlist(dims.as_slice(), false, kind);
    let distance: Tensor = (&labels - logits).abs();
    let pos = sum(&(-&labels * ((1.0f64 + 1e-6) - distance).log())) / (sum(&labels) + 1e-6);
    let negatives = labels.eq(0.0).to_kind(kind);
    let per_entry = match negative {
        NegativeTerm::Log => -((1.0f64 + 1e-6) - logits).log(),
        NegativeTerm::Squared => logits * logits,
    };
    let neg = sum(&(&negatives * per_entry)) / (sum(&negatives) + 1e-6);
    pos + neg
}

/// VoCo's `regularization_loss` per region: `bases` `[R, K, E]` -> `[R]`, the mean over
/// pairs k < l of sim(b_k, sg(b_l))².
pub fn regulariser(bases: &Tensor) -> Tensor {
    let k = bases.size()[1];
    let cos = unit(bases).matmul(&unit(&bases.detach()).transpose(1, 2)).relu();
    let upper = Tensor::ones([k, k], (cos.kind(), cos.device())).triu(1);
    let pairs = (k * (k - 1) / 2) as f64;
    (cos.square() * upper).sum_dim_intlist([1i64, 2].as_slice(), false, cos.kind()) / pairs
}

impl Objective for VocoObjective {
    fn consumes(&self) -> Consumes {
        Consumes::VolumeCrops
    }

    /// The base crops' size (random crops have the same), or `crop_resize`'s.
    fn encoder_input_size(&self, delivered: &[i64]) -> Result<Vec<i64>> {
        let region: [i64; 3] = delivered
            .try_into()
            .map_err(|_| anyhow::anyhow!("{NAME} cuts 3D regions, but `data.views.crop_size` is {delivered:?}"))?;
        let grid = self.grid_over(region)?;
        Ok(self.encoder_input.unwrap_or(grid.base).to_vec())
    }

    fn loss(&mut self, input: &StepInput, progress: &Progress) -> Result<Loss> {
        let crops: &VolumeCrops = input
            .volume_crops
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{NAME}: the runner supplied no 3D crops"))?;
        ensure!(
            !crops.crops.is_empty(),
            "{NAME} needs at least one crop a volume (data.views.volume_views)"
        );
        let ids = Vec::<i64>::try_from(input.ids.to_device(Device::Cpu))?;
        let coordinates: Vec<RegionCoordinates> = (0..crops.crops.len())
            .flat_map(|view| {
                ids.iter().map(move |&id| RegionCoordinates {
                    id: id as u64,
                    view: view as u64,
                })
            })
            .collect();
        let regions = Tensor::cat(crops.crops, 0);
        let size = regions.size();
        ensure!(size.len() == 5, "{NAME}: expected crops [B, C, D, H, W], got {size:?}");
        let grid = self.grid_over([size[2], size[3], size[4]])?;
        let cut = crops::cut(
            &regions,
            &coordinates,
            &grid,
            self.cfg.random_crops,
            &self.cfg.augmentation,
            self.seed,
            progress.epoch,
        );
        let inputs = Tensor::cat(&[&cut.random, &cut.bases], 0);
        let inputs = match self.encoder_input {
            Some(size) => crops::resize(&inputs, size),
            None => inputs,
        };
        let embeddings = self.embed(&(crops.encode)(&inputs)?)?;
        let student = self.drop_rows(&embeddings).apply_t(&self.student, true);
        self.update_teacher();
        let teacher = tch::no_grad(|| embeddings.apply_t(&self.teacher, true));

        let (r, n, k) = (
            coordinates.len() as i64,
            self.cfg.random_crops as i64,
            grid.len() as i64,
        );
        let split = |z: &Tensor| {
            (
                z.narrow(0, 0, r * n).view([r, n, -1]),
                z.narrow(0, r * n, r * k).view([r, k, -1]),
            )
        };
        let (x_student, b_student) = split(&student);
        let (x_teacher, b_teacher) = split(&teacher);
        let kind = loss_kind(&student);
        let labels = cut.labels.to_device(student.device()).to_kind(kind);
        let terms = self.terms(&x_student, &b_student, &x_teacher, &b_teacher, &labels);

        let expected = Tensor::from_slice(&grid.expected_labels())
            .to_device(student.device())
            .to_kind(kind);
        let negative = match self.cfg.variant {
            Variant::V2 => NegativeTerm::Log,
            Variant::V1 => NegativeTerm::Squared,
        };
        let baseline = ce_loss(&labels, &expected.expand_as(&labels), negative).mean(None);

        let mut logged = vec![("intra".to_string(), terms.intra.double_value(&[]))];
        let total = match &terms.inter {
            Some(inter) => {
                logged.push(("inter".into(), inter.double_value(&[])));
                &terms.intra + inter + &terms.reg
            }
            None => &terms.intra + &terms.reg,
        };
        logged.push(("reg".into(), terms.reg.double_value(&[])));
        logged.push(("intra_baseline".into(), baseline.double_value(&[])));
        Ok(Loss {
            total,
            terms: logged,
            health: Vec::new(),
        })
    }
}

fn build(section: &Section, p: nn::Path, shape: &ObjectiveShape) -> Result<Box<dyn Objective>> {
    let cfg: VocoConfig = section.parse()?;
    let key = section.key.strip_prefix("objectives.").unwrap_or(&section.key);
    Ok(Box::new(VocoObjective::new(p, cfg, shape, key)?))
}

register!(OBJECTIVES, VOCO: ObjectiveEntry = ObjectiveEntry {
    name: NAME,
    about: "VoCo volume contrast: random crops predict their overlap with a grid of base crops (student/EMA-teacher heads), 3D encoders",
    default_config: default_toml::<VocoConfig>,
    smoke_configs: &[
        "grid = [2, 2]\nrandom_crops = 1\nhidden_dim = 16\noutput_dim = 16\ncrop_resize = [32, 32, 32]",
        "variant = \"v1\"\ngrid = [1, 2]\nrandom_crops = 2\nhidden_dim = 8\noutput_dim = 8\nfeature_dropout = 0.0\ncrop_resize = [32, 32, 32]\naugmentation = { rotate90 = 0.0 }",
    ],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn level(channels: i64, stride: i64) -> Level {
        Level {
            name: format!("s{stride}"),
            channels,
            stride,
        }
    }

    /// A 3D encoder's shape with three levels of 2, 3 and 4 channels.
    fn shape() -> ObjectiveShape {
        ObjectiveShape {
            spatial_dims: SpatialDims::Three,
            in_channels: 1,
            deepest_level: (4, 4),
            levels: vec![level(2, 1), level(3, 2), level(4, 4)],
            input_size: None,
            slice_dim: 4,
            volume_dim: Some(4),
            sequence_dim: None,
            num_samples: 8,
            global_slice_views: 0,
            local_slice_views: 0,
            volume_views: 2,
            seed: 5,
        }
    }

    fn small() -> VocoConfig {
        VocoConfig {
            grid: [2, 2],
            hidden_dim: 8,
            output_dim: 6,
            ..VocoConfig::default()
        }
    }

    /// A stand-in encoder: three levels, average pools of the input at strides 1, 2 and 4,
    /// lifted to 2, 3 and 4 channels by trainable per-channel scales, so gradients reach it.
    fn pooling_encoder(scales: &[Tensor]) -> impl Fn(&Tensor) -> Result<EncoderOutput> + '_ {
        move |x: &Tensor| {
            let levels: Vec<Tensor> = scales
                .iter()
                .zip([1i64, 2, 4])
                .map(|(scale, s)| {
                    let pooled = x.avg_pool3d([s; 3], [s; 3], [0; 3], false, true, None);
                    // Each channel a different non-linear reading of the voxels.
                    let c = scale.size()[0];
                    let powers = Tensor::arange(c, (x.kind(), x.device())).view([1, c, 1, 1, 1]) + 1.0;
                    (pooled.abs() + 0.1).pow(&powers) * scale.view([1, c, 1, 1, 1])
                })
                .collect();
            Ok(EncoderOutput {
                pooled: levels[2].mean_dim([2i64, 3, 4].as_slice(), false, x.kind()),
                levels,
            })
        }
    }

    fn progress(epoch: usize) -> Progress {
        Progress {
            epoch,
            step: 0,
            steps_per_epoch: 1,
        }
    }

    #[test]
    fn ce_loss_matches_the_hand_computed_value() {
        let labels = Tensor::from_slice(&[0.5, 0.0, 0.5, 0.0, 0.25, 0.75]).view([1, 2, 3]);
        let logits = Tensor::from_slice(&[0.4, 0.2, 0.7, 0.0, 0.5, 0.75]).view([1, 2, 3]);
        let e = 1e-6f64;
        let pos = -(0.5 * (1.0f64 - 0.1 + e).ln()
            + 0.5 * (1.0 - 0.2 + e).ln()
            + 0.25 * (1.0 - 0.25 + e).ln()
            + 0.75 * (1.0 - 0.0 + e).ln())
            / (2.0 + e);
        let neg_log = -((1.0f64 - 0.2 + e).ln() + (1.0 - 0.0 + e).ln()) / (2.0 + e);
        let neg_squared = (0.2 * 0.2 + 0.0) / (2.0 + e);
        let got = ce_loss(&labels, &logits, NegativeTerm::Log).double_value(&[0]);
        assert!((got - (pos + neg_log)).abs() < 1e-12, "{got} vs {}", pos + neg_log);
        let got = ce_loss(&labels, &logits, NegativeTerm::Squared).double_value(&[0]);
        assert!(
            (got - (pos + neg_squared)).abs() < 1e-12,
            "{got} vs {}",
            pos + neg_squared
        );
        // A perfect prediction costs only the 1e-6 of the logarithms.
        let perfect = ce_loss(&labels, &labels, NegativeTerm::Log).double_value(&[0]);
        assert!(perfect.abs() < 1e-5, "{perfect}");
    }

    #[test]
    fn the_regulariser_is_zero_for_orthogonal_bases_and_one_for_equal_ones() {
        let orthogonal = Tensor::eye(4, (Kind::Double, Device::Cpu)).view([1, 4, 4]) * 3.0;
        assert_eq!(regulariser(&orthogonal).double_value(&[0]), 0.0);
        // Opposite directions are clipped by the ReLU.
        let opposite = Tensor::from_slice(&[1.0, 2.0, -1.0, -2.0]).view([1, 2, 2]);
        assert_eq!(regulariser(&opposite).double_value(&[0]), 0.0);
        let equal = Tensor::ones([2, 3, 5], (Kind::Double, Device::Cpu));
        let r = Vec::<f64>::try_from(regulariser(&equal)).unwrap();
        assert!(r.iter().all(|v| (v - 1.0).abs() < 1e-12), "{r:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// The matrix forms equal the reference's loops: the regulariser over pairs k < l,
        /// every similarity a clipped cosine, and the gradient of the regulariser reaches
        /// only the first member of each pair.
        #[test]
        fn the_vectorised_terms_equal_their_loops(r in 1i64..4, k in 2i64..6, e in 1i64..5, seed in 0i64..1000) {
            tch::manual_seed(seed);
            let bases = Tensor::randn([r, k, e], (Kind::Double, Device::Cpu));
            let got = Vec::<f64>::try_from(regulariser(&bases)).unwrap();
            let v = |i: i64, j: i64| Vec::<f64>::try_from(bases.get(i).get(j)).unwrap();
            let cos = |a: &[f64], b: &[f64]| {
                let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                let n = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-8);
                (dot / (n(a) * n(b))).max(0.0)
            };
            for i in 0..r {
                let mut sum = 0.0;
                for a in 0..k {
                    for b in a + 1..k {
                        sum += cos(&v(i, a), &v(i, b)).powi(2);
                    }
                }
                let want = sum / (k * (k - 1) / 2) as f64;
                prop_assert!((got[i as usize] - want).abs() < 1e-12, "{} vs {want}", got[i as usize]);
                let sim = similarity(&bases, &bases);
                for a in 0..k {
                    for b in 0..k {
                        let s = sim.double_value(&[i, a, b]);
                        prop_assert!((s - cos(&v(i, a), &v(i, b))).abs() < 1e-12);
                    }
                }
            }
            // sg on the second member: the last base crop of each region gets no gradient.
            let leaf = bases.set_requires_grad(true);
            regulariser(&leaf).sum(Kind::Double).backward();
            let last = leaf.grad().narrow(1, k - 1, 1).abs().sum(Kind::Double).double_value(&[]);
            prop_assert_eq!(last, 0.0);
        }
    }

    #[test]
    fn the_teacher_moves_by_one_minus_m_of_the_difference_each_step() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut cfg = small();
        cfg.momentum = 0.75;
        let objective = VocoObjective::new(vs.root(), cfg, &shape(), "voco").unwrap();
        for _ in 0..3 {
            let before: Vec<(Tensor, Tensor)> = objective.pairs.iter().map(|(s, t)| (s.copy(), t.copy())).collect();
            objective.update_teacher();
            for ((s, t), (s0, t0)) in objective.pairs.iter().zip(&before) {
                assert!(s.equal(s0), "the EMA leaves the student alone");
                let moved = t - t0;
                let want = (s0 - t0) * 0.25;
                let off = (moved - want).abs().max().double_value(&[]);
                assert!(off < 1e-6, "off by {off}");
                assert!(!t.requires_grad());
            }
            // The student moves on, as an optimizer step would move it.
            tch::no_grad(|| {
                for (s, _) in &objective.pairs {
                    let _ = s.shallow_clone().g_add_scalar_(0.5);
                }
            });
        }
        // Independent draws by default (as the references), a copy on request.
        let (s, t) = &objective.pairs[0];
        assert!(!s.equal(t));
        let copied = VocoObjective::new(
            vs.root() / "copied",
            VocoConfig {
                teacher_from_student: true,
                ..small()
            },
            &shape(),
            "voco",
        )
        .unwrap();
        assert!(copied.pairs.iter().all(|(s, t)| s.equal(t)));
    }

    #[test]
    fn a_step_trains_the_encoder_and_the_student_and_logs_every_term() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut objective = VocoObjective::new(vs.root() / "voco", small(), &shape(), "voco").unwrap();
        let scales: Vec<Tensor> = [2, 3, 4]
            .iter()
            .enumerate()
            .map(|(i, &c)| vs.root().var(&format!("scale{i}"), &[c], nn::Init::Const(1.0)))
            .collect();
        let encode = pooling_encoder(&scales);
        let crops = vec![
            Tensor::rand([2, 1, 4, 8, 8], (Kind::Float, Device::Cpu)),
            Tensor::rand([2, 1, 4, 8, 8], (Kind::Float, Device::Cpu)),
        ];
        let ids = Tensor::from_slice(&[3i64, 5]);
        let input = StepInput::volume_crops(&ids, &crops, &encode);
        let loss = objective.loss(&input, &progress(0)).unwrap();
        let names: Vec<&str> = loss.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["intra", "inter", "reg", "intra_baseline"]);
        let sum: f64 = loss.terms[..3].iter().map(|(_, v)| v).sum();
        let total = loss.total.double_value(&[]);
        assert!(total.is_finite() && (total - sum).abs() < 1e-5, "{total} vs {sum}");
        assert!(loss.terms[3].1 > 0.0 && loss.terms[3].1.is_finite());
        loss.total.backward();
        for (name, t) in vs.variables() {
            let reached = t.grad().defined() && t.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0;
            assert_eq!(reached, !name.contains("teacher"), "{name}");
        }
        // The student's input is 2 + 3 + 4 wide: the three levels pooled.
        assert_eq!(vs.variables()["voco.student.layer1.0.weight"].size(), [8, 9]);
    }

    #[test]
    fn pooled_levels_resolve_as_documented_and_refuse_clearly() {
        let five: Vec<Level> = (0..5).map(|i| level(48 << i.min(4), 2 << i)).collect();
        let rule = PooledLevels::Rule(LevelRule::Voco);
        assert_eq!(rule.resolve(&five, "v").unwrap(), [0, 1, 2, 4]);
        assert_eq!(rule.resolve(&five[..4], "v").unwrap(), [0, 1, 2, 3]);
        assert_eq!(
            PooledLevels::Rule(LevelRule::All).resolve(&five, "v").unwrap(),
            [0, 1, 2, 3, 4]
        );
        let err = PooledLevels::Indices(vec![0, 7])
            .resolve(&five, "v")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("objectives.v.pooled_levels") && err.contains("5 levels"),
            "{err}"
        );
        let err = PooledLevels::Indices(vec![1, 1])
            .resolve(&five, "v")
            .unwrap_err()
            .to_string();
        assert!(err.contains("twice"), "{err}");
        let parsed: VocoConfig = Section::inline("objectives.v", NAME, "pooled_levels = [0, 2]")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(parsed.pooled_levels, PooledLevels::Indices(vec![0, 2]));
        let parsed: VocoConfig = Section::inline("objectives.v", NAME, "pooled_levels = \"all\"")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(parsed.pooled_levels, PooledLevels::Rule(LevelRule::All));
    }

    #[test]
    fn wrong_configs_and_encoders_are_refused_naming_the_key() {
        let vs = nn::VarStore::new(Device::Cpu);
        let two_d = ObjectiveShape {
            spatial_dims: SpatialDims::Two,
            ..shape()
        };
        let err = VocoObjective::new(vs.root(), small(), &two_d, "vo")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("but the run's encoder is 2D"), "{err}");
        let one = VocoConfig {
            grid: [1, 1],
            ..small()
        };
        let err = VocoObjective::new(vs.root() / "a", one, &shape(), "vo")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("objectives.vo.grid"), "{err}");
        let vit = ObjectiveShape {
            input_size: Some(vec![8, 8, 8]),
            ..shape()
        };
        let resize = VocoConfig {
            crop_resize: Some([4, 4, 4]),
            ..small()
        };
        let err = VocoObjective::new(vs.root() / "b", resize, &vit, "vo")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("objectives.vo.crop_resize") && err.contains("[8, 8, 8]"),
            "{err}"
        );
        let objective = VocoObjective::new(vs.root() / "c", small(), &vit, "vo").unwrap();
        assert_eq!(objective.encoder_input, Some([8, 8, 8]));
    }

    #[test]
    fn the_v1_loss_has_no_inter_term_and_averages_both_directions() {
        let vs = nn::VarStore::new(Device::Cpu);
        let v1 = VocoObjective::new(
            vs.root(),
            VocoConfig {
                variant: Variant::V1,
                ..small()
            },
            &shape(),
            "voco",
        )
        .unwrap();
        tch::manual_seed(3);
        let z = |n: i64| Tensor::randn([2, n, 6], (Kind::Double, Device::Cpu));
        let (xs, bs, xt, bt) = (z(2), z(4), z(2), z(4));
        let labels = Tensor::rand([2, 2, 4], (Kind::Double, Device::Cpu)) * Tensor::from_slice(&[1.0, 0.0, 1.0, 0.0]);
        let terms = v1.terms(&xs, &bs, &xt, &bt, &labels);
        assert!(terms.inter.is_none());
        let logits = (similarity(&xs, &bt) + similarity(&xt, &bs)) * 0.5;
        let want = ce_loss(&labels, &logits, NegativeTerm::Squared).mean(None);
        assert!(terms.intra.equal(&want));
    }
}
