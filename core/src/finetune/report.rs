//! What a fine-tune reports: a row per initialisation with the mean ± std over repeats of
//! every metric (the paper's tables), as Markdown and JSON, and its figures: the learning
//! curves of every row and repeat, and for segmentation a few slices with image, ground
//! truth and each row's prediction side by side.

use super::data::MaskedVolume;
use super::Init;
use crate::head::Task;
use crate::metrics::{chart_builder, draw_legend, legend_mark};
use crate::metrics::{mean, sample_std};
use crate::segmentation::{self, VolumeScores};
use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// The metric a task's table leads with.
pub fn primary_metric(task: Task) -> &'static str {
    match task {
        Task::Segmentation | Task::VolumeSegmentation => "dice_3d",
        Task::VolumeClassification => "auc",
        Task::Detection => "ap50",
    }
}

/// Averages per-volume scores into the set's metrics: for each foreground class, 3D IoU and
/// Dice averaged over the volumes where the class is in the truth or the prediction
/// (`iou_3d/C`, `dice_3d/C`); `dice_3d` and `iou_3d` average each volume's mean over its
/// foreground classes; `dice_2d` likewise from the per-slice Dice.
pub fn segmentation_scores(per_volume: &[VolumeScores], classes: i64) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let average = |values: Vec<Option<f64>>| -> Option<f64> {
        let v: Vec<f64> = values.into_iter().flatten().collect();
        (!v.is_empty()).then(|| mean(&v))
    };
    type Field = fn(&VolumeScores) -> &Vec<Option<f64>>;
    let fields: [(&str, Field); 3] = [
        ("dice_3d", |s| &s.dice),
        ("iou_3d", |s| &s.iou),
        ("dice_2d", |s| &s.dice_2d),
    ];
    for (name, field) in fields {
        if let Some(v) = average(
            per_volume
                .iter()
                .map(|s| segmentation::mean_foreground(field(s)))
                .collect(),
        ) {
            out.insert(name.to_string(), v);
        }
        if name != "dice_2d" {
            for c in 1..classes as usize {
                if let Some(v) = average(per_volume.iter().map(|s| field(s).get(c).copied().flatten()).collect()) {
                    out.insert(format!("{name}/{c}"), v);
                }
            }
        }
    }
    out
}

/// One epoch of a trial's learning curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurvePoint {
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub loss: f64,
    /// The primary metric on the evaluation set, where evaluated.
    pub metric: Option<f64>,
}

/// A trial's learning curve.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Curve {
    pub init: Init,
    pub run: usize,
    pub seed: u64,
    pub points: Vec<CurvePoint>,
}

/// One row of one repeat, trained and scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub init: Init,
    pub run: usize,
    pub seed: u64,
    /// Training samples (slices for segmentation, volumes for classification).
    pub train_samples: usize,
    /// Training volumes drawn by the label fraction.
    pub train_units: usize,
    pub steps: usize,
    /// The scores after the last epoch.
    pub metrics: BTreeMap<String, f64>,
    pub seconds: f64,
    #[serde(skip)]
    pub curve: Curve,
}

/// Mean ± sample std (n - 1) of one metric over repeats, with each repeat's value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub mean: f64,
    pub std: f64,
    pub runs: Vec<f64>,
}

impl Summary {
    fn of(values: Vec<f64>) -> Summary {
        Summary {
            mean: mean(&values),
            std: sample_std(&values),
            runs: values,
        }
    }
}

/// A row of the table: one initialisation over every repeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub init: Init,
    /// The primary metric's mean, std and per-repeat values.
    pub mean: f64,
    pub std: f64,
    pub runs: Vec<f64>,
    /// Every metric, the primary one included.
    pub metrics: BTreeMap<String, Summary>,
    pub trials: Vec<Trial>,
}

/// A set, as the report describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetInfo {
    pub format: String,
    pub volumes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slices: Option<usize>,
}

/// How the fine-tune was run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    pub task: Task,
    pub head: String,
    pub pretrained: String,
    pub pretrained_step: Option<usize>,
    pub run_config: String,
    pub train: SetInfo,
    pub eval: SetInfo,
    pub label_fraction: f64,
    pub runs: usize,
    pub seeds: Vec<u64>,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: String,
    pub lr: f64,
    pub backbone_lr_scale: f64,
    pub input: String,
    pub device: String,
    pub seconds: f64,
    pub out: String,
}

/// What `medssl finetune` reports; `--json` prints it and `results.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub metric: String,
    pub rows: Vec<Row>,
    pub setup: Setup,
}

impl Report {
    pub fn new(task: Task, trials: &[Trial], setup: Setup) -> Report {
        let metric = primary_metric(task).to_string();
        let rows = [Init::Pretrained, Init::Scratch]
            .into_iter()
            .map(|init| {
                let mine: Vec<Trial> = trials.iter().filter(|t| t.init == init).cloned().collect();
                let names: std::collections::BTreeSet<&String> = mine.iter().flat_map(|t| t.metrics.keys()).collect();
                let metrics: BTreeMap<String, Summary> = names
                    .into_iter()
                    .map(|name| {
                        let values = mine
                            .iter()
                            .map(|t| t.metrics.get(name).copied().unwrap_or(f64::NAN))
                            .collect();
                        (name.clone(), Summary::of(values))
                    })
                    .collect();
                let primary = metrics.get(&metric).cloned().unwrap_or(Summary {
                    mean: f64::NAN,
                    std: f64::NAN,
                    runs: Vec::new(),
                });
                Row {
                    init,
                    mean: primary.mean,
                    std: primary.std,
                    runs: primary.runs,
                    metrics,
                    trials: mine,
                }
            })
            .collect();
        Report { metric, rows, setup }
    }

    /// The metrics of the table's columns: the primary one first, then the others.
    fn columns(&self) -> Vec<String> {
        let mut columns = vec![self.metric.clone()];
        if let Some(row) = self.rows.first() {
            columns.extend(row.metrics.keys().filter(|k| **k != self.metric).cloned());
        }
        columns
    }

    /// The table like the paper's: a row per initialisation, mean ± std over repeats.
    pub fn table(&self) -> String {
        let columns = self.columns();
        let mut out = format!(
            "| init | {} |\n|---|{}\n",
            columns.join(" | "),
            "---|".repeat(columns.len())
        );
        for row in &self.rows {
            let cells: Vec<String> = columns
                .iter()
                .map(|c| match row.metrics.get(c) {
                    Some(s) => format!("{:.4} ± {:.4}", s.mean, s.std),
                    None => "-".into(),
                })
                .collect();
            out.push_str(&format!("| {} | {} |\n", row.init.name(), cells.join(" | ")));
        }
        out
    }

    /// The report as Markdown: setup, table, every repeat's value, and `figures` (caption,
    /// file name in the fine-tuning directory) as linked pictures.
    pub fn markdown(&self, figures: &[(String, String)]) -> String {
        let s = &self.setup;
        let mut out = format!(
            "# Fine-tuning: {:?} with head `{}`\n\n\
             - pre-trained checkpoint: `{}`{}\n\
             - backbone: the pre-training run's (`{}`); scratch rows use the same architecture, randomly initialised\n\
             - training set: {} `{}` volumes{}; label fraction {} (by volume)\n\
             - evaluation set: {} `{}` volumes{}\n\
             - input: {}\n\
             - {} epochs, batch {}, {} lr {} (backbone x {}), {} repeat(s), seeds {:?}; scores after the last epoch\n\
             - device {}, {:.0} s\n\n",
            s.task,
            s.head,
            s.pretrained,
            s.pretrained_step.map(|n| format!(" (step {n})")).unwrap_or_default(),
            s.run_config,
            s.train.volumes,
            s.train.format,
            s.train.slices.map(|n| format!(" ({n} slices)")).unwrap_or_default(),
            s.label_fraction,
            s.eval.volumes,
            s.eval.format,
            s.eval.slices.map(|n| format!(" ({n} slices)")).unwrap_or_default(),
            s.input,
            s.epochs,
            s.batch_size,
            s.optimizer,
            s.lr,
            s.backbone_lr_scale,
            s.runs,
            s.seeds,
            s.device,
            s.seconds
        );
        out.push_str(&self.table());
        out.push_str(&format!("\nPer repeat ({}):\n\n", self.metric));
        for row in &self.rows {
            let values: Vec<String> = row
                .trials
                .iter()
                .map(|t| {
                    format!(
                        "seed {}: {:.4} ({} training samples, {:.0} s)",
                        t.seed,
                        t.metrics.get(&self.metric).copied().unwrap_or(f64::NAN),
                        t.train_samples,
                        t.seconds
                    )
                })
                .collect();
            out.push_str(&format!("- {}: {}\n", row.init.name(), values.join("; ")));
        }
        if !figures.is_empty() {
            out.push_str("\n## Figures\n");
            for (caption, file) in figures {
                out.push_str(&format!("\n[{caption}]({file})\n\n![{caption}]({file})\n"));
            }
        }
        out
    }
}

/// Colour of an initialisation's curves.
fn colour(init: Init) -> RGBColor {
    match init {
        Init::Pretrained => RGBColor(31, 119, 180),
        Init::Scratch => RGBColor(255, 127, 14),
    }
}

/// Training loss (left) and the evaluation metric (right) against the epoch, one line per
/// row and repeat, into `out` (PNG).
pub fn plot_curves(curves: &[&Curve], metric: &str, out: &Path) -> Result<()> {
    let root = BitMapBackend::new(out, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let epochs = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.epoch))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    type Pick = fn(&super::report::CurvePoint) -> Option<f64>;
    let picks: [(&str, Pick); 2] = [("training loss", |p| Some(p.loss)), (metric, |p| p.metric)];
    for (panel, (title, pick)) in panels.iter().zip(picks) {
        let values: Vec<f64> = curves
            .iter()
            .flat_map(|c| c.points.iter().filter_map(pick))
            .filter(|v| v.is_finite())
            .collect();
        let (low, high) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        let (low, high) = if low.is_finite() { (low, high) } else { (0.0, 1.0) };
        let pad = ((high - low) * 0.05).max(1e-6);
        let with_text = crate::metrics::register_font();
        let mut chart =
            chart_builder(panel, title, 60, with_text).build_cartesian_2d(0f64..epochs, (low - pad)..(high + pad))?;
        if with_text {
            chart.configure_mesh().x_desc("epoch").y_desc(title).draw()?;
        }
        for curve in curves {
            let c = colour(curve.init);
            let points: Vec<(f64, f64)> = curve
                .points
                .iter()
                .filter_map(|p| pick(p).map(|v| (p.epoch as f64, v)))
                .filter(|p| p.1.is_finite())
                .collect();
            // Markers too: an evaluation every few epochs can leave a single point.
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
            let drawn = chart.draw_series(LineSeries::new(points, c.stroke_width(2)))?;
            if with_text && curve.run == 0 {
                drawn.label(curve.init.name()).legend(legend_mark(c.to_rgba()));
            }
        }
        if with_text {
            draw_legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
        }
    }
    root.present()
        .with_context(|| format!("cannot write `{}`", out.display()))?;
    Ok(())
}

/// Colours of classes 1, 2, ... in the segmentation figure.
const CLASS_COLOURS: [[u8; 3]; 6] = [
    [230, 50, 50],
    [50, 200, 80],
    [60, 120, 240],
    [240, 200, 40],
    [200, 80, 220],
    [40, 210, 210],
];

/// Up to three slices of `volume` (those with the most foreground), each a row of image,
/// ground truth and each prediction in `predictions` (by row name), masks drawn over the
/// image, into `out` (PNG).
pub fn plot_segmentation(
    volume: &MaskedVolume,
    predictions: &BTreeMap<&'static str, Tensor>,
    out: &Path,
) -> Result<()> {
    let (d, h, w) = volume.voxels.size3()?;
    let foreground: Vec<i64> =
        Vec::<i64>::try_from(volume.mask.gt(0).sum_dim_intlist([1, 2].as_slice(), false, Kind::Int64))?;
    let mut order: Vec<i64> = (0..d).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(foreground[i as usize]));
    let mut rows: Vec<i64> = order.into_iter().take(3).collect();
    rows.sort_unstable();
    let scale = (192 / h.max(w)).max(1) as u32;
    let (tile_w, tile_h) = (w as u32 * scale, h as u32 * scale);
    let columns = 2 + predictions.len() as u32;
    let gap = 4;
    let mut canvas = image_canvas(columns * (tile_w + gap), rows.len() as u32 * (tile_h + gap));
    for (r, &slice) in rows.iter().enumerate() {
        let img = volume.voxels.get(slice);
        let (low, high) = (img.min().double_value(&[]), img.max().double_value(&[]));
        let grey: Vec<f32> = Vec::<f32>::try_from(((&img - low) / (high - low).max(1e-6)).flatten(0, -1))?;
        let mut masks: Vec<Option<Vec<i64>>> =
            vec![None, Some(Vec::<i64>::try_from(volume.mask.get(slice).flatten(0, -1))?)];
        for prediction in predictions.values() {
            masks.push(Some(Vec::<i64>::try_from(prediction.get(slice).flatten(0, -1))?));
        }
        for (c, mask) in masks.iter().enumerate() {
            let (x0, y0) = (c as u32 * (tile_w + gap), r as u32 * (tile_h + gap));
            for y in 0..tile_h {
                for x in 0..tile_w {
                    let i = (y / scale) as usize * w as usize + (x / scale) as usize;
                    let g = (grey[i].clamp(0.0, 1.0) * 255.0) as u8;
                    let mut px = [g, g, g];
                    if let Some(class) = mask.as_ref().map(|m| m[i]).filter(|&k| k > 0) {
                        let colour = CLASS_COLOURS[(class as usize - 1) % CLASS_COLOURS.len()];
                        for k in 0..3 {
                            px[k] = ((px[k] as u16 * 2 + colour[k] as u16 * 3) / 5) as u8;
                        }
                    }
                    canvas.put(x0 + x, y0 + y, px);
                }
            }
        }
    }
    canvas.save(out)
}

/// An RGB canvas, written as PNG through plotters' bitmap backend.
struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

fn image_canvas(width: u32, height: u32) -> Canvas {
    Canvas {
        width,
        height,
        pixels: vec![255; (width * height * 3) as usize],
    }
}

impl Canvas {
    fn put(&mut self, x: u32, y: u32, rgb: [u8; 3]) {
        let i = ((y * self.width + x) * 3) as usize;
        self.pixels[i..i + 3].copy_from_slice(&rgb);
    }

    fn save(self, out: &Path) -> Result<()> {
        let root = BitMapBackend::new(out, (self.width, self.height)).into_drawing_area();
        for y in 0..self.height {
            for x in 0..self.width {
                let i = ((y * self.width + x) * 3) as usize;
                let [r, g, b] = [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]];
                root.draw_pixel((x as i32, y as i32), &RGBColor(r, g, b))?;
            }
        }
        root.present()
            .with_context(|| format!("cannot write `{}`", out.display()))?;
        Ok(())
    }
}
