//! `medssl sweep FILE`: a base pre-training config run once per named variant (each a set of
//! `--set` overrides), every run evaluated the same way, and one table with a row per
//! variant (Markdown and JSON, named after FILE). The paper's Table 7 ablations are such a
//! file.
//!
//! One pre-training per variant cannot rank variants whose gaps are as large as the
//! run-to-run variation of pre-training itself, so `pretraining_seeds = [0, 1, 2]` trains
//! every variant once per seed (`--set seed=N`, into `VARIANT/seed-N/`) and its row gives the
//! mean ± std over those pre-trainings (each the mean over the evaluation's own seeds).
//!
//! Each variant is a separate `medssl run` and `medssl eval` process, so one variant's
//! memory is returned before the next starts and a failure names its variant. A variant
//! whose run directory already holds a finished run (its `report.md`) is evaluated without
//! training again, so an interrupted sweep picks up where it stopped, provided the run was
//! trained with this variant's overrides (its saved config is checked); `--force` retrains.

use anyhow::{bail, ensure, Context, Result};
use medssl_core::finetune::Init;
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
    /// Seeds of the pre-training; each variant is trained once per seed. Empty: once, with
    /// the base config's seed.
    #[serde(default)]
    pub pretraining_seeds: Vec<u64>,
    pub evaluation: Evaluation,
    pub variants: Vec<Variant>,
}

/// How each variant's pre-training is judged: a frozen-feature probe (`medssl eval linear`
/// or `knn`), or a fine-tune (`medssl finetune`: 3D Dice of a U-Net, AUC of a 3D
/// classifier, ...) beside the same network from scratch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    /// `linear`, `knn` or `finetune`.
    pub protocol: String,
    /// Labelled training set (relative to the sweep file); required by the probes, and for
    /// `finetune` it replaces the config's `data.train.path`.
    #[serde(default)]
    pub train: Option<PathBuf>,
    #[serde(default = "train_split")]
    pub train_split: String,
    /// Labelled evaluation set, as `train`.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    #[serde(default = "eval_split")]
    pub eval_split: String,
    /// Reader of both sets of a probe (`medmnist`, ...); default: recognised from the path.
    #[serde(default)]
    pub format: Option<String>,
    /// The fine-tuning config of `finetune` (relative to the sweep file).
    #[serde(default)]
    pub config: Option<PathBuf>,
    #[serde(default = "one")]
    pub label_fraction: f64,
    /// Probes: score by stratified K-fold cross-validation over `train` and `eval` pooled
    /// (`medssl eval --folds K`) instead of train -> eval.
    #[serde(default)]
    pub folds: Option<usize>,
    /// Probe seeds, or fine-tuning repeats.
    #[serde(default = "one_seed")]
    pub seeds: usize,
    /// Further flags for `medssl eval` or `medssl finetune`, e.g. `["--k", "10"]`.
    #[serde(default)]
    pub args: Vec<String>,
}

impl Evaluation {
    fn is_finetune(&self) -> bool {
        self.protocol == "finetune"
    }
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

const EVAL_JSON: &str = "eval.json";

/// The table's file name: the sweep file's name with `ext` (`table7_swav.toml` writes
/// `table7_swav.md` and `table7_swav.json`), so that two sweeps sharing pre-trainings (a
/// probe and a fine-tune judging the same variants) can share one `--out`.
pub fn table_name(file: &Path, ext: &str) -> String {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "table".into());
    format!("{stem}.{ext}")
}

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
        let e = &mut sweep.evaluation;
        for p in [&mut e.train, &mut e.eval, &mut e.config].into_iter().flatten() {
            *p = folder.join(&*p);
        }
        ensure!(
            matches!(e.protocol.as_str(), "linear" | "knn" | "finetune"),
            "sweep file `{}`: `evaluation.protocol` is `{}`; expected `linear`, `knn` or `finetune`",
            path.display(),
            e.protocol
        );
        if e.is_finetune() {
            ensure!(
                e.folds.is_none(),
                "sweep file `{}`: `evaluation.folds` is for the probes; a fine-tune scores on its config's `data.eval`",
                path.display()
            );
            ensure!(
                e.config.as_ref().is_some_and(|c| c.is_file()),
                "sweep file `{}`: `evaluation.protocol = \"finetune\"` needs `evaluation.config`, an existing fine-tuning config (e.g. configs/downstream/hippocampus_unet.toml)",
                path.display()
            );
        } else {
            ensure!(
                e.train.is_some() && e.eval.is_some(),
                "sweep file `{}`: the `{}` probe needs `evaluation.train` and `evaluation.eval`",
                path.display(),
                e.protocol
            );
        }
        let distinct: std::collections::BTreeSet<_> = sweep.pretraining_seeds.iter().collect();
        ensure!(
            distinct.len() == sweep.pretraining_seeds.len(),
            "sweep file `{}`: `pretraining_seeds` {:?} repeats a seed",
            path.display(),
            sweep.pretraining_seeds
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
    let seeds: Vec<Option<u64>> = if sweep.pretraining_seeds.is_empty() {
        vec![None]
    } else {
        sweep.pretraining_seeds.iter().copied().map(Some).collect()
    };
    let mut rows = Vec::new();
    for (i, variant) in sweep.variants.iter().enumerate() {
        let mut results = Vec::new();
        for &seed in &seeds {
            let dir = match seed {
                None => out.join(slug(&variant.name)),
                Some(seed) => out.join(slug(&variant.name)).join(format!("seed-{seed}")),
            };
            let seed_override = seed.map(|seed| format!("seed={seed}"));
            let overrides: Vec<&String> = sweep
                .set
                .iter()
                .chain(extra)
                .chain(&variant.set)
                .chain(&seed_override)
                .collect();
            tracing::info!(
                "variant {}/{} `{}`{} in {}",
                i + 1,
                sweep.variants.len(),
                variant.name,
                seed.map(|s| format!(", pre-training seed {s}")).unwrap_or_default(),
                dir.display()
            );
            if force || !dir.join(medssl_core::run_dir::REPORT_FILE).is_file() {
                pretrain(&exe, &sweep.base, &dir, &overrides).with_context(|| format!("variant `{}`", variant.name))?;
            } else {
                check_reused(&dir, &overrides).with_context(|| format!("variant `{}`", variant.name))?;
                tracing::info!(
                    "variant `{}` already trained in {}: evaluating it",
                    variant.name,
                    dir.display()
                );
            }
            let evaluated = if sweep.evaluation.is_finetune() {
                finetune(&exe, &sweep.evaluation, &dir)
            } else {
                evaluate(&exe, &sweep.evaluation, &dir)
            };
            let result = evaluated.with_context(|| format!("variant `{}`: evaluation", variant.name))?;
            medssl_core::checkpoint::write_atomic(
                &dir.join(EVAL_JSON),
                serde_json::to_string_pretty(&result)?.as_bytes(),
            )?;
            results.push((seed, dir, result));
        }
        rows.push(row(&sweep.evaluation, variant, &results));
    }
    let table = json!({
        "sweep": file,
        "base": sweep.base,
        "evaluation": {
            "protocol": sweep.evaluation.protocol,
            "config": sweep.evaluation.config,
            "train": sweep.evaluation.train,
            "train_split": sweep.evaluation.train_split,
            "eval": sweep.evaluation.eval,
            "eval_split": sweep.evaluation.eval_split,
            "label_fraction": sweep.evaluation.label_fraction,
            "folds": sweep.evaluation.folds,
            "seeds": sweep.evaluation.seeds,
        },
        "pretraining_seeds": sweep.pretraining_seeds,
        "rows": rows,
    });
    medssl_core::checkpoint::write_atomic(
        &out.join(table_name(file, "json")),
        serde_json::to_string_pretty(&table)?.as_bytes(),
    )?;
    let markdown = markdown_table(&sweep, &rows);
    medssl_core::checkpoint::write_atomic(&out.join(table_name(file, "md")), markdown.as_bytes())?;
    println!("{markdown}");
    Ok(())
}

/// Refuses to reuse a finished run that another variant or sweep trained: every override of
/// this variant (and the sweep's, and the seed) must hold in the run's resolved
/// `config.toml`. Keys under `run.` (threads, checkpoints kept) do not change what is
/// learned and are not compared.
fn check_reused(dir: &Path, overrides: &[&String]) -> Result<()> {
    let path = dir.join(medssl_core::run_dir::CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("`{}` holds a finished run but no readable config", path.display()))?;
    let saved: toml::Value =
        toml::from_str(&text).with_context(|| format!("`{}` is not valid TOML", path.display()))?;
    for raw in overrides {
        let (key, wanted) = medssl_core::config::parse_override(raw)?;
        if key.starts_with("run.") {
            continue;
        }
        let wanted: toml::Value = wanted
            .deserialize()
            .map_err(|e| anyhow::anyhow!("--set `{raw}`: {e}"))?;
        let found = key.split('.').try_fold(&saved, |value, part| match value {
            toml::Value::Table(table) => table.get(part),
            toml::Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        });
        ensure!(
            found.is_some_and(|found| same_value(found, &wanted)),
            "`{}` already holds a finished run, trained with {} where this sweep asks `{key} = {wanted}`: it belongs to another variant or sweep; pass --force to retrain it, or another --out",
            dir.display(),
            found.map(|v| format!("`{key} = {v}`")).unwrap_or_else(|| format!("no `{key}`"))
        );
    }
    Ok(())
}

/// Equal TOML values, an integer equal to a float of the same value (`--set w=0` against a
/// saved weight `0.0`).
fn same_value(a: &toml::Value, b: &toml::Value) -> bool {
    use toml::Value::{Array, Float, Integer};
    match (a, b) {
        (Integer(x), Float(y)) | (Float(y), Integer(x)) => *x as f64 == *y,
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b)),
        _ => a == b,
    }
}

/// `medssl run BASE --run-dir DIR --force --set ...`.
fn pretrain(exe: &Path, base: &Path, dir: &Path, overrides: &[&String]) -> Result<()> {
    let mut command = Command::new(exe);
    command.arg("run").arg(base).arg("--run-dir").arg(dir).arg("--force");
    for o in overrides {
        command.arg("--set").arg(o);
    }
    let status = command.status().context("cannot start the pre-training run")?;
    ensure!(
        status.success(),
        "pre-training in `{}` failed ({status}); its log is above",
        dir.display()
    );
    Ok(())
}

/// A variant's row of the table from its evaluations, one per pre-training seed. With one
/// pre-training the row is that evaluation's (its std is over the evaluation's seeds); with
/// several, each score is the mean over pre-trainings with their sample std, and the
/// per-seed scores are kept.
fn row(evaluation: &Evaluation, variant: &Variant, results: &[(Option<u64>, PathBuf, Value)]) -> Value {
    type Score = fn(&Value) -> Value;
    // `results` hold the reports as `evaluate` and `finetune` parsed and checked them.
    let (keys, sides): (&[&str], [(&str, Score); 2]) = if evaluation.is_finetune() {
        (
            &["value"],
            [
                ("pretrained", |r| summary(&r["rows"][0])),
                ("scratch", |r| summary(&r["rows"][1])),
            ],
        )
    } else {
        (
            &["acc", "auc"],
            [
                ("pretrained", |r| r["pretrained"].clone()),
                ("random_init", |r| r["random_init"].clone()),
            ],
        )
    };
    let mut out = json!({ "variant": variant.name, "set": variant.set });
    if let [(None, dir, result)] = results {
        out["run_dir"] = json!(dir);
        if evaluation.is_finetune() {
            out["metric"] = result["metric"].clone();
        }
        for (side, score) in &sides {
            out[*side] = score(result);
        }
        return out;
    }
    out["run_dirs"] = json!(results.iter().map(|(_, dir, _)| dir).collect::<Vec<_>>());
    out["pretraining_seeds"] = json!(results.iter().filter_map(|(seed, _, _)| *seed).collect::<Vec<_>>());
    if evaluation.is_finetune() {
        out["metric"] = results
            .first()
            .map(|(_, _, r)| r["metric"].clone())
            .unwrap_or(Value::Null);
    }
    for (side, score) in &sides {
        let per_seed: Vec<Value> = results.iter().map(|(_, _, r)| score(r)).collect();
        let mut combined = json!({ "per_pretraining_seed": per_seed });
        for key in keys {
            let values: Vec<f64> = per_seed.iter().filter_map(|s| s[*key].as_f64()).collect();
            if values.len() == per_seed.len() {
                combined[*key] = json!(medssl_core::metrics::mean(&values));
                combined[format!("{key}_std")] = json!(medssl_core::metrics::sample_std(&values));
            }
        }
        out[*side] = combined;
    }
    out
}

/// `medssl eval PROTOCOL RUN_DIR ... --json`, parsed.
fn evaluate(exe: &Path, evaluation: &Evaluation, run_dir: &Path) -> Result<Value> {
    let mut command = Command::new(exe);
    command
        .arg("eval")
        .arg(&evaluation.protocol)
        .arg(run_dir)
        .arg("--train")
        .args(&evaluation.train)
        .arg("--train-split")
        .arg(&evaluation.train_split)
        .arg("--eval")
        .args(&evaluation.eval)
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
    if let Some(folds) = evaluation.folds {
        command.arg("--folds").arg(folds.to_string());
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
    let report: medssl_core::eval::Report = serde_json::from_str(text.trim())
        .with_context(|| format!("`medssl eval --json` printed something that is not its report: {text}"))?;
    Ok(serde_json::to_value(report)?)
}

/// `medssl finetune CONFIG --pretrained RUN_DIR ... --json`, parsed; the fine-tune's own
/// folder is `RUN_DIR/finetune`.
fn finetune(exe: &Path, evaluation: &Evaluation, run_dir: &Path) -> Result<Value> {
    let mut command = Command::new(exe);
    command
        .arg("finetune")
        .args(&evaluation.config)
        .arg("--pretrained")
        .arg(run_dir)
        .arg("--out")
        .arg(run_dir.join("finetune"))
        .arg("--force")
        .arg("--label-fraction")
        .arg(evaluation.label_fraction.to_string())
        .arg("--runs")
        .arg(evaluation.seeds.to_string())
        .arg("--json");
    if let Some(train) = &evaluation.train {
        command.arg("--train").arg(train);
    }
    if let Some(eval) = &evaluation.eval {
        command.arg("--eval").arg(eval);
    }
    command.args(&evaluation.args);
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start `medssl finetune`")?;
    if !output.status.success() {
        bail!("`medssl finetune` failed ({}); its log is above", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let report: medssl_core::finetune::report::Report = serde_json::from_str(text.trim())
        .with_context(|| format!("`medssl finetune --json` printed something that is not its report: {text}"))?;
    let inits: Vec<Init> = report.rows.iter().map(|r| r.init).collect();
    ensure!(
        inits == [Init::Pretrained, Init::Scratch],
        "`medssl finetune --json` gave rows {inits:?}, expected a pretrained and a scratch row"
    );
    Ok(serde_json::to_value(report)?)
}

/// A fine-tune row's primary metric in the probes' shape: `value` and `value_std`.
fn summary(row: &Value) -> Value {
    json!({ "value": row["mean"], "value_std": row["std"], "runs": row["runs"] })
}

/// One row a variant: the pre-trained probe's ACC and AUC (mean ± std over seeds) beside
/// the random-init encoder of the same architecture.
fn markdown_table(sweep: &SweepFile, rows: &[Value]) -> String {
    let e = &sweep.evaluation;
    let spread = if sweep.pretraining_seeds.is_empty() {
        "± is the std over the evaluation's seeds of one pre-training".to_string()
    } else {
        format!(
            "each variant pre-trained with seeds {:?}: mean ± sample std over those pre-trainings, each the mean over the evaluation's seeds",
            sweep.pretraining_seeds
        )
    };
    if e.is_finetune() {
        let metric_name = rows
            .first()
            .and_then(|r| r["metric"].as_str())
            .unwrap_or("metric")
            .to_string();
        let mut md = format!(
            "Fine-tune: `{}`, {} of the training volumes, {} repeat(s), pre-trained beside scratch; base config `{}`; {spread}.\n\n| variant | overrides | {metric_name} (pre-trained) | {metric_name} (scratch) |\n|---|---|---|---|\n",
            e.config.as_deref().unwrap_or(Path::new("")).display(),
            e.label_fraction,
            e.seeds,
            sweep.base.display()
        );
        for row in rows {
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                row["variant"].as_str().unwrap_or_default(),
                overrides(row),
                metric(&row["pretrained"], "value"),
                metric(&row["scratch"], "value"),
            ));
        }
        return md;
    }
    let set = |path: &Option<PathBuf>, split: &str| {
        format!("`{}` ({split})", path.as_deref().unwrap_or(Path::new("")).display())
    };
    let (train, eval, fraction) = (
        set(&e.train, &e.train_split),
        set(&e.eval, &e.eval_split),
        e.label_fraction,
    );
    let sets = match e.folds {
        None => format!("on {train} -> {eval}, {fraction} of the training labels"),
        Some(k) => format!(
            "{k}-fold stratified cross-validation over {train} and {eval} pooled, each fit on fraction {fraction} of the other folds' labels"
        ),
    };
    let mut md = format!(
        "Probe: {} {sets}, {} seed(s); base config `{}`; {spread}.\n\n",
        e.protocol,
        e.seeds,
        sweep.base.display()
    );
    md.push_str("| variant | overrides | ACC | AUC | random-init ACC | random-init AUC |\n|---|---|---|---|---|---|\n");
    for row in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row["variant"].as_str().unwrap_or_default(),
            overrides(row),
            metric(&row["pretrained"], "acc"),
            metric(&row["pretrained"], "auc"),
            metric(&row["random_init"], "acc"),
            metric(&row["random_init"], "auc"),
        ));
    }
    md
}

/// A row's overrides as inline code, or a dash.
fn overrides(row: &Value) -> String {
    let set: Vec<String> = row["set"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(|s| format!("`{s}`"))).collect())
        .unwrap_or_default();
    if set.is_empty() {
        "—".to_string()
    } else {
        set.join(" ")
    }
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
    fn a_finished_run_is_reused_only_by_the_variant_that_trained_it() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("config.toml"),
            "seed = 1\n[aggregator]\nlevels = [\"layer4\"]\n[[stages]]\nepochs = 8\n[[stages]]\nepochs = 0\nobjectives = { mask = 0.0, inter = 1.0 }\n",
        )
        .unwrap();
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let check = |v: &[String]| check_reused(tmp.path(), &v.iter().collect::<Vec<_>>());
        let ours = owned(&[
            "seed=1",
            "stages.1.epochs=0",
            "stages.1.objectives.mask=0",
            "aggregator.levels=[\"layer4\"]",
            "run.threads=1",
        ]);
        check(&ours).unwrap();
        for (other, named) in [
            ("seed=2", "`seed = 1`"),
            ("stages.1.objectives.inter=0", "`stages.1.objectives.inter = 1.0`"),
            ("aggregator.width=64", "no `aggregator.width`"),
            ("stages.5.epochs=1", "no `stages.5.epochs`"),
        ] {
            let err = format!("{:#}", check(&owned(&[other])).unwrap_err());
            assert!(err.contains(named) && err.contains("--force"), "{other}: {err}");
        }
    }

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
    fn rows_average_over_pretraining_seeds_and_keep_each() {
        let evaluation = Evaluation {
            protocol: "linear".into(),
            train: None,
            train_split: train_split(),
            eval: None,
            eval_split: eval_split(),
            format: None,
            config: None,
            label_fraction: 1.0,
            folds: None,
            seeds: 3,
            args: Vec::new(),
        };
        let variant = Variant {
            name: "full".into(),
            set: Vec::new(),
        };
        let probe = |auc: f64| {
            json!({
                "pretrained": {"acc": 0.5, "acc_std": 0.1, "auc": auc, "auc_std": 0.2},
                "random_init": {"acc": 0.4, "auc": 0.6},
            })
        };
        let one = row(&evaluation, &variant, &[(None, PathBuf::from("a"), probe(0.7))]);
        assert_eq!(
            one["pretrained"]["auc_std"], 0.2,
            "one pre-training keeps the probe's own std"
        );
        assert_eq!(one["run_dir"], "a");

        let results: Vec<_> = [(0, 0.7), (1, 0.8), (2, 0.9)]
            .into_iter()
            .map(|(seed, auc)| (Some(seed), PathBuf::from(format!("seed-{seed}")), probe(auc)))
            .collect();
        let three = row(&evaluation, &variant, &results);
        let pretrained = &three["pretrained"];
        assert!((pretrained["auc"].as_f64().unwrap() - 0.8).abs() < 1e-12);
        assert!((pretrained["auc_std"].as_f64().unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(pretrained["acc_std"], 0.0);
        assert_eq!(pretrained["per_pretraining_seed"][2]["auc"], 0.9);
        assert_eq!(three["random_init"]["auc"], 0.6);
        assert_eq!(three["pretraining_seeds"], json!([0, 1, 2]));
        assert_eq!(three["run_dirs"].as_array().unwrap().len(), 3);
        assert_eq!(metric(pretrained, "auc"), "0.800 ± 0.100");
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
        assert_eq!(sweep.evaluation.train, Some(tmp.path().join("data.npz")));
        assert_eq!(sweep.variants[1].set, ["stages.1.epochs=0"]);

        std::fs::write(&path, format!("pretraining_seeds = [1, 1]\n{text}")).unwrap();
        let err = SweepFile::load(&path).err().unwrap().to_string();
        assert!(err.contains("repeats a seed"), "{err}");
        std::fs::write(&path, text.replace("w/o mask", "FULL")).unwrap();
        let err = SweepFile::load(&path).err().unwrap().to_string();
        assert!(err.contains("same directory name"), "{err}");
        std::fs::write(&path, text.replace("\"linear\"", "\"ridge\"")).unwrap();
        let err = format!("{:#}", SweepFile::load(&path).err().unwrap());
        assert!(err.contains("evaluation.protocol"), "{err}");
        std::fs::write(&path, text.replace("\"linear\"", "\"finetune\"")).unwrap();
        let err = format!("{:#}", SweepFile::load(&path).err().unwrap());
        assert!(err.contains("needs `evaluation.config`"), "{err}");
        std::fs::write(tmp.path().join("seg.toml"), "classes = 3\n").unwrap();
        let finetune = text
            .replace("\"linear\"", "\"finetune\"\nconfig = \"seg.toml\"")
            .replace("train = \"data.npz\"\n", "")
            .replace("eval = \"data.npz\"\n", "");
        std::fs::write(&path, &finetune).unwrap();
        let sweep = SweepFile::load(&path).unwrap();
        assert_eq!(sweep.evaluation.config, Some(tmp.path().join("seg.toml")));
        assert_eq!(sweep.evaluation.train, None);
        std::fs::write(&path, finetune.replace("[evaluation]", "[evaluation]\nfolds = 5")).unwrap();
        let err = format!("{:#}", SweepFile::load(&path).err().unwrap());
        assert!(err.contains("`evaluation.folds` is for the probes"), "{err}");

        // A cross-validated probe says so in the table's header.
        std::fs::write(&path, text.replace("[evaluation]", "[evaluation]\nfolds = 5")).unwrap();
        let sweep = SweepFile::load(&path).unwrap();
        assert_eq!(sweep.evaluation.folds, Some(5));
        let md = markdown_table(&sweep, &[]);
        assert!(
            md.contains("5-fold stratified cross-validation") && md.contains("pooled"),
            "{md}"
        );
    }
}
