//! Run metrics: one JSON object a logged step in `metrics.jsonl`, the loss-curve PNG and the
//! short `report.md`.

use crate::tensorboard::EventWriter;
use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// Appends metric records, one JSON object a line, flushed as written; with a TensorBoard
/// writer attached, each record's scalars go to its event file too.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    tensorboard: Option<EventWriter>,
}

impl MetricsLog {
    /// Opens `path` for appending. When resuming, records after `keep_through_step` (written
    /// after the checkpoint, by the run that was interrupted) are dropped first, so the log
    /// reads as one uninterrupted run.
    pub fn open(path: &Path, keep_through_step: Option<usize>) -> Result<Self> {
        if let Some(last) = keep_through_step {
            keep_lines(path, |_, line| {
                serde_json::from_str::<Value>(line)
                    .ok()
                    .and_then(|record| record.get("step")?.as_u64())
                    .is_some_and(|s| s as usize <= last)
            })?;
        }
        Self::append(path)
    }

    /// Opens `path` for appending after keeping only its first `records` records: how a
    /// resumed fine-tune drops what the interrupted one logged after its checkpoint (its
    /// records count steps per trial, so [`MetricsLog::open`]'s step filter cannot).
    pub fn open_keeping(path: &Path, records: usize) -> Result<Self> {
        keep_lines(path, |index, _| index < records)?;
        Self::append(path)
    }

    fn append(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open `{}`", path.display()))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
            tensorboard: None,
        })
    }

    /// Also writes every record to `writer` (`run.tensorboard`, `train.tensorboard`).
    pub fn with_tensorboard(mut self, writer: EventWriter) -> Self {
        self.tensorboard = Some(writer);
        self
    }

    /// The attached TensorBoard writer, for what is not a record (training views).
    pub fn tensorboard(&mut self) -> Option<&mut EventWriter> {
        self.tensorboard.as_mut()
    }

    pub fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        // One write call a line: `writeln!` on a file writes each formatted piece apart, so
        // a run killed mid-record left half a line (a resume drops such a line anyway).
        let line = format!("{}\n", Value::Object(record.clone()));
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write `{}`", self.path.display()))?;
        match &mut self.tensorboard {
            Some(writer) => writer.record(record),
            None => Ok(()),
        }
    }
}

/// Rewrites `path` (atomically) with the lines `keep(index, line)` accepts; a torn last line
/// is dropped. Kept lines are copied as written: a parse and re-print could change a float's
/// last digit, and the log of a resumed run must equal an uninterrupted one.
fn keep_lines(path: &Path, keep: impl Fn(usize, &str) -> bool) -> Result<()> {
    let text = if path.exists() {
        std::fs::read_to_string(path).with_context(|| format!("cannot read `{}`", path.display()))?
    } else {
        String::new()
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| serde_json::from_str::<Value>(line).is_ok())
        .enumerate()
        .filter(|(index, line)| keep(*index, line))
        .map(|(_, line)| line)
        .collect();
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    crate::checkpoint::write_atomic(path, text.as_bytes())
}

/// Every record of a metrics file (a missing file has none; a torn last line is ignored).
pub fn read_records(path: &Path) -> Result<Vec<Map<String, Value>>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = File::open(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    Ok(BufReader::new(file)
        .lines()
        .map_while(|l| l.ok())
        .filter_map(|line| match serde_json::from_str(&line) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        })
        .collect())
}

/// The font for plot labels: DejaVu Sans where the system has it. Without one the plot is
/// drawn without text. Plugins that plot (e.g. a precision-recall curve) use it too.
pub fn register_font() -> bool {
    const CANDIDATES: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
    ];
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REGISTERED.get_or_init(|| {
        CANDIDATES.iter().any(|path| {
            std::fs::read(path).ok().is_some_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    })
}

/// A line chart of medssl's plots: `(x, y)` in f64, drawn into a PNG.
pub type LineChart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// The builder every plot starts from on `area`: margins, axis label areas sized for text
/// (`y_labels` pixels wide for the y axis; none without a font) and `caption` where there is
/// text.
pub fn chart_builder<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    y_labels: u32,
    with_text: bool,
) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .margin(16)
        .x_label_area_size(if with_text { 40 } else { 8 })
        .y_label_area_size(if with_text { y_labels } else { 8 });
    if with_text {
        builder.caption(caption, ("sans-serif", 22));
    }
    builder
}

/// The legend box of every labelled series, at `position`.
pub fn draw_legend<'a, 'b: 'a>(chart: &mut LineChart<'a, 'b>, position: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A legend entry's mark: a short line in the series' colour.
pub fn legend_mark(colour: RGBAColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
}

/// One panel of the run's plot: a title, its y axis and the series drawn on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub y_desc: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// The panels of `loss.png`, from the records of metrics.jsonl: first the total loss beside
/// each objective's loss (all losses, one axis); then one panel per objective that logs terms
/// (its loss, its terms and baselines, `loss/<objective>/...`); then one panel per health
/// signal (`health/...`: embedding std, code entropy, prototypes used, masked counts), each
/// on its own axis, so that a count never shares an axis with a loss.
pub fn loss_panels(records: &[Map<String, Value>]) -> Vec<Panel> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for record in records {
        let Some(step) = record.get("step").and_then(Value::as_f64) else {
            continue;
        };
        for (key, value) in record {
            let plotted = key == "loss" || key.starts_with("loss/") || key.starts_with("health/");
            if let (true, Some(v)) = (plotted, value.as_f64()) {
                match series.iter_mut().find(|(k, _)| k == key) {
                    Some((_, points)) => points.push((step, v)),
                    None => series.push((key.clone(), vec![(step, v)])),
                }
            }
        }
    }
    let find = |key: &str| series.iter().find(|(k, _)| k == key).cloned();
    let objectives: Vec<&str> = series
        .iter()
        .filter_map(|(k, _)| k.strip_prefix("loss/").filter(|rest| !rest.contains('/')))
        .collect();
    let mut panels = Vec::new();
    let overview: Vec<_> = find("loss")
        .into_iter()
        .chain(objectives.iter().filter_map(|o| find(&format!("loss/{o}"))))
        .collect();
    if !overview.is_empty() {
        panels.push(Panel {
            title: "loss".into(),
            y_desc: "loss".into(),
            series: overview,
        });
    }
    for objective in &objectives {
        let prefix = format!("loss/{objective}/");
        let terms: Vec<_> = series.iter().filter(|(k, _)| k.starts_with(&prefix)).cloned().collect();
        if !terms.is_empty() {
            panels.push(Panel {
                title: format!("objective `{objective}`"),
                y_desc: "loss".into(),
                series: find(&format!("loss/{objective}")).into_iter().chain(terms).collect(),
            });
        }
    }
    for (key, points) in series.iter().filter(|(k, _)| k.starts_with("health/")) {
        let name = key.trim_start_matches("health/");
        panels.push(Panel {
            title: name.to_string(),
            y_desc: name.rsplit('/').next().unwrap_or(name).to_string(),
            series: vec![(key.clone(), points.clone())],
        });
    }
    panels
}

/// Draws [`loss_panels`] of `records` against the global step into `out` (PNG), two panels a
/// row.
pub fn plot_losses(records: &[Map<String, Value>], out: &Path) -> Result<()> {
    let panels = loss_panels(records);
    let columns = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(columns).max(1);
    let with_text = register_font();
    let root = BitMapBackend::new(out, (640 * columns as u32, 360 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.0)))
        .fold(1.0f64, f64::max);
    for (panel, area) in panels.iter().zip(root.split_evenly((rows, columns))) {
        draw_panel(&area, panel, x_max, with_text)?;
    }
    root.present()
        .with_context(|| format!("cannot write `{}`", out.display()))?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
    x_max: f64,
    with_text: bool,
) -> Result<()> {
    let finite = panel
        .series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(_, v)| v.is_finite());
    let (mut y_min, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(_, y) in finite {
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-6 * y_max.abs().max(1.0));
    let mut chart = chart_builder(area, &panel.title, 60, with_text)
        .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))?;
    if with_text {
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(panel.y_desc.as_str())
            .draw()?;
    }
    for (i, (name, pts)) in panel.series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let drawn = chart.draw_series(LineSeries::new(
            pts.iter().copied().filter(|p| p.1.is_finite()),
            colour.stroke_width(2),
        ))?;
        if with_text {
            drawn.label(name.clone()).legend(legend_mark(colour));
        }
    }
    if with_text && panel.series.len() > 1 {
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    Ok(())
}

/// Mean of `key` over the first and the last `window` records that have it.
pub fn first_and_last_mean(records: &[Map<String, Value>], key: &str, window: usize) -> Option<(f64, f64)> {
    let values: Vec<f64> = records
        .iter()
        .filter_map(|r| r.get(key).and_then(Value::as_f64))
        .collect();
    if values.is_empty() {
        return None;
    }
    let w = window.clamp(1, values.len());
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    Some((mean(&values[..w]), mean(&values[values.len() - w..])))
}

/// One stage's health over time: a Markdown table with a row per epoch and the mean over
/// that epoch's records of the loss, every loss term (`loss/...`) and every health indicator
/// (`health/...`), columns sorted by name. Empty where no record has an epoch.
pub fn epoch_table(records: &[Map<String, Value>]) -> String {
    let columns: std::collections::BTreeSet<&str> = records
        .iter()
        .flat_map(|r| r.iter())
        .filter(|(k, v)| (k.as_str() == "loss" || k.starts_with("loss/") || k.starts_with("health/")) && v.is_f64())
        .map(|(k, _)| k.as_str())
        .collect();
    let mut epochs: std::collections::BTreeMap<u64, Vec<&Map<String, Value>>> = Default::default();
    for r in records {
        if let Some(epoch) = r.get("epoch").and_then(Value::as_u64) {
            epochs.entry(epoch).or_default().push(r);
        }
    }
    if epochs.is_empty() || columns.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "| epoch | records | {} |\n|---|---|{}\n",
        columns.iter().copied().collect::<Vec<_>>().join(" | "),
        "---|".repeat(columns.len())
    );
    for (epoch, rows) in &epochs {
        let cells = columns.iter().map(|c| {
            let values: Vec<f64> = rows.iter().filter_map(|r| r.get(*c).and_then(Value::as_f64)).collect();
            if values.is_empty() {
                String::new()
            } else {
                format!("{:.4}", values.iter().sum::<f64>() / values.len() as f64)
            }
        });
        out.push_str(&format!(
            "| {epoch} | {} | {} |\n",
            rows.len(),
            cells.collect::<Vec<_>>().join(" | ")
        ));
    }
    out
}

/// Arithmetic mean (0 for no values).
pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Standard deviation with Bessel's correction (n - 1); 0 for one value.
pub fn sample_std(values: &[f64]) -> f64 {
    let m = mean(values);
    (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (values.len().max(2) - 1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_table_averages_each_column_over_its_epoch() {
        let records: Vec<Map<String, Value>> = [
            serde_json::json!({"epoch": 0, "step": 1, "loss": 4.0, "health/swav/entropy": 4.1, "lr": 0.1}),
            serde_json::json!({"epoch": 0, "step": 2, "loss": 2.0, "health/slice_embedding_std": 0.05}),
            serde_json::json!({"epoch": 1, "step": 3, "loss": 1.0, "health/swav/entropy": 3.0}),
        ]
        .into_iter()
        .map(|v| v.as_object().unwrap().clone())
        .collect();
        assert_eq!(
            epoch_table(&records),
            "| epoch | records | health/slice_embedding_std | health/swav/entropy | loss |\n\
             |---|---|---|---|---|\n\
             | 0 | 2 | 0.0500 | 4.1000 | 3.0000 |\n\
             | 1 | 1 |  | 3.0000 | 1.0000 |\n"
        );
        assert_eq!(epoch_table(&[]), "");
    }

    #[test]
    fn losses_share_panels_and_every_health_signal_has_its_own() {
        let records: Vec<Map<String, Value>> = [
            serde_json::json!({"step": 1, "loss": 4.0, "loss/intra": 4.0, "loss/mask": 0.5,
                "loss/mask/baseline_mean": 0.7, "health/intra/prototypes_used": 45.0,
                "health/slice_embedding_std": 0.05, "lr": 0.1}),
            serde_json::json!({"step": 2, "loss": 3.0, "loss/intra": 3.0, "loss/mask": 0.4,
                "loss/mask/baseline_mean": 0.7, "health/intra/prototypes_used": 40.0,
                "health/slice_embedding_std": 0.06}),
        ]
        .into_iter()
        .map(|v| v.as_object().unwrap().clone())
        .collect();
        let panels = loss_panels(&records);
        let names = |p: &Panel| p.series.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "loss",
                "objective `mask`",
                "intra/prototypes_used",
                "slice_embedding_std"
            ]
        );
        assert_eq!(names(&panels[0]), ["loss", "loss/intra", "loss/mask"]);
        assert_eq!(names(&panels[1]), ["loss/mask", "loss/mask/baseline_mean"]);
        for health in &panels[2..] {
            assert_eq!(health.series.len(), 1, "a health signal is alone on its axis");
            assert!(health.series[0].0.starts_with("health/"));
        }
        assert_eq!(panels[2].series[0].1, [(1.0, 45.0), (2.0, 40.0)]);
        assert!(panels.iter().all(|p| p.series.iter().all(|(k, _)| k != "lr")));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("loss.png");
        plot_losses(&records, &out).unwrap();
        // A PNG's IHDR holds its width and height at bytes 16-23, big-endian.
        let png = std::fs::read(&out).unwrap();
        let side = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
        assert_eq!((side(16), side(20)), (1280, 720), "four panels, two a row");
    }

    #[test]
    fn resuming_keeps_earlier_lines_byte_for_byte_and_drops_later_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("metrics.jsonl");
        let kept = "{\"step\":1,\"loss\":2.3025850929940455e0,\"lr\":0.30000000000000004}\n\
                    {\"step\":2,\"loss\":1.0000000000000002,\"a\":1}\n";
        std::fs::write(&path, format!("{kept}{{\"step\":3,\"loss\":0.5}}\n{{\"step\":4,\"lo")).unwrap();
        let mut log = MetricsLog::open(&path, Some(2)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), kept);
        let mut record = Map::new();
        record.insert("step".into(), Value::from(3));
        log.write(&record).unwrap();
        assert_eq!(read_records(&path).unwrap().len(), 3);
    }
}
