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
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The top level of a run config. Component sections stay raw here: each is parsed by the
/// component that its `name` selects.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Seed of everything random: initialisation, data order, augmentations.
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available, else CPU).
    pub device: String,
    pub run: RunSection,
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
pub struct RunSection {
    /// Run directory; relative paths resolve against the config file's folder's `runs/`
    /// parent, i.e. the current directory. Overridden by `--run-dir`.
    pub dir: Option<PathBuf>,
    /// Log a metrics line every this many steps.
    pub log_every: usize,
    /// Write a checkpoint every this many steps (and always at the end of a stage).
    pub checkpoint_every: usize,
    /// How many checkpoints to keep.
    pub keep_checkpoints: usize,
    /// CPU threads for libtorch's intra-op parallelism (0: libtorch's default).
    pub threads: i32,
    /// Refuse a run in which a module with parameters is trained by no stage (it would stay
    /// at its random initialisation); without it the run starts with a warning.
    pub strict_training: bool,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            dir: None,
            log_every: 1,
            checkpoint_every: 50,
            keep_checkpoints: 2,
            threads: 0,
            strict_training: false,
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
    pub name: String,
    /// Peak learning rate, reached after warm-up.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub final_lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Adam's betas.
    pub betas: [f64; 2],
    pub eps: f64,
    /// LARS trust coefficient.
    pub trust_coefficient: f64,
    /// Linear warm-up length, in epochs (fractions allowed).
    pub warmup_epochs: f64,
    /// Clip the global gradient norm to this value (0: no clipping).
    pub clip_grad_norm: f64,
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

/// Nests a dotted key's value: `a.b.c = v` becomes `{a: {b: {c: v}}}`.
fn nest(key: &str, value: Value) -> Dict {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut dict = Dict::new();
    dict.insert(last.to_string(), value);
    for part in parts.into_iter().rev() {
        let mut outer = Dict::new();
        outer.insert(part.to_string(), Value::from(dict));
        dict = outer;
    }
    dict
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

/// The component section at dotted `key` of `figment`, whose component is picked by
/// `selector` (`name` for models and objectives, `format` for datasets).
pub fn section_of(figment: &Figment, key: &str, selector: &'static str) -> Result<Section> {
    let value = figment
        .find_value(key)
        .map_err(|_| anyhow!("config: the section `[{key}]` is missing"))?;
    let Value::Dict(tag, mut dict) = value else {
        bail!("config: `{key}` must be a table with a `{selector}` key");
    };
    let name = match dict.remove(selector) {
        Some(Value::String(_, name)) => name,
        Some(other) => bail!(
            "config key `{key}.{selector}` must be a string naming a component, found {}",
            describe_value(&other)
        ),
        None => bail!("config section `[{key}]` has no `{selector}` key naming its component"),
    };
    Ok(Section {
        key: key.to_string(),
        name,
        body: Value::Dict(tag, dict),
        figment: figment.clone(),
        paths: Default::default(),
    })
}

/// A component section: the chosen component's name and its own keys, not yet parsed.
#[derive(Clone)]
pub struct Section {
    /// Dotted key of the section, for messages.
    pub key: String,
    /// The selected component.
    pub name: String,
    body: Value,
    figment: Figment,
    /// Paths this section's component resolved, by field: the run directory records them
    /// absolute, so `resume` finds the data from any working directory.
    paths: Rc<RefCell<BTreeMap<String, PathBuf>>>,
}

impl Section {
    /// A section built in code (tests, sweeps): the component `name` with `body` as its
    /// TOML keys.
    pub fn inline(key: &str, name: &str, body: &str) -> Result<Section> {
        let table: toml::Table = toml::from_str(body).with_context(|| format!("inline config of `{key}`"))?;
        let figment = Figment::from(Serialized::defaults(Value::serialize(nest(
            key,
            Value::serialize(table)?,
        ))?));
        let value = figment.find_value(key).unwrap_or_else(|_| Value::from(Dict::new()));
        Ok(Section {
            key: key.to_string(),
            name: name.to_string(),
            body: value,
            figment,
            paths: Default::default(),
        })
    }

    /// Moves `keys` out of this section into a new one with the same key and sources, for
    /// options that core reads beside a component's own (a data source's `weight`, ...).
    pub fn take(&mut self, keys: &[&str]) -> Section {
        let mut taken = Dict::new();
        if let Value::Dict(_, dict) = &mut self.body {
            for key in keys {
                if let Some(value) = dict.remove(*key) {
                    taken.insert(key.to_string(), value);
                }
            }
        }
        Section {
            body: Value::from(taken),
            paths: Default::default(),
            ..self.clone()
        }
    }

    /// Parses the section into the component's config struct. Missing keys take the
    /// struct's defaults; unknown keys and wrong types are errors naming the key, the value
    /// and its source.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.body).map_err(|e| {
            describe_error(&self.figment, e, &self.key).context(format!(
                "invalid config for `{}` in section `[{}]`",
                self.name, self.key
            ))
        })
    }

    /// The section as the run directory records it: the component's default config with
    /// the user's keys laid over it, the selector key, and every path the component resolved
    /// made absolute. Call it after building the component.
    pub fn resolved(&self, selector: &str, default_toml: &str) -> Result<toml::Value> {
        let mut table: toml::Table = toml::from_str(default_toml)
            .with_context(|| format!("default config of `{}` is not valid TOML", self.name))?;
        let user = toml::Value::try_from(&self.body).with_context(|| format!("section `[{}]`", self.key))?;
        if let toml::Value::Table(user) = user {
            overlay(&mut table, user);
        }
        for (field, path) in self.paths.borrow().iter() {
            table.insert(field.clone(), toml::Value::String(path.display().to_string()));
        }
        table.insert(selector.to_string(), toml::Value::String(self.name.clone()));
        Ok(toml::Value::Table(table))
    }

    /// Resolves the path in this section's key `field`: a relative path from a config file
    /// is relative to that file's folder; one from an environment variable or `--set` is
    /// relative to the working directory, as on any command line.
    pub fn resolve_path(&self, field: &str, path: &Path) -> PathBuf {
        let resolved = if path.is_absolute() {
            path.to_path_buf()
        } else {
            let key = format!("{}.{field}", self.key);
            let base = match self.figment.find_metadata(&key).and_then(|m| m.source.as_ref()) {
                Some(figment::Source::File(file)) => file.parent().map(Path::to_path_buf).unwrap_or_default(),
                _ => PathBuf::new(),
            };
            let joined = base.join(path);
            std::path::absolute(&joined).unwrap_or(joined)
        };
        self.paths.borrow_mut().insert(field.to_string(), resolved.clone());
        resolved
    }
}

/// Lays `top` over `base`, recursing into tables.
fn overlay(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => overlay(b, t),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

fn describe_value(value: &Value) -> String {
    match value {
        Value::String(_, s) => format!("the string \"{s}\""),
        Value::Char(_, c) => format!("the character '{c}'"),
        Value::Bool(_, b) => format!("the boolean {b}"),
        Value::Num(_, n) => format!("the number {:?}", n),
        Value::Empty(_, _) => "an empty value".into(),
        Value::Dict(_, _) => "a table".into(),
        Value::Array(_, _) => "an array".into(),
    }
}

/// Turns a figment error into one that names the full dotted key, the value found, what
/// was expected and which layer (file, environment variable, `--set`) supplied it.
pub fn describe_error(figment: &Figment, error: figment::Error, prefix: &str) -> anyhow::Error {
    use figment::error::Kind;
    let mut messages = Vec::new();
    for e in error {
        let mut path = e.path.clone();
        if let Kind::UnknownField(field, _) = &e.kind {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
        }
        let key = if prefix.is_empty() {
            path.join(".")
        } else if path.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", path.join("."))
        };
        let source = e
            .metadata
            .as_ref()
            .map(describe_source)
            .or_else(|| figment.find_metadata(&key).map(describe_source));
        let what = match &e.kind {
            Kind::UnknownField(field, expected) => format!(
                "unknown key `{field}`; expected one of: {}",
                expected.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
            ),
            Kind::MissingField(field) => format!("missing required key `{field}`"),
            Kind::InvalidType(actual, expected) => format!("found {actual}, expected {expected}"),
            Kind::InvalidValue(actual, expected) => format!("invalid value {actual}, expected {expected}"),
            other => other.to_string(),
        };
        let location = match source {
            Some(source) => format!(" (from {source})"),
            None => String::new(),
        };
        let key_text = if key.is_empty() {
            "top level".to_string()
        } else {
            format!("key `{key}`")
        };
        messages.push(format!("config {key_text}{location}: {what}"));
    }
    anyhow!(messages.join("\n"))
}

fn describe_source(metadata: &figment::Metadata) -> String {
    match &metadata.source {
        Some(figment::Source::File(path)) => format!("file `{}`", path.display()),
        Some(figment::Source::Custom(custom)) => custom.clone(),
        _ => metadata.name.to_string(),
    }
}
