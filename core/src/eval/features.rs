//! Frozen features of a labelled set: each sample read, resized as the run's views are,
//! and encoded once per backbone in eval mode (see the module doc of `eval`).

use super::{DataSpec, SetInfo};
use crate::assemble::Backbone;
use crate::config::Section;
use crate::dataset::Dataset;
use crate::encoder::SpatialDims;
use crate::inspect;
use crate::precision::Precision;
use crate::registry::{self, Registered};
use crate::views::{self, ViewConfig};
use anyhow::{anyhow, bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// How the samples of a set enter the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Input {
    /// One slice a sample, `[1, S, S]`.
    Image,
    /// The slice sequence `[1, T, S, S]` and which slices are real `[T]`.
    Volume,
}

/// A loaded, resized sample.
pub(super) struct Prepared {
    pub(super) input: Tensor,
    pub(super) valid: Option<Tensor>,
    /// -1 for a sample without a label (only where labels are not required).
    pub(super) label: i64,
}

/// A set's features under every backbone (and its flattened inputs).
pub(super) struct Encoded {
    pub(super) features: Vec<Tensor>,
    pub(super) raw: Option<Tensor>,
    /// A label a sample (-1 where a sample has none and labels were not required).
    pub(super) labels: Vec<i64>,
    pub(super) input: Input,
    /// Each feature row's sample and, for [`Encoding::per_slice`], its slice.
    pub(super) rows: Vec<(usize, Option<usize>)>,
}

/// How [`encode`] runs, beside the set and the backbones.
pub(super) struct Encoding<'a> {
    pub(super) views: &'a ViewConfig,
    pub(super) batch_size: usize,
    pub(super) workers: usize,
    pub(super) device: Device,
    pub(super) precision: Precision,
    /// Also keep the flattened inputs (`--raw-pixels`).
    pub(super) raw: bool,
    /// Refuse a sample without a class label (`medssl eval`); else its label is -1.
    pub(super) labelled: bool,
    /// A volume set's rows are its real slices' pooled encoder embeddings, not the
    /// volumes' (`medssl embed --level slice`); a 2D image is a slice either way.
    pub(super) per_slice: bool,
}

/// Builds the reader of one set: `format` with the path and, where the reader has one,
/// the split.
pub(super) fn open_set(
    spec: &DataSpec,
    format: Option<&str>,
    role: &str,
    default_split: &str,
) -> Result<(Box<dyn Dataset>, SetInfo)> {
    let flag = match role {
        "train" => "--train",
        "eval" => "--eval",
        _ => "--data",
    };
    let format = match format {
        Some(f) => f,
        None => inspect::guess_format(&spec.path)
            .with_context(|| format!("{flag}: pass --format naming a reader (see `medssl list`)"))?,
    };
    let entry = registry::datasets().get(format).context("--format")?;
    let defaults: toml::Table = toml::from_str(&entry.default_config()).unwrap_or_default();
    let path = std::path::absolute(&spec.path).unwrap_or_else(|_| spec.path.clone());
    let mut body = format!("path = {}\n", toml::Value::String(path.display().to_string()));
    let split = if defaults.contains_key("split") {
        let split = spec.split.clone().unwrap_or_else(|| default_split.to_string());
        body.push_str(&format!("split = {}\n", toml::Value::String(split.clone())));
        Some(split)
    } else {
        if let Some(split) = &spec.split {
            tracing::warn!("{flag}-split `{split}` is ignored: the `{format}` reader has no splits");
        }
        None
    };
    let section = Section::inline(role, format, &body)?;
    let dataset = (entry.build)(&section).with_context(|| {
        format!(
            "{flag} `{}`{}",
            spec.path.display(),
            split
                .as_ref()
                .map(|s| format!(" ({flag}-split {s})"))
                .unwrap_or_default()
        )
    })?;
    ensure!(
        !dataset.is_empty(),
        "{flag} `{}`: the set has no samples",
        spec.path.display()
    );
    let info = SetInfo {
        path: spec.path.display().to_string(),
        format: format.to_string(),
        split,
        samples: dataset.len(),
        class_counts: Vec::new(),
    };
    Ok((dataset, info))
}

/// Loads and resizes sample `index`.
pub(super) fn prepare(
    dataset: &dyn Dataset,
    index: usize,
    input: Input,
    views: &ViewConfig,
    dims: SpatialDims,
    flag: &str,
    labelled: bool,
) -> Result<Prepared> {
    let volume = dataset
        .load(index)
        .with_context(|| format!("{flag}: cannot read {}", dataset.describe(index)))?;
    let label = match volume.label {
        Some(label) => label,
        None if !labelled => -1,
        None => bail!(
            "{flag}: {} has no class label; `medssl eval` needs a labelled set (e.g. a MedMNIST .npz with its `<split>_labels`)",
            dataset.describe(index)
        ),
    };
    ensure!(
        label >= 0 || !labelled,
        "{flag}: {} has label {label}; expected a class id >= 0",
        dataset.describe(index)
    );
    let voxels = volume.voxels.to_kind(Kind::Float);
    let (d, h, w) = voxels.size3().map_err(|_| {
        anyhow!(
            "{flag}: {} decoded to shape {:?}, expected [D, H, W]",
            dataset.describe(index),
            volume.voxels.size()
        )
    })?;
    Ok(match input {
        Input::Image => {
            ensure!(
                d == 1,
                "{flag}: {} is a volume of {d} slices, but the set's first sample is a 2D image; a set is all images or all volumes",
                dataset.describe(index)
            );
            let s = views.slice_size;
            Prepared {
                input: voxels
                    .view([1, 1, h, w])
                    .upsample_bilinear2d([s, s], false, None, None)
                    .view([1, s, s]),
                valid: None,
                label,
            }
        }
        Input::Volume => {
            let stack = views::whole_volume(&voxels, views, dims);
            Prepared {
                input: stack.voxels,
                valid: Some(stack.valid),
                label,
            }
        }
    })
}

/// The features of `x` (`[B, 1, S, S]`, or `[B, 1, T, S, S]` with `valid` `[B, T]`) under
/// `backbone`, as described in the module's doc.
/// Under mixed precision the backbone runs in autocast and its features come out fp32.
pub(super) fn embed(backbone: &Backbone, x: &Tensor, valid: Option<&Tensor>, precision: Precision) -> Result<Tensor> {
    let region = precision.autocast(x.device())?;
    let features = tch::no_grad(|| match valid {
        None => backbone.embed_images(x, false).pooled,
        Some(valid) => backbone.embed_volumes(x, valid, false, false).1,
    });
    drop(region);
    Ok(features.to_kind(Kind::Float))
}

/// The pooled encoder embedding of each real slice of `x` (`[B, 1, T, S, S]`, `valid`
/// `[B, T]`), as the slice sequence an aggregator reads holds them: `[real slices, E]`.
fn embed_each_slice(backbone: &Backbone, x: &Tensor, valid: &Tensor, precision: Precision) -> Result<Tensor> {
    let region = precision.autocast(x.device())?;
    let pooled = tch::no_grad(|| backbone.embed_slices(x, false).0.pooled);
    drop(region);
    let (b, t) = (x.size()[0], x.size()[2]);
    let pooled = pooled.view([b * t, -1]).to_kind(Kind::Float);
    Ok(pooled.index_select(0, &valid.view([b * t]).nonzero().view([-1])))
}

/// Encodes every sample of `dataset` under each backbone, `batch_size` at a time; samples
/// are read and resized on `workers` threads.
pub(super) fn encode(
    dataset: &dyn Dataset,
    flag: &str,
    backbones: &[&Backbone],
    settings: &Encoding,
) -> Result<Encoded> {
    let Encoding {
        views,
        batch_size,
        workers,
        device,
        precision,
        raw,
        labelled,
        per_slice,
    } = *settings;
    let first = dataset
        .load(0)
        .with_context(|| format!("{flag}: cannot read {}", dataset.describe(0)))?;
    let input = if first.voxels.size().first() == Some(&1) {
        Input::Image
    } else {
        Input::Volume
    };
    drop(first);
    let dims = backbones.first().map_or(SpatialDims::Two, |b| b.encoder.spatial_dims());
    ensure!(
        !(dims == SpatialDims::Three && input == Input::Image),
        "{flag}: the set holds 2D images, but the run's encoder is 3D: evaluate it on volumes"
    );
    let n = dataset.len();
    let mut features: Vec<Vec<Tensor>> = backbones.iter().map(|_| Vec::new()).collect();
    let mut raw_parts = Vec::new();
    ensure!(
        !(per_slice && dims == SpatialDims::Three),
        "{flag}: slice-level embeddings are a 2D encoder's, but the run's encoder is 3D (its embedding is of the whole volume): use --level volume"
    );
    let mut labels = Vec::with_capacity(n);
    let mut rows = Vec::with_capacity(n);
    for start in (0..n).step_by(batch_size.max(1)) {
        let indices: Vec<usize> = (start..(start + batch_size.max(1)).min(n)).collect();
        let threads = workers.clamp(1, indices.len());
        let mut prepared: Vec<Option<Result<Prepared>>> = (0..indices.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|w| {
                    let indices = &indices;
                    scope.spawn(move || {
                        indices
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| i % threads == w)
                            .map(|(i, &index)| (i, prepare(dataset, index, input, views, dims, flag, labelled)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for handle in handles {
                for (i, result) in handle.join().unwrap_or_else(|_| vec![]) {
                    prepared[i] = Some(result);
                }
            }
        });
        let prepared: Vec<Prepared> = prepared
            .into_iter()
            .map(|p| p.unwrap_or_else(|| Err(anyhow!("{flag}: a loader thread failed"))))
            .collect::<Result<_>>()?;
        let x =
            Tensor::stack(&prepared.iter().map(|p| p.input.shallow_clone()).collect::<Vec<_>>(), 0).to_device(device);
        let valid = match input {
            Input::Image => None,
            Input::Volume => Some(
                Tensor::stack(
                    &prepared
                        .iter()
                        .map(|p| p.valid.as_ref().expect("volumes have a mask").shallow_clone())
                        .collect::<Vec<_>>(),
                    0,
                )
                .to_device(device),
            ),
        };
        for (backbone, out) in backbones.iter().zip(&mut features) {
            let encoded = match &valid {
                Some(valid) if per_slice => embed_each_slice(backbone, &x, valid, precision)?,
                valid => embed(backbone, &x, valid.as_ref(), precision)?,
            };
            out.push(encoded.to_device(Device::Cpu));
        }
        for (p, &index) in prepared.iter().zip(&indices) {
            match (&p.valid, per_slice) {
                (Some(valid), true) => {
                    let real = Vec::<bool>::try_from(valid.to_device(Device::Cpu).to_kind(Kind::Bool))?;
                    rows.extend(
                        real.iter()
                            .enumerate()
                            .filter(|(_, r)| **r)
                            .map(|(t, _)| (index, Some(t))),
                    );
                }
                _ => rows.push((index, None)),
            }
        }
        if raw {
            raw_parts.push(x.flatten(1, -1).to_device(Device::Cpu));
        }
        labels.extend(prepared.iter().map(|p| p.label));
    }
    Ok(Encoded {
        features: features.into_iter().map(|parts| Tensor::cat(&parts, 0)).collect(),
        raw: raw.then(|| Tensor::cat(&raw_parts, 0)),
        labels,
        input,
        rows,
    })
}
