//! TensorBoard event files: the scalars of `metrics.jsonl` and a few training views, written
//! where `tensorboard --logdir RUN` finds them (`RUN/tensorboard/events.out.tfevents.*`).
//!
//! The format is TensorFlow's: a file of TFRecords (`u64` little-endian length, the masked
//! CRC-32C of those 8 bytes, the data, the masked CRC-32C of the data; TensorFlow's
//! `core/lib/io/record_writer.cc`), each holding one `Event` protobuf message
//! (`tensorboard/compat/proto/event.proto` and `summary.proto`). The first event names the
//! file version, `brain.Event:2`. Only the fields medssl writes are declared below, with the
//! field numbers of those `.proto` files; prost derives their encoding, so neither `protoc`
//! nor a build script is needed (tensorboard-rs, which did this, is unmaintained).
//!
//! A resumed run starts a new file whose first event after the version is a `SessionLog`
//! `START` at the first step it will write, as TensorFlow's `Supervisor` did: TensorBoard's
//! Python `EventAccumulator` then drops everything the interrupted run logged from that step
//! on, and its data server drops a series' points at or after any step that comes again, so
//! either way the resumed run's values replace the interrupted run's. A resumed fine-tune
//! writes no `START`: its steps are epochs shared by every trial, so a `START` would drop
//! the finished trials' later epochs; the data server still replaces the repeated epochs.

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The folder of a run (or fine-tune) that holds its event files.
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// The version string of the first event of every file (TensorFlow's `kVersionPrefix` + 2).
pub const FILE_VERSION: &str = "brain.Event:2";

/// Training views drawn at each epoch's first batch.
pub const MAX_VIEW_IMAGES: usize = 4;

/// `Event` (event.proto): a timestamp, a step and what happened.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

/// `Event.what`: the members medssl writes.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `Summary` (summary.proto): named values.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `Summary.Value`: a tag and a scalar or an image.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(oneof = "Payload", tags = "2, 4")]
    pub value: Option<Payload>,
}

/// `Summary.Value.value`: `simple_value` or `image`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
}

/// `Summary.Image`: an encoded (here PNG) picture.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 1 grayscale, 3 RGB, 4 RGBA.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// `SessionLog`: medssl writes `START` (1) when a resumed run opens its file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(string, tag = "2")]
    pub checkpoint_path: String,
    #[prost(string, tag = "3")]
    pub msg: String,
}

/// `SessionLog.SessionStatus.START`.
pub const SESSION_START: i32 = 1;

/// TFRecord's masked CRC-32C: the CRC rotated right by 15 bits plus a constant, so that a
/// CRC of data that holds CRCs is not itself trivially structured.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// How a metrics record maps to TensorBoard's steps and tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordLayout {
    /// Pre-training: the record's `step`; every other numeric key is a tag of its own.
    Steps,
    /// Fine-tuning: the record's `epoch` (1-based); each key is tagged by its trial,
    /// `<init>/run<N>/<key>` with an `eval/` prefix dropped (`pretrained/run0/dice_3d`).
    Trials,
}

/// An open event file.
pub struct EventWriter {
    path: PathBuf,
    file: File,
    layout: RecordLayout,
}

impl EventWriter {
    /// Starts a new event file in `dir` (created if needed). `resumed_at`: the first step a
    /// resumed run will write, recorded as a `SessionLog` `START` (see the module doc).
    pub fn create(dir: &Path, layout: RecordLayout, resumed_at: Option<i64>) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
        // TensorBoard reads a folder's event files in name order, so a resumed run's file
        // must sort after the interrupted run's even when both start in the same second.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let latest = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list `{}`", dir.display()))?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_prefix("events.out.tfevents.")?
                    .split('.')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .max();
        let seconds = latest.map_or(now, |l| now.max(l + 1));
        let path = dir.join(format!(
            "events.out.tfevents.{seconds}.{}.{}",
            hostname(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot create TensorBoard event file `{}`", path.display()))?;
        let mut writer = EventWriter { path, file, layout };
        writer.write_event(0, What::FileVersion(FILE_VERSION.into()))?;
        if let Some(step) = resumed_at {
            writer.write_event(
                step,
                What::SessionLog(SessionLog {
                    status: SESSION_START,
                    checkpoint_path: String::new(),
                    msg: format!("medssl resumed at step {step}"),
                }),
            )?;
        }
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `values` (tag, value) at `step`, one event.
    pub fn scalars(&mut self, step: i64, values: &[(String, f32)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.clone(),
                value: Some(Payload::SimpleValue(*v)),
            })
            .collect();
        self.write_event(step, What::Summary(Summary { value }))
    }

    /// Writes each `(tag, image)` at `step` as a grayscale PNG: `image` is `[H, W]`, its
    /// range stretched to 0-255 (a constant image is black).
    pub fn images(&mut self, step: i64, images: &[(String, Tensor)]) -> Result<()> {
        if images.is_empty() {
            return Ok(());
        }
        let value = images
            .iter()
            .map(|(tag, image)| {
                Ok(SummaryValue {
                    tag: tag.clone(),
                    value: Some(Payload::Image(
                        grayscale_png(image).with_context(|| format!("image `{tag}`"))?,
                    )),
                })
            })
            .collect::<Result<_>>()?;
        self.write_event(step, What::Summary(Summary { value }))
    }

    /// Writes the numeric values of a metrics record (booleans as 0 and 1; strings and
    /// nulls are left out) as [`RecordLayout`] says; a record without the step is skipped.
    pub fn record(&mut self, record: &Map<String, Value>) -> Result<()> {
        let number = |v: &Value| match v {
            Value::Bool(b) => Some(f32::from(u8::from(*b))),
            v => v.as_f64().map(|x| x as f32),
        };
        let (step_key, skip, prefix): (&str, &[&str], String) = match self.layout {
            RecordLayout::Steps => ("step", &["step"], String::new()),
            RecordLayout::Trials => {
                let init = record.get("init").and_then(Value::as_str).unwrap_or("trial");
                let run = record.get("run").and_then(Value::as_u64).unwrap_or(0);
                ("epoch", &["epoch", "step", "run", "seed"], format!("{init}/run{run}/"))
            }
        };
        let Some(step) = record.get(step_key).and_then(Value::as_i64) else {
            return Ok(());
        };
        let values: Vec<(String, f32)> = record
            .iter()
            .filter(|(k, _)| !skip.contains(&k.as_str()))
            .filter_map(|(k, v)| {
                let tag = format!("{prefix}{}", k.strip_prefix("eval/").unwrap_or(k));
                Some((tag, number(v)?))
            })
            .collect();
        self.scalars(step, &values)
    }

    fn write_event(&mut self, step: i64, what: What) -> Result<()> {
        let wall_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let data = prost::Message::encode_to_vec(&Event {
            wall_time,
            step,
            what: Some(what),
        });
        let length = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&length);
        record.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc32c(&data).to_le_bytes());
        // One write and a flush a record, as metrics.jsonl: a killed run leaves at most one
        // torn record at the end, which TensorBoard skips.
        self.file
            .write_all(&record)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write `{}`", self.path.display()))
    }
}

/// The first sample of up to [`MAX_VIEW_IMAGES`] of a batch's views, as `[H, W]` images:
/// 2D views as they are, a 3D view's or crop's middle slice.
pub fn view_images(batch: &crate::loader::Batch) -> Vec<(String, Tensor)> {
    let first = |t: &Tensor| t.get(0).get(0);
    let middle = |t: &Tensor| {
        let volume = first(t);
        let depth = volume.size()[0];
        volume.get(depth / 2)
    };
    let slices = batch
        .slice_views
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("views/slice_view_{i}"), first(v)));
    let volumes = batch
        .volume_views
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("views/volume_view_{i}_middle_slice"), middle(v)));
    let crops = batch
        .volume_crops
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("views/crop_{i}_middle_slice"), middle(v)));
    slices
        .chain(volumes)
        .chain(crops)
        .filter(|(_, image)| image.numel() > 0)
        .take(MAX_VIEW_IMAGES)
        .collect()
}

/// `image` (`[H, W]`, any float kind) min-max scaled to 8 bits and PNG-encoded.
fn grayscale_png(image: &Tensor) -> Result<Image> {
    let (height, width) = image
        .size2()
        .map_err(|_| anyhow::anyhow!("expected a 2D image, got shape {:?}", image.size()))?;
    let image = image.to_device(tch::Device::Cpu).to_kind(Kind::Float);
    let (low, high) = (image.min().double_value(&[]), image.max().double_value(&[]));
    let scale = if high > low { 255.0 / (high - low) } else { 0.0 };
    let pixels: Vec<u8> = Vec::<f32>::try_from(image.flatten(0, -1))?
        .iter()
        .map(|&v| ((f64::from(v) - low) * scale).round().clamp(0.0, 255.0) as u8)
        .collect();
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &pixels,
        width as u32,
        height as u32,
        image::ColorType::L8,
    )
    .context("PNG encoding")?;
    Ok(Image {
        height: height as i32,
        width: width as i32,
        colorspace: 1,
        encoded_image_string: png,
    })
}

/// The host name TensorFlow puts in event file names (`localhost` where none is found).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace(['/', '\\'], "_"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_with_masked_crcs_and_the_version_comes_first() {
        let tmp = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(tmp.path(), RecordLayout::Steps, Some(7)).unwrap();
        writer.scalars(7, &[("loss".into(), 0.25)]).unwrap();
        let bytes = std::fs::read(writer.path()).unwrap();
        let mut at = 0;
        let mut events = Vec::new();
        while at < bytes.len() {
            let length = &bytes[at..at + 8];
            let n = u64::from_le_bytes(length.try_into().unwrap()) as usize;
            assert_eq!(
                u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()),
                masked_crc32c(length)
            );
            let data = &bytes[at + 12..at + 12 + n];
            assert_eq!(
                u32::from_le_bytes(bytes[at + 12 + n..at + 16 + n].try_into().unwrap()),
                masked_crc32c(data)
            );
            events.push(<Event as prost::Message>::decode(data).unwrap());
            at += 16 + n;
        }
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].what, Some(What::FileVersion(FILE_VERSION.into())));
        assert!(matches!(&events[1].what, Some(What::SessionLog(s)) if s.status == SESSION_START));
        assert_eq!(events[1].step, 7);
        let Some(What::Summary(summary)) = &events[2].what else {
            panic!("a summary")
        };
        assert_eq!(summary.value[0].value, Some(Payload::SimpleValue(0.25)));
        let name = writer.path().file_name().unwrap().to_str().unwrap().to_string();
        let second = EventWriter::create(tmp.path(), RecordLayout::Steps, None).unwrap();
        assert!(
            second.path().file_name().unwrap().to_str().unwrap() > name.as_str(),
            "a later file sorts after an earlier one"
        );
    }

    #[test]
    fn fine_tune_records_are_tagged_by_trial_at_their_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(tmp.path(), RecordLayout::Trials, None).unwrap();
        let record = serde_json::json!({"init": "pretrained", "run": 1, "seed": 3, "epoch": 2,
            "step": 40, "loss": 0.5, "eval/dice_3d": 0.75});
        writer.record(record.as_object().unwrap()).unwrap();
        let bytes = std::fs::read(writer.path()).unwrap();
        // Skip the version record; the second is the summary.
        let first = 16 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let n = u64::from_le_bytes(bytes[first..first + 8].try_into().unwrap()) as usize;
        let event = <Event as prost::Message>::decode(&bytes[first + 12..first + 12 + n]).unwrap();
        assert_eq!(event.step, 2);
        let Some(What::Summary(summary)) = event.what else {
            panic!("a summary")
        };
        let mut tags: Vec<&str> = summary.value.iter().map(|v| v.tag.as_str()).collect();
        tags.sort();
        assert_eq!(tags, ["pretrained/run1/dice_3d", "pretrained/run1/loss"]);
    }
}
