//! TensorBoard event files (`run.tensorboard = true`): read back by a reader written here
//! from the format's description (TFRecord framing, both masked CRC-32Cs checked, `Event`
//! messages decoded with prost), not by the writer's own code.

mod common;

use medssl_core::tensorboard::{masked_crc32c, Event, EventWriter, Payload, RecordLayout, What, FILE_VERSION};
use prost::Message;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medssl_plugins as _;

/// Every event of one file, each record's length and data checked against its CRCs.
fn read_events(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    let mut events = Vec::new();
    let mut rest = bytes.as_slice();
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    while !rest.is_empty() {
        assert!(rest.len() >= 12, "{}: a torn record header", path.display());
        let length = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        assert_eq!(u32_at(rest, 8), masked_crc32c(&rest[..8]), "length CRC");
        let data = &rest[12..12 + length];
        assert_eq!(u32_at(rest, 12 + length), masked_crc32c(data), "data CRC");
        events.push(Event::decode(data).unwrap());
        rest = &rest[16 + length..];
    }
    events
}

/// The event files of a run, in the order TensorBoard reads them (by name).
fn event_files(run: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    files.sort();
    files
}

/// (tag, step) -> value over `files` as TensorBoard's EventAccumulator merges them: a
/// `SessionLog` START at step s drops every value logged at s or later.
fn scalars(files: &[PathBuf]) -> BTreeMap<(String, i64), f32> {
    let mut out = BTreeMap::new();
    for file in files {
        let events = read_events(file);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion(FILE_VERSION.into())),
            "the version first"
        );
        for event in events {
            match event.what {
                Some(What::SessionLog(log)) if log.status == 1 => out.retain(|(_, step), _| *step < event.step),
                Some(What::Summary(summary)) => {
                    for value in summary.value {
                        if let Some(Payload::SimpleValue(v)) = value.value {
                            out.insert((value.tag, event.step), v);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// metrics.jsonl's numbers (booleans as 0/1) by (key, step), as f32 as TensorBoard keeps them.
fn jsonl_scalars(run: &Path) -> BTreeMap<(String, i64), f32> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines() {
        let record: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
        let step = record["step"].as_i64().unwrap();
        for (key, value) in &record {
            let v = match value {
                Value::Bool(b) => Some(f32::from(u8::from(*b))),
                v => v.as_f64().map(|x| x as f32),
            };
            if let (Some(v), false) = (v, key == "step") {
                out.insert((key.clone(), step), v);
            }
        }
    }
    out
}

#[test]
fn scalars_and_an_image_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(tmp.path(), RecordLayout::Steps, None).unwrap();
    let values = [("loss".to_string(), 2.5f32), ("loss/swav/entropy".to_string(), -0.125)];
    writer.scalars(3, &values).unwrap();
    let image = tch::Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).view([3, 4]);
    writer.images(4, &[("views/slice_view_0".to_string(), image)]).unwrap();
    let events = read_events(writer.path());
    assert_eq!(events.len(), 3);
    let Some(What::Summary(summary)) = &events[1].what else {
        panic!("scalars")
    };
    assert_eq!(events[1].step, 3);
    let read: Vec<(String, f32)> = summary
        .value
        .iter()
        .map(|v| match v.value {
            Some(Payload::SimpleValue(x)) => (v.tag.clone(), x),
            _ => panic!("a scalar"),
        })
        .collect();
    assert_eq!(read, values);
    let Some(What::Summary(summary)) = &events[2].what else {
        panic!("an image")
    };
    let Some(Payload::Image(png)) = &summary.value[0].value else {
        panic!("an image")
    };
    assert_eq!((events[2].step, png.height, png.width, png.colorspace), (4, 3, 4, 1));
    let bytes = &png.encoded_image_string;
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR: width and height, big-endian, at bytes 16-23.
    let side = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!((side(16), side(20)), (4, 3));
    let name = writer.path().file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
}

#[test]
fn a_run_writes_every_metrics_scalar_and_epoch_views_and_a_resume_replaces_later_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::TINY
        .replace("checkpoint_every = 1", "checkpoint_every = 2\ntensorboard = true")
        .replace("epochs = 2", "epochs = 1");
    let run = common::pretrain(tmp.path(), "run", &config);
    let files = event_files(&run);
    assert_eq!(files.len(), 1, "{files:?}");
    let logged = scalars(&files);
    let expected = jsonl_scalars(&run);
    assert!(expected.keys().any(|(k, _)| k == "loss/slices") && expected.contains_key(&("lr".into(), 1)));
    assert_eq!(logged, expected);
    // 8 volumes in batches of 4: 2 steps an epoch, 4 steps in all; views at each epoch's
    // first step.
    let images: Vec<(i64, String)> = read_events(&files[0])
        .into_iter()
        .filter_map(|e| match e.what {
            Some(What::Summary(s)) => Some((e.step, s)),
            _ => None,
        })
        .flat_map(|(step, s)| {
            s.value
                .into_iter()
                .filter(|v| matches!(v.value, Some(Payload::Image(_))))
                .map(move |v| (step, v.tag))
        })
        .collect();
    let steps: Vec<i64> = images
        .iter()
        .map(|(s, _)| *s)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(steps, [1, 3]);
    assert!(images.iter().all(|(_, tag)| tag.starts_with("views/")), "{images:?}");
    assert!(images.iter().filter(|(s, _)| *s == 1).count() <= 4);

    // Killed after step 4 (its checkpoint not written; the last is step 2) and resumed:
    // a second file, and the merged scalars equal the resumed run's metrics.jsonl.
    let config = config.replace("epochs = 1", "epochs = 2");
    let path = common::write(tmp.path(), "killed.toml", &config);
    let killed = tmp.path().join("killed");
    let out = common::medssl()
        .env("INJECT_MEDSSL_ABORT", "step:4")
        .arg("run")
        .arg(&path)
        .arg("--run-dir")
        .arg(&killed)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let before = scalars(&event_files(&killed));
    assert!(
        before.contains_key(&("loss".into(), 3)),
        "step 3 was logged before the kill"
    );
    let out = common::medssl().arg("resume").arg(&killed).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let files = event_files(&killed);
    assert_eq!(files.len(), 2, "{files:?}");
    let second = read_events(&files[1]);
    assert!(
        matches!(&second[1].what, Some(What::SessionLog(s)) if s.status == 1) && second[1].step == 3,
        "the resumed file starts at the step after the checkpoint"
    );
    assert_eq!(scalars(&files), jsonl_scalars(&killed));
}
