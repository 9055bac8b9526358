//! Builds a run's components from its config: the data pipeline, the encoder, the optional
//! aggregator and the objectives, all under one variable store so that a checkpoint is the
//! store plus the optimizer and objective state. [`Backbone`] is the encoder and
//! aggregator alone, which need no data: what evaluation rebuilds from a run's config.

use crate::aggregator::{Aggregator, AggregatorShape};
use crate::config::LoadedConfig;
use crate::encoder::{Encoder, EncoderOutput, EncoderShape, SpatialDims};
use crate::encoder_init::{EncoderInit, INIT_KEYS};
use crate::loader::DataPipeline;
use crate::objective::{Consumes, Objective, ObjectiveShape};
use crate::precision::Precision;
use crate::registry::{self, Registered};
use crate::run_dir;
use crate::slice_features::{SliceFeatureConfig, SliceFeatures, LEVELS_KEY};
use crate::sources::{Source, SourceOptions, Sources, SOURCE_OPTION_KEYS};
use crate::views::ViewConfig;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Tensor};

/// Channels of every image the data pipeline produces (medical images are grey-scale).
pub const IMAGE_CHANNELS: i64 = 1;

/// The data pipeline of a config: every source under `[data.sources]`, and each source
/// section as resolved for the run directory.
pub fn data_pipeline(cfg: &LoadedConfig) -> Result<(DataPipeline, Vec<(String, toml::Value)>)> {
    let views = cfg.run.data.views.resolved()?;
    views.validate()?;
    let mut sources = Vec::new();
    let mut resolved = Vec::new();
    for key in cfg.run.data.sources.keys() {
        let mut section = cfg.section(&format!("data.sources.{key}"), "format")?;
        let mut options: SourceOptions = section.take(&SOURCE_OPTION_KEYS).parse()?;
        // `data.views.spacing_mm` is every source's spacing unless the source sets its own.
        options.target_spacing = options.target_spacing.or(views.spacing_mm);
        let entry = registry::datasets()
            .get(&section.name)
            .with_context(|| section.selector_context())?;
        let dataset = (entry.build)(&section)?;
        let mut table = section.resolved("format", &entry.default_config())?;
        if let (toml::Value::Table(table), Ok(toml::Value::Table(core))) = (&mut table, toml::Value::try_from(&options))
        {
            table.extend(core);
        }
        resolved.push((section.key.clone(), table));
        sources.push(Source {
            key: key.clone(),
            dataset,
            options,
        });
    }
    anyhow::ensure!(
        cfg.run.data.loader.batch_size >= 1,
        "config key `data.loader.batch_size` must be at least 1"
    );
    let sources = Sources::new(sources, cfg.run.data.loader.cache_mib)?;
    let pipeline = DataPipeline::new(sources, views, cfg.run.data.loader.clone(), cfg.run.seed)?;
    Ok((pipeline, resolved))
}

/// Refuses an encoder with a fixed input size whose size the data views do not give: a
/// 3D encoder's crops (`data.views.crop_size`).
fn check_encoder_input(encoder: &dyn Encoder, name: &str, views: &ViewConfig) -> Result<()> {
    if encoder.spatial_dims() == SpatialDims::Three {
        if let Some(size) = encoder.input_size() {
            anyhow::ensure!(
                size == views.crop_size,
                "encoder `{name}` takes inputs of exactly {size:?} voxels (its `img_size`), but `data.views.crop_size` is {:?}; set one to the other",
                views.crop_size
            );
        }
    }
    Ok(())
}

/// The representation part of a run: the encoder (f_intra), the optional aggregator
/// (f_inter) and what a slice contributes to the aggregator's sequence. It needs no data,
/// so a run's representation can be rebuilt from its config alone, e.g. to evaluate a
/// checkpoint on other data (`medssl eval`).
pub struct Backbone {
    pub vs: nn::VarStore,
    pub encoder: Box<dyn Encoder>,
    pub aggregator: Option<Box<dyn Aggregator>>,
    /// What a slice contributes to a sequence the aggregator reads (Eq. 9).
    pub slice_features: SliceFeatures,
    /// The encoder and aggregator sections as resolved (defaults filled in).
    pub resolved: Vec<(String, toml::Value)>,
    /// Where the encoder's weights start from (`encoder.init`), applied by
    /// [`Backbone::apply_init`] when a run starts.
    pub init: EncoderInit,
}

impl Backbone {
    /// Builds the encoder and the aggregator the config names, on `device`, with their
    /// variables under `encoder` and `aggregator`, as in [`Model`] (so checkpoint names
    /// match).
    pub fn build(cfg: &LoadedConfig, device: Device) -> Result<Backbone> {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let mut resolved = Vec::new();

        let mut section = cfg.section("encoder", "name")?;
        let mut init: EncoderInit = section.take(&INIT_KEYS).parse()?;
        init.init = init.init.map(|path| section.resolve_path("init", &path));
        let entry = registry::encoders()
            .get(&section.name)
            .with_context(|| section.selector_context())?;
        let encoder = (entry.build)(
            &section,
            &root / "encoder",
            &EncoderShape {
                in_channels: IMAGE_CHANNELS,
            },
        )?;
        let mut table = section.resolved("name", &entry.default_config())?;
        // Only where given, so that the resolved config of a run without one is as before.
        if let (Some(_), toml::Value::Table(table), Ok(toml::Value::Table(core))) =
            (&init.init, &mut table, toml::Value::try_from(&init))
        {
            table.extend(core);
        }
        resolved.push(("encoder".to_string(), table));

        let views = cfg.run.data.views.resolved()?;
        check_encoder_input(encoder.as_ref(), &section.name, &views)?;
        let (aggregator, slice_features) = match &cfg.run.aggregator {
            Some(_) if encoder.spatial_dims() == SpatialDims::Three => {
                let aggregator = cfg.section("aggregator", "name")?.name;
                bail!(
                    "encoder `{}` is 3D: it embeds whole volumes itself, but aggregator `{aggregator}` reads the slice sequences of a 2D encoder; remove the `[aggregator]` section",
                    section.name
                )
            }
            None => (
                None,
                SliceFeatures::new(&SliceFeatureConfig::default(), encoder.as_ref())?,
            ),
            Some(_) => {
                let mut section = cfg.section("aggregator", "name")?;
                let feature_cfg: SliceFeatureConfig = section.take(&[LEVELS_KEY]).parse()?;
                let slice_features = SliceFeatures::new(&feature_cfg, encoder.as_ref())?;
                let entry = registry::aggregators()
                    .get(&section.name)
                    .with_context(|| section.selector_context())?;
                let shape = AggregatorShape {
                    input_dim: slice_features.dim(),
                    slices: views.volume_slices,
                };
                let aggregator = (entry.build)(&section, &root / "aggregator", &shape)?;
                anyhow::ensure!(
                    aggregator.input_dim() == shape.input_dim,
                    "aggregator `{}` takes slice features of width {}, but the encoder's `aggregator.levels` give {}",
                    section.name,
                    aggregator.input_dim(),
                    shape.input_dim
                );
                let mut table = section.resolved("name", &entry.default_config())?;
                if let (toml::Value::Table(table), Ok(toml::Value::Table(core))) =
                    (&mut table, toml::Value::try_from(&feature_cfg))
                {
                    table.extend(core);
                }
                resolved.push(("aggregator".to_string(), table));
                (Some(aggregator), slice_features)
            }
        };
        Ok(Backbone {
            vs,
            encoder,
            aggregator,
            slice_features,
            resolved,
            init,
        })
    }

    /// Loads `encoder.init`'s weights into the encoder, where the config names a file.
    pub fn apply_init(&self) -> Result<()> {
        let variables: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter_map(|(name, t)| name.strip_prefix("encoder.").map(|n| (n.to_string(), t)))
            .collect();
        if let Some(report) = self.init.apply(&variables, self.encoder.reference_library())? {
            tracing::info!(
                "encoder initialised from {} ({} tensors; {} of the file's left out as not the encoder's)",
                self.init.init.as_deref().unwrap_or(Path::new("?")).display(),
                report.loaded,
                report.left_out.len()
            );
        }
        Ok(())
    }

    /// Copies the checkpoint's `model.encoder.*` and `model.aggregator.*` tensors into this
    /// backbone's `encoder.*` and `aggregator.*` variables, strictly
    /// ([`run_dir::load_variables`]). The store may hold more than the backbone (a
    /// fine-tune's head): only the backbone's variables come from the checkpoint.
    pub fn load(&self, tensors: &[(String, Tensor)], source: &Path) -> Result<()> {
        let groups = ["encoder.", "aggregator."];
        let variables: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, _)| groups.iter().any(|g| name.starts_with(g)))
            .collect();
        run_dir::load_variables(&variables, tensors, "model.", &groups, source)
    }

    /// The encoder's levels and pooled embedding of `images` `[N, C, H, W]`. With `train`
    /// the encoder runs in training mode under autograd; without, it runs frozen: eval mode
    /// (batch norm's running statistics) and no autograd.
    pub fn embed_images(&self, images: &Tensor, train: bool) -> EncoderOutput {
        if train {
            self.encoder.forward(images, true)
        } else {
            tch::no_grad(|| self.encoder.forward(images, false))
        }
    }

    /// The slices of `volumes` `[B, C, T, H, W]` through the encoder ([`Self::embed_images`]),
    /// and the sequence `[B, T, F]` of their (multi-level) features that the aggregator
    /// reads (Eq. 9).
    pub fn embed_slices(&self, volumes: &Tensor, train_encoder: bool) -> (EncoderOutput, Tensor) {
        let size = volumes.size();
        let (b, t) = (size[0], size[2]);
        let slices = volumes.transpose(1, 2).reshape([b * t, size[1], size[3], size[4]]);
        let out = self.embed_images(&slices, train_encoder);
        let sequence = self.slice_features.compute(&out).view([b, t, -1]);
        (out, sequence)
    }

    /// The volume embedding `[B, F]` of `volumes` `[B, C, T, H, W]` whose real slices are
    /// `valid` `[B, T]`: the aggregator over the slice sequence (Eq. 10), in training mode
    /// with `train_aggregator`; without an aggregator, the mean of the real slices' pooled
    /// encoder embeddings. Also returns the slices' encoder output. A 3D encoder embeds the
    /// volumes whole (`[B, C, D, H, W]`, every voxel real): its pooled embedding, and its
    /// output on the volumes.
    pub fn embed_volumes(
        &self,
        volumes: &Tensor,
        valid: &Tensor,
        train_encoder: bool,
        train_aggregator: bool,
    ) -> (EncoderOutput, Tensor) {
        if self.encoder.spatial_dims() == SpatialDims::Three {
            let out = self.embed_images(volumes, train_encoder);
            let volume = out.pooled.shallow_clone();
            return (out, volume);
        }
        let (out, sequence) = self.embed_slices(volumes, train_encoder);
        let volume = match &self.aggregator {
            Some(aggregator) => aggregator.forward(&sequence, Some(valid), train_aggregator).volume,
            None => {
                let size = volumes.size();
                let kind = out.pooled.kind();
                let weights = valid.to_kind(kind).unsqueeze(-1);
                let pooled = out.pooled.view([size[0], size[2], -1]);
                (pooled * &weights).sum_dim_intlist(1, false, kind)
                    / weights.sum_dim_intlist(1, false, kind).clamp_min(1.0)
            }
        };
        (out, volume)
    }
}

/// The trainable part of a run: the backbone and the objectives, under one variable store
/// (the backbone's).
pub struct Model {
    pub backbone: Backbone,
    pub objectives: BTreeMap<String, Box<dyn Objective>>,
    /// Each component section as resolved (defaults filled in), for the run's config.toml.
    pub resolved: Vec<(String, toml::Value)>,
}

impl Model {
    /// Builds the objectives the config names on top of `backbone`. `num_samples` sizes
    /// memory banks.
    pub fn build(cfg: &LoadedConfig, backbone: Backbone, num_samples: usize) -> Result<Model> {
        let mut resolved = backbone.resolved.clone();
        let (encoder, aggregator) = (&backbone.encoder, &backbone.aggregator);
        let root = backbone.vs.root();
        let views = cfg.run.data.views.resolved()?;

        let shape = ObjectiveShape {
            spatial_dims: encoder.spatial_dims(),
            in_channels: encoder.in_channels(),
            deepest_level: encoder
                .levels()
                .last()
                .map_or((encoder.embedding_dim(), 1), |l| (l.channels, l.stride)),
            levels: encoder.levels().to_vec(),
            input_size: encoder.input_size(),
            slice_dim: encoder.embedding_dim(),
            volume_dim: match encoder.spatial_dims() {
                SpatialDims::Two => aggregator.as_ref().map(|a| a.output_dim()),
                SpatialDims::Three => Some(encoder.embedding_dim()),
            },
            sequence_dim: aggregator.as_ref().map(|a| a.input_dim()),
            num_samples,
            global_slice_views: views.slice_views,
            local_slice_views: views.local_views,
            volume_views: views.volume_views,
            seed: cfg.run.seed,
        };
        let mut objectives = BTreeMap::new();
        for key in cfg.run.objectives.keys() {
            let path = format!("objectives.{key}");
            let section = cfg.section(&path, "name")?;
            let entry = registry::objectives()
                .get(&section.name)
                .with_context(|| section.selector_context())?;
            let objective =
                (entry.build)(&section, &root / "objectives" / key.as_str(), &shape).with_context(|| {
                    let encoder_name = cfg.section("encoder", "name").map(|s| s.name).unwrap_or_default();
                    format!(
                        "building objective `{key}` ({}) on encoder `{encoder_name}` ({})",
                        section.name,
                        encoder.spatial_dims()
                    )
                })?;
            resolved.push((path.clone(), section.resolved("name", &entry.default_config())?));
            let dims = encoder.spatial_dims();
            if let Some(wanted) = objective.consumes().spatial_dims().filter(|&d| d != dims) {
                let encoder_name = cfg.section("encoder", "name")?.name;
                bail!(
                    "objective `{key}` ({}) consumes {:?}, which needs a {wanted} encoder, but encoder `{encoder_name}` is {dims}; pair it with a {wanted} encoder",
                    section.name,
                    objective.consumes()
                );
            }
            let needs_aggregator = matches!(objective.consumes(), Consumes::VolumeViews | Consumes::SliceSequence);
            if dims == SpatialDims::Two && aggregator.is_none() && needs_aggregator {
                bail!(
                    "objective `{key}` ({}) consumes {:?}, which needs an aggregator; add an `[aggregator]` section",
                    section.name,
                    objective.consumes()
                );
            }
            let context_free = aggregator.as_ref().is_some_and(|a| !a.mixes_slices());
            if context_free && objective.consumes() == Consumes::SliceSequence {
                let name = cfg.section("aggregator", "name")?.name;
                bail!(
                    "objective `{key}` ({}) predicts slices from their context through the aggregator, but aggregator `{name}` treats each slice alone; use one that attends across slices (e.g. deformable-attention, full-attention)",
                    section.name
                );
            }
            if dims == SpatialDims::Three {
                let size = objective
                    .encoder_input_size(&views.crop_size)
                    .with_context(|| format!("objective `{key}` ({})", section.name))?;
                encoder.check_input_size(&size).with_context(|| {
                    let encoder_name = cfg.section("encoder", "name").map(|s| s.name).unwrap_or_default();
                    format!(
                        "objective `{key}` ({}) feeds encoder `{encoder_name}` crops of {size:?} voxels (from `data.views.crop_size` = {:?})",
                        section.name, views.crop_size
                    )
                })?;
            }
            objectives.insert(key.clone(), objective);
        }
        // After every component has made its variables, so that buffers made at build time
        // (memory banks, queues) follow too; integer and boolean ones keep their kind.
        let mut backbone = backbone;
        // Mixed precision keeps fp32 master weights: autocast lowers activations only.
        match cfg.run.options.precision {
            Precision::Fp32 | Precision::Bf16 | Precision::Fp16 => {}
            Precision::Fp64 => backbone.vs.double(),
        }
        Ok(Model {
            backbone,
            objectives,
            resolved,
        })
    }

    /// Fingerprint of the architecture: every variable's name and shape. Two configs that
    /// give the same fingerprint can exchange checkpoints.
    pub fn fingerprint(&self) -> String {
        let mut vars: Vec<(String, Vec<i64>)> = self
            .backbone
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        vars.sort();
        let text = vars
            .iter()
            .map(|(n, s)| format!("{n}:{s:?}"))
            .collect::<Vec<_>>()
            .join(";");
        // FNV-1a: stable across platforms and Rust versions, unlike std's hasher.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{hash:016x}")
    }
}
