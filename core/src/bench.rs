//! Stand-alone benchmarks of core's pipelines (`medssl bench loader`). Training-step
//! throughput of a config is `Run::bench`.

use crate::loader::{DataPipeline, LoaderConfig, Needs, OnError};
use crate::objective::Consumes;
use crate::registry;
use crate::section::Section;
use crate::sources::{Source, SourceOptions, Sources};
use crate::views::ViewConfig;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// What `medssl bench loader` measures.
#[derive(Debug, Serialize)]
pub struct LoaderBench {
    /// Volumes through the timed epochs (the dataset's size times `epochs`).
    pub volumes: usize,
    pub epochs: usize,
    pub seconds: f64,
    pub volumes_per_s: f64,
    pub peak_rss_mib: Option<f64>,
    pub threads: usize,
}

/// Decodes every NIfTI volume under `data` (a folder of volumes, or a Decathlon folder's
/// `imagesTr`), z-scores it, and makes two 3D views of `slices x size x size`, on
/// `threads` worker threads with the cache off: the data path of a volume-level stage.
/// `warmup` untimed epochs first (they fill the page cache), then `epochs` timed ones, each
/// with its own views; every epoch starts its worker threads afresh, and that is timed.
pub fn loader(
    data: &Path,
    threads: usize,
    slices: i64,
    size: i64,
    warmup: usize,
    epochs: usize,
) -> Result<LoaderBench> {
    anyhow::ensure!(epochs > 0, "bench loader: --epochs must be at least 1");
    let folder = if data.join("imagesTr").is_dir() {
        data.join("imagesTr")
    } else {
        data.to_path_buf()
    };
    let entry = registry::datasets().get("nifti")?;
    let path = toml::Value::String(folder.display().to_string());
    let section = Section::inline(
        "data.sources.bench",
        "nifti",
        &format!("path = {path}\nnormalize = \"zscore\""),
    )?;
    let dataset = (entry.build)(&section).with_context(|| format!("bench loader: `{}`", folder.display()))?;
    let volumes = dataset.len();
    let sources = Sources::new(
        vec![Source {
            key: "bench".into(),
            dataset,
            options: SourceOptions::default(),
        }],
        0,
    )?;
    let views = ViewConfig {
        volume_views: 2,
        volume_slices: slices,
        volume_size: size,
        ..Default::default()
    };
    let loader = LoaderConfig {
        batch_size: 1,
        workers: threads.max(1),
        prefetch: 2 * threads.max(1),
        on_error: OnError::Fail,
        cache_mib: 0,
    };
    let pipeline = DataPipeline::new(sources, views, loader, 0)?;
    let pass = |epoch: usize| -> Result<f64> {
        let started = Instant::now();
        let mut seen = 0;
        let needs = Needs::of([Consumes::VolumeViews]);
        for batch in pipeline.epoch(epoch, 0, needs) {
            seen += batch?.ids.size()[0] as usize;
        }
        anyhow::ensure!(
            seen == volumes,
            "bench loader: {seen} of {volumes} volumes came through"
        );
        Ok(started.elapsed().as_secs_f64())
    };
    for epoch in 0..warmup {
        pass(epoch)?;
    }
    let seconds = (warmup..warmup + epochs).map(pass).sum::<Result<f64>>()?;
    Ok(LoaderBench {
        volumes: volumes * epochs,
        epochs,
        seconds,
        volumes_per_s: (volumes * epochs) as f64 / seconds.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
        threads,
    })
}
/// Peak resident set size of this process, from /proc (Linux only).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
