//! "The model of a run", whatever trained it: the newest of its latest complete checkpoint (EMA
//! weights) and its last written DiLoCo global model. Sits above `run` and `sync`, which both
//! write models, for the commands that read one (sample, export, fidelity, eval-loss).

use crate::config::RunSpec;
use crate::store::Store;
use crate::train::checkpoint;
use crate::train::run::RunError;

/// Where the model of a run comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSource {
    /// A single-process checkpoint (its EMA weights).
    Checkpoint { step: u64 },
    /// The global model a DiLoCo round committed.
    Commit { round: u64 },
}

/// "The model of a run": the newest of its latest complete checkpoint and its last committed
/// global model, by training steps done.
pub struct RunModel {
    pub source: ModelSource,
    /// Store key of the weights, for error messages and model cards.
    pub key: String,
    pub weights: bytes::Bytes,
    /// Optimizer steps behind the weights (per worker for DiLoCo: rounds × H).
    pub steps: u64,
    /// Whether the weights are an EMA.
    pub ema: bool,
}

/// Reads the model of the run in `store` (weights verified against their record).
pub fn latest_model(store: &Store, spec: &RunSpec) -> Result<RunModel, RunError> {
    let checkpoint = checkpoint::list(store)?.last().copied();
    let commit = crate::sync::protocol::latest_state_commit(store)
        .map_err(|e| RunError::Invalid(e.to_string()))?
        .filter(|c| c.round > 0);
    let commit_steps = commit.as_ref().map(|c| c.round * spec.sync.inner_steps);
    let checkpoint_newer = |step: u64| commit_steps.is_none_or(|s| step >= s);
    match (checkpoint, commit) {
        (Some(step), commit) if commit.is_none() || checkpoint_newer(step) => Ok(RunModel {
            source: ModelSource::Checkpoint { step },
            key: format!("{}/ema.safetensors", checkpoint::dir(step)),
            weights: checkpoint::read_file(store, step, "ema.safetensors")?,
            steps: step,
            ema: true,
        }),
        (_, Some(c)) => Ok(RunModel {
            source: ModelSource::Commit { round: c.round },
            weights: store.get_verified(&c.model_key, &c.model_sha256)?,
            key: c.model_key,
            steps: c.round * spec.sync.inner_steps,
            ema: false,
        }),
        (_, None) => Err(RunError::Invalid(format!(
            "{}: no model yet: neither a complete checkpoint (checkpoints/*/MANIFEST.json) nor a committed round",
            store.url()
        ))),
    }
}
