//! The records of a round and where they live in the store.
//!
//! ```text
//! rounds/<r>/plan.json                      create-only: members, data ranges, deadline
//! rounds/<r>/updates/<worker>.safetensors   compressed pseudo-gradient
//! rounds/<r>/updates/<worker>.json          signed record pointing at it (written last)
//! rounds/<r>/commit.json                    create-only: what was accepted and why others were not
//! state/<r>/model-<sha>.safetensors         θ_r (content-addressed: racing coordinators never clash)
//! state/<r>/outer-<sha>.safetensors         outer momentum after round r
//! workers/<worker>/<ms>-<nonce>.json       heartbeat (a new create-only object per beat)
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
/// Where a worker's heartbeats live: each beat is a new create-only object under an unguessable
/// key, and the worker deletes its previous one, so no one else's write replaces a worker's
/// heartbeat (a forged object beside it fails its signature check and is ignored).
pub fn heartbeat_prefix(worker: &str) -> String {
    format!("workers/{worker}/")
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
    /// The run this update belongs to: the random id in its genesis commit.
    #[serde(default)]
    pub run_id: String,
    pub round: u64,
    /// sha256 of the global model θ_{r-1} the update was computed from (the base commit's).
    #[serde(default)]
    pub base_sha256: String,
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
    /// Bytes the worker downloaded to reach this round's base model (the previous rounds'
    /// accepted updates, or the model and momentum whole).
    #[serde(default)]
    pub fetched_bytes: u64,
    /// Of `samples`' steps, those trained ahead while the previous round closed (`overlap_steps`),
    /// from the worker's estimate of the base model, then moved onto it.
    #[serde(default)]
    pub overlapped_steps: u64,
    pub signature: String,
}

impl UpdateRecord {
    /// What the signature covers: the run (its unique id, not its name), the round, the model the
    /// update was computed from, the worker, the work and the payload hash, so a record cannot be
    /// replayed into another round or run, applied to another model, nor its payload swapped.
    pub fn signed_message(&self) -> Vec<u8> {
        format!(
            "skytrain-update/v2|{}|{}|{}|{}|{}|{}|{}|{}",
            self.run_id,
            self.round,
            self.base_sha256,
            self.worker,
            self.public_key,
            self.samples,
            serde_json::to_string(&self.consumed).unwrap(),
            self.update_sha256
        )
        .into_bytes()
    }

    pub fn sign(&mut self, key: &super::keys::WorkerKey) {
        self.signature = key.sign(&self.signed_message());
    }

    /// Whether this record is `public_key`'s, for round `round` of run `run_id` on top of the model
    /// `base_sha256`; Err names the first binding that does not hold.
    pub fn check_binding(&self, run_id: &str, round: u64, base_sha256: &str, public_key: &str) -> Result<(), String> {
        if self.run_id != run_id {
            return Err(format!(
                "record is for run `{}`, not this run `{run_id}` (replayed from another run?)",
                self.run_id
            ));
        }
        if self.round != round {
            return Err(format!("record is for round {}, not {round} (replayed?)", self.round));
        }
        if self.base_sha256 != base_sha256 {
            return Err(format!(
                "update was computed from model {}, not this round's base {base_sha256}",
                short(&self.base_sha256)
            ));
        }
        if self.public_key != public_key {
            return Err("public key differs from the one the worker was planned with".into());
        }
        match super::keys::verify(&self.public_key, &self.signed_message(), &self.signature) {
            Ok(true) => Ok(()),
            Ok(false) => Err("missing or invalid signature".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(16)]
}

/// An update's effect (`sync::scoring`): losses at fixed noise before and after applying it, on
/// held-out samples the round fixes and on its member's own samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub held_out_before: f64,
    pub held_out_after: f64,
    /// Standard error of the held-out gain (of the mean of the per-sample gains).
    #[serde(default)]
    pub held_out_gain_se: f64,
    pub own_before: f64,
    pub own_after: f64,
}

impl Score {
    pub fn held_out_gain(&self) -> f64 {
        self.held_out_before - self.held_out_after
    }

    pub fn own_gain(&self) -> f64 {
        self.own_before - self.own_after
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<Score>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    pub worker: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<Score>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    /// The run's unique id, drawn at random in its genesis commit and carried by every commit:
    /// records and heartbeats sign it, so nothing from another run (even one of the same name,
    /// with the same admitted keys) is taken for this one's.
    #[serde(default)]
    pub run_id: String,
    pub round: u64,
    /// "genesis", "all-reported", "reported-or-left" (the others' leases ended), "deadline" or
    /// "no-quorum" (model unchanged).
    pub closed_by: String,
    /// Where the model and outer momentum after this round are; empty in rounds that write no
    /// state (`[sync] state_every`), whose state is the last one written plus the updates since.
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
    /// Seconds the coordinator spent scoring the round's updates (`[sync] score`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_seconds: Option<f64>,
}

impl Commit {
    /// Whether this round's model and momentum were written (see `model_key`).
    pub fn has_state(&self) -> bool {
        !self.model_key.is_empty()
    }
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
    /// The run (genesis id) the heartbeat is for.
    #[serde(default)]
    pub run_id: String,
    /// The worker's signature over who it is, for which run, when, and whether it is leaving: a
    /// heartbeat written by anyone else is ignored.
    #[serde(default)]
    pub signature: String,
}

impl Heartbeat {
    pub fn signed_message(&self) -> Vec<u8> {
        format!(
            "skytrain-heartbeat/v1|{}|{}|{}|{}|{}|{:?}|{:?}",
            self.run_id, self.worker, self.public_key, self.started_ms, self.last_seen_ms, self.leaving_ms, self.round
        )
        .into_bytes()
    }

    pub fn sign(&mut self, key: &super::keys::WorkerKey) {
        self.signature = key.sign(&self.signed_message());
    }

    /// Which of a worker's heartbeats is its newest: the later one, and of two written in the same
    /// millisecond the one that says it is leaving (a leave is final; a tie broken otherwise would
    /// let the beat just before it hide it, and its round wait for the deadline).
    pub fn is_newer_than(&self, other: &Heartbeat) -> bool {
        (self.last_seen_ms, self.leaving_ms.is_some()) > (other.last_seen_ms, other.leaving_ms.is_some())
    }

    /// Whether the heartbeat is signed by its own key for run `run_id`.
    pub fn is_valid(&self, run_id: &str) -> bool {
        self.run_id == run_id
            && valid_worker_name(&self.worker)
            && super::keys::verify(&self.public_key, &self.signed_message(), &self.signature).unwrap_or(false)
    }
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

/// The newest commit, read forward from `known` (one this process has read): commits are written
/// in round order and never deleted, so rounds `known + 1, …` are read until one is missing, one
/// read when nothing is new. Without `known`, [`latest_commit`] (a listing of every key under
/// `rounds/`, many pages on a long run: once per process, not per poll).
pub fn latest_commit_after(store: &Store, known: Option<&Commit>) -> Result<Option<Commit>, SyncError> {
    let Some(known) = known else { return latest_commit(store) };
    let mut newest = None;
    while let Some(c) = read_commit(store, newest.as_ref().unwrap_or(known).round + 1)? {
        newest = Some(c);
    }
    Ok(Some(newest.unwrap_or_else(|| known.clone())))
}

/// The newest commit that names its state: the latest written global model (None before genesis).
pub fn latest_state_commit(store: &Store) -> Result<Option<Commit>, SyncError> {
    match latest_commit(store)? {
        Some(c) if !c.has_state() => state_commit_at_or_before(store, c.round).map(Some),
        other => Ok(other),
    }
}

/// The newest commit at or before round `r` that names its state (genesis always does).
pub fn state_commit_at_or_before(store: &Store, r: u64) -> Result<Commit, SyncError> {
    for q in (0..=r).rev() {
        match read_commit(store, q)? {
            Some(c) if c.has_state() => return Ok(c),
            Some(_) => {}
            None => return Err(SyncError::Other(format!("commit {q} missing (looking for a written state)"))),
        }
    }
    Err(SyncError::Other("no commit names a state, not even genesis".into()))
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

/// Writes `hb` as a new object and deletes `previous` (an older one of the worker's); returns its key.
pub fn put_heartbeat(
    store: &Store,
    hb: &Heartbeat,
    previous: Option<&str>,
) -> Result<String, crate::store::StoreError> {
    let key = format!(
        "{}{:013}-{}.json",
        heartbeat_prefix(&hb.worker),
        hb.last_seen_ms,
        hex::encode(rand::random::<[u8; 8]>())
    );
    store.put_create(&key, serde_json::to_vec(hb).unwrap())?;
    if let Some(old) = previous {
        if let Err(e) = store.delete(old) {
            tracing::warn!("previous heartbeat {old} not deleted (it is ignored as older): {e}");
        }
    }
    Ok(key)
}

/// The newest validly signed heartbeat (for run `run_id`) among `keys`.
fn newest_valid(store: &Store, keys: &[String], run_id: &str) -> Result<Option<Heartbeat>, SyncError> {
    let mut best: Option<Heartbeat> = None;
    for key in keys {
        let Ok(Some(h)) = read_json::<Heartbeat>(store, key) else { continue };
        let worker_dir = key.strip_prefix("workers/").and_then(|k| k.split_once('/')).map(|(w, _)| w);
        if worker_dir == Some(h.worker.as_str())
            && h.is_valid(run_id)
            && best.as_ref().is_none_or(|b| h.is_newer_than(b))
        {
            best = Some(h);
        }
    }
    Ok(best)
}

/// Each worker's newest validly signed heartbeat for run `run_id`.
pub fn read_heartbeats(store: &Store, run_id: &str) -> Result<Vec<Heartbeat>, SyncError> {
    let mut by_worker: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for key in store.list("workers")? {
        if let Some((worker, _)) = key.strip_prefix("workers/").and_then(|k| k.split_once('/')) {
            by_worker.entry(worker.to_string()).or_default().push(key.clone());
        }
    }
    let mut out = Vec::new();
    for keys in by_worker.values() {
        out.extend(newest_valid(store, keys, run_id)?);
    }
    Ok(out)
}

/// One worker's newest validly signed heartbeat for run `run_id`.
pub fn read_heartbeat(store: &Store, run_id: &str, worker: &str) -> Result<Option<Heartbeat>, SyncError> {
    newest_valid(store, &store.list(&heartbeat_prefix(worker))?, run_id)
}

/// The data `worker` is planned in the round after `plan` if that round's members are again
/// `plan`'s and all of them report in full (so the commit carries `plan`'s queue on unchanged):
/// what a worker trains ahead on while `plan`'s round closes. None if it is not a member.
pub fn predicted_ranges(plan: &Plan, worker: &str, per_member: u64) -> Option<Vec<DataRange>> {
    let (mut pending, mut next) = (plan.pending.clone(), plan.next_position);
    let mut mine = None;
    // The coordinator assigns in the plan's member order (sorted by name), as here.
    for m in &plan.members {
        let ranges = assign(&mut pending, &mut next, per_member);
        if m.worker == worker {
            mine = Some(ranges);
        }
    }
    mine
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

    /// A leaving heartbeat written in the same millisecond as the beat before it is the newest,
    /// whichever of the two the store lists first.
    #[test]
    fn a_leave_in_the_same_millisecond_as_the_last_beat_is_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path().to_str().unwrap()).unwrap();
        let key = super::super::keys::WorkerKey::generate();
        let beat = |leaving_ms: Option<u64>| {
            let mut h = Heartbeat {
                run_id: "run".into(),
                worker: "w".into(),
                public_key: key.public_hex(),
                started_ms: 0,
                last_seen_ms: 1_000,
                hardware: String::new(),
                samples_per_s: None,
                round: None,
                selfcheck: None,
                gpus: Vec::new(),
                leaving_ms,
                signature: String::new(),
            };
            h.sign(&key);
            h
        };
        let (stay, leave) = (beat(None), beat(Some(999)));
        assert!(leave.is_newer_than(&stay) && !stay.is_newer_than(&leave) && !stay.is_newer_than(&stay));
        for _ in 0..8 {
            put_heartbeat(&store, &stay, None).unwrap();
            put_heartbeat(&store, &leave, None).unwrap();
            let newest = read_heartbeat(&store, "run", "w").unwrap().unwrap();
            assert_eq!(newest.leaving_ms, Some(999));
        }
    }
}
