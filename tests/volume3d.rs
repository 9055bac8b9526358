//! Native 3D pre-training and fine-tuning end to end: a tiny `vit3d` trained by the
//! `reconstruction` objective on generated volumes, fine-tuned as UNETR on a generated
//! Decathlon folder (sliding-window evaluation) and probed on 3D volumes, its weights
//! exported under MONAI's names; the configs that mix 2D and 3D components, refused
//! naming both sides; and the plumbing of `medssl bench voco-step` at a tiny size.

mod common;

use common::archive::archive;
use common::decathlon::decathlon;
use common::{assert_fails_with, medssl, test_device, test_device_name, unit, write};
use medssl_core::checkpoint;
use medssl_core::config::LoadedConfig;
use medssl_core::train::Run;
use serde_json::Value;
use std::path::Path;

use medssl_plugins as _;

/// A ViT of 2 x 2 x 2 patches of 16^3 on 32^3 crops, trained by reconstruction on 8
/// generated volumes: 2 epochs of 4 steps.
const TINY_3D: &str = r#"
seed = 2
device = "cpu"

[run]
log_every = 1
checkpoint_every = 4
threads = 1

[data.sources.phantom]
format = "phantom"
count = 8
slices = 20
size = 28

[data.views]
volume_views = 2
crop_size = [32, 32, 32]

[data.loader]
batch_size = 2
workers = 2

[encoder]
name = "vit3d"
img_size = [32, 32, 32]
patch_size = 16
hidden_size = 24
mlp_dim = 48
num_layers = 4
num_heads = 2
levels = [0, 1, 2]

[objectives.recon]
name = "reconstruction"
decoder_channels = 4
corruption = { inpaint_size = [2, 8], outpaint_size = [6, 16], shuffle_size = 3 }

[optimizer]
name = "adamw"
lr = 2e-3
weight_decay = 0.0

[[stages]]
name = "reconstruction"
epochs = 2
train = ["encoder"]
objectives = { recon = 1.0 }
"#;

fn records(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn reconstruction_pretraining_has_finite_falling_losses_and_logs_its_terms() {
    let tmp = tempfile::tempdir().unwrap();
    let config = TINY_3D.replace("epochs = 2", "epochs = 6");
    let run = common::pretrain(tmp.path(), "recon", &config);
    let records = records(&run);
    assert_eq!(records.len(), 24);
    for r in &records {
        for key in [
            "loss",
            "loss/recon/l1",
            "loss/recon/contrastive",
            "loss/recon/corrupted_l1",
        ] {
            let v = r[key].as_f64().unwrap_or_else(|| panic!("no {key} in {r}"));
            assert!(v.is_finite() && v >= 0.0, "{key} = {v}");
        }
        let (l1, c) = (
            r["loss/recon/l1"].as_f64().unwrap(),
            r["loss/recon/contrastive"].as_f64().unwrap(),
        );
        assert!(
            (r["loss"].as_f64().unwrap() - (l1 + c * l1)).abs() < 1e-4,
            "loss = r + c r: {r}"
        );
    }
    let mean = |rs: &[Value]| rs.iter().map(|r| r["loss"].as_f64().unwrap()).sum::<f64>() / rs.len() as f64;
    let (first, last) = (mean(&records[..6]), mean(&records[18..]));
    assert!(last < first, "the loss did not fall: {first} -> {last}");
}

#[test]
fn a_3d_run_finetunes_as_unetr_with_sliding_windows_and_probes_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::pretrain(tmp.path(), "recon", TINY_3D);
    let task = decathlon(tmp.path(), 6, 2);
    let config = format!(
        r#"
seed = 1
threads = 1
runs = 1
classes = 3

[data.train]
format = "decathlon"
path = {path:?}
ids = ["case_001", "case_002", "case_003", "case_004"]

[data.eval]
format = "decathlon"
path = {path:?}
ids = ["case_005", "case_006"]

[input]
crops_per_volume = 2
flip = 0.5
sliding_window = {{ overlap = 0.5, blend = "gaussian" }}

[head]
name = "unetr"
feature_size = 4

[train]
epochs = 2
batch_size = 2
eval_every = 1

[optimizer]
name = "adamw"
lr = 0.01
"#,
        path = task.display().to_string()
    );
    let file = write(tmp.path(), "unetr.toml", &config);
    let out_dir = tmp.path().join("ft");
    let out = medssl()
        .arg("finetune")
        .arg(&file)
        .arg("--pretrained")
        .arg(&run)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let results: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["metric"], "dice_3d");
    let rows = results["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        unit(&row["mean"], "dice_3d");
    }
    assert!(out_dir.join("segmentation.png").is_file());
    assert!(
        results["setup"]["input"].as_str().unwrap().contains("sliding windows"),
        "{}",
        results["setup"]
    );

    // Frozen features of whole volumes, resized to the crop size, for a probe.
    let volumes = archive(tmp.path(), "volumes.npz", 6, true);
    let out = medssl()
        .args(["eval", "knn"])
        .arg(&run)
        .arg("--train")
        .arg(&volumes)
        .arg("--eval")
        .arg(&volumes)
        .args(["--eval-split", "val", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let report: Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    unit(&report["pretrained"]["acc"], "acc");
}

#[test]
fn a_vit3d_exports_under_monais_names_and_starts_a_run_from_them() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::pretrain(tmp.path(), "recon", TINY_3D);
    let file = tmp.path().join("vit.safetensors");
    let out = medssl()
        .arg("export")
        .arg(&run)
        .args(["--format", "monai", "--prefix", "vit.", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let exported: std::collections::BTreeMap<String, tch::Tensor> =
        checkpoint::read_safetensors(&file).unwrap().into_iter().collect();
    // MONAI 1.6's ViT: 3 tensors of the patch embedding, 13 a block (qkv without bias), the
    // final norm's 2: 161 for 12 blocks.
    assert_eq!(exported.len(), 3 + 4 * 13 + 2, "{:?}", exported.keys());
    for name in [
        "vit.patch_embedding.position_embeddings",
        "vit.patch_embedding.patch_embeddings.weight",
        "vit.blocks.3.attn.qkv.weight",
        "vit.blocks.0.norm_cross_attn.bias",
        "vit.blocks.2.mlp.linear2.weight",
        "vit.norm.weight",
    ] {
        assert!(exported.contains_key(name), "no `{name}`");
    }
    assert_eq!(exported["vit.patch_embedding.position_embeddings"].size(), [1, 8, 24]);

    let config = write(tmp.path(), "again.toml", TINY_3D);
    let overrides = vec![
        format!("encoder.init={}", file.display()),
        "encoder.init_prefix=vit.".to_string(),
    ];
    let prepared = Run::prepare(LoadedConfig::load(&config, &overrides).unwrap()).unwrap();
    let vars: std::collections::BTreeMap<String, tch::Tensor> = prepared.variables().into_iter().collect();
    assert!(vars["encoder.blocks.3.attn.qkv.weight"].equal(&exported["vit.blocks.3.attn.qkv.weight"]));

    // torchvision's names are a ResNet's, not a ViT's.
    let out = medssl()
        .arg("export")
        .arg(&run)
        .args(["--format", "torchvision", "--out"])
        .arg(tmp.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert_fails_with(&out, &["vit3d", "--format monai"]);
}

/// Runs `medssl check` on TINY_3D with `overrides`.
fn check(dir: &Path, config: &str, overrides: &[&str]) -> std::process::Output {
    let file = write(dir, "c.toml", config);
    let mut cmd = medssl();
    cmd.arg("check").arg(&file);
    for o in overrides {
        cmd.args(["--set", o]);
    }
    cmd.output().unwrap()
}

#[test]
fn configs_that_mix_2d_and_3d_components_are_refused_naming_both() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ok = check(dir, TINY_3D, &[]);
    assert!(ok.status.success(), "{}", common::stderr(&ok));

    // A 3D encoder with an aggregator.
    let with_aggregator = format!("{TINY_3D}\n[aggregator]\nname = \"mean-pool\"\n");
    assert_fails_with(
        &check(dir, &with_aggregator, &[]),
        &["encoder `vit3d` is 3D", "mean-pool"],
    );
    // A 3D encoder with a slice-level objective.
    let slice_objective = TINY_3D.replace(
        "name = \"reconstruction\"\ndecoder_channels = 4\ncorruption = { inpaint_size = [2, 8], outpaint_size = [6, 16], shuffle_size = 3 }",
        "name = \"ntxent\"\nlevel = \"slice\"",
    );
    assert_fails_with(
        &check(dir, &slice_objective, &[]),
        &[
            "objective `recon` (ntxent)",
            "needs a 2D encoder",
            "encoder `vit3d` is 3D",
        ],
    );
    // A 2D encoder with the 3D objective.
    let two_d = TINY_3D.replace(
        "name = \"vit3d\"\nimg_size = [32, 32, 32]\npatch_size = 16\nhidden_size = 24\nmlp_dim = 48\nnum_layers = 4\nnum_heads = 2\nlevels = [0, 1, 2]",
        "name = \"resnet18\"\nbase_width = 4\nsmall_input = true",
    );
    assert_fails_with(&check(dir, &two_d, &[]), &["reconstruction", "3D", "resnet18"]);
    // Crops of another size than the ViT's position embeddings.
    assert_fails_with(
        &check(dir, TINY_3D, &["data.views.crop_size=[48, 48, 48]"]),
        &[
            "encoder `vit3d`",
            "[32, 32, 32]",
            "data.views.crop_size",
            "[48, 48, 48]",
        ],
    );

    // VoCo's base crops: a grid that does not divide the region, and crops that a v2 Swin
    // reduces to one position before its last stage, refused at load, not at the first step.
    let voco = TINY_3D
        .replace(
            "name = \"vit3d\"\nimg_size = [32, 32, 32]\npatch_size = 16\nhidden_size = 24\nmlp_dim = 48\nnum_layers = 4\nnum_heads = 2\nlevels = [0, 1, 2]",
            "name = \"swin3d\"\nfeature_size = 12\nuse_v2 = true",
        )
        .replace(
            "[objectives.recon]\nname = \"reconstruction\"\ndecoder_channels = 4\ncorruption = { inpaint_size = [2, 8], outpaint_size = [6, 16], shuffle_size = 3 }",
            "[objectives.vo]\nname = \"voco\"\ngrid = [2, 2]\nrandom_crops = 1\nhidden_dim = 16\noutput_dim = 16",
        )
        .replace("{ recon = 1.0 }", "{ vo = 1.0 }");
    let ok = check(dir, &voco, &["data.views.crop_size=[32, 64, 64]"]);
    assert!(ok.status.success(), "{}", common::stderr(&ok));
    assert_fails_with(
        &check(dir, &voco, &["data.views.crop_size=[32, 63, 64]"]),
        &["objectives.vo.grid", "data.views.crop_size", "[32, 63, 64]"],
    );
    assert_fails_with(
        &check(dir, &voco, &["data.views.crop_size=[16, 32, 32]"]),
        &[
            "objective `vo` (voco) feeds encoder `swin3d` crops of [16, 16, 16]",
            "encoder.use_v2",
            "`layers4c`",
            "at least 17 voxels",
        ],
    );
    let without_v2 = voco.replace("use_v2 = true", "use_v2 = false");
    let ok = check(dir, &without_v2, &["data.views.crop_size=[16, 32, 32]"]);
    assert!(ok.status.success(), "{}", common::stderr(&ok));

    // A 2D head on the 3D run, and the 3D head on a 2D run.
    let run3d = common::pretrain(dir, "run3d", TINY_3D);
    let run2d = common::pretrain(dir, "run2d", &common::TINY.replace("epochs = 2", "epochs = 1"));
    let task = decathlon(dir, 2, 2);
    let finetune = |head: &str, run: &Path| {
        let config = format!(
            "classes = 3\n[data.train]\nformat = \"decathlon\"\npath = {p:?}\nids = [\"case_001\"]\n[data.eval]\nformat = \"decathlon\"\npath = {p:?}\nids = [\"case_002\"]\n[head]\n{head}\n",
            p = task.display().to_string()
        );
        let file = write(dir, "ft.toml", &config);
        medssl()
            .arg("finetune")
            .arg(&file)
            .arg("--pretrained")
            .arg(run)
            .arg("--out")
            .arg(dir.join("ft"))
            .output()
            .unwrap()
    };
    assert_fails_with(
        &finetune("name = \"unet\"\nchannels = [8, 8, 8, 8, 8]", &run3d),
        &["head `unet`", "encoder is 3D"],
    );
    assert_fails_with(
        &finetune("name = \"unetr\"", &run2d),
        &["head `unetr`", "encoder is 2D"],
    );
    assert!(!dir.join("ft").exists(), "a refused fine-tune writes nothing");
}

/// The benchmark's plumbing at a tiny size (its numbers belong in docs/benchmarks.md): one
/// VoCo step of a feature-size-12 `swin3d` on 2 regions of 2 x 2 base crops of 32^3.
#[test]
fn bench_voco_step_reports_a_finite_step_time_and_its_settings() {
    let tiny = [
        "bench",
        "voco-step",
        "--feature-size",
        "12",
        "--crop",
        "32",
        "--grid",
        "2",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--json",
    ];
    let out = medssl()
        .args(tiny)
        .args(["--device", &test_device_name()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["bench"], "voco-step");
    let ms = report["ms_per_step"].as_f64().unwrap();
    assert!(ms.is_finite() && ms > 0.0, "{report}");
    assert_eq!(report["min_ms"].as_f64(), Some(ms), "one timed step: {report}");
    assert_eq!(report["max_ms"].as_f64(), Some(ms), "{report}");
    let rss = report["peak_rss_mb"].as_f64().unwrap();
    assert!(rss.is_finite() && rss > 0.0, "{report}");
    for (key, value) in [
        ("steps", 1),
        ("batch", 2),
        ("size", 32),
        ("grid", 2),
        ("feature_size", 12),
    ] {
        assert_eq!(report[key], value, "{key}: {report}");
    }
    // MONAI 1.6.1's SwinUNETR(feature_size=12, use_v2=True).swinViT has 1,355,958
    // parameters; each head is 276 (12 + 24 + 48 + 192 pooled) -> 1024 -> 1024 -> 1024,
    // 2,382,848 (benchmarks/voco_step.py counts the same 6,121,654); the int64
    // relative_position_index buffers are not counted.
    assert_eq!(report["parameters"], 1_355_958 + 2 * 2_382_848, "{report}");
    assert_eq!(report["device"], format!("{:?}", test_device()));
    assert!(report["threads"].as_i64().unwrap() >= 1, "{report}");
    assert!(report.get("window").is_none(), "sliding-window's field: {report}");

    let out = medssl().args(["bench", "voco-step", "--grid", "1"]).output().unwrap();
    assert_fails_with(&out, &["--grid", "at least 2"]);
}
