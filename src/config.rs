//! models.toml: the deployment (models, where their weights live, how they are placed on
//! devices, which tiers each serves), parsed and validated once at start so that every
//! mistake is reported with the file it came from instead of surfacing mid-request.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The models.toml shipped in the repository, used when no file is found or named.
pub const BUILTIN_MODELS_TOML: &str = include_str!("../models.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config {origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("unknown layout '{name}' (layouts in {origin}: {known})")]
    UnknownLayout {
        name: String,
        origin: String,
        known: String,
    },
    #[error("no layout of {origin} can run here:\n{reasons}")]
    NoUsableLayout { origin: String, reasons: String },
}

/// A request's complexity tier, as the router assigns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Simple,
    Moderate,
    Complex,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Simple => "SIMPLE",
            Tier::Moderate => "MODERATE",
            Tier::Complex => "COMPLEX",
        })
    }
}

/// Where a model runs: one GPU, or one CPU worker with its own share of the cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceSpec {
    Cpu(usize),
    Cuda(usize),
}

impl DeviceSpec {
    pub fn is_cuda(&self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu(n) => write!(f, "cpu:{n}"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, idx) = s.split_once(':').unwrap_or((s, "0"));
        let idx: usize = idx
            .parse()
            .map_err(|_| format!("bad device '{s}': expected cpu:N or cuda:N"))?;
        match kind {
            "cpu" => Ok(DeviceSpec::Cpu(idx)),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(idx)),
            _ => Err(format!("bad device '{s}': expected cpu:N or cuda:N")),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One model: a GGUF file in the hf-hub cache (`repo` + `file`) or on disk (`path`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub repo: Option<String>,
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// An embedding model (served by /api/embed, /api/embeddings and /v1/embeddings, on
/// the CPU, in every layout): a sentence-transformers folder from the hf-hub cache
/// (`repo`) or on disk (`path`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    #[serde(default)]
    pub repo: Option<String>,
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// One model placed on one device in a layout.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub model: String,
    pub device: DeviceSpec,
    #[serde(default)]
    pub tiers: Vec<Tier>,
    /// Threads for a CPU device; 0 (the default) shares the cores out evenly.
    #[serde(default)]
    pub threads: usize,
    /// Memory for the model's KV cache blocks in MiB; unset: room for `--parallel`
    /// sequences of the default num_ctx. Sequences beyond what fits wait or are
    /// preempted and resumed; a request's num_ctx is capped to what fits.
    #[serde(default)]
    pub kv_cache_mib: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub place: Vec<Placement>,
    /// Tier → models to try in order (the first available one serves). When absent, a
    /// tier goes to the models placed for it, then to the layout's other models.
    #[serde(default)]
    pub route: BTreeMap<Tier, Vec<String>>,
}

impl Layout {
    /// The ordered fallback chain of a tier.
    pub fn chain(&self, tier: Tier) -> Vec<String> {
        if let Some(list) = self.route.get(&tier) {
            return list.clone();
        }
        let mut chain: Vec<String> = self
            .place
            .iter()
            .filter(|p| p.tiers.contains(&tier))
            .map(|p| p.model.clone())
            .collect();
        for p in &self.place {
            if !chain.contains(&p.model) {
                chain.push(p.model.clone());
            }
        }
        chain
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_layout")]
    layout: String,
    #[serde(default)]
    prefer: Vec<String>,
    models: BTreeMap<String, ModelSpec>,
    #[serde(default)]
    embeddings: BTreeMap<String, EmbeddingSpec>,
    #[serde(default)]
    layouts: BTreeMap<String, Layout>,
    #[serde(default)]
    routing: Routing,
}

/// The router's configuration: which names are routed and the classifier's rules.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Model names that mean "pick the model for me", besides "auto".
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Tier when no rule or signal fires.
    #[serde(default = "default_tier")]
    pub default_tier: Tier,
    /// A SIMPLE decision with less confidence than this goes to MODERATE.
    #[serde(default)]
    pub escalate_below: f32,
    #[serde(default)]
    pub signals: Signals,
    /// Phrase rules; when a models.toml has none, the built-in ones apply.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Which classifier decides: the learned head over embeddings (default), or the
    /// phrase rules alone. The learned one falls back to the rules, with a logged
    /// reason, while its embedding model is loading or unavailable.
    #[serde(default)]
    pub classifier: ClassifierKind,
    /// The learned classifier's head (a JSON file written by scripts/train-router);
    /// relative to models.toml. Absent: the head built into the binary.
    #[serde(default)]
    pub head: Option<PathBuf>,
    /// The embedding model (a name under [embeddings]) the head reads.
    #[serde(default = "default_router_embedding")]
    pub embedding: String,
    /// Append every routing decision to this JSONL file (relative to the working
    /// folder; DUET_ROUTING_LOG overrides it).
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Confidence-driven escalation: unsure decisions are drafted by the fast model.
    #[serde(default)]
    pub draft: Option<DraftPolicy>,
    /// Generation policy per tier for routed requests (a system hint, a num_predict cap).
    #[serde(default)]
    pub tiers: TierPolicies,
}

/// Which classifier routes requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassifierKind {
    #[default]
    Learned,
    Rules,
}

fn default_router_embedding() -> String {
    "all-minilm".to_string()
}

/// The signal computed over the fast model's draft that decides whether to keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftSignal {
    /// Mean log-probability of the generated tokens (kept when >= threshold).
    MeanLogprob,
    /// Lowest log-probability of a generated token (kept when >= threshold).
    MinLogprob,
    /// Mean entropy of the top-20 distribution (kept when <= threshold).
    MeanEntropy,
    /// The quality model audits the draft: it reads the prompt and the draft in one
    /// pass (a prefill, no decoding) and the draft's lowest token log-probability under
    /// it decides (kept when >= threshold). The prompt's blocks stay in its prefix cache
    /// for an escalation.
    AuditMinLogprob,
    /// As `audit_min_logprob`, with the mean log-probability of the draft's tokens.
    AuditMeanLogprob,
}

impl DraftSignal {
    /// Whether the quality model computes the signal (an audit of the draft).
    pub fn is_audit(self) -> bool {
        matches!(self, Self::AuditMinLogprob | Self::AuditMeanLogprob)
    }
}

/// Draft then audit: a routed request whose decision is MODERATE or COMPLEX with a
/// confidence below `below` is answered by the SIMPLE tier's model first; the answer is
/// returned when `signal` passes `threshold`, else the request re-runs on its tier's model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DraftPolicy {
    pub below: f32,
    pub signal: DraftSignal,
    pub threshold: f32,
}

/// Generation policy of routed requests, per tier.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierPolicies {
    pub simple: Option<TierPolicy>,
    pub moderate: Option<TierPolicy>,
    pub complex: Option<TierPolicy>,
}

impl TierPolicies {
    pub fn of(&self, t: Tier) -> Option<&TierPolicy> {
        match t {
            Tier::Simple => self.simple.as_ref(),
            Tier::Moderate => self.moderate.as_ref(),
            Tier::Complex => self.complex.as_ref(),
        }
    }
}

/// What a routed request of a tier gets when the client did not set it: a system
/// message (only when the request has none) and a num_predict cap (only when the client
/// set no num_predict / max_tokens).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierPolicy {
    pub system: Option<String>,
    pub num_predict: Option<i32>,
}

/// The classifier's rules are the routing section itself.
pub type RoutingRules = Routing;

fn default_tier() -> Tier {
    Tier::Moderate
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            aliases: Vec::new(),
            default_tier: default_tier(),
            escalate_below: 0.0,
            signals: Signals::default(),
            rules: Vec::new(),
            classifier: ClassifierKind::default(),
            head: None,
            embedding: default_router_embedding(),
            log: None,
            draft: None,
            tiers: TierPolicies::default(),
        }
    }
}

/// Weights and thresholds of the non-phrase signals (see router::classifier).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Signals {
    /// Attached code at least this long adds `code_weight` to MODERATE…
    pub long_code_lines: usize,
    /// …and at least this long, to COMPLEX instead.
    pub huge_code_lines: usize,
    pub code_weight: f32,
    /// A conversation of at least this many messages adds `turns_weight` to MODERATE.
    pub many_turns: usize,
    pub turns_weight: f32,
    /// num_predict at most this adds `answer_weight` to SIMPLE…
    pub short_answer_tokens: i32,
    /// …and at least this, to COMPLEX.
    pub long_answer_tokens: i32,
    pub answer_weight: f32,
    /// Rule weights found in the system prompt count this much.
    pub system_factor: f32,
}

impl Default for Signals {
    fn default() -> Self {
        Self {
            long_code_lines: 40,
            huge_code_lines: 200,
            code_weight: 1.0,
            many_turns: 6,
            turns_weight: 0.5,
            short_answer_tokens: 64,
            long_answer_tokens: 1024,
            answer_weight: 1.0,
            system_factor: 0.5,
        }
    }
}

/// Phrases that, found in what is asked, count `weight` toward `tier`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub tier: Tier,
    pub weight: f32,
    pub phrases: Vec<String>,
    /// When this rule fires, its tier decides outright, whatever the learned
    /// classifier says (the operator's override layer).
    #[serde(default, rename = "override")]
    pub force: bool,
}

fn default_layout() -> String {
    "auto".to_string()
}

/// The validated deployment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (a path, or "built-in models.toml"), for error messages.
    pub origin: String,
    /// Directory that relative `path`s are resolved against.
    pub base_dir: PathBuf,
    pub layout: String,
    pub prefer: Vec<String>,
    pub models: BTreeMap<String, ModelSpec>,
    pub embeddings: BTreeMap<String, EmbeddingSpec>,
    pub layouts: BTreeMap<String, Layout>,
    pub routing: Routing,
}

impl Config {
    /// Loads `explicit` if given, else `./models.toml` if present, else the built-in copy.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from("models.toml")).filter(|p| p.is_file()),
        };
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
                    path: path.clone(),
                    source,
                })?;
                let base = path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."));
                Self::parse(&text, &path.display().to_string(), base)
            }
            None => Self::parse(
                BUILTIN_MODELS_TOML,
                "built-in models.toml",
                PathBuf::from("."),
            ),
        }
    }

    pub fn parse(text: &str, origin: &str, base_dir: PathBuf) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        let mut raw = raw;
        if raw.routing.rules.is_empty() && text != BUILTIN_MODELS_TOML {
            // A deployment that does not write its own rules gets the built-in ones.
            if let Ok(builtin) = toml::from_str::<RawConfig>(BUILTIN_MODELS_TOML) {
                let own = std::mem::replace(&mut raw.routing, builtin.routing);
                let r = &mut raw.routing;
                r.aliases = own.aliases;
                r.classifier = own.classifier;
                r.head = own.head;
                r.embedding = own.embedding;
                r.log = own.log;
                r.draft = own.draft.or(r.draft.take());
                if own.tiers.simple.is_some()
                    || own.tiers.moderate.is_some()
                    || own.tiers.complex.is_some()
                {
                    r.tiers = own.tiers;
                }
            }
        }
        let cfg = Config {
            origin: origin.to_string(),
            base_dir,
            layout: raw.layout,
            prefer: raw.prefer,
            models: raw.models,
            embeddings: raw.embeddings,
            layouts: raw.layouts,
            routing: raw.routing,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.clone(),
            message,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.models.is_empty() {
            return Err(self.invalid("no [models.\"NAME\"] entries".into()));
        }
        let mut names: BTreeSet<&str> = BTreeSet::new();
        for (name, spec) in &self.models {
            if name.trim().is_empty() {
                return Err(self.invalid("a model has an empty name".into()));
            }
            if spec.path.is_none() && (spec.repo.is_none() || spec.file.is_none()) {
                return Err(self.invalid(format!(
                    "model '{name}' needs either `path` or both `repo` and `file`"
                )));
            }
            names.insert(name);
        }
        for (name, spec) in &self.embeddings {
            if name.trim().is_empty() {
                return Err(self.invalid("an embedding model has an empty name".into()));
            }
            if spec.path.is_none() && spec.repo.is_none() {
                return Err(
                    self.invalid(format!("embedding model '{name}' needs `path` or `repo`"))
                );
            }
            if !names.insert(name) {
                return Err(self.invalid(format!(
                    "embedding model '{name}' has the name of a chat model"
                )));
            }
        }
        let aliases = self
            .models
            .iter()
            .map(|(n, s)| (n, &s.aliases))
            .chain(self.embeddings.iter().map(|(n, s)| (n, &s.aliases)));
        for (name, aliases) in aliases {
            for alias in aliases {
                if !names.insert(alias) {
                    return Err(self.invalid(format!(
                        "alias '{alias}' of model '{name}' is already a model name or another alias"
                    )));
                }
            }
        }
        for alias in std::iter::once(&"auto".to_string()).chain(&self.routing.aliases) {
            if !names.insert(alias) {
                return Err(self.invalid(format!(
                    "routed name '{alias}' is already a model name or alias"
                )));
            }
        }
        let r = &self.routing;
        if !(0.0..=1.0).contains(&r.escalate_below) {
            return Err(self.invalid("routing.escalate_below must be between 0 and 1".into()));
        }
        if let Some(d) = &r.draft {
            if !(0.0..=1.0).contains(&d.below) || !d.threshold.is_finite() {
                return Err(self.invalid(
                    "routing.draft: below must be between 0 and 1 and threshold a number".into(),
                ));
            }
        }
        for (t, p) in [Tier::Simple, Tier::Moderate, Tier::Complex]
            .into_iter()
            .filter_map(|t| r.tiers.of(t).map(|p| (t, p)))
        {
            if p.num_predict.is_some_and(|n| n <= 0) {
                return Err(self.invalid(format!(
                    "routing.tiers.{}: num_predict must be positive",
                    t.to_string().to_lowercase()
                )));
            }
        }
        for rule in &r.rules {
            if rule.name.trim().is_empty() {
                return Err(self.invalid("a routing rule has no name".into()));
            }
            if !rule.weight.is_finite() || rule.weight <= 0.0 {
                return Err(self.invalid(format!(
                    "routing rule '{}': weight must be a positive number",
                    rule.name
                )));
            }
            if rule.phrases.is_empty() || rule.phrases.iter().any(|p| p.trim().is_empty()) {
                return Err(self.invalid(format!(
                    "routing rule '{}': phrases must be a non-empty list of non-empty strings",
                    rule.name
                )));
            }
        }
        for (lname, layout) in &self.layouts {
            for (tier, list) in &layout.route {
                if list.is_empty() {
                    return Err(self.invalid(format!(
                        "layout '{lname}': the model list of tier {tier} is empty"
                    )));
                }
                for m in list {
                    if !layout.place.iter().any(|p| &p.model == m) {
                        return Err(self.invalid(format!(
                            "layout '{lname}': tier {tier} lists model '{m}', which the layout does not place"
                        )));
                    }
                }
            }
        }
        for (lname, layout) in &self.layouts {
            if lname == "auto" {
                return Err(self.invalid("'auto' is reserved and cannot name a layout".into()));
            }
            if layout.place.is_empty() {
                return Err(self.invalid(format!("layout '{lname}' places no model")));
            }
            let mut seen = BTreeSet::new();
            for p in &layout.place {
                if !self.models.contains_key(&p.model) {
                    return Err(self.invalid(format!(
                        "layout '{lname}' places unknown model '{}' (known: {})",
                        p.model,
                        self.models.keys().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                if !seen.insert(&p.model) {
                    return Err(
                        self.invalid(format!("layout '{lname}' places model '{}' twice", p.model))
                    );
                }
                if p.threads != 0 && p.device.is_cuda() {
                    return Err(self.invalid(format!(
                        "layout '{lname}': `threads` only applies to cpu devices, not {}",
                        p.device
                    )));
                }
            }
        }
        for name in self.prefer.iter().chain(std::iter::once(&self.layout)) {
            if name != "auto" && !self.layouts.contains_key(name) {
                return Err(self.invalid(format!("layout '{name}' is named but not defined")));
            }
        }
        Ok(())
    }

    /// The canonical model name for a name or alias.
    pub fn canonical_name<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if let Some((k, _)) = self.models.get_key_value(name) {
            return Some(k.as_str());
        }
        self.models
            .iter()
            .find(|(_, s)| s.aliases.iter().any(|a| a == name))
            .map(|(k, _)| k.as_str())
    }

    pub fn layout_names(&self) -> String {
        self.layouts.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// Picks the layout to run. `requested` (flag or DUET_LAYOUT) overrides the file's
    /// `layout`; "auto" walks `prefer` (or every layout) and takes the first one for which
    /// `usable` reports no problem. Returns the name and one warning per skipped layout.
    pub fn choose_layout(
        &self,
        requested: Option<&str>,
        usable: impl Fn(&Layout) -> Result<(), String>,
    ) -> Result<(String, Vec<String>), ConfigError> {
        let wanted = requested.unwrap_or(&self.layout);
        if wanted != "auto" {
            if !self.layouts.contains_key(wanted) {
                return Err(ConfigError::UnknownLayout {
                    name: wanted.to_string(),
                    origin: self.origin.clone(),
                    known: self.layout_names(),
                });
            }
            return Ok((wanted.to_string(), Vec::new()));
        }
        let order: Vec<&String> = if self.prefer.is_empty() {
            self.layouts.keys().collect()
        } else {
            self.prefer.iter().collect()
        };
        let mut skipped = Vec::new();
        for name in order {
            let Some(layout) = self.layouts.get(name) else {
                continue;
            };
            match usable(layout) {
                Ok(()) => return Ok((name.clone(), skipped)),
                Err(why) => skipped.push(format!("layout '{name}' skipped: {why}")),
            }
        }
        Err(ConfigError::NoUsableLayout {
            origin: self.origin.clone(),
            reasons: skipped.join("\n"),
        })
    }

    /// Threads a CPU placement gets: its own `threads`, else an even share of `cores`
    /// among the layout's CPU devices (at least one each).
    pub fn cpu_threads(layout: &Layout, placement: &Placement, cores: usize) -> usize {
        if placement.threads > 0 {
            return placement.threads;
        }
        let cpu_devices: BTreeSet<DeviceSpec> = layout
            .place
            .iter()
            .filter(|p| !p.device.is_cuda())
            .map(|p| p.device)
            .collect();
        (cores / cpu_devices.len().max(1)).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", PathBuf::from("."))
    }

    #[test]
    fn builtin_config_is_valid_and_has_both_layouts() {
        let cfg = parse(BUILTIN_MODELS_TOML).unwrap();
        let gpu = &cfg.layouts["gpu"];
        assert_eq!(gpu.place[0].model, "qwen2.5-coder:1.5b");
        assert_eq!(gpu.place[0].device, DeviceSpec::Cuda(0));
        assert_eq!(gpu.place[1].model, "qwen2.5-coder:7b-instruct-q8_0");
        assert_eq!(gpu.place[1].tiers, vec![Tier::Moderate, Tier::Complex]);
        let cpu = &cfg.layouts["cpu"];
        assert_eq!(cpu.place[0].device, DeviceSpec::Cpu(0));
        assert_eq!(cpu.place[1].device, DeviceSpec::Cpu(1));
        assert_ne!(cpu.place[0].model, cpu.place[1].model);
    }

    #[test]
    fn device_specs_parse() {
        assert_eq!("cuda:1".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(1)));
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu(0)));
        assert!("tpu:0".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn bad_configs_give_clear_errors() {
        let cases = [
            ("models = 3", "invalid type"),
            ("[models.a]\nrepo = \"x\"\n", "needs either `path`"),
            (
                "[models.a]\npath = \"a.gguf\"\n[[layouts.l.place]]\nmodel = \"b\"\ndevice = \"cpu:0\"\n",
                "unknown model 'b'",
            ),
            (
                "[models.a]\npath = \"a.gguf\"\n[[layouts.l.place]]\nmodel = \"a\"\ndevice = \"tpu:0\"\n",
                "bad device 'tpu:0'",
            ),
            (
                "[models.a]\npath = \"a.gguf\"\n[[layouts.l.place]]\nmodel = \"a\"\ndevice = \"cpu:0\"\ntiers = [\"hard\"]\n",
                "unknown variant `hard`",
            ),
            ("[models.a]\npath = \"a.gguf\"\ncolour = 1\n", "unknown field `colour`"),
            ("layout = \"nope\"\n[models.a]\npath = \"a.gguf\"\n", "layout 'nope'"),
            (
                "[models.a]\npath = \"a.gguf\"\naliases = [\"b\"]\n[models.b]\npath = \"b.gguf\"\n",
                "alias 'b'",
            ),
            ("[models.a]\npath = \"a.gguf\"\n[layouts.l]\nplace = []\n", "places no model"),
            ("this is not toml", "invalid config test.toml"),
            (
                "[models.a]\npath = \"a.gguf\"\n[[routing.rules]]\nname = \"r\"\ntier = \"trivial\"\nweight = 1.0\nphrases = [\"x\"]\n",
                "unknown variant `trivial`",
            ),
            (
                "[models.a]\npath = \"a.gguf\"\n[[routing.rules]]\nname = \"r\"\ntier = \"simple\"\nweight = 1.0\nphrases = []\n",
                "phrases must be a non-empty list",
            ),
            (
                "[models.a]\npath = \"a.gguf\"\n[[routing.rules]]\nname = \"r\"\ntier = \"simple\"\nweight = -1.0\nphrases = [\"x\"]\n",
                "weight must be a positive number",
            ),
            (
                "[models.a]\npath = \"a.gguf\"\n[layouts.l.route]\nsimple = [\"b\"]\n[[layouts.l.place]]\nmodel = \"a\"\ndevice = \"cpu:0\"\n",
                "tier SIMPLE lists model 'b'",
            ),
            (
                "[models.a]\npath = \"a.gguf\"\n[layouts.l.route]\ncomplex = []\n[[layouts.l.place]]\nmodel = \"a\"\ndevice = \"cpu:0\"\n",
                "tier COMPLEX is empty",
            ),
            (
                "[models.a]\npath = \"a.gguf\"\n[layouts.l.route]\nhard = [\"a\"]\n[[layouts.l.place]]\nmodel = \"a\"\ndevice = \"cpu:0\"\n",
                "unknown variant `hard`",
            ),
            (
                "[models.a]\npath = \"a.gguf\"\n[routing]\naliases = [\"a\"]\n",
                "routed name 'a'",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.contains("test.toml"), "{err}");
        }
    }

    #[test]
    fn aliases_resolve() {
        let cfg = parse(BUILTIN_MODELS_TOML).unwrap();
        assert_eq!(
            cfg.canonical_name("qwen2.5-coder:7b"),
            Some("qwen2.5-coder:7b-instruct-q8_0")
        );
        assert_eq!(
            cfg.canonical_name("qwen2.5-coder:0.5b"),
            Some("qwen2.5-coder:0.5b")
        );
        assert_eq!(cfg.canonical_name("llama3"), None);
    }

    #[test]
    fn auto_layout_falls_back_with_a_warning() {
        let cfg = parse(BUILTIN_MODELS_TOML).unwrap();
        let (name, warnings) = cfg
            .choose_layout(None, |l| {
                if l.place.iter().any(|p| p.device.is_cuda()) {
                    Err("no CUDA".into())
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert_eq!(name, "cpu");
        assert_eq!(warnings, vec!["layout 'gpu' skipped: no CUDA".to_string()]);
        let err = cfg
            .choose_layout(None, |_| Err("nothing".into()))
            .unwrap_err();
        assert!(err.to_string().contains("no layout"), "{err}");
        let err = cfg.choose_layout(Some("tpu"), |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("unknown layout 'tpu'"), "{err}");
        let (name, _) = cfg.choose_layout(Some("gpu"), |_| Err("x".into())).unwrap();
        assert_eq!(name, "gpu");
    }

    #[test]
    fn tier_chains_come_from_route_or_placements() {
        let cfg = parse(BUILTIN_MODELS_TOML).unwrap();
        let cpu = &cfg.layouts["cpu"];
        assert_eq!(
            cpu.chain(Tier::Simple),
            vec!["qwen2.5-coder:0.5b", "qwen2.5-coder:1.5b"]
        );
        assert_eq!(
            cpu.chain(Tier::Complex),
            vec!["qwen2.5-coder:1.5b", "qwen2.5-coder:0.5b"]
        );
        let mut derived = cpu.clone();
        derived.route.clear();
        assert_eq!(
            derived.chain(Tier::Moderate),
            vec!["qwen2.5-coder:1.5b", "qwen2.5-coder:0.5b"]
        );
        assert_eq!(
            derived.chain(Tier::Simple),
            vec!["qwen2.5-coder:0.5b", "qwen2.5-coder:1.5b"]
        );
    }

    #[test]
    fn a_config_without_rules_gets_the_built_in_ones() {
        let cfg =
            parse("[models.a]\npath = \"a.gguf\"\n[routing]\naliases = [\"pick\"]\n").unwrap();
        assert!(!cfg.routing.rules.is_empty());
        assert_eq!(cfg.routing.aliases, vec!["pick".to_string()]);
    }

    #[test]
    fn cpu_threads_share_the_cores() {
        let cfg = parse(BUILTIN_MODELS_TOML).unwrap();
        let cpu = &cfg.layouts["cpu"];
        assert_eq!(Config::cpu_threads(cpu, &cpu.place[0], 2), 1);
        assert_eq!(Config::cpu_threads(cpu, &cpu.place[1], 8), 4);
        assert_eq!(Config::cpu_threads(cpu, &cpu.place[1], 1), 1);
    }
}
