//! A training run on one machine, living entirely in its store: `run.toml` (immutable spec),
//! cached data, checkpoints and metric events. Killed at any moment, it resumes from the latest
//! complete checkpoint and continues exactly as if it had not stopped.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::RunSpec;
use crate::data::encode::record::EncoderRecord;
use crate::data::manifest::{latents_record_key, DatasetManifest, LatentsRecord, Provenance};
use crate::data::stream::{ShardStream, StreamError, StreamOptions};
use crate::data::Order;
use crate::model::{weights, TextCond};
use crate::store::{sha256_hex, Store, StoreError};
use crate::train::checkpoint::{self, CheckpointError};
use crate::train::{LatentSet, StepStats, TrainData, Trainer};

pub const SPEC_KEY: &str = "run.toml";
/// The run's unique id (create-only, written at init): what signed round records and heartbeats
/// bind to, so nothing from another run, even one of the same name, passes for this one's.
pub const RUN_ID_KEY: &str = "run-id";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Data(#[from] StreamError),
    #[error("{0}")]
    Invalid(String),
}

/// Writes the run spec create-only; an existing different spec is an error (specs are immutable).
/// Draws the run's id (random, 128 bits) unless it has one.
pub fn init(store: &Store, spec: &RunSpec) -> Result<(), RunError> {
    let text = spec.to_toml();
    match store.put_create(RUN_ID_KEY, hex::encode(rand::random::<[u8; 16]>())) {
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    match store.put_create(SPEC_KEY, text.clone()) {
        Ok(()) => Ok(()),
        Err(StoreError::AlreadyExists { .. }) => {
            let existing = read_spec(store)?;
            if &existing == spec {
                Ok(())
            } else {
                Err(RunError::Invalid(format!(
                    "{}/{SPEC_KEY} already holds a different run spec; run specs are immutable, use a new store prefix",
                    store.url()
                )))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Checks, before a run is initialised at `run_location`, that the encoded dataset its spec names
/// exists and has the latent and text shapes the model takes; a mismatch names the `[model]` values
/// that would match. Runs on a cached-latents file (no `[data] shards`) are checked at `train`.
pub fn check_data(spec: &RunSpec, run_location: &str) -> Result<(), RunError> {
    let Some(shards) = &spec.data.shards else { return Ok(()) };
    let data = if crate::store::Location::is_relative(shards) {
        Store::open(run_location)?.sub(shards)
    } else {
        Store::open(shards)?
    };
    let manifest = DatasetManifest::read(&data).map_err(|e| RunError::Invalid(e.to_string()))?;
    let e = manifest.encoding(&data).map_err(|e| RunError::Invalid(e.to_string()))?;
    let [c, h, w] = spec.model.latent_shape();
    let (l, t) = spec.model.text_shape();
    let want_latent = [c as usize, h as usize, w as usize];
    let text_ok = match spec.model {
        crate::config::ModelConfig::Dit(_) => e.text_shape == [l as usize, t as usize] && e.pooled_dim == t as usize,
        crate::config::ModelConfig::Tld(_) => e.pooled_dim == t as usize,
    };
    let as_i64 = |s: &[usize]| s.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let latent_ok = if e.buckets.is_empty() {
        e.latent_shape == want_latent
    } else {
        // Bucketed: every bucket's shape must fit the model (a dit at the nominal size).
        for (bucket, shape) in &e.buckets {
            spec.model
                .check_latent(&as_i64(shape), true)
                .map_err(|why| RunError::Invalid(format!("the dataset {}: bucket {bucket}: {why}", data.url())))?;
        }
        e.latent_shape == want_latent
    };
    if latent_ok && text_ok {
        return Ok(());
    }
    let matching = match (&spec.model, e.latent_shape.as_slice(), e.text_shape.as_slice()) {
        (crate::config::ModelConfig::Dit(_), [c, s, _], [l, t]) => format!(
            "latent_channels = {c}, latent_size = {s}, text_len = {l}, text_dim = {t} (pooled {})",
            e.pooled_dim
        ),
        (crate::config::ModelConfig::Tld(_), [c, s, _], _) => {
            format!("latent_channels = {c}, latent_size = {s}, text_emb_size = {}", e.pooled_dim)
        }
        _ => format!("latents {:?}, text {:?}", e.latent_shape, e.text_shape),
    };
    Err(RunError::Invalid(format!(
        "the dataset {} holds latents {:?} and text {:?} (pooled {}), the [model] takes latents {want_latent:?} and \
         text [{l}, {t}]: a [model] for this dataset has {matching}",
        data.url(),
        e.latent_shape,
        e.text_shape,
        e.pooled_dim
    )))
}

/// The run's id (None for a run initialised before runs had ids).
pub fn read_run_id(store: &Store) -> Result<Option<String>, RunError> {
    Ok(store.get_opt(RUN_ID_KEY)?.map(|b| String::from_utf8_lossy(&b).trim().to_string()))
}

pub fn read_spec(store: &Store) -> Result<RunSpec, RunError> {
    let bytes = store.get(SPEC_KEY)?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| RunError::Invalid(format!("{}/{SPEC_KEY}: not UTF-8 text", store.url())))?;
    RunSpec::from_toml(&text, &format!("{}/{SPEC_KEY}", store.url())).map_err(RunError::Invalid)
}

/// One line of `metrics/train/*.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricEvent {
    #[serde(flatten)]
    pub stats: StepStats,
    pub samples_per_s: f64,
    pub time: String,
}

/// Steps of training, reported to `on_step` after each.
pub struct TrainOptions<'a> {
    /// Stop (after checkpointing) once this many steps are done, even if the spec asks for more.
    pub stop_at: Option<u64>,
    pub on_step: Option<&'a mut dyn FnMut(&StepStats)>,
}

/// The store holding a run's data: the encoded dataset `[data] shards` names (a prefix of the
/// run's own store when relative), or the run's store itself for a cached-latents run.
pub fn data_store(store: &Store, spec: &RunSpec) -> Result<Store, RunError> {
    match &spec.data.shards {
        Some(location) if crate::store::Location::is_relative(location) => Ok(store.sub(location)),
        Some(location) => Ok(Store::open(location)?),
        None => Ok(store.clone()),
    }
}

/// The frozen encoders and the provenance recorded with a run's data; the encoders' files live
/// in the returned store.
pub fn data_record(store: &Store, spec: &RunSpec) -> Result<(Store, EncoderRecord, Provenance), RunError> {
    let data = data_store(store, spec)?;
    if spec.data.shards.is_some() {
        let manifest = DatasetManifest::read(&data).map_err(|e| RunError::Invalid(e.to_string()))?;
        let encoding = manifest.encoding(&data).map_err(|e| RunError::Invalid(e.to_string()))?;
        let encoders = encoding.encoders.clone().ok_or_else(|| {
            RunError::Invalid(format!(
                "{}/manifest.json records no encoders (shards indexed from another tool): pass the encoder \
                 folders explicitly (--vae, --text)",
                data.url()
            ))
        })?;
        return Ok((data, encoders, manifest.provenance()));
    }
    let key = latents_record_key(&spec.data.latents);
    let bytes = store.get(&key)?;
    let record: LatentsRecord =
        serde_json::from_slice(&bytes).map_err(|e| RunError::Invalid(format!("{}/{key}: {e}", store.url())))?;
    Ok((data, record.encoders, record.provenance))
}

/// The run's training data: encoded shards streamed from their store when the spec names them,
/// else the cached-latents file in the run's store.
pub fn open_data(store: &Store, spec: &RunSpec) -> Result<TrainData, RunError> {
    let device = crate::train::tch_device(spec.train.device);
    if spec.data.shards.is_none() {
        let data_key = spec.data.latents.clone();
        let bytes = store.get(&data_key)?;
        let set = LatentSet::from_safetensors(&bytes, &format!("{}/{data_key}", store.url()))
            .map_err(|e| RunError::Invalid(e.to_string()))?;
        let order = Order::new(spec.train.seed, set.len().max(1));
        return Ok(TrainData::Memory { set: set.to_device(device), order });
    }
    let data_store = data_store(store, spec)?;
    let opts = StreamOptions {
        seed: spec.train.seed,
        window_shards: spec.data.window_shards,
        batch: spec.train.batch_size as usize,
        patience: std::time::Duration::from_secs(spec.data.patience_s),
        ..Default::default()
    };
    let stream = ShardStream::open(data_store, opts)?;
    let key = stream.encoding().null_text.clone();
    let bytes = stream.store().get(&key)?;
    let file = format!("{}/{key}", stream.store().url());
    let mut t = weights::from_safetensors(&bytes, &file).map_err(|e| RunError::Invalid(e.to_string()))?;
    let mut take = |name: &str| {
        t.remove(name)
            .map(|x| x.unsqueeze(0).to_device(device))
            .ok_or_else(|| RunError::Invalid(format!("{file}: tensor `{name}` missing")))
    };
    let null_text = TextCond { tokens: take("tokens")?, pooled: take("pooled")? };
    Ok(TrainData::Stream { stream: Box::new(stream), null_text })
}

/// Loads the run's data, builds or resumes its trainer.
pub fn open_trainer(store: &Store) -> Result<(Trainer, String), RunError> {
    let spec = read_spec(store)?;
    let spec_sha = sha256_hex(spec.to_toml().as_bytes());
    let data = open_data(store, &spec)?;
    let mut trainer = Trainer::with_data(spec, data).map_err(RunError::Invalid)?;
    if let Some(&step) = checkpoint::list(store)?.last() {
        checkpoint::restore(store, &mut trainer, step, &spec_sha)?;
        tracing::info!(step, "resumed from checkpoint");
    }
    Ok((trainer, spec_sha))
}

/// Trains until the spec's step count (or `stop_at`), checkpointing every `checkpoint_every`.
pub fn train(store: &Store, trainer: &mut Trainer, spec_sha: &str, mut opts: TrainOptions) -> Result<(), RunError> {
    let total = opts.stop_at.unwrap_or(trainer.spec.train.steps).min(trainer.spec.train.steps);
    let every = trainer.spec.train.checkpoint_every;
    let batch = trainer.spec.train.batch_size as f64;
    let mut pending: Vec<MetricEvent> = Vec::new();
    while trainer.step < total {
        let t0 = Instant::now();
        let stats = trainer.train_step()?;
        if !stats.loss.is_finite() {
            return Err(RunError::Invalid(format!("loss became {} at step {}", stats.loss, stats.step)));
        }
        pending.push(MetricEvent {
            stats,
            samples_per_s: batch / t0.elapsed().as_secs_f64(),
            time: chrono::Utc::now().to_rfc3339(),
        });
        if let Some(cb) = opts.on_step.as_mut() {
            cb(&stats);
        }
        if trainer.step.is_multiple_of(every) || trainer.step == total {
            flush_metrics(store, &mut pending)?;
            checkpoint::save(store, trainer, spec_sha)?;
            checkpoint::prune(store, trainer.spec.train.keep_last, trainer.spec.train.keep_every)?;
        }
    }
    Ok(())
}

/// Writes pending events as one new object (append by writing new objects; idempotent on replay).
fn flush_metrics(store: &Store, pending: &mut Vec<MetricEvent>) -> Result<(), RunError> {
    let (Some(first), Some(last)) = (pending.first(), pending.last()) else { return Ok(()) };
    let key = format!("metrics/train/{:010}-{:010}.jsonl", first.stats.step, last.stats.step);
    let mut body = String::new();
    for e in pending.iter() {
        body.push_str(&serde_json::to_string(e).unwrap());
        body.push('\n');
    }
    store.put(&key, body)?;
    let mut events = crate::observe::tensorboard::EventWriter::new(store, "train");
    for e in pending.iter() {
        let t = chrono::DateTime::parse_from_rfc3339(&e.time).map(|d| d.timestamp_millis() as u64).unwrap_or(0);
        events.scalar("train/loss", e.stats.step, e.stats.loss, t);
        events.scalar("train/lr", e.stats.step, e.stats.lr, t);
        events.scalar("train/grad_norm", e.stats.step, e.stats.grad_norm, t);
        events.scalar("train/samples_per_s", e.stats.step, e.samples_per_s, t);
    }
    events.flush()?;
    pending.clear();
    Ok(())
}

/// All training metric events of a run, by step (a replayed step keeps its latest record).
pub fn read_metrics(store: &Store) -> Result<Vec<MetricEvent>, RunError> {
    let mut by_step = std::collections::BTreeMap::new();
    for key in store.list("metrics/train")? {
        let bytes = store.get(&key)?;
        for (i, line) in String::from_utf8_lossy(&bytes).lines().enumerate() {
            let e: MetricEvent = serde_json::from_str(line)
                .map_err(|err| RunError::Invalid(format!("{}/{key} line {}: {err}", store.url(), i + 1)))?;
            by_step.insert(e.stats.step, e);
        }
    }
    Ok(by_step.into_values().collect())
}
