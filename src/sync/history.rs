//! Replaying committed rounds on plain buffers: the global model and outer momentum after round r
//! from those after round r − 1 and round r's accepted updates. `run verify` replays a whole run
//! with it, and workers use it to reach the next round's model by downloading that round's
//! accepted updates (kilobytes with the sparse codec) instead of the model (4 bytes per
//! parameter); both compute the coordinator's result bit for bit (same code, same order).

use std::collections::HashMap;

use bytes::Bytes;

use super::compress::{self, Update};
use super::params::ParamSet;
use super::protocol::{read_commit, state_commit_at_or_before, update_key, Commit};
use super::{outer, SyncError};
use crate::config::{Robust, SyncConfig};
use crate::store::{sha256_hex, Store};

/// The global state as of a committed round.
pub struct Global {
    pub round: u64,
    pub theta: ParamSet,
    pub momentum: ParamSet,
    /// sha256 of `theta` as safetensors (what commits record).
    pub sha256: String,
}

impl Global {
    /// Fetches commit `c`'s model and momentum whole (`c` names them); returns the state and the
    /// bytes fetched.
    /// The genesis's momentum, all zeros, is made here, not fetched, once its hash says so.
    pub fn fetch(store: &Store, c: &Commit) -> Result<(Global, u64), SyncError> {
        let model = store.get_verified(&c.model_key, &c.model_sha256)?;
        let theta = ParamSet::from_safetensors(&model, &c.model_key)?;
        let zeros = ParamSet::zeros_like(&theta);
        let (momentum, outer_bytes) = if c.round == 0 && zeros.sha256() == c.outer_sha256 {
            (zeros, 0)
        } else {
            let outer = store.get_verified(&c.outer_key, &c.outer_sha256)?;
            (ParamSet::from_safetensors(&outer, &c.outer_key)?, outer.len())
        };
        let g = Global { round: c.round, theta, momentum, sha256: c.model_sha256.clone() };
        Ok((g, (model.len() + outer_bytes) as u64))
    }

    /// The state as of commit `c`, whether or not its round wrote one: the newest state written
    /// at or before it, fetched, then every round since replayed from its accepted updates (the
    /// momentum too is checked against `c`). Returns the state and the bytes fetched.
    pub fn reach(store: &Store, cfg: &SyncConfig, c: &Commit) -> Result<(Global, u64), SyncError> {
        if c.has_state() {
            return Global::fetch(store, c);
        }
        let written = state_commit_at_or_before(store, c.round)?;
        let (mut g, mut fetched) = Global::fetch(store, &written)?;
        for r in written.round + 1..c.round {
            let next = read_commit(store, r)?.ok_or_else(|| SyncError::Other(format!("commit {r} missing")))?;
            fetched += g.apply(store, cfg, &next, &mut HashMap::new())?;
        }
        fetched += g.apply(store, cfg, c, &mut HashMap::new())?;
        if g.momentum.sha256() != c.outer_sha256 {
            let reason = "replayed outer momentum differs from the committed".into();
            return Err(SyncError::Invalid { file: super::protocol::commit_key(c.round), reason });
        }
        Ok((g, fetched))
    }

    /// Applies commit `c` (the next round) to this state: its accepted updates, aggregated and
    /// stepped as the coordinator did; Err if the result is not the model `c` records. An update
    /// whose payload `fetched_already` holds (by its key, with the hash `c` accepted) is taken from
    /// there; the rest are fetched. Returns the bytes of updates fetched.
    pub fn apply(
        &mut self,
        store: &Store,
        cfg: &SyncConfig,
        c: &Commit,
        fetched_already: &mut HashMap<String, Bytes>,
    ) -> Result<u64, SyncError> {
        let invalid = |reason: String| SyncError::Invalid { file: super::protocol::commit_key(c.round), reason };
        if c.round != self.round + 1 {
            return Err(invalid(format!("commit {} does not follow round {}", c.round, self.round)));
        }
        let mut fetched = 0;
        if !c.accepted.is_empty() {
            // A plain mean is summed as each update arrives (one decoded update in memory at a
            // time; a sparse one only its sent entries); robust aggregation needs them all.
            let total = c.accepted.iter().map(|a| a.samples).sum();
            let mut mean = outer::WeightedMean::new(&self.theta, total, cfg.mean_over_senders);
            let mut updates = Vec::new();
            for a in &c.accepted {
                let key = update_key(c.round, &a.worker);
                let bytes = match fetched_already.remove(&key) {
                    Some(b) if sha256_hex(&b) == a.update_sha256 => b,
                    _ => {
                        let b = store.get_verified(&key, &a.update_sha256)?;
                        fetched += b.len() as u64;
                        b
                    }
                };
                match (cfg.robust, compress::decode_update(&bytes, &self.theta, &key)?) {
                    (Robust::None, Update::Sparse(entries)) => mean.add_entries(&entries, a.samples, 1.0),
                    (Robust::None, Update::Dense(delta)) => mean.add(&delta, a.samples, 1.0),
                    (_, Update::Dense(delta)) => updates.push((delta, a.samples)),
                    (_, Update::Sparse(_)) => updates.push((compress::decode(&bytes, &self.theta, &key)?, a.samples)),
                }
            }
            let avg = if cfg.robust == Robust::None { mean.finish() } else { outer::aggregate(&updates, cfg) };
            outer::step(&mut self.theta, &mut self.momentum, &avg, cfg);
            if !self.theta.all_finite() {
                return Err(invalid("the committed model has non-finite parameters".into()));
            }
            self.sha256 = self.theta.sha256();
        }
        self.round = c.round;
        if self.sha256 != c.model_sha256 {
            return Err(invalid(format!(
                "replayed model {} differs from the committed {}",
                self.sha256, c.model_sha256
            )));
        }
        Ok(fetched)
    }
}
