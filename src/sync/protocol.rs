//! The records of a round and where they live in the store.
//!
//! ```text
//! rounds/<r>/plan.json                      create-only: members, data ranges, deadline
//! rounds/<r>/updates/<worker>.safetensors   compressed pseudo-gradient
//! rounds/<r>/updates/<worker>.json          signed record pointing at it (written last)
//! rounds/<r>/commit.json                    create-only: what was accepted and why others were not
//! state/<r>/model-<sha>.safetensors         θ_r (content-addressed: racing coordinators never clash)
//! state/<r>/outer-<sha>.safetensors         outer momentum after round r
//! workers/<worker>.json                     heartbeat
//! ```

use serde::{Deserialize, Serialize};

use super::SyncError;
use crate::store::Store;

pub fn round_dir(r: u64) -> String {
    format!("rounds/{r:010}")
}
pub fn plan_key(r: u64) -> String {
    format!("{}/plan.json", round_dir(r))
}
pub fn commit_key(r: u64) -> String {
    format!("{}/commit.json", round_dir(r))
}
pub fn update_key(r: u64, worker: &str) -> String {
    format!("{}/updates/{worker}.safetensors", round_dir(r))
}
pub fn record_key(r: u64, worker: &str) -> String {
    format!("{}/updates/{worker}.json", round_dir(r))
}
pub fn heartbeat_key(worker: &str) -> String {
    format!("workers/{worker}.json")
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Worker names become object keys: keep them to a safe alphabet.
pub fn valid_worker_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Absolute data positions `start .. start + len` (see `data::Order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRange {
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub worker: String,
    pub public_key: String,
    /// Positions assigned to this member for the round (H·B samples in all).
    pub ranges: Vec<DataRange>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub round: u64,
    pub members: Vec<Member>,
    /// Unix milliseconds.
    pub deadline_ms: u64,
    pub created_ms: u64,
    /// The data queue after this plan's assignment (what the commit carries on from).
    pub next_position: u64,
    pub pending: Vec<DataRange>,
}

/// A worker's signed report of its update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRecord {
    pub round: u64,
    pub worker: String,
    pub public_key: String,
    /// Samples the update was trained on (its averaging weight).
    pub samples: u64,
    /// The assigned positions actually trained on.
    pub consumed: Vec<DataRange>,
    pub update_sha256: String,
    pub bytes: u64,
    pub mean_loss: f64,
    pub inner_seconds: f64,
    pub signature: String,
}

impl UpdateRecord {
    /// What the signature covers: the run, the round, the worker, the work and the payload hash,
    /// so a record cannot be replayed into another round or run, nor its payload swapped.
    pub fn signed_message(&self, run: &str) -> Vec<u8> {
        format!(
            "skytrain-update/v1|{run}|{}|{}|{}|{}|{}|{}",
            self.round,
            self.worker,
            self.public_key,
            self.samples,
            serde_json::to_string(&self.consumed).unwrap(),
            self.update_sha256
        )
        .into_bytes()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub worker: String,
    pub samples: u64,
    pub weight: f64,
    pub norm: f64,
    pub update_sha256: String,
    pub bytes: u64,
    pub mean_loss: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    pub worker: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub round: u64,
    /// "genesis", "all-reported", "reported-or-left" (the others' leases ended), "deadline" or
    /// "no-quorum" (model unchanged).
    pub closed_by: String,
    pub model_key: String,
    pub model_sha256: String,
    pub outer_key: String,
    pub outer_sha256: String,
    pub accepted: Vec<Accepted>,
    pub rejected: Vec<Rejected>,
    /// Members of the plan that sent nothing usable before the round closed.
    pub missing: Vec<String>,
    /// Next fresh data position, and assigned-but-untrained ranges to hand out first.
    pub next_position: u64,
    pub pending: Vec<DataRange>,
    pub mean_loss: Option<f64>,
    pub committed_ms: u64,
}

/// Heartbeat: who a worker is, what it runs on, how fast it is, when it was last seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker: String,
    pub public_key: String,
    pub started_ms: u64,
    pub last_seen_ms: u64,
    pub hardware: String,
    pub samples_per_s: Option<f64>,
    pub round: Option<u64>,
    /// Start-up measurements (training throughput, store bandwidth).
    #[serde(default)]
    pub selfcheck: Option<crate::sync::selfcheck::SelfCheck>,
    /// Latest GPU telemetry (empty without NVML).
    #[serde(default)]
    pub gpus: Vec<crate::observe::telemetry::GpuReading>,
    /// Set in the last heartbeat of a worker whose lease is ending (SIGTERM): the coordinator plans
    /// it no more rounds and stops waiting for its update in the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving_ms: Option<u64>,
}

/// Written create-only when the coordinator stops a run before its last round (budget).
pub const STOPPED_KEY: &str = "stopped.json";

/// Why and where a run was stopped early; the global model of `round` is its final checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stopped {
    pub reason: String,
    pub round: u64,
    pub model_key: String,
    pub model_sha256: String,
    pub spend_usd: f64,
    pub budget_usd: Option<f64>,
    pub stopped_ms: u64,
}

fn read_json<T: serde::de::DeserializeOwned>(store: &Store, key: &str) -> Result<Option<T>, SyncError> {
    match store.get_opt(key)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| SyncError::Invalid { file: format!("{}/{key}", store.url()), reason: e.to_string() }),
    }
}

pub fn read_plan(store: &Store, r: u64) -> Result<Option<Plan>, SyncError> {
    read_json(store, &plan_key(r))
}

pub fn read_commit(store: &Store, r: u64) -> Result<Option<Commit>, SyncError> {
    read_json(store, &commit_key(r))
}

/// The highest committed round and its commit (None before genesis).
pub fn latest_commit(store: &Store) -> Result<Option<Commit>, SyncError> {
    let latest = store
        .list("rounds")?
        .iter()
        .filter_map(|k| k.strip_suffix("/commit.json"))
        .filter_map(|d| d.rsplit('/').next()?.parse::<u64>().ok())
        .max();
    match latest {
        None => Ok(None),
        Some(r) => read_commit(store, r),
    }
}

/// A worker name (from the file name) and its record, or why the record could not be read.
pub type NamedRecord = (String, Result<UpdateRecord, String>);

/// The parseable update records of round `r` (malformed ones are reported by the caller as
/// rejected by name: the worker name is the file name).
pub fn read_records(store: &Store, r: u64) -> Result<Vec<NamedRecord>, SyncError> {
    let prefix = format!("{}/updates", round_dir(r));
    let mut out = Vec::new();
    for key in store.list(&prefix)? {
        let Some(name) = key.rsplit('/').next().and_then(|f| f.strip_suffix(".json")) else { continue };
        let parsed = match store.get_opt(&key)? {
            None => continue,
            Some(b) => serde_json::from_slice::<UpdateRecord>(&b).map_err(|e| format!("malformed record: {e}")),
        };
        out.push((name.to_string(), parsed));
    }
    Ok(out)
}

pub fn read_heartbeats(store: &Store) -> Result<Vec<Heartbeat>, SyncError> {
    let mut out = Vec::new();
    for key in store.list("workers")? {
        if let Ok(Some(h)) = read_json::<Heartbeat>(store, &key) {
            out.push(h);
        }
    }
    Ok(out)
}

/// Takes `want` positions: first from `pending`, then fresh from `next`.
pub fn assign(pending: &mut Vec<DataRange>, next: &mut u64, mut want: u64) -> Vec<DataRange> {
    let mut out = Vec::new();
    while want > 0 && !pending.is_empty() {
        let r = &mut pending[0];
        let take = r.len.min(want);
        out.push(DataRange { start: r.start, len: take });
        r.start += take;
        r.len -= take;
        want -= take;
        if r.len == 0 {
            pending.remove(0);
        }
    }
    if want > 0 {
        out.push(DataRange { start: *next, len: want });
        *next += want;
    }
    out
}

/// `assigned` minus `consumed` (consumed ranges are prefixes of assigned ones, in order).
pub fn unconsumed(assigned: &[DataRange], consumed: &[DataRange]) -> Vec<DataRange> {
    let done: u64 = consumed.iter().map(|r| r.len).sum();
    let mut skip = done;
    let mut out = Vec::new();
    for r in assigned {
        if skip >= r.len {
            skip -= r.len;
            continue;
        }
        out.push(DataRange { start: r.start + skip, len: r.len - skip });
        skip = 0;
    }
    out
}

/// The first `n` positions of `ranges`, as ranges.
pub fn prefix(ranges: &[DataRange], mut n: u64) -> Vec<DataRange> {
    let mut out = Vec::new();
    for r in ranges {
        if n == 0 {
            break;
        }
        let take = r.len.min(n);
        out.push(DataRange { start: r.start, len: take });
        n -= take;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_reuses_pending_ranges_first() {
        let mut pending = vec![DataRange { start: 100, len: 30 }];
        let mut next = 500;
        let a = assign(&mut pending, &mut next, 50);
        assert_eq!(a, vec![DataRange { start: 100, len: 30 }, DataRange { start: 500, len: 20 }]);
        assert!(pending.is_empty());
        assert_eq!(next, 520);
        let consumed = prefix(&a, 40);
        assert_eq!(unconsumed(&a, &consumed), vec![DataRange { start: 510, len: 10 }]);
        assert!(valid_worker_name("w-1_a") && !valid_worker_name("../x") && !valid_worker_name(""));
    }
}
