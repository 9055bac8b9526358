//! The U-Net head on a small ResNet-18 overfits a handful of real hippocampus MRI slices
//! (Medical Segmentation Decathlon Task04, from ../shared/data: labels 0 background,
//! 1 anterior, 2 posterior hippocampus) to a mean foreground Dice above 0.9, measured by
//! `medssl_core::segmentation` on the slices stacked as one volume, with batch norm in
//! evaluation mode. Where the shared data is absent it prints a note and overfits generated
//! image / mask pairs instead; a second test overfits those everywhere, so the fallback is
//! known to pass.
//!
//! Overfitting a fixed batch is the first check of a segmentation model: it shows that the
//! decoder, the skips, the upsampling to the input size and the loss can drive every
//! foreground class to a near-perfect overlap.

use medssl_core::prelude::*;
use medssl_core::registry;
use medssl_core::segmentation::{mean_foreground, merge_slices, split_slices, volume_scores};
use medssl_readers as _;
use medssl_resnet as _;
use medssl_unet as _;
use std::path::Path;
use std::time::Instant;
use tch::nn::OptimizerConfig;

/// Side of the square the slices are resized to.
const SIZE: i64 = 32;
/// Slices in the batch.
const SLICES: usize = 6;
const CLASSES: i64 = 3;

/// `[N, 1, SIZE, SIZE]` images and `[N, SIZE, SIZE]` masks of real slices holding both
/// labels, or `None` where the data is absent.
fn hippocampus_slices() -> Result<Option<(Tensor, Tensor)>> {
    let task = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/hippocampus"));
    if !task.is_dir() {
        return Ok(None);
    }
    let ids: Vec<String> = [1, 3, 4, 6, 7, 8]
        .iter()
        .map(|n| format!("\"hippocampus_{n:03}\""))
        .collect();
    let body = format!("path = {:?}\nids = [{}]", task.display().to_string(), ids.join(", "));
    let section = Section::inline("data.sources.hippocampus", "decathlon", &body)?;
    let dataset = (registry::datasets().get("decathlon")?.build)(&section)?;
    let (mut images, mut masks) = (Vec::new(), Vec::new());
    for index in 0..dataset.len() {
        let volume = dataset.load(index)?;
        let mask = volume.mask.context("a Decathlon training volume has a mask")?;
        // The slice with the most voxels of the rarer of the two labels: both are there.
        let per_label = |label: i64| mask.eq(label).sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Int64);
        let both = per_label(1).minimum(&per_label(2));
        let best = both.argmax(0, false).int64_value(&[]);
        ensure!(
            both.int64_value(&[best]) > 0,
            "{} has no slice with both labels",
            dataset.describe(index)
        );
        // Volumes differ in size: each slice is resized on its own, masks by nearest
        // neighbour so that they keep whole class ids.
        let image = volume.voxels.get(best).view([1, 1, -1, mask.size()[2]]);
        images.push(
            image
                .upsample_bilinear2d([SIZE, SIZE], false, None, None)
                .view([1, SIZE, SIZE]),
        );
        let slice_mask = mask.get(best).unsqueeze(0).unsqueeze(0).to_kind(Kind::Float);
        masks.push(
            slice_mask
                .upsample_nearest2d([SIZE, SIZE], None, None)
                .view([SIZE, SIZE])
                .to_kind(Kind::Int64),
        );
    }
    let images = Tensor::stack(&images, 0);
    let masks = Tensor::stack(&masks, 0);
    Ok(Some((images, masks)))
}

/// Generated stand-ins: two touching ellipses (classes 1 and 2) per image, at shifting
/// places, on a noisy background.
fn generated_slices() -> (Tensor, Tensor) {
    // Seeded: the same noise wherever it runs.
    tch::manual_seed(1);
    let grid = Tensor::arange(SIZE, (Kind::Float, Device::Cpu));
    let (y, x) = (grid.view([SIZE, 1]), grid.view([1, SIZE]));
    let masks: Vec<Tensor> = (0..SLICES)
        .map(|i| {
            let (cy, cx) = (12.0 + i as f64, 10.0 + 1.5 * i as f64);
            let inside = |cy: f64, cx: f64| (((&y - cy) / 5.0).square() + ((&x - cx) / 3.0).square()).le(1.0);
            let anterior = inside(cy, cx).to_kind(Kind::Int64);
            let posterior = inside(cy + 2.0, cx + 6.0).to_kind(Kind::Int64);
            (&anterior + posterior * 2).clamp_max(2)
        })
        .collect();
    let masks = Tensor::stack(&masks, 0);
    let images = masks.to_kind(Kind::Float).unsqueeze(1)
        + Tensor::randn([SLICES as i64, 1, SIZE, SIZE], (Kind::Float, Device::Cpu)) * 0.5;
    (images, masks)
}

/// Trains a U-Net on a small ResNet-18 on the fixed batch until its mean foreground Dice
/// (batch norm in evaluation mode) passes 0.9 or 400 steps have run; returns that Dice.
fn overfit(images: &Tensor, masks: &Tensor) -> Result<f64> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let section = Section::inline("encoder", "resnet18", "base_width = 8\nsmall_input = true")?;
    let encoder = (registry::encoders().get("resnet18")?.build)(
        &section,
        vs.root() / "encoder",
        &EncoderShape { in_channels: 1 },
    )?;
    let shape = HeadShape {
        in_channels: encoder.in_channels(),
        spatial_dims: encoder.spatial_dims(),
        levels: encoder.levels().to_vec(),
        embedding_dim: encoder.embedding_dim(),
        volume_dim: None,
        num_classes: CLASSES,
    };
    let section = Section::inline("head", "unet", "channels = [32, 32, 16, 16, 16]")?;
    let head = (registry::heads().get("unet")?.build)(&section, vs.root() / "head", &shape)?;
    let mut optimizer = nn::Adam::default().build(&vs, 3e-3)?;

    let targets = Targets::Classes(masks.shallow_clone());
    fn input(features: &EncoderOutput) -> HeadInput<'_> {
        HeadInput {
            encoder: features,
            volume: None,
            image_size: [SIZE, SIZE],
            images: None,
        }
    }
    let started = Instant::now();
    let mut dice = 0.0;
    let mut steps = 0;
    while steps < 400 && dice <= 0.9 {
        for _ in 0..20 {
            let features = encoder.forward(images, true);
            let loss = head.loss(&input(&features), &targets, 0)?;
            optimizer.backward_step(&loss);
            steps += 1;
        }
        // The slices' predictions, merged as the fine-tune merges a volume's.
        let features = tch::no_grad(|| encoder.forward(images, false));
        let Prediction::Logits(logits) = tch::no_grad(|| head.predict(&input(&features)))? else {
            bail!("the U-Net predicted something other than logits");
        };
        let prediction = logits.argmax(1, false);
        let merged = merge_slices(&split_slices(&prediction));
        let scores = volume_scores(&merged, masks, CLASSES)?;
        dice = mean_foreground(&scores.dice).unwrap_or(0.0);
        println!(
            "step {steps}: mean foreground Dice {dice:.4} (per class {:?}, 2D {:?}), {:.1} s",
            scores.dice,
            mean_foreground(&scores.dice_2d),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(dice)
}

#[test]
fn unet_overfits_real_hippocampus_slices() -> Result<()> {
    let (images, masks) = match hippocampus_slices()? {
        Some(data) => data,
        None => {
            println!("note: ../shared/data/hippocampus is absent; overfitting generated image / mask pairs instead");
            generated_slices()
        }
    };
    let dice = overfit(&images, &masks)?;
    assert!(dice > 0.9, "mean foreground Dice {dice}");
    Ok(())
}

/// The stand-in data itself, so that the fallback above is known to pass where the shared
/// data is absent.
#[test]
fn unet_overfits_generated_slices() -> Result<()> {
    let (images, masks) = generated_slices();
    let dice = overfit(&images, &masks)?;
    assert!(dice > 0.9, "mean foreground Dice {dice}");
    Ok(())
}
