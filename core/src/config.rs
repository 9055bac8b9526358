//! Layered run configuration: built-in defaults < the TOML file < `MEDSSL_` environment
//! variables (`__` separates keys) < `--set a.b.c=value` overrides.
//!
//! A component section (`[encoder]`, `[objectives.NAME]`, `[data.sources.NAME]`, ...) holds
//! a `name` (or `format` for datasets) that picks the registered component, and that
//! component's own keys. Those keys are parsed by the component into its serde config struct
//! (`deny_unknown_fields`, defaults for every key); errors name the key, the offending value
//! and where the value came from (file, environment variable or `--set`).

use anyhow::{anyhow, bail, Context, Result};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use crate::section::{describe_error, section_of, Section};
use crate::section::{describe_value, nest};

/// The top level of a run config. Component sections stay raw here: each is parsed by the
/// component that its `name` selects.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Seed of everything random: initialisation, data order, augmentations.
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available, else CPU).
    pub device: String,
    /// The `[run]` table: where the run writes, how often, and its process settings.
    #[serde(rename = "run")]
    pub options: RunOptions,
    pub data: DataSection,
    pub encoder: Dict,
    #[serde(default)]
    pub aggregator: Option<Dict>,
    /// Objectives by key; stages refer to them by that key.
    pub objectives: BTreeMap<String, Dict>,
    pub optimizer: OptimizerConfig,
    pub stages: Vec<StageConfig>,
}

/// Where a run writes, and how often.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunOptions {
    /// Run directory; relative paths resolve against the config file's folder's `runs/`
    /// parent, i.e. the current directory. Overridden by `--run-dir`.
    pub dir: Option<PathBuf>,
    /// Log a metrics line every this many steps.
    pub log_every: usize,
    /// Write a checkpoint every this many steps (and always at the end of a stage).
    pub checkpoint_every: usize,
    /// How many checkpoints to keep (at least 1).
    pub keep_checkpoints: usize,
    /// CPU threads for libtorch's intra-op parallelism (0: libtorch's default).
    #[serde(deserialize_with = "threads")]
    pub threads: i32,
    /// Refuse a run in which a module with parameters is trained by no stage (it would stay
    /// at its random initialisation); without it the run starts with a warning.
    pub strict_training: bool,
    /// `[run.distributed]`: used when a launcher (torchrun, srun, mpirun) started several
    /// processes.
    pub distributed: crate::distributed::DistributedConfig,
    /// `fp32`, `bf16`, `fp16` or `fp64`: the kind of the run's activations (weights and
    /// optimizer state stay fp32, or f64 under `fp64`).
    pub precision: crate::precision::Precision,
    /// `auto` (dynamic loss scaling under fp16), `dynamic` or `off`.
    pub loss_scaling: crate::loss_scaling::LossScaling,
    /// Deterministic CUDA kernels (cuDNN and ATen), for bit-exact resumes on a GPU.
    pub deterministic: bool,
    /// cuDNN's benchmark mode: the fastest convolution algorithm per shape, not reproducible.
    pub cudnn_benchmark: bool,
    /// Also write TensorBoard event files (`RUN/tensorboard/`): every metrics.jsonl scalar
    /// and a few training views each epoch (`crate::tensorboard`).
    pub tensorboard: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            dir: None,
            log_every: 1,
            checkpoint_every: 50,
            keep_checkpoints: 2,
            threads: 0,
            strict_training: false,
            distributed: Default::default(),
            precision: Default::default(),
            loss_scaling: Default::default(),
            deterministic: false,
            cudnn_benchmark: false,
            tensorboard: false,
        }
    }
}

/// The data pipeline: sources, views and the loader.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Datasets by key; each has a `format` naming a registered dataset reader.
    pub sources: BTreeMap<String, Dict>,
    #[serde(default)]
    pub views: crate::views::ViewConfig,
    #[serde(default)]
    pub loader: crate::loader::LoaderConfig,
}

/// Optimizer and learning-rate schedule, shared by all stages unless a stage overrides it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// `sgd`, `lars` or `adamw`.
    #[serde(deserialize_with = "optimizer_name")]
    pub name: String,
    /// Peak learning rate, reached after warm-up.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    #[serde(deserialize_with = "non_negative")]
    pub final_lr: f64,
    #[serde(deserialize_with = "non_negative")]
    pub momentum: f64,
    #[serde(deserialize_with = "non_negative")]
    pub weight_decay: f64,
    /// Adam's betas.
    #[serde(deserialize_with = "betas")]
    pub betas: [f64; 2],
    #[serde(deserialize_with = "positive")]
    pub eps: f64,
    /// AdamW's AMSGrad variant (Reddi et al., ICLR 2018): the denominator uses the running
    /// maximum of the second moment (`torch.optim.AdamW(amsgrad=True)`, VoCo's optimizer).
    pub amsgrad: bool,
    /// LARS trust coefficient.
    #[serde(deserialize_with = "positive")]
    pub trust_coefficient: f64,
    /// Linear warm-up length, in epochs (fractions allowed).
    #[serde(deserialize_with = "non_negative")]
    pub warmup_epochs: f64,
    /// Clip the global gradient norm to this value (0: no clipping).
    #[serde(deserialize_with = "non_negative")]
    pub clip_grad_norm: f64,
}

/// One of the optimizers `optim.rs` implements, checked as the config is read so that the
/// error names the layer the name came from.
fn optimizer_name<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if crate::optim::RULES.contains(&name.as_str()) {
        Ok(name)
    } else {
        Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Str(&name),
            &format!("one of: {}", crate::optim::RULES.join(", ")).as_str(),
        ))
    }
}

/// A finite number `>= 0`: a negative weight decay or warm-up is a typo, never a setting.
fn non_negative<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Float(v),
            &"a finite number >= 0",
        ))
    }
}

/// A finite number `> 0`.
fn positive<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Float(v),
            &"a finite number > 0",
        ))
    }
}

/// Adam's two betas, each in [0, 1).
fn betas<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<[f64; 2], D::Error> {
    let v = <[f64; 2]>::deserialize(d)?;
    match v.iter().find(|b| !(0.0..1.0).contains(*b)) {
        None => Ok(v),
        Some(&b) => Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Float(b),
            &"two betas, each in [0, 1)",
        )),
    }
}

/// libtorch's thread count: 0 (its default) or more.
fn threads<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<i32, D::Error> {
    let v = i32::deserialize(d)?;
    if v >= 0 {
        Ok(v)
    } else {
        Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Signed(v.into()),
            &"a number of threads, 0 (libtorch's default) or more",
        ))
    }
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            name: "adamw".into(),
            lr: 1e-3,
            final_lr: 0.0,
            momentum: 0.9,
            weight_decay: 1e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            amsgrad: false,
            trust_coefficient: 0.001,
            warmup_epochs: 0.0,
            clip_grad_norm: 0.0,
        }
    }
}

/// One training stage: which modules learn and which objectives, with which weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    pub epochs: usize,
    /// Modules whose parameters are optimised in this stage: `encoder`, `aggregator`.
    /// The others are frozen (not in the optimizer, batch norm in eval mode). An active
    /// objective's own parameters (projectors, prototypes) always learn.
    pub train: Vec<String>,
    /// Objective key (from `[objectives]`) to loss weight.
    pub objectives: BTreeMap<String, f64>,
    /// Overrides of `[optimizer]` keys for this stage.
    #[serde(default)]
    pub optimizer: Option<Dict>,
    /// Keys of the `[data.sources]` this stage draws from (default: all), e.g. 2D images and
    /// slices for stage 1, volumes for stage 3.
    #[serde(default)]
    pub sources: Option<Vec<String>>,
    /// Batch size of this stage (default: `data.loader.batch_size`), e.g. fewer volumes a
    /// batch in the stages that run the aggregator than 2D images in stage 1.
    #[serde(default)]
    pub batch_size: Option<usize>,
}

/// A loaded config: the merged layers, the typed top level and where the file was.
#[derive(Clone)]
pub struct LoadedConfig {
    pub figment: Figment,
    pub run: RunConfig,
}

/// Built-in defaults of the top level; component defaults come from their own structs.
fn builtin_defaults() -> Value {
    let table: toml::Table = toml::from_str(
        r#"
        seed = 0
        device = "cpu"
        objectives = {}
        stages = []
        [run]
        [data]
        sources = {}
        [optimizer]
        "#,
    )
    .expect("built-in defaults are valid TOML");
    Value::serialize(table).expect("built-in defaults serialise")
}

/// Parses one `--set key=value`: the value is read as a TOML value when it parses as one
/// (numbers, booleans, arrays, quoted strings), else taken as a bare string.
pub fn parse_override(raw: &str) -> Result<(String, Value)> {
    let (key, value) = raw
        .split_once('=')
        .ok_or_else(|| anyhow!("--set `{raw}`: expected KEY=VALUE, e.g. --set optimizer.lr=0.01"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|part| part.is_empty()) {
        bail!("--set `{raw}`: the key `{key}` is not a dotted key like `optimizer.lr`");
    }
    let value = value.trim();
    let parsed: Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(table) => Value::serialize(&table["v"]).map_err(|e| anyhow!("--set `{raw}`: {e}"))?,
        Err(_) => Value::from(value.to_string()),
    };
    Ok((key.to_string(), parsed))
}

/// Replaces the value at `path` (table keys and array indices) inside `value`.
fn set_path(value: &mut Value, path: &[&str], new: Value) -> Result<()> {
    let Some((first, rest)) = path.split_first() else {
        *value = new;
        return Ok(());
    };
    match value {
        Value::Array(_, items) => {
            let len = items.len();
            let index: usize = first
                .parse()
                .map_err(|_| anyhow!("`{first}` is not an index into an array"))?;
            let item = items
                .get_mut(index)
                .ok_or_else(|| anyhow!("index {index} is out of range: the array has {len} element(s)"))?;
            set_path(item, rest, new)
        }
        Value::Dict(_, dict) => {
            if rest.is_empty() {
                dict.insert(first.to_string(), new);
                return Ok(());
            }
            let entry = dict
                .entry(first.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            set_path(entry, rest, new)
        }
        other => bail!("cannot set `{first}` inside {}", describe_value(other)),
    }
}

/// A `--set` layer, named so that errors say which override a value came from.
struct Override {
    raw: String,
    dict: Dict,
}

impl figment::Provider for Override {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(format!("command-line override `--set {}`", self.raw))
    }
    fn data(&self) -> figment::Result<figment::value::Map<figment::Profile, Dict>> {
        Ok(figment::Profile::Default.collect(self.dict.clone()))
    }
}

impl LoadedConfig {
    /// Loads `path` with the environment and `--set` layers on top.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        Self::from_figment(layered(path, builtin_defaults(), overrides)?)
    }

    /// Loads a config that a run directory saved (already resolved: no env, no overrides).
    pub fn load_resolved(path: &Path) -> Result<Self> {
        if !path.is_file() {
            bail!("`{}` is missing: is this a medssl run directory?", path.display());
        }
        let figment = Figment::new()
            .merge(Serialized::defaults(builtin_defaults()))
            .merge(Toml::file_exact(path));
        Self::from_figment(figment)
    }

    fn from_figment(figment: Figment) -> Result<Self> {
        let run: RunConfig = figment.extract().map_err(|e| describe_error(&figment, e, ""))?;
        Ok(LoadedConfig { figment, run })
    }

    /// The component section at dotted `key`, whose component is picked by `selector`
    /// (`name` for models and objectives, `format` for datasets).
    pub fn section(&self, key: &str, selector: &'static str) -> Result<Section> {
        section_of(&self.figment, key, selector)
    }

    /// Parses the value at dotted `key` into `T`, with errors that name the key's source.
    pub fn extract<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.figment
            .extract_inner(key)
            .map_err(|e| describe_error(&self.figment, e, ""))
    }

    /// The whole resolved config, with every selected component's defaults filled in, as
    /// TOML: what the run directory keeps.
    pub fn resolved_toml(&self, filled: &[(String, toml::Value)]) -> Result<String> {
        resolved_toml_of(&self.figment, filled)
    }
}

/// The keys whose values differ between two resolved configs, as `key: old -> new`, leaving
/// out the keys under the prefixes in `free` (e.g. `run.`: where and how often a run writes).
/// What resume checks before it continues a run under a `config.toml` edited since.
pub fn changed_keys(before: &str, after: &str, free: &[&str]) -> Result<Vec<String>> {
    fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(table) => {
                for (k, v) in table {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let parse = |text: &str| -> Result<BTreeMap<String, String>> {
        let value: toml::Value = toml::from_str(text).context("a resolved config that is not TOML")?;
        let mut flat = BTreeMap::new();
        flatten("", &value, &mut flat);
        flat.retain(|k, _| !free.iter().any(|f| k.starts_with(f)));
        Ok(flat)
    };
    let (before, after) = (parse(before)?, parse(after)?);
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    Ok(keys
        .into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(absent)".into());
            format!("`{k}` {} -> {}", show(before.get(k)), show(after.get(k)))
        })
        .collect())
}

/// The whole config of `figment` with `filled` (component sections with their defaults)
/// laid in at their dotted keys, as TOML.
pub fn resolved_toml_of(figment: &Figment, filled: &[(String, toml::Value)]) -> Result<String> {
    let mut root: toml::Table = figment.extract().map_err(|e| describe_error(figment, e, ""))?;
    for (key, value) in filled {
        let mut table = &mut root;
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        for part in parts {
            table = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| anyhow!("config key `{key}` is not a table"))?;
        }
        table.insert(last.to_string(), value.clone());
    }
    Ok(toml::to_string_pretty(&root)?)
}

/// `MEDSSL_` environment variables that are no config key, left out of the config's
/// environment layer: `MEDSSL_TEST_DEVICE` picks the device of the device-aware tests
/// ([`crate::device::test_device`]), `MEDSSL_CUDA_INCLUDE` and `MEDSSL_REQUIRE_NCCL` steer
/// the build of medssl-torch-ext and its tests. A shell or a test run that sets them (as
/// `scripts/gpu-check` does) would otherwise refuse every config for an unknown top-level key.
const NOT_CONFIG_KEYS: &[&str] = &["test_device", "cuda_include", "require_nccl"];

/// The layers of the config file `path`: `defaults` < the file < `MEDSSL_` environment
/// variables (`__` separates keys) < each `--set KEY=VALUE` in `overrides`, in order.
pub fn layered(path: &Path, defaults: Value, overrides: &[String]) -> Result<Figment> {
    if !path.is_file() {
        bail!("config file `{}` does not exist or is not a file", path.display());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read config file `{}`", path.display()))?;
    if let Err(e) = toml::from_str::<toml::Table>(&text) {
        bail!("config file `{}` is not valid TOML: {e}", path.display());
    }
    let mut figment = Figment::new()
        .merge(Serialized::defaults(defaults))
        .merge(Toml::file_exact(path))
        .merge(
            Env::prefixed("MEDSSL_")
                .ignore(NOT_CONFIG_KEYS)
                .split("__")
                .map(|k| k.as_str().to_lowercase().into()),
        );
    for raw in overrides {
        let (key, value) = parse_override(raw)?;
        let dict = if key.split('.').any(|part| part.parse::<usize>().is_ok()) {
            // An array element (`stages.0.epochs`): figment merges arrays whole, so the
            // override carries the whole top-level value with the element replaced.
            let top = key.split('.').next().unwrap_or_default();
            let mut current = figment
                .find_value(top)
                .map_err(|_| anyhow!("--set `{raw}`: the config has no `{top}` to index into"))?;
            let rest: Vec<&str> = key.split('.').skip(1).collect();
            set_path(&mut current, &rest, value).map_err(|e| anyhow!("--set `{raw}`: {e}"))?;
            nest(top, current)
        } else {
            nest(&key, value)
        };
        figment = figment.merge(Override { raw: raw.clone(), dict });
    }
    Ok(figment)
}
