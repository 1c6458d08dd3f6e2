//! Checkpoints in the store: `checkpoints/<step>/{model,ema,optim}.safetensors`, `state.json`,
//! then `MANIFEST.json` last. A checkpoint without its manifest does not exist, so a process killed
//! mid-write leaves nothing half-visible; the manifest's hashes are verified on load.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::DataPosition;
use crate::model::weights;
use crate::store::{sha256_hex, Store};
use crate::train::Trainer;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
}

/// What besides tensors a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub adam_t: u64,
    pub data_position: DataPosition,
    /// Counter-based RNG: the state is (seed, step); recorded to make that explicit.
    pub rng: RngState,
    pub run_spec_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RngState {
    pub kind: String,
    pub seed: u64,
    pub counter: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub step: u64,
    pub files: BTreeMap<String, FileEntry>,
    pub written_at: String,
}

pub fn dir(step: u64) -> String {
    format!("checkpoints/{step:010}")
}

/// Writes the trainer's full state at its current step (large objects first, manifest last).
pub fn save(store: &Store, trainer: &Trainer, spec_sha256: &str) -> Result<(), CheckpointError> {
    let dir = dir(trainer.step);
    let state = TrainState {
        step: trainer.step,
        adam_t: trainer.opt.t,
        data_position: trainer.data.position(trainer.step * trainer.spec.train.batch_size as u64),
        rng: RngState { kind: "counter(seed, step)".into(), seed: trainer.spec.train.seed, counter: trainer.step },
        run_spec_sha256: spec_sha256.into(),
    };
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("model.safetensors", trainer.model.to_safetensors(None)),
        ("ema.safetensors", weights::to_safetensors(&trainer.ema.params, None)),
        ("optim.safetensors", weights::to_safetensors(&trainer.optimizer_tensors(), None)),
        ("state.json", serde_json::to_vec_pretty(&state).unwrap()),
    ];
    let mut entries = BTreeMap::new();
    for (name, data) in files {
        entries.insert(name.to_string(), FileEntry { sha256: sha256_hex(&data), bytes: data.len() as u64 });
        store.put(&format!("{dir}/{name}"), data)?;
    }
    let manifest = Manifest { step: trainer.step, files: entries, written_at: chrono::Utc::now().to_rfc3339() };
    store.put(&format!("{dir}/MANIFEST.json"), serde_json::to_vec_pretty(&manifest).unwrap())?;
    Ok(())
}

/// Steps of the complete checkpoints (those with a manifest), ascending.
pub fn list(store: &Store) -> Result<Vec<u64>, CheckpointError> {
    let mut steps: Vec<u64> = store
        .list("checkpoints")?
        .iter()
        .filter_map(|k| k.strip_suffix("/MANIFEST.json"))
        .filter_map(|d| d.rsplit('/').next()?.parse().ok())
        .collect();
    steps.sort();
    Ok(steps)
}

fn read_manifest(store: &Store, step: u64) -> Result<Manifest, CheckpointError> {
    let key = format!("{}/MANIFEST.json", dir(step));
    let bytes = store.get(&key)?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Invalid { file: key, reason: e.to_string() })
}

/// Reads one file of a checkpoint, verified against the manifest.
pub fn read_file(store: &Store, step: u64, name: &str) -> Result<bytes::Bytes, CheckpointError> {
    let manifest = read_manifest(store, step)?;
    let key = format!("{}/{name}", dir(step));
    let entry = manifest.files.get(name).ok_or_else(|| CheckpointError::Invalid {
        file: format!("{}/MANIFEST.json", dir(step)),
        reason: format!("no entry for `{name}`"),
    })?;
    Ok(store.get_verified(&key, &entry.sha256)?)
}

/// Restores `trainer` (freshly built from the same spec) to checkpoint `step`.
pub fn restore(store: &Store, trainer: &mut Trainer, step: u64, spec_sha256: &str) -> Result<(), CheckpointError> {
    let d = dir(step);
    let state_key = format!("{d}/state.json");
    let state: TrainState = serde_json::from_slice(&read_file(store, step, "state.json")?)
        .map_err(|e| CheckpointError::Invalid { file: state_key.clone(), reason: e.to_string() })?;
    if state.run_spec_sha256 != spec_sha256 {
        return Err(CheckpointError::Invalid {
            file: state_key,
            reason: "field `run_spec_sha256` does not match this run's run.toml (checkpoint from another run?)".into(),
        });
    }
    let model = read_file(store, step, "model.safetensors")?;
    trainer.model.load_safetensors(&model, &format!("{d}/model.safetensors"))?;
    let ema_file = format!("{d}/ema.safetensors");
    let ema = weights::from_safetensors(&read_file(store, step, "ema.safetensors")?, &ema_file)?;
    weights::load_into(&trainer.ema.params, &ema, &ema_file, &[])?;
    let optim_file = format!("{d}/optim.safetensors");
    let optim = weights::from_safetensors(&read_file(store, step, "optim.safetensors")?, &optim_file)?;
    trainer.load_optimizer(&optim, &optim_file, state.adam_t)?;
    let expected = trainer.data.position(state.step * trainer.spec.train.batch_size as u64);
    if state.data_position != expected {
        return Err(CheckpointError::Invalid {
            file: state_key,
            reason: format!(
                "field `data_position` {:?} does not follow from step {} (expected {expected:?})",
                state.data_position, state.step
            ),
        });
    }
    trainer.step = state.step;
    Ok(())
}

/// Deletes the checkpoints retention does not keep: all but the newest `keep_last` and those
/// whose step is a multiple of `keep_every` (0: none). The manifest goes first, so a checkpoint
/// interrupted mid-deletion is simply incomplete. Returns the steps deleted.
pub fn prune(store: &Store, keep_last: u64, keep_every: u64) -> Result<Vec<u64>, CheckpointError> {
    let steps = list(store)?;
    let newest = steps.len().saturating_sub(keep_last.max(1) as usize);
    let mut deleted = Vec::new();
    for &step in &steps[..newest] {
        if keep_every > 0 && step.is_multiple_of(keep_every) {
            continue;
        }
        let d = dir(step);
        store.delete(&format!("{d}/MANIFEST.json"))?;
        for key in store.list(&d)? {
            store.delete(&key)?;
        }
        deleted.push(step);
    }
    Ok(deleted)
}
