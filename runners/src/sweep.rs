//! `medssl sweep FILE`: a base pre-training config run once per named variant (each a set of
//! `--set` overrides), every run evaluated the same way, and one table with a row per
//! variant (Markdown and JSON). The paper's Table 7 ablations are such a file.
//!
//! Each variant is a separate `medssl run` and `medssl eval` process, so one variant's
//! memory is returned before the next starts and a failure names its variant. A variant
//! whose run directory already holds a finished run (its `report.md`) is evaluated without
//! training again, so an interrupted sweep picks up where it stopped; `--force` retrains.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// The pre-training config every variant starts from (relative to the sweep file).
    pub base: PathBuf,
    /// Overrides applied to every variant, before the variant's own.
    #[serde(default)]
    pub set: Vec<String>,
    pub evaluation: Evaluation,
    pub variants: Vec<Variant>,
}

/// How each variant's pre-training is judged: a frozen-feature probe (`medssl eval`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    /// `linear` or `knn`.
    pub protocol: String,
    /// Labelled training set of the probe (relative to the sweep file).
    pub train: PathBuf,
    #[serde(default = "train_split")]
    pub train_split: String,
    /// Labelled evaluation set (relative to the sweep file).
    pub eval: PathBuf,
    #[serde(default = "eval_split")]
    pub eval_split: String,
    /// Reader of both sets (`medmnist`, ...); default: recognised from the path.
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default = "one")]
    pub label_fraction: f64,
    #[serde(default = "one_seed")]
    pub seeds: usize,
    /// Further flags for `medssl eval`, e.g. `["--k", "10"]`.
    #[serde(default)]
    pub args: Vec<String>,
}

fn train_split() -> String {
    "train".into()
}
fn eval_split() -> String {
    "val".into()
}
fn one() -> f64 {
    1.0
}
fn one_seed() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    #[serde(default)]
    pub set: Vec<String>,
}

/// Where the sweep writes: one run directory a variant, and the table.
pub const TABLE_MD: &str = "table.md";
pub const TABLE_JSON: &str = "table.json";
const EVAL_JSON: &str = "eval.json";

impl SweepFile {
    /// Reads `path`, resolving its paths against the file's folder; every variant name must
    /// be unique and make a distinct directory name.
    pub fn load(path: &Path) -> Result<SweepFile> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read sweep file `{}`", path.display()))?;
        let mut sweep: SweepFile =
            toml::from_str(&text).with_context(|| format!("sweep file `{}` is not a valid sweep", path.display()))?;
        let folder = path.parent().unwrap_or(Path::new("."));
        sweep.base = folder.join(&sweep.base);
        sweep.evaluation.train = folder.join(&sweep.evaluation.train);
        sweep.evaluation.eval = folder.join(&sweep.evaluation.eval);
        ensure!(
            matches!(sweep.evaluation.protocol.as_str(), "linear" | "knn"),
            "sweep file `{}`: `evaluation.protocol` is `{}`; expected `linear` or `knn`",
            path.display(),
            sweep.evaluation.protocol
        );
        ensure!(
            !sweep.variants.is_empty(),
            "sweep file `{}` has no `[[variants]]`",
            path.display()
        );
        let mut dirs = std::collections::BTreeSet::new();
        for variant in &sweep.variants {
            ensure!(
                dirs.insert(slug(&variant.name)),
                "sweep file `{}`: variant names `{}` and another one make the same directory name `{}`",
                path.display(),
                variant.name,
                slug(&variant.name)
            );
        }
        ensure!(
            sweep.base.is_file(),
            "sweep file `{}`: `base` config `{}` does not exist",
            path.display(),
            sweep.base.display()
        );
        Ok(sweep)
    }
}

/// A directory name for a variant: lower-case letters, digits and dashes.
pub fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Runs the sweep into `out` with `extra` overrides on every variant (after the file's).
pub fn run(file: &Path, out: &Path, extra: &[String], force: bool) -> Result<()> {
    let sweep = SweepFile::load(file)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create sweep directory `{}`", out.display()))?;
    let exe = std::env::current_exe().context("cannot find the medssl executable")?;
    let mut rows = Vec::new();
    for (i, variant) in sweep.variants.iter().enumerate() {
        let dir = out.join(slug(&variant.name));
        let overrides: Vec<&String> = sweep.set.iter().chain(extra).chain(&variant.set).collect();
        tracing::info!(
            "variant {}/{} `{}` in {}",
            i + 1,
            sweep.variants.len(),
            variant.name,
            dir.display()
        );
        if force || !dir.join(medssl_core::train::REPORT_FILE).is_file() {
            let mut command = Command::new(&exe);
            command
                .arg("run")
                .arg(&sweep.base)
                .arg("--run-dir")
                .arg(&dir)
                .arg("--force");
            for o in &overrides {
                command.arg("--set").arg(o);
            }
            let status = command
                .status()
                .with_context(|| format!("cannot start the run of variant `{}`", variant.name))?;
            ensure!(
                status.success(),
                "variant `{}`: pre-training failed ({status}); its log is above",
                variant.name
            );
        } else {
            tracing::info!("variant `{}` already trained: evaluating it", variant.name);
        }
        let result = evaluate(&exe, &sweep.evaluation, &dir)
            .with_context(|| format!("variant `{}`: evaluation", variant.name))?;
        medssl_core::checkpoint::write_atomic(&dir.join(EVAL_JSON), serde_json::to_string_pretty(&result)?.as_bytes())?;
        rows.push(json!({
            "variant": variant.name,
            "set": variant.set,
            "run_dir": dir,
            "pretrained": result["pretrained"],
            "random_init": result["random_init"],
        }));
    }
    let table = json!({
        "sweep": file,
        "base": sweep.base,
        "evaluation": {
            "protocol": sweep.evaluation.protocol,
            "train": sweep.evaluation.train,
            "train_split": sweep.evaluation.train_split,
            "eval": sweep.evaluation.eval,
            "eval_split": sweep.evaluation.eval_split,
            "label_fraction": sweep.evaluation.label_fraction,
            "seeds": sweep.evaluation.seeds,
        },
        "rows": rows,
    });
    medssl_core::checkpoint::write_atomic(&out.join(TABLE_JSON), serde_json::to_string_pretty(&table)?.as_bytes())?;
    let markdown = markdown_table(&sweep, &rows);
    medssl_core::checkpoint::write_atomic(&out.join(TABLE_MD), markdown.as_bytes())?;
    println!("{markdown}");
    Ok(())
}

/// `medssl eval PROTOCOL RUN_DIR ... --json`, parsed.
fn evaluate(exe: &Path, evaluation: &Evaluation, run_dir: &Path) -> Result<Value> {
    let mut command = Command::new(exe);
    command
        .arg("eval")
        .arg(&evaluation.protocol)
        .arg(run_dir)
        .arg("--train")
        .arg(&evaluation.train)
        .arg("--train-split")
        .arg(&evaluation.train_split)
        .arg("--eval")
        .arg(&evaluation.eval)
        .arg("--eval-split")
        .arg(&evaluation.eval_split)
        .arg("--label-fraction")
        .arg(evaluation.label_fraction.to_string())
        .arg("--seeds")
        .arg(evaluation.seeds.to_string())
        .arg("--json");
    if let Some(format) = &evaluation.format {
        command.arg("--format").arg(format);
    }
    command.args(&evaluation.args);
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start `medssl eval`")?;
    if !output.status.success() {
        bail!("`medssl eval` failed ({}); its log is above", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let value: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("`medssl eval --json` printed something that is not JSON: {text}"))?;
    ensure!(
        value.get("pretrained").is_some() && value.get("random_init").is_some(),
        "`medssl eval --json` gave no `pretrained`/`random_init` rows: {value}"
    );
    Ok(value)
}

/// One row a variant: the pre-trained probe's ACC and AUC (mean ± std over seeds) beside
/// the random-init encoder of the same architecture.
fn markdown_table(sweep: &SweepFile, rows: &[Value]) -> String {
    let e = &sweep.evaluation;
    let mut md = format!(
        "Probe: {} on `{}` ({}) -> `{}` ({}), {} of the training labels, {} seed(s); base config `{}`.\n\n",
        e.protocol,
        e.train.display(),
        e.train_split,
        e.eval.display(),
        e.eval_split,
        e.label_fraction,
        e.seeds,
        sweep.base.display()
    );
    md.push_str("| variant | overrides | ACC | AUC | random-init ACC | random-init AUC |\n|---|---|---|---|---|---|\n");
    for row in rows {
        let set: Vec<String> = row["set"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(|s| format!("`{s}`"))).collect())
            .unwrap_or_default();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row["variant"].as_str().unwrap_or_default(),
            if set.is_empty() {
                "—".to_string()
            } else {
                set.join(" ")
            },
            metric(&row["pretrained"], "acc"),
            metric(&row["pretrained"], "auc"),
            metric(&row["random_init"], "acc"),
            metric(&row["random_init"], "auc"),
        ));
    }
    md
}

/// `mean ± std` where the evaluation gave a std, else the value.
fn metric(result: &Value, key: &str) -> String {
    match (
        result.get(key).and_then(Value::as_f64),
        result.get(format!("{key}_std")).and_then(Value::as_f64),
    ) {
        (Some(mean), Some(std)) => format!("{mean:.3} ± {std:.3}"),
        (Some(mean), None) => format!("{mean:.3}"),
        _ => "—".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_directory_names() {
        assert_eq!(slug("w/o mask prediction"), "w-o-mask-prediction");
        assert_eq!(slug("Full"), "full");
        assert_eq!(slug("  multi-level: layer4 only "), "multi-level-layer4-only");
    }

    #[test]
    fn metric_shows_std_when_given() {
        assert_eq!(metric(&json!({"auc": 0.5, "auc_std": 0.01}), "auc"), "0.500 ± 0.010");
        assert_eq!(metric(&json!({"auc": 0.5}), "auc"), "0.500");
        assert_eq!(metric(&json!({}), "auc"), "—");
    }

    #[test]
    fn a_sweep_file_resolves_paths_and_refuses_colliding_names() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("base.toml"), "seed = 0\n").unwrap();
        let text = r#"
            base = "base.toml"
            [evaluation]
            protocol = "linear"
            train = "data.npz"
            eval = "data.npz"
            [[variants]]
            name = "full"
            [[variants]]
            name = "w/o mask"
            set = ["stages.1.epochs=0"]
        "#;
        let path = tmp.path().join("sweep.toml");
        std::fs::write(&path, text).unwrap();
        let sweep = SweepFile::load(&path).unwrap();
        assert_eq!(sweep.base, tmp.path().join("base.toml"));
        assert_eq!(sweep.evaluation.train_split, "train");
        assert_eq!(sweep.variants[1].set, ["stages.1.epochs=0"]);

        std::fs::write(&path, text.replace("w/o mask", "FULL")).unwrap();
        let err = SweepFile::load(&path).err().unwrap().to_string();
        assert!(err.contains("same directory name"), "{err}");
        std::fs::write(&path, text.replace("\"linear\"", "\"ridge\"")).unwrap();
        let err = format!("{:#}", SweepFile::load(&path).err().unwrap());
        assert!(err.contains("evaluation.protocol"), "{err}");
    }
}
