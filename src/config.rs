//! Configurations, stored as TOML in the run spec and as JSON beside exported weights.
//!
//! Every field has a default, so a config file names only what it changes; unknown fields are
//! refused so a typo never silently falls back to a default.

use serde::{Deserialize, Serialize};

/// Which denoiser, and its shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "family", rename_all = "lowercase")]
pub enum ModelConfig {
    /// DiT with adaLN-Zero timestep modulation and cross-attention to text tokens.
    Dit(DitConfig),
    /// The AT-1 "transformer_latent_diffusion" layout (../shared/reference/at1-model.md).
    Tld(TldConfig),
}

/// Hand-written so errors name the field (`hidden: invalid type …`): serde's derived internally
/// tagged enums buffer their content and lose the path.
impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut value = serde_json::Value::deserialize(deserializer)?;
        // `model = "dit-tiny"`: a named configuration.
        if let Some(name) = value.as_str() {
            return ModelConfig::named(name).ok_or_else(|| {
                D::Error::custom(format!("unknown model `{name}`; named configs are {:?}", ModelConfig::NAMES))
            });
        }
        let obj = value.as_object_mut().ok_or_else(|| D::Error::custom("model config must be a table"))?;
        let family =
            obj.remove("family").ok_or_else(|| D::Error::custom("missing field `family` (\"dit\" or \"tld\")"))?;
        let fields = serde_json::Value::Object(obj.clone());
        let named = |r: Result<ModelConfig, serde_path_to_error::Error<serde_json::Error>>| {
            r.map_err(|e| D::Error::custom(format!("field `{}`: {}", e.path(), e.inner())))
        };
        match family.as_str() {
            Some("dit") => named(serde_path_to_error::deserialize(fields).map(ModelConfig::Dit)),
            Some("tld") => named(serde_path_to_error::deserialize(fields).map(ModelConfig::Tld)),
            _ => Err(D::Error::custom(format!("field `family`: expected \"dit\" or \"tld\", got {family}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DitConfig {
    pub latent_channels: i64,
    pub latent_size: i64,
    pub patch_size: i64,
    pub hidden: i64,
    pub depth: i64,
    pub heads: i64,
    pub mlp_ratio: f64,
    /// Width of each text-token embedding fed to cross-attention.
    pub text_dim: i64,
    /// Number of text tokens (the text encoder pads to this length).
    pub text_len: i64,
    /// Sinusoidal frequency features for the noise level.
    pub freq_dim: i64,
    /// What the network predicts: "velocity" (ε − x0) or "x0".
    pub prediction: Prediction,
    /// Transformer blocks over the text tokens before the denoiser reads them (0: none). A fixed
    /// text encoder's tokens are context-free; these let the model relate words to each other.
    pub text_refiner: i64,
    /// The MLPs' nonlinearity.
    pub mlp_activation: Activation,
}

impl Default for DitConfig {
    fn default() -> Self {
        DitConfig {
            latent_channels: 4,
            latent_size: 32,
            patch_size: 2,
            hidden: 384,
            depth: 6,
            heads: 6,
            mlp_ratio: 4.0,
            text_dim: 768,
            text_len: 77,
            freq_dim: 256,
            prediction: Prediction::Velocity,
            text_refiner: 0,
            mlp_activation: Activation::GeluTanh,
        }
    }
}

/// GELU as DiT has it (tanh approximation), or exact (erf). The two differ by < 1e-3 everywhere;
/// on the CPU the exact one's bf16 kernel (forward + backward) takes less than half the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    GeluTanh,
    Gelu,
}

impl Activation {
    /// The config file's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Activation::GeluTanh => "gelu-tanh",
            Activation::Gelu => "gelu",
        }
    }

    /// libtorch's `approximate` argument for `gelu`.
    pub fn gelu_approximation(self) -> &'static str {
        match self {
            Activation::GeluTanh => "tanh",
            Activation::Gelu => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    Velocity,
    X0,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TldConfig {
    pub embed_dim: i64,
    pub n_layers: i64,
    pub latent_channels: i64,
    pub latent_size: i64,
    pub patch_size: i64,
    pub noise_embed_dims: i64,
    pub text_emb_size: i64,
    pub mlp_multiplier: i64,
}

impl Default for TldConfig {
    /// AT-1 itself: 23,049,536 parameters.
    fn default() -> Self {
        TldConfig {
            embed_dim: 512,
            n_layers: 6,
            latent_channels: 4,
            latent_size: 32,
            patch_size: 2,
            noise_embed_dims: 128,
            text_emb_size: 768,
            mlp_multiplier: 4,
        }
    }
}

impl ModelConfig {
    /// Configurations by name: `dit-tiny` (the demo) up to `dit-1b`, and `tld-at1`.
    pub fn named(name: &str) -> Option<ModelConfig> {
        let dit = |hidden, depth, heads| ModelConfig::Dit(DitConfig { hidden, depth, heads, ..DitConfig::default() });
        Some(match name {
            // 6 latent channels: the demo autoencoder's 4-channel round trip loses the shape edges
            // the fidelity check looks for.
            "dit-tiny" => ModelConfig::Dit(DitConfig {
                latent_channels: 6,
                latent_size: 16,
                patch_size: 2,
                hidden: 128,
                depth: 4,
                heads: 2,
                text_dim: 64,
                text_len: 12,
                freq_dim: 64,
                // Two refiner blocks: with fewer, relations (which object is above/left) are not
                // learned reliably across seeds (BENCHMARKS.md, "Demo").
                text_refiner: 2,
                // Exact GELU: cheaper on the CPU than the tanh form, same fidelity over seeds.
                mlp_activation: Activation::Gelu,
                ..DitConfig::default()
            }),
            // The engine bake-off configuration (benchmark P1).
            "dit-bench" => dit(384, 6, 6),
            "dit-s" => dit(384, 12, 6),
            "dit-b" => dit(768, 12, 12),
            "dit-l" => dit(1024, 24, 16),
            "dit-xl" => dit(1152, 28, 16),
            "dit-1b" => dit(1280, 28, 20),
            "tld-at1" => ModelConfig::Tld(TldConfig::default()),
            _ => return None,
        })
    }

    pub const NAMES: &'static [&'static str] =
        &["dit-tiny", "dit-bench", "dit-s", "dit-b", "dit-l", "dit-xl", "dit-1b", "tld-at1"];

    pub fn latent_shape(&self) -> [i64; 3] {
        match self {
            ModelConfig::Dit(c) => [c.latent_channels, c.latent_size, c.latent_size],
            ModelConfig::Tld(c) => [c.latent_channels, c.latent_size, c.latent_size],
        }
    }

    /// Checks that the model takes latents of `shape` `[C, H, W]`: its own square size, or, for a
    /// `dit` on a bucketed dataset (`bucketed`), any grid of whole patches. AT-1's `tld` has
    /// fixed-size layers and takes its own size only.
    pub fn check_latent(&self, shape: &[i64], bucketed: bool) -> Result<(), String> {
        let own = self.latent_shape();
        match (self, shape) {
            (_, s) if s == own => Ok(()),
            (ModelConfig::Dit(c), &[ch, h, w]) if bucketed && ch == c.latent_channels => {
                if h % c.patch_size == 0 && w % c.patch_size == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "a bucket's latents are {shape:?}, not a whole number of the model's {p}×{p} patches",
                        p = c.patch_size
                    ))
                }
            }
            (ModelConfig::Tld(_), _) if bucketed => Err(format!(
                "a bucket's latents are {shape:?}; `tld` takes only its own size {own:?} (fixed-size layers): \
                 train bucketed data with a `dit` model"
            )),
            _ => Err(format!("training latents have shape {shape:?} per sample, the model expects {own:?}")),
        }
    }

    /// (tokens, width) of the text conditioning: per-token for `dit`, one pooled vector for `tld`.
    pub fn text_shape(&self) -> (i64, i64) {
        match self {
            ModelConfig::Dit(c) => (c.text_len, c.text_dim),
            ModelConfig::Tld(c) => (1, c.text_emb_size),
        }
    }

    pub fn prediction(&self) -> Prediction {
        match self {
            ModelConfig::Dit(c) => c.prediction,
            ModelConfig::Tld(_) => Prediction::X0,
        }
    }

    /// Checks the shape rules a model needs, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: i64| if v > 0 { Ok(()) } else { Err(format!("`{name}` must be > 0, got {v}")) };
        match self {
            ModelConfig::Dit(c) => {
                for (n, v) in [
                    ("latent_channels", c.latent_channels),
                    ("latent_size", c.latent_size),
                    ("patch_size", c.patch_size),
                    ("hidden", c.hidden),
                    ("depth", c.depth),
                    ("heads", c.heads),
                    ("text_dim", c.text_dim),
                    ("text_len", c.text_len),
                    ("freq_dim", c.freq_dim),
                ] {
                    positive(n, v)?;
                }
                if c.latent_size % c.patch_size != 0 {
                    return Err(format!(
                        "`latent_size` {} is not a multiple of `patch_size` {}",
                        c.latent_size, c.patch_size
                    ));
                }
                if c.hidden % c.heads != 0 {
                    return Err(format!("`hidden` {} is not a multiple of `heads` {}", c.hidden, c.heads));
                }
                if c.hidden % 4 != 0 || c.freq_dim % 2 != 0 {
                    return Err("`hidden` must be a multiple of 4 and `freq_dim` even".into());
                }
                if c.text_refiner < 0 {
                    return Err(format!("`text_refiner` must be >= 0, got {}", c.text_refiner));
                }
                if c.mlp_ratio.is_nan() || c.mlp_ratio <= 0.0 {
                    return Err(format!("`mlp_ratio` must be > 0, got {}", c.mlp_ratio));
                }
            }
            ModelConfig::Tld(c) => {
                for (n, v) in [
                    ("embed_dim", c.embed_dim),
                    ("n_layers", c.n_layers),
                    ("latent_channels", c.latent_channels),
                    ("latent_size", c.latent_size),
                    ("patch_size", c.patch_size),
                    ("noise_embed_dims", c.noise_embed_dims),
                    ("text_emb_size", c.text_emb_size),
                    ("mlp_multiplier", c.mlp_multiplier),
                ] {
                    positive(n, v)?;
                }
                if c.embed_dim % 64 != 0 {
                    return Err(format!("`embed_dim` {} must be a multiple of 64 (heads of 64)", c.embed_dim));
                }
                if c.embed_dim % 4 != 0 || c.noise_embed_dims % 2 != 0 {
                    return Err("`embed_dim` must be a multiple of 4 and `noise_embed_dims` even".into());
                }
                if c.latent_size % c.patch_size != 0 {
                    return Err(format!(
                        "`latent_size` {} is not a multiple of `patch_size` {}",
                        c.latent_size, c.patch_size
                    ));
                }
            }
        }
        Ok(())
    }
}

/// How the noise level σ is drawn for training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SigmaDist {
    /// σ = sigmoid(n), n ~ N(mean, std) (SD3's default: mean 0, std 1).
    LogitNormal { mean: f64, std: f64 },
    /// σ ~ Beta(a, b) (AT-1: 0.75, 0.75).
    Beta { a: f64, b: f64 },
}

impl Default for SigmaDist {
    fn default() -> Self {
        SigmaDist::LogitNormal { mean: 0.0, std: 1.0 }
    }
}

/// Where training runs, parsed once from the spec's `device = "cpu" | "cuda" | "cuda:N"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(name: &str) -> Result<Device, String> {
        match name {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
                Some(i) => Ok(Device::Cuda(i)),
                None => Err(format!("unknown device `{other}` (expected \"cpu\", \"cuda\" or \"cuda:N\")")),
            },
        }
    }
}

impl TryFrom<String> for Device {
    type Error = String;
    fn try_from(s: String) -> Result<Device, String> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(0) => write!(f, "cuda"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Auto,
    Bf16,
    F32,
}

/// The optimisation side of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub seed: u64,
    pub steps: u64,
    pub batch_size: i64,
    /// Micro-batches per optimizer step and replica (the batch is split into this many).
    pub grad_accum: i64,
    /// Model replicas in this process, each on its own thread (on CPU sharing `threads`; on CUDA
    /// one GPU each, from the run's device on), gradients summed every step: data parallelism
    /// inside one worker. The batch is split between them.
    pub replicas: i64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm bound; 0 disables clipping.
    pub grad_clip: f64,
    pub ema_decay: f64,
    /// Probability of training a sample with the empty caption (for classifier-free guidance).
    pub caption_dropout: f64,
    pub sigma: SigmaDist,
    pub checkpoint_every: u64,
    /// Checkpoints kept: the newest `keep_last`, and every one whose step is a multiple of
    /// `keep_every` (0: none besides the newest). Older ones are deleted after each save.
    pub keep_last: u64,
    pub keep_every: u64,
    pub log_every: u64,
    /// "cpu", "cuda" or "cuda:N".
    pub device: Device,
    /// Matmul/attention precision: "auto" (bf16 on CUDA, f32 on CPU), "bf16" or "f32".
    /// Parameters, optimizer state and normalisations stay f32 either way.
    pub precision: Precision,
    /// CPU threads for libtorch; 0 keeps libtorch's default.
    pub threads: i32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 0,
            steps: 1000,
            batch_size: 32,
            grad_accum: 1,
            replicas: 1,
            lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 100,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            ema_decay: 0.999,
            caption_dropout: 0.1,
            sigma: SigmaDist::default(),
            checkpoint_every: 250,
            keep_last: 3,
            keep_every: 10_000,
            log_every: 10,
            device: Device::Cpu,
            precision: Precision::Auto,
            threads: 0,
        }
    }
}

impl TrainConfig {
    /// The recipe in one line, for model cards: what someone reproducing the weights needs.
    pub fn describe(&self) -> String {
        let sigma = match self.sigma {
            SigmaDist::LogitNormal { mean, std } => format!("logit-normal({mean}, {std})"),
            SigmaDist::Beta { a, b } => format!("Beta({a}, {b})"),
        };
        let precision = match self.precision {
            Precision::Auto => "auto",
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        };
        format!(
            "batch {} × {} accumulation; AdamW lr {:e} → {:e} (cosine, {} warm-up steps), β {}/{}, eps {:e}, \
             weight decay {}; gradient clip {}; EMA {}; σ {sigma}; caption dropout {}; {precision} matmuls; seed {}",
            self.batch_size,
            self.grad_accum,
            self.lr,
            self.min_lr,
            self.warmup_steps,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.grad_clip,
            self.ema_decay,
            self.caption_dropout,
            self.seed
        )
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.batch_size <= 0
            || self.grad_accum <= 0
            || self.replicas <= 0
            || self.batch_size % (self.grad_accum * self.replicas) != 0
        {
            return Err(format!(
                "`batch_size` ({}) must be a positive multiple of `grad_accum` ({}) × `replicas` ({})",
                self.batch_size, self.grad_accum, self.replicas
            ));
        }
        if !self.lr.is_finite() || self.lr <= 0.0 || !self.min_lr.is_finite() || self.min_lr < 0.0 {
            return Err(format!("`lr` must be > 0 and `min_lr` >= 0, got {} and {}", self.lr, self.min_lr));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(format!("`ema_decay` must be in [0, 1), got {}", self.ema_decay));
        }
        if !(0.0..=1.0).contains(&self.caption_dropout) {
            return Err(format!("`caption_dropout` must be in [0, 1], got {}", self.caption_dropout));
        }
        if self.checkpoint_every == 0 || self.log_every == 0 {
            return Err("`checkpoint_every` and `log_every` must be > 0".into());
        }
        if self.keep_last == 0 {
            return Err("`keep_last` must be >= 1 (resume needs the newest checkpoint)".into());
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("`{name}` must be in [0, 1), got {v}"));
            }
        }
        let positive = self.eps.is_finite() && self.eps > 0.0;
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !positive || !non_negative(self.weight_decay) || !non_negative(self.grad_clip) {
            return Err(format!(
                "`eps` must be > 0, `weight_decay` and `grad_clip` >= 0 (and finite), got {}, {}, {}",
                self.eps, self.weight_decay, self.grad_clip
            ));
        }
        match self.sigma {
            SigmaDist::LogitNormal { std, .. } if std.is_nan() || std <= 0.0 => {
                Err(format!("`sigma.std` must be > 0, got {std}"))
            }
            SigmaDist::Beta { a, b } if a.is_nan() || b.is_nan() || a <= 0.0 || b <= 0.0 => {
                Err(format!("`sigma.a`/`sigma.b` must be > 0, got {a}, {b}"))
            }
            _ => Ok(()),
        }
    }
}

/// Where a run's training data lives in its store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Key of the cached-latents safetensors file (see `train::LatentSet`), used when `shards`
    /// is not set (the embedded demo).
    pub latents: String,
    /// An encoded webdataset (from `skytrain encode`) streamed from an object store: a location
    /// (`s3://bucket/prefix`, a local path) or, without a scheme or leading `/`, a prefix inside
    /// the run's own store.
    pub shards: Option<String>,
    /// Shards shuffled together by the streaming loader (see `data::stream`).
    pub window_shards: usize,
    /// Seconds a shard may stay unreadable before the run fails.
    pub patience_s: u64,
}

impl DataConfig {
    /// The shards' location parses (see `store::Location`), and the loader's knobs are usable.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(shards) = &self.shards {
            crate::store::Location::parse(shards).map_err(|e| format!("`shards`: {e}"))?;
        }
        if self.window_shards == 0 {
            return Err("`window_shards` must be >= 1".into());
        }
        if self.patience_s == 0 {
            return Err("`patience_s` must be > 0".into());
        }
        Ok(())
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { latents: "data/latents.safetensors".into(), shards: None, window_shards: 4, patience_s: 300 }
    }
}

/// The immutable description of a run, stored as `run.toml` at the run's root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub name: String,
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    /// Prices, exchange rate and budget (see `deploy::cost`).
    #[serde(default)]
    pub cost: CostConfig,
}

impl RunSpec {
    /// Parses and validates a spec; `file` names the source in errors.
    pub fn from_toml(text: &str, file: &str) -> Result<RunSpec, String> {
        let mut spec: RunSpec = toml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
        let table: toml::Table = toml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
        let sync = table.get("sync").and_then(toml::Value::as_table);
        spec.sync.fill_codec_defaults(|key| sync.is_some_and(|t| t.contains_key(key)));
        spec.model.validate().map_err(|e| format!("{file}: [model] {e}"))?;
        spec.train.validate().map_err(|e| format!("{file}: [train] {e}"))?;
        spec.data.validate().map_err(|e| format!("{file}: [data] {e}"))?;
        spec.sync.validate().map_err(|e| format!("{file}: [sync] {e}"))?;
        spec.cost.validate().map_err(|e| format!("{file}: {e}"))?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a run spec always serialises")
    }
}

/// Adds `public` to `[sync] admitted_keys` of a spec's text, keeping its comments and layout;
/// the spec is validated before and after. Returns the new text.
pub fn admit_key(text: &str, file: &str, public: &str) -> Result<String, String> {
    let spec = RunSpec::from_toml(text, file)?;
    if spec.sync.admitted_keys.iter().any(|k| k == public) {
        return Err(format!("{file}: [sync] admitted_keys already holds {public}"));
    }
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("{file}: {e}"))?;
    let sync = doc
        .entry("sync")
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()))
        .as_table_like_mut()
        .ok_or_else(|| format!("{file}: `sync` is not a table"))?;
    let keys = sync
        .entry("admitted_keys")
        .or_insert(toml_edit::value(toml_edit::Array::new()))
        .as_array_mut()
        .ok_or_else(|| format!("{file}: [sync] `admitted_keys` is not an array"))?;
    keys.push(public);
    let out = doc.to_string();
    RunSpec::from_toml(&out, file)?;
    Ok(out)
}

/// Keys `export` adds to a model's `config.json` beside the model fields.
const EXPORT_KEYS: &[&str] = &["skytrain_version", "num_parameters", "objective", "latent_shape", "text_conditioning"];

impl ModelConfig {
    /// Reads a model config from a name (`dit-tiny`, …), a `.json` file (an exported `config.json`
    /// included) or a `.toml` file; errors name the file and the field.
    pub fn load(name_or_path: &str) -> Result<ModelConfig, String> {
        if let Some(cfg) = ModelConfig::named(name_or_path) {
            return Ok(cfg);
        }
        let text = std::fs::read_to_string(name_or_path).map_err(|e| {
            format!("{name_or_path}: cannot read model config ({e}); named configs are {:?}", ModelConfig::NAMES)
        })?;
        let cfg: ModelConfig = if name_or_path.ends_with(".toml") {
            toml::from_str(&text).map_err(|e| format!("{name_or_path}: {e}"))?
        } else {
            let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{name_or_path}: {e}"))?;
            if let Some(obj) = v.as_object_mut() {
                for k in EXPORT_KEYS {
                    obj.remove(*k);
                }
            }
            serde_json::from_value(v).map_err(|e| format!("{name_or_path}: {e}"))?
        };
        cfg.validate().map_err(|e| format!("{name_or_path}: {e}"))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_roundtrip_and_errors_name_the_field() {
        let spec = RunSpec {
            name: "t".into(),
            model: ModelConfig::named("dit-tiny").unwrap(),
            train: TrainConfig::default(),
            data: DataConfig::default(),
            sync: SyncConfig::default(),
            cost: Default::default(),
        };
        let text = spec.to_toml();
        assert_eq!(RunSpec::from_toml(&text, "run.toml").unwrap(), spec);
        let bad = text.replace("hidden = 128", "hiddn = 128");
        let err = RunSpec::from_toml(&bad, "run.toml").unwrap_err();
        assert!(err.contains("run.toml") && err.contains("hiddn"), "{err}");
        let bad = text.replace("heads = 2", "heads = 3");
        let err = RunSpec::from_toml(&bad, "run.toml").unwrap_err();
        assert!(err.contains("heads"), "{err}");
        for name in ModelConfig::NAMES {
            ModelConfig::named(name).unwrap().validate().unwrap();
        }
        let named = RunSpec::from_toml("name = \"n\"\nmodel = \"dit-tiny\"\n", "n.toml").unwrap();
        assert_eq!(named.model, ModelConfig::named("dit-tiny").unwrap());
        let err = RunSpec::from_toml("name = \"n\"\nmodel = \"dit-huge\"\n", "n.toml").unwrap_err();
        assert!(err.contains("dit-huge"), "{err}");
    }

    #[test]
    fn sparse_runs_get_sparse_outer_settings_unless_the_spec_gives_them() {
        let spec =
            |sync: &str| RunSpec::from_toml(&format!("name = \"n\"\nmodel = \"dit-tiny\"\n[sync]\n{sync}"), "n.toml");
        let sparse = spec("codec = \"sparse\"").unwrap().sync;
        assert_eq!((sparse.outer_lr, sparse.outer_momentum, sparse.error_decay), (SPARSE_OUTER_LR, 0.0, 0.95));
        assert!(sparse.mean_over_senders);
        let given =
            spec("codec = \"sparse\"\nouter_lr = 0.8\nerror_decay = 1.0\nmean_over_senders = false").unwrap().sync;
        assert_eq!((given.outer_lr, given.outer_momentum, given.error_decay), (0.8, 0.0, 1.0));
        assert!(!given.mean_over_senders);
        let int8 = spec("codec = \"int8\"").unwrap().sync;
        let default = SyncConfig::default();
        assert_eq!(
            (int8.outer_lr, int8.outer_momentum, int8.error_decay, int8.mean_over_senders),
            (default.outer_lr, default.outer_momentum, 1.0, false)
        );
        // The settings are written out with the spec, so a stored run.toml reads back the same.
        let stored = RunSpec {
            name: "n".into(),
            model: ModelConfig::named("dit-tiny").unwrap(),
            train: TrainConfig::default(),
            data: DataConfig::default(),
            sync: sparse,
            cost: Default::default(),
        };
        assert_eq!(RunSpec::from_toml(&stored.to_toml(), "run.toml").unwrap(), stored);
    }

    #[test]
    fn admitting_a_key_edits_the_spec_in_place() {
        let text = "# my run\nname = \"n\"\nmodel = \"dit-b\" # the big one\n\n[sync]\nrounds = 4 # four\n";
        let key = "ab".repeat(32);
        let out = admit_key(text, "r.toml", &key).unwrap();
        assert!(out.starts_with(text.trim_end()), "{out}");
        assert!(out.contains("# the big one") && out.contains("model = \"dit-b\""), "{out}");
        let spec = RunSpec::from_toml(&out, "r.toml").unwrap();
        assert_eq!(spec.sync.admitted_keys, vec![key.clone()]);
        assert!(admit_key(&out, "r.toml", &key).unwrap_err().contains("already"));
        let out = admit_key("name = \"n\"\nmodel = \"dit-tiny\"\n", "r.toml", &key).unwrap();
        assert_eq!(RunSpec::from_toml(&out, "r.toml").unwrap().sync.admitted_keys.len(), 1);
        assert!(admit_key("name = 1", "r.toml", &key).unwrap_err().contains("r.toml"));
    }

    #[test]
    fn every_sync_field_is_validated_naming_it() {
        let base = "name = \"n\"\nmodel = \"dit-tiny\"\n[sync]\n";
        for (line, field) in [
            ("block_size = 0", "block_size"),
            ("inner_steps = 0", "inner_steps"),
            ("rounds = 0", "rounds"),
            ("outer_lr = nan", "outer_lr"),
            ("outer_lr = -1.0", "outer_lr"),
            ("outer_momentum = 1.0", "outer_momentum"),
            ("round_deadline_s = -1.0", "round_deadline_s"),
            ("heartbeat_timeout_s = 0.0", "heartbeat_timeout_s"),
            ("norm_bound = -1.0", "norm_bound"),
            ("norm_bound = inf", "norm_bound"),
            ("quorum = 3\nmin_members = 2", "quorum"),
            ("admitted_keys = [\"xyz\"]", "admitted_keys[0]"),
        ] {
            let err = RunSpec::from_toml(&format!("{base}{line}\n"), "r.toml").unwrap_err();
            assert!(err.contains("r.toml") && err.contains("[sync]") && err.contains(field), "{line}: {err}");
        }
        let err = RunSpec::from_toml("name = \"n\"\nmodel = \"dit-tiny\"\n[train]\ndevice = \"gpu\"\n", "r.toml")
            .unwrap_err();
        assert!(err.contains("r.toml") && err.contains("gpu") && err.contains("cuda:N"), "{err}");
        let err = RunSpec::from_toml("name = \"n\"\nmodel = \"dit-tiny\"\n[data]\nshards = \"gs://b/d\"\n", "r.toml")
            .unwrap_err();
        assert!(err.contains("[data]") && err.contains("shards") && err.contains("gs"), "{err}");
        let spec =
            RunSpec::from_toml("name = \"n\"\nmodel = \"dit-tiny\"\n[train]\ndevice = \"cuda:1\"\n", "r.toml").unwrap();
        assert_eq!(spec.train.device, Device::Cuda(1));
        assert_eq!(SyncConfig::default().total_inner_steps(), 10 * 50);
    }

    #[test]
    fn activation_names_are_the_config_spelling() {
        for act in [Activation::GeluTanh, Activation::Gelu] {
            assert_eq!(serde_json::to_string(&act).unwrap(), format!("\"{}\"", act.name()));
        }
    }
}

/// How workers compress their pseudo-gradients (`sync::compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    F32,
    F16,
    Int8,
    /// Top-k of each chunk at 2 bits (`topk` of every `topk_chunk` values; `sync::sparse`).
    Sparse,
}

/// Robust aggregation of the accepted pseudo-gradients.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Robust {
    /// Weighted mean.
    None,
    /// Each update scaled down to at most the round's median norm, then the weighted mean.
    ClipToMedian,
    /// Coordinate-wise mean after dropping the `trim` largest and smallest values (unweighted).
    TrimmedMean,
}

/// The outer lr `codec = "sparse"` runs with unless the spec gives one (see
/// `SyncConfig::fill_codec_defaults`).
pub const SPARSE_OUTER_LR: f64 = 1.0;

/// DiLoCo rounds through the store (DESIGN §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Outer rounds in the run.
    pub rounds: u64,
    /// Inner AdamW steps per worker per round (H).
    pub inner_steps: u64,
    /// The outer step: 1.0 by default, [`SPARSE_OUTER_LR`] with `codec = "sparse"`. With
    /// `outer_momentum` 0.5 it is 16–20 points of validation loss closer to data parallel in P6
    /// (24 to 96 rounds at H 25 and 50) than the DiLoCo paper's 0.7 / 0.9, tuned for thousands.
    pub outer_lr: f64,
    /// 0.5 by default, 0 with `codec = "sparse"`.
    pub outer_momentum: f64,
    /// Nesterov momentum (DiLoCo) or plain heavy-ball.
    pub nesterov: bool,
    /// Accepted updates needed to close a round at its deadline.
    pub quorum: usize,
    /// Live workers needed to open a round.
    pub min_members: usize,
    /// Seconds from a round's plan to its deadline.
    pub round_deadline_s: f64,
    /// A worker not seen for this long is not planned into new rounds.
    pub heartbeat_timeout_s: f64,
    pub codec: Codec,
    /// Values per int8 scale.
    pub block_size: usize,
    /// `sparse`: values per chunk of the flattened pseudo-gradient (at most 65,536) …
    pub topk_chunk: usize,
    /// … and entries sent per chunk: 88 of 4,096 (2.1%) costs 0.025 bytes per parameter.
    pub topk: usize,
    /// Error feedback carried into the next round is scaled by this (SparseLoCo's β): below 1 it
    /// forgets what waited too long, which pseudo-gradients recomputed from nearly the same θ each
    /// round would otherwise pile up. 1 by default, 0.95 with `codec = "sparse"`.
    pub error_decay: f64,
    /// Average each entry over the updates that sent it (non-zero) instead of over all (mean and
    /// clip-to-median aggregation): for sparse updates, whose unsent entries say nothing. Off by
    /// default, on with `codec = "sparse"`.
    pub mean_over_senders: bool,
    /// An update whose norm exceeds this multiple of the median norm of the round's other updates
    /// is rejected.
    pub norm_bound: f64,
    pub robust: Robust,
    /// Score each update by its effect before averaging (`sync::scoring`): the loss of θ and of
    /// θ with the update applied, on the member's own first samples and on held-out samples the
    /// round fixes, at fixed noise. The coordinator then loads the model and the data.
    pub score: bool,
    /// Held-out samples each update is scored on (rounded up to whole training batches); its own
    /// data is one training batch.
    pub score_batch: usize,
    /// The step taken along an update to score it: θ − score_step·Δ.
    pub score_step: f64,
    /// An update must lower the held-out loss, per unit of its norm by at least this fraction of
    /// the round's median.
    pub score_min_fraction: f64,
    /// Standard errors of benefit of the doubt: an update is rejected only if its held-out gain
    /// plus this many standard errors still falls short.
    pub score_z: f64,
    /// Updates at least this cosine-similar to another member's are near copies (free riding).
    pub duplicate_cosine: f64,
    /// Values dropped at each end per coordinate for `trimmed-mean` (needs 2·trim+1 updates).
    pub trim: usize,
    /// Hex ed25519 public keys of the workers this run admits.
    pub admitted_keys: Vec<String>,
    /// How often processes poll the store, milliseconds.
    pub poll_ms: u64,
    /// Global states (`state/<r>/`) kept: genesis (replays start there), the newest `keep_last`,
    /// and every round that is a multiple of `keep_every` (0: none besides those).
    pub keep_last: u64,
    pub keep_every: u64,
    /// The model and outer momentum are written every `state_every` rounds and at the last; the
    /// commits between record their hashes only, and whoever needs their state (a worker joining,
    /// a coordinator restarting) fetches the one before and replays the accepted updates since.
    /// At dit-b size a state is 1.3 GB: written each round it is most of the round's close.
    pub state_every: u64,
    /// Inner steps of round r+1 a worker trains while round r closes (0: none). It starts them from
    /// its own round-r local model on the data it will be planned if round r's members all report
    /// again, and when θ_r arrives moves its model by θ_r minus that start, keeping what the steps
    /// learned (a one-step-delayed outer update, as in streaming DiLoCo's τ). Its update is still
    /// bound to θ_r; if the plan gives it other data, it discards them and starts from θ_r.
    pub overlap_steps: u64,
}

impl SyncConfig {
    /// With `codec = "sparse"`, the outer settings the spec leaves out are SparseLoCo's recipe (no
    /// outer momentum: the error feedback, decayed by 0.95, plays its part) with each entry
    /// averaged over the updates that sent it and the outer lr P6 measured best for that
    /// (BENCHMARKS.md); the dense codecs' defaults (1.0 / 0.5 with undecayed error feedback)
    /// diverge with sparse updates. `given` says which keys the
    /// spec's `[sync]` holds.
    fn fill_codec_defaults(&mut self, given: impl Fn(&str) -> bool) {
        if self.codec != Codec::Sparse {
            return;
        }
        let fields = [
            ("outer_lr", &mut self.outer_lr, SPARSE_OUTER_LR),
            ("outer_momentum", &mut self.outer_momentum, 0.0),
            ("error_decay", &mut self.error_decay, 0.95),
        ];
        for (key, field, value) in fields {
            if !given(key) {
                *field = value;
            }
        }
        if !given("mean_over_senders") {
            self.mean_over_senders = true;
        }
    }

    /// Inner steps of the whole run per worker: rounds × H (H lives only in `inner_steps`).
    pub fn total_inner_steps(&self) -> u64 {
        self.rounds * self.inner_steps
    }

    /// Every field in range, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        let at_least_one = [
            ("rounds", self.rounds),
            ("inner_steps", self.inner_steps),
            ("block_size", self.block_size as u64),
            ("topk", self.topk as u64),
            ("score_batch", self.score_batch as u64),
            ("quorum", self.quorum as u64),
            ("min_members", self.min_members as u64),
            ("poll_ms", self.poll_ms),
            ("keep_last", self.keep_last),
            ("state_every", self.state_every),
        ];
        for (name, v) in at_least_one {
            if v == 0 {
                return Err(format!("`{name}` must be >= 1, got 0"));
            }
        }
        if self.topk_chunk > 65_536 || self.topk > self.topk_chunk {
            return Err(format!(
                "`topk` ({}) must be at most `topk_chunk` ({}), which is at most 65536",
                self.topk, self.topk_chunk
            ));
        }
        if !(self.score_step > 0.0 && self.score_step <= 1.0) {
            return Err(format!("`score_step` must be in (0, 1], got {}", self.score_step));
        }
        if !(self.error_decay > 0.0 && self.error_decay <= 1.0) {
            return Err(format!("`error_decay` must be in (0, 1], got {}", self.error_decay));
        }
        if !(self.score_z >= 0.0 && self.score_z.is_finite()) {
            return Err(format!("`score_z` must be a finite number ≥ 0, got {}", self.score_z));
        }
        if !(0.0..1.0).contains(&self.score_min_fraction) {
            return Err(format!("`score_min_fraction` must be in [0, 1), got {}", self.score_min_fraction));
        }
        if !(self.duplicate_cosine > 0.0 && self.duplicate_cosine <= 1.0) {
            return Err(format!("`duplicate_cosine` must be in (0, 1], got {}", self.duplicate_cosine));
        }
        if !self.outer_lr.is_finite() || self.outer_lr <= 0.0 || self.outer_lr > 10.0 {
            return Err(format!("`outer_lr` must be in (0, 10], got {}", self.outer_lr));
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return Err(format!("`outer_momentum` must be in [0, 1), got {}", self.outer_momentum));
        }
        for (name, v) in [
            ("round_deadline_s", self.round_deadline_s),
            ("heartbeat_timeout_s", self.heartbeat_timeout_s),
            ("norm_bound", self.norm_bound),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return Err(format!("`{name}` must be a finite number > 0, got {v}"));
            }
        }
        if self.overlap_steps >= self.inner_steps {
            return Err(format!(
                "`overlap_steps` ({}) must be below `inner_steps` ({}): the rest of a round trains from θ_r",
                self.overlap_steps, self.inner_steps
            ));
        }
        if self.quorum > self.min_members {
            return Err(format!(
                "`quorum` ({}) exceeds `min_members` ({}): a round could open with fewer members than it needs to close",
                self.quorum, self.min_members
            ));
        }
        for (i, k) in self.admitted_keys.iter().enumerate() {
            if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("`admitted_keys[{i}]` is not 64 hex digits (an ed25519 public key): `{k}`"));
            }
        }
        Ok(())
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            rounds: 10,
            inner_steps: 50,
            outer_lr: 1.0,
            outer_momentum: 0.5,
            nesterov: true,
            quorum: 1,
            min_members: 1,
            round_deadline_s: 600.0,
            heartbeat_timeout_s: 60.0,
            codec: Codec::Int8,
            block_size: 256,
            topk_chunk: 4096,
            topk: 88,
            norm_bound: 10.0,
            robust: Robust::None,
            score: false,
            score_batch: 64,
            score_step: 0.25,
            score_min_fraction: 0.4,
            score_z: 2.0,
            error_decay: 1.0,
            mean_over_senders: false,
            duplicate_cosine: 0.99,
            trim: 1,
            admitted_keys: vec![],
            poll_ms: 500,
            keep_last: 3,
            keep_every: 100,
            state_every: 1,
            overlap_steps: 0,
        }
    }
}

/// USDC as IBC denoms on Akash (from `@akashnetwork/chain-sdk`'s `USDC_IBC_DENOMS`).
pub const USDC_MAINNET: &str = "ibc/170C677610AC31DF0904FFE09CD3B5C657492170E7E52372E48756B71E56F2F1";
pub const USDC_SANDBOX: &str = "ibc/12C6A0C374171B595A0A9E18B83FA09D295FB1F2D8C6DAA3AC28683471752D84";

/// A lease price per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// `uakt`, `uact`, `usdc` (the network's USDC IBC denom) or an explicit `ibc/<hash>`.
    pub denom: String,
    /// Micro-units per block.
    pub amount: f64,
}

/// Prices and budget of a run (`[cost]` in the run spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostConfig {
    /// Seconds per block of the Akash chain (leases are priced per block).
    pub block_time_s: f64,
    /// USD per AKT for this run (e.g. a 30-day average); needed when a price is in uakt.
    pub akt_usd: Option<f64>,
    /// USD per ACT, when prices are in uact.
    pub act_usd: Option<f64>,
    /// Lease price of one worker, per block (a worker may report its own lease's price instead).
    pub worker_price: Option<Price>,
    pub coordinator_price: Option<Price>,
    /// Spend limit: the coordinator warns at `warn_fraction` of it and stops the run at 100%.
    pub budget_usd: Option<f64>,
    pub warn_fraction: f64,
}

impl Default for CostConfig {
    fn default() -> Self {
        CostConfig {
            block_time_s: 6.1,
            akt_usd: None,
            act_usd: None,
            worker_price: None,
            coordinator_price: None,
            budget_usd: None,
            warn_fraction: 0.8,
        }
    }
}

impl CostConfig {
    /// USD per hour of a lease at `price` per block.
    pub fn usd_per_hour(&self, price: &Price) -> Result<f64, String> {
        let rate = match price.denom.as_str() {
            "uakt" => self.akt_usd.ok_or_else(|| "[cost] akt_usd is needed for prices in uakt".to_string())?,
            "uact" => self.act_usd.ok_or_else(|| "[cost] act_usd is needed for prices in uact".to_string())?,
            "usdc" | "uusdc" => 1.0,
            d if d == USDC_MAINNET || d == USDC_SANDBOX => 1.0,
            d => return Err(format!("[cost] unknown denom `{d}`")),
        };
        if self.block_time_s <= 0.0 {
            return Err("[cost] block_time_s must be positive".into());
        }
        Ok(price.amount / 1e6 * rate * 3600.0 / self.block_time_s)
    }

    pub fn validate(&self) -> Result<(), String> {
        for p in [&self.worker_price, &self.coordinator_price].into_iter().flatten() {
            self.usd_per_hour(p)?;
        }
        if let Some(b) = self.budget_usd {
            if b.is_nan() || b <= 0.0 {
                return Err("[cost] budget_usd must be positive".into());
            }
        }
        if !(0.0..=1.0).contains(&self.warn_fraction) {
            return Err("[cost] warn_fraction must be within 0..1".into());
        }
        Ok(())
    }
}
