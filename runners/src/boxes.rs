//! `medssl data boxes-from-masks`: per-slice detection boxes of the connected components of
//! a Decathlon task's masks, written as COCO JSON (medssl_faster_rcnn::boxes_from_masks).
//! With the hippocampus masks this is the 2D detection set that stands in for VinDr-CXR.

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use medssl_core::config::Section;
use medssl_core::detection::coco;
use medssl_core::registry;
use medssl_faster_rcnn::boxes_from_masks::{BoxesFromMasks, CocoBuilder, Connectivity, VolumeSummary};
use std::path::PathBuf;

#[derive(Args)]
pub struct BoxesArgs {
    /// A Decathlon task folder (imagesTr/ and labelsTr/).
    task: PathBuf,
    /// The NIfTI axis cut into slices (0, 1 or 2).
    #[arg(long, default_value_t = 2)]
    axis: usize,
    /// The COCO JSON file to write.
    #[arg(long)]
    out: PathBuf,
    /// Classes to box as VALUE=NAME, comma-separated (default: every mask value above 0
    /// found, named `class-VALUE`).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// Components with fewer pixels are dropped.
    #[arg(long, default_value_t = 4)]
    min_pixels: usize,
    /// 4 or 8 (pixels touching at a corner join one component).
    #[arg(long, default_value_t = 8)]
    connectivity: u8,
    /// Leave out slices without any box (kept by default, as background-only images).
    #[arg(long)]
    skip_empty: bool,
}

/// `VALUE=NAME` pairs.
fn parse_classes(raw: &[String]) -> Result<Vec<(i64, String)>> {
    raw.iter()
        .map(|pair| {
            let Some((value, name)) = pair.split_once('=') else {
                bail!("--classes `{pair}`: expected VALUE=NAME, e.g. 1=anterior");
            };
            let value: i64 = value
                .trim()
                .parse()
                .with_context(|| format!("--classes `{pair}`: `{value}` is not a mask value"))?;
            Ok((value, name.trim().to_string()))
        })
        .collect()
}

pub fn run(args: BoxesArgs) -> Result<()> {
    ensure!(args.axis <= 2, "--axis {}: expected 0, 1 or 2", args.axis);
    let root = std::path::absolute(&args.task).unwrap_or_else(|_| args.task.clone());
    let body = format!(
        "path = {}\nslice_axis = {}\nnormalize = \"none\"\n",
        toml::Value::String(root.display().to_string()),
        args.axis
    );
    let section = Section::inline("data", "decathlon", &body)?;
    let dataset = (registry::datasets().get("decathlon")?.build)(&section)
        .with_context(|| format!("reading the Decathlon task `{}`", args.task.display()))?;
    ensure!(
        !dataset.is_empty(),
        "`{}` holds no labelled volume",
        args.task.display()
    );
    let mut masks = Vec::with_capacity(dataset.len());
    for i in 0..dataset.len() {
        let volume = dataset
            .load(i)
            .with_context(|| format!("cannot read {}", dataset.describe(i)))?;
        let mask = volume
            .mask
            .with_context(|| format!("{} has no mask", dataset.describe(i)))?;
        // COCO's `file_name` is relative to the image root: here, the task folder.
        let described = dataset.describe(i);
        let name = std::path::Path::new(&described)
            .strip_prefix(&root)
            .map(|p| p.display().to_string())
            .unwrap_or(described.clone());
        masks.push((name, mask));
    }
    let mut classes = parse_classes(&args.classes)?;
    if classes.is_empty() {
        let mut values = std::collections::BTreeSet::new();
        for (_, mask) in &masks {
            let found: Vec<i64> = Vec::<i64>::try_from(mask.flatten(0, -1).unique_dim(0, true, false, false).0)?;
            values.extend(found.into_iter().filter(|&v| v > 0));
        }
        classes = values.into_iter().map(|v| (v, format!("class-{v}"))).collect();
    }
    let mut builder = CocoBuilder::new(BoxesFromMasks {
        classes,
        connectivity: Connectivity::parse(args.connectivity).context("--connectivity")?,
        min_pixels: args.min_pixels,
        skip_empty: args.skip_empty,
    })?;
    let mut total = VolumeSummary::default();
    for (name, mask) in &masks {
        let size = mask.size();
        let shape = [size[0] as usize, size[1] as usize, size[2] as usize];
        let values: Vec<i64> = Vec::<i64>::try_from(mask.flatten(0, -1))?;
        let summary = builder.add_volume(name, args.axis, &values, shape)?;
        total.images += summary.images;
        total.boxes += summary.boxes;
        total.dropped += summary.dropped;
    }
    coco::write_coco(&args.out, &builder.finish())?;
    println!(
        "{} volumes: {} slice images, {} boxes ({} components under {} pixels dropped) -> {}",
        masks.len(),
        total.images,
        total.boxes,
        total.dropped,
        args.min_pixels,
        args.out.display()
    );
    Ok(())
}
