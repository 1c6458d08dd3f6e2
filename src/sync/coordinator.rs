//! The coordinator: stateless; everything it knows it reads from the store each time round.
//! Killed and restarted anywhere, it picks up the latest commit; two running at once may both
//! compute a round, but the commit record is create-only, so only one of them commits it.

use std::time::Duration;

use super::history::Global;
use super::outer;
use super::params::ParamSet;
use super::protocol::*;
use super::scoring::{self, Scorer};
use super::{compress, SyncError};
use crate::config::RunSpec;
use crate::store::{sha256_hex, Store, StoreError};

/// Hashes a state and, if `write`, stores it content-addressed; returns (key, sha256), the key
/// empty when not written.
fn put_state(store: &Store, r: u64, kind: &str, state: &ParamSet, write: bool) -> Result<(String, String), SyncError> {
    if !write {
        return Ok((String::new(), state.sha256()));
    }
    put_state_bytes(store, r, kind, state.to_safetensors())
}

/// Stores a state file content-addressed; returns (key, sha256).
fn put_state_bytes(store: &Store, r: u64, kind: &str, bytes: Vec<u8>) -> Result<(String, String), SyncError> {
    let sha = sha256_hex(&bytes);
    let key = format!("state/{r:010}/{kind}-{}.safetensors", &sha[..16]);
    if !store.exists(&key)? {
        store.put(&key, bytes)?;
    }
    Ok((key, sha))
}

/// The global state the coordinator committed last, kept in memory so that the next round does
/// not read back and hash what it has just written (at dit-b size, 1.3 GB).
pub struct Held {
    model_sha256: String,
    outer_sha256: String,
    theta: ParamSet,
    momentum: ParamSet,
}

impl Held {
    /// `held` if it is `base`'s state, else `base`'s state from the store (the last one written,
    /// and the rounds since replayed).
    fn take_or_fetch(
        held: &mut Option<Held>,
        store: &Store,
        cfg: &crate::config::SyncConfig,
        base: &Commit,
    ) -> Result<Held, SyncError> {
        if let Some(h) = held.take() {
            if h.model_sha256 == base.model_sha256 && h.outer_sha256 == base.outer_sha256 {
                return Ok(h);
            }
        }
        let (g, _) = Global::reach(store, cfg, base)?;
        Ok(Held {
            model_sha256: base.model_sha256.clone(),
            outer_sha256: base.outer_sha256.clone(),
            theta: g.theta,
            momentum: g.momentum,
        })
    }
}

/// Deletes global states (`state/<r>/`) retention does not keep: genesis (replays start there),
/// those the newest `keep_last` commits point at or are replayed from, and rounds that are
/// multiples of `keep_every`. Updates are kept, so `run verify` still replays every round from
/// genesis.
pub fn prune_states(store: &Store, cfg: &crate::config::SyncConfig, last: u64) -> Result<Vec<String>, SyncError> {
    let window_start = (last + 1).saturating_sub(cfg.keep_last.max(1));
    let mut keep = std::collections::BTreeSet::new();
    let written = state_commit_at_or_before(store, window_start)?;
    keep.insert(written.model_key);
    keep.insert(written.outer_key);
    for r in window_start..=last {
        if let Some(c) = read_commit(store, r)? {
            keep.insert(c.model_key);
            keep.insert(c.outer_key);
        }
    }
    let mut deleted = Vec::new();
    for key in store.list("state")? {
        let Some(r) = key.split('/').nth(1).and_then(|x| x.parse::<u64>().ok()) else { continue };
        let milestone = cfg.keep_every > 0 && r.is_multiple_of(cfg.keep_every);
        if r == 0 || r >= window_start || milestone || keep.contains(&key) {
            continue;
        }
        store.delete(&key)?;
        deleted.push(key);
    }
    Ok(deleted)
}

/// Round 0: θ_0 from the run seed, zero momentum, and the run's unique id (drawn at `run init`; a
/// retry of a run under the same name is another run).
pub fn ensure_genesis(store: &Store, spec: &RunSpec) -> Result<Commit, SyncError> {
    if let Some(c) = read_commit(store, 0)? {
        return Ok(c);
    }
    let weights = crate::train::initial_weights(spec).map_err(SyncError::Other)?;
    let theta = ParamSet::from_safetensors(&weights, "initial weights")?;
    let (model_key, model_sha256) = put_state_bytes(store, 0, "model", weights)?;
    let (outer_key, outer_sha256) = put_state(store, 0, "outer", &ParamSet::zeros_like(&theta), true)?;
    let commit = Commit {
        run_id: crate::train::run::read_run_id(store)?.unwrap_or_default(),
        round: 0,
        closed_by: "genesis".into(),
        model_key,
        model_sha256,
        outer_key,
        outer_sha256,
        accepted: vec![],
        rejected: vec![],
        missing: vec![],
        next_position: 0,
        pending: vec![],
        mean_loss: None,
        committed_ms: now_ms(),
        score_seconds: None,
    };
    match store.put_create(&commit_key(0), serde_json::to_vec_pretty(&commit).unwrap()) {
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(read_commit(store, 0)?.expect("genesis just written"))
}

/// The newest validly signed heartbeat the coordinator has seen from each worker. Heartbeats
/// anyone else writes under a worker's name (unsigned, signed by another key or for another run)
/// are ignored, and so is an older one of the worker's own replayed over its newest: nothing a
/// third party writes makes a live worker look gone or leaving.
#[derive(Default)]
pub struct Heartbeats {
    newest: std::collections::BTreeMap<String, Heartbeat>,
}

impl Heartbeats {
    fn offer(&mut self, h: Heartbeat, run_id: &str) {
        if !h.is_valid(run_id) {
            return;
        }
        match self.newest.get(&h.worker) {
            Some(old) if !h.is_newer_than(old) => {}
            _ => {
                self.newest.insert(h.worker.clone(), h);
            }
        }
    }

    /// Reads every heartbeat in the store.
    pub fn refresh(&mut self, store: &Store, run_id: &str) -> Result<(), SyncError> {
        for h in read_heartbeats(store, run_id)? {
            self.offer(h, run_id);
        }
        Ok(())
    }

    /// Reads one worker's heartbeat.
    pub fn refresh_worker(&mut self, store: &Store, run_id: &str, worker: &str) -> Result<(), SyncError> {
        if let Some(h) = read_heartbeat(store, run_id, worker)? {
            self.offer(h, run_id);
        }
        Ok(())
    }

    pub fn get(&self, worker: &str) -> Option<&Heartbeat> {
        self.newest.get(worker)
    }
}

/// Plans round `base.round + 1` over the live, admitted workers (validly signed heartbeats, see
/// [`Heartbeats`]); None if too few.
pub fn make_plan(spec: &RunSpec, base: &Commit, heartbeats: &Heartbeats) -> Result<Option<Plan>, SyncError> {
    let cfg = &spec.sync;
    let now = now_ms();
    let timeout = (cfg.heartbeat_timeout_s * 1000.0) as u64;
    let mut live: Vec<Heartbeat> = heartbeats
        .newest
        .values()
        .filter(|h| now.saturating_sub(h.last_seen_ms) <= timeout)
        .filter(|h| h.leaving_ms.is_none())
        .filter(|h| cfg.admitted_keys.is_empty() || cfg.admitted_keys.contains(&h.public_key))
        .cloned()
        .collect();
    live.sort_by(|a, b| a.worker.cmp(&b.worker));
    if live.len() < cfg.min_members.max(1) {
        return Ok(None);
    }
    let per_member = cfg.inner_steps * spec.train.batch_size as u64;
    let mut pending = base.pending.clone();
    let mut next = base.next_position;
    let members = live
        .into_iter()
        .map(|h| Member {
            worker: h.worker,
            public_key: h.public_key,
            ranges: assign(&mut pending, &mut next, per_member),
        })
        .collect();
    Ok(Some(Plan {
        round: base.round + 1,
        members,
        deadline_ms: now + (cfg.round_deadline_s * 1000.0) as u64,
        created_ms: now,
        next_position: next,
        pending,
    }))
}

/// A candidate update that passed the per-update checks.
struct Candidate {
    record: UpdateRecord,
    delta: ParamSet,
    norm: f64,
    score: Option<Score>,
}

/// Validates one record and its payload against the plan and the model; Err is the reason.
/// Checks who sent a record: a member of the plan, with an admitted key, for this run, round and
/// base model, signed (`UpdateRecord::check_binding`). Err is the reason.
fn check_sender<'p>(
    spec: &RunSpec,
    plan: &'p Plan,
    base: &Commit,
    name: &str,
    rec: &UpdateRecord,
) -> Result<&'p Member, String> {
    if rec.round != plan.round {
        return Err(format!("record is for round {}, not {} (replayed?)", rec.round, plan.round));
    }
    if rec.worker != name {
        return Err(format!("record names worker `{}` but is stored as `{name}`", rec.worker));
    }
    let member = plan.members.iter().find(|m| m.worker == name).ok_or("not a member of this round's plan")?;
    let admitted = &spec.sync.admitted_keys;
    if !admitted.is_empty() && !admitted.contains(&rec.public_key) {
        return Err("public key not admitted by the run spec".into());
    }
    rec.check_binding(&base.run_id, plan.round, &base.model_sha256, &member.public_key)?;
    Ok(member)
}

fn check_update(
    store: &Store,
    spec: &RunSpec,
    plan: &Plan,
    base: &Commit,
    theta: &ParamSet,
    name: &str,
    record: Result<UpdateRecord, String>,
) -> Result<Candidate, String> {
    let rec = record?;
    let member = check_sender(spec, plan, base, name, &rec)?;
    let assigned: u64 = member.ranges.iter().map(|r| r.len).sum();
    if rec.samples == 0 || rec.samples > assigned || rec.consumed != prefix(&member.ranges, rec.samples) {
        return Err(format!("claims {} samples over {:?}, not a prefix of its assignment", rec.samples, rec.consumed));
    }
    let key = update_key(plan.round, name);
    let bytes = store.get_verified(&key, &rec.update_sha256).map_err(|e| format!("payload: {e}"))?;
    let delta = compress::decode(&bytes, theta, &key).map_err(|e| format!("payload: {e}"))?;
    if !delta.all_finite() {
        return Err("non-finite values in the update".into());
    }
    let norm = delta.l2_norm();
    Ok(Candidate { record: rec, delta, norm, score: None })
}

/// Closes round `plan.round` on top of `base`: validation, aggregation, outer step, state objects.
/// Returns the commit record to write; `held` (the base's state, if the caller has it) becomes the
/// state the commit names.
pub fn close_round(
    store: &Store,
    spec: &RunSpec,
    plan: &Plan,
    base: &Commit,
    closed_by: &str,
    scorer: &mut Option<Scorer>,
    held: &mut Option<Held>,
) -> Result<Commit, SyncError> {
    let cfg = &spec.sync;
    let Held { mut theta, mut momentum, .. } = Held::take_or_fetch(held, store, cfg, base)?;
    let mut rejected = Vec::new();
    let mut candidates = Vec::new();
    let started = std::time::Instant::now();
    let mut records = read_records(store, plan.round)?;
    records.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, record) in records {
        match check_update(store, spec, plan, base, &theta, &name, record) {
            Ok(c) => candidates.push(c),
            Err(reason) => rejected.push(Rejected { worker: name, reason, score: None }),
        }
    }
    // Norm bound against the median of the *other* updates, so one outlier cannot raise its own bar.
    let norms: Vec<f64> = candidates.iter().map(|c| c.norm).collect();
    let mut accepted_c = Vec::new();
    for (i, c) in candidates.into_iter().enumerate() {
        let others: Vec<f64> = norms.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, n)| *n).collect();
        let med = outer::median(&others);
        if !others.is_empty() && c.norm > cfg.norm_bound * med {
            rejected.push(Rejected {
                worker: c.record.worker.clone(),
                reason: format!(
                    "update norm {:.4e} exceeds {} × the median {:.4e} of the others",
                    c.norm, cfg.norm_bound, med
                ),
                score: None,
            });
        } else {
            accepted_c.push(c);
        }
    }
    // Scoring: each update's effect on the loss; those that do not help, and copies, are rejected.
    let mut score_seconds = None;
    if cfg.score && !accepted_c.is_empty() {
        let t0 = std::time::Instant::now();
        let scorer = match scorer {
            Some(s) => s,
            None => scorer.insert(Scorer::open(store, spec)?),
        };
        let mut entries = Vec::with_capacity(accepted_c.len());
        for c in &accepted_c {
            let uploaded_ms = store.modified_ms(&record_key(plan.round, &c.record.worker))?;
            let (worker, consumed, delta) = (&c.record.worker, &c.record.consumed, &c.delta);
            entries.push(scoring::Entry { worker, uploaded_ms, consumed, delta });
        }
        let scores = scorer.score(spec, plan, &theta, &entries)?;
        let verdicts = scoring::judge(&entries, &scores, cfg);
        for ((c, score), verdict) in accepted_c.iter_mut().zip(scores).zip(&verdicts) {
            c.score = Some(score);
            if let Some(reason) = verdict {
                rejected.push(Rejected { worker: c.record.worker.clone(), reason: reason.clone(), score: c.score });
            }
        }
        let mut verdicts = verdicts.into_iter();
        accepted_c.retain(|_| verdicts.next().expect("one per candidate").is_none());
        score_seconds = Some(t0.elapsed().as_secs_f64());
    }
    let checked_s = started.elapsed().as_secs_f64();
    let no_quorum = accepted_c.len() < cfg.quorum.max(1);
    if no_quorum {
        for c in accepted_c.drain(..) {
            let reason = "round closed without quorum".into();
            rejected.push(Rejected { worker: c.record.worker, reason, score: c.score });
        }
    }
    rejected.sort_by(|a, b| a.worker.cmp(&b.worker));
    // The outer step; a model that would not be finite is never committed: its updates are
    // rejected and the round keeps θ_r (their data goes back to the queue).
    let mut changed = false;
    if !accepted_c.is_empty() {
        let updates: Vec<(ParamSet, u64)> =
            accepted_c.iter_mut().map(|c| (std::mem::take(&mut c.delta), c.record.samples)).collect();
        let avg = outer::aggregate(&updates, cfg);
        outer::step(&mut theta, &mut momentum, &avg, cfg);
        changed = theta.all_finite() && momentum.all_finite();
        if !changed {
            (theta, momentum) = {
                let (g, _) = Global::reach(store, cfg, base)?;
                (g.theta, g.momentum)
            };
            for c in accepted_c.drain(..) {
                rejected.push(Rejected {
                    worker: c.record.worker,
                    reason: "the outer step with this round's updates gives a non-finite model".into(),
                    score: c.score,
                });
            }
            rejected.sort_by(|a, b| a.worker.cmp(&b.worker));
        }
    }
    let stepped_s = started.elapsed().as_secs_f64();
    // The state is written every `state_every` rounds and at the last; between, only hashed.
    let due = plan.round.is_multiple_of(cfg.state_every) || plan.round >= cfg.rounds;
    let (model_key, model_sha256, outer_key, outer_sha256) = if !changed && (base.has_state() || !due) {
        (base.model_key.clone(), base.model_sha256.clone(), base.outer_key.clone(), base.outer_sha256.clone())
    } else {
        // Model and momentum serialised, hashed (and uploaded) side by side.
        let (model, outer) = std::thread::scope(|s| {
            let model = s.spawn(|| put_state(store, plan.round, "model", &theta, due));
            let outer = put_state(store, plan.round, "outer", &momentum, due);
            (model.join().expect("state upload thread panicked"), outer)
        });
        let ((mk, ms), (ok, os)) = (model?, outer?);
        (mk, ms, ok, os)
    };
    *held = Some(Held { model_sha256: model_sha256.clone(), outer_sha256: outer_sha256.clone(), theta, momentum });
    let written_s = started.elapsed().as_secs_f64();
    tracing::info!(
        round = plan.round,
        checked_s,
        stepped_s,
        written_s,
        "round closed (seconds since it began closing)"
    );
    let total: u64 = accepted_c.iter().map(|c| c.record.samples).sum();
    let accepted: Vec<Accepted> = accepted_c
        .iter()
        .map(|c| Accepted {
            worker: c.record.worker.clone(),
            samples: c.record.samples,
            weight: c.record.samples as f64 / total.max(1) as f64,
            norm: c.norm,
            update_sha256: c.record.update_sha256.clone(),
            bytes: c.record.bytes,
            mean_loss: c.record.mean_loss,
            score: c.score,
        })
        .collect();
    // Data: anything assigned but not trained on by an accepted update goes back to the queue.
    let mut pending = plan.pending.clone();
    for m in &plan.members {
        match accepted_c.iter().find(|c| c.record.worker == m.worker) {
            Some(c) => pending.extend(unconsumed(&m.ranges, &c.record.consumed)),
            None => pending.extend(m.ranges.iter().copied()),
        }
    }
    let reported: Vec<&str> =
        accepted.iter().map(|a| a.worker.as_str()).chain(rejected.iter().map(|r| r.worker.as_str())).collect();
    let missing = plan.members.iter().map(|m| m.worker.clone()).filter(|w| !reported.contains(&w.as_str())).collect();
    let mean_loss = (!accepted.is_empty()).then(|| accepted.iter().map(|a| a.mean_loss * a.weight).sum());
    Ok(Commit {
        run_id: base.run_id.clone(),
        round: plan.round,
        closed_by: if no_quorum { "no-quorum".into() } else { closed_by.into() },
        model_key,
        model_sha256,
        outer_key,
        outer_sha256,
        accepted,
        rejected,
        missing,
        next_position: plan.next_position,
        pending,
        mean_loss,
        committed_ms: now_ms(),
        score_seconds,
    })
}

pub struct CoordinatorOptions {
    /// Give up after the store has been unreachable this long.
    pub max_outage: Duration,
    pub on_commit: Option<super::CommitHook>,
    /// Set to stop between two looks at the store (the binary sets it on SIGTERM): every write the
    /// coordinator makes is whole, so another coordinator can take over from there.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions { max_outage: Duration::from_secs(600), on_commit: None, stop: None }
    }
}

/// Runs rounds until the run's last round is committed.
pub fn run(store: &Store, mut opts: CoordinatorOptions) -> Result<(), SyncError> {
    let spec = crate::train::run::read_spec(store)?;
    store.probe_create_only()?;
    let poll = Duration::from_millis(spec.sync.poll_ms.max(10));
    let mut outage = super::Outage::new(opts.max_outage);
    let mut session = crate::ledger::Session {
        role: "coordinator".into(),
        name: "coordinator".into(),
        started_ms: now_ms(),
        last_seen_ms: now_ms(),
        gpus: 0,
        price: crate::ledger::lease_price_from_env(),
    };
    let mut last_session = 0;
    let mut budget = Budget { warned: false, checked_ms: 0 };
    let mut events = crate::observe::tensorboard::EventWriter::new(store, "coordinator");
    let mut heartbeats = Heartbeats::default();
    let mut scorer: Option<Scorer> = None;
    let mut held: Option<Held> = None;
    // The newest commit seen: each tick reads forward from it instead of listing every round.
    let mut known: Option<Commit> = None;
    loop {
        if opts.stop.as_ref().is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
            tracing::warn!("stopping (asked to): every round so far is whole; a coordinator started later continues");
            events.flush()?;
            return Ok(());
        }
        // The coordinator's own lease time, for the ledger (best effort: retried next tick).
        if now_ms() >= last_session + 2000 {
            session.last_seen_ms = now_ms();
            if store.put(&session.key(), serde_json::to_vec(&session).unwrap()).is_ok() {
                last_session = session.last_seen_ms;
            }
        }
        let step = match budget.check(store, &spec) {
            Ok(true) => Ok(Tick::Done),
            Ok(false) => tick(store, &spec, &mut known, &mut heartbeats, &mut scorer, &mut held),
            Err(e) => Err(e),
        };
        match step {
            Ok(Tick::Done) => {
                events.flush()?;
                return Ok(());
            }
            Ok(Tick::Committed(c)) => {
                outage.ok();
                let t = c.committed_ms;
                events.scalar("round/accepted", c.round, c.accepted.len() as f64, t);
                events.scalar("round/rejected", c.round, c.rejected.len() as f64, t);
                events.scalar("round/missing", c.round, c.missing.len() as f64, t);
                events.scalar(
                    "round/bytes_received",
                    c.round,
                    c.accepted.iter().map(|a| a.bytes).sum::<u64>() as f64,
                    t,
                );
                if let Some(l) = c.mean_loss {
                    events.scalar("round/mean_inner_loss", c.round, l, t);
                }
                if c.round.is_multiple_of(10) {
                    events.flush()?;
                }
                if let Some(cb) = opts.on_commit.as_mut() {
                    cb(&c);
                }
            }
            Ok(Tick::Wait) => {
                outage.ok();
                std::thread::sleep(poll);
            }
            Err(SyncError::Store(e)) => outage.wait_out(&e, poll.max(Duration::from_secs(1)))?,
            Err(e) => return Err(e),
        }
    }
}

/// The run's budget: a warning at `warn_fraction`, and at 100% no new round: the last committed
/// global model becomes the final checkpoint, recorded in `stopped.json`.
struct Budget {
    warned: bool,
    /// When the ledger was last read: spend moves slowly, rounds are polled fast.
    checked_ms: u64,
}

impl Budget {
    /// Whether the run is (now) stopped. Without a budget nothing is read; with one, the ledger
    /// is read at most every 2 s.
    fn check(&mut self, store: &Store, spec: &RunSpec) -> Result<bool, SyncError> {
        let Some(limit) = spec.cost.budget_usd else { return Ok(false) };
        if now_ms() < self.checked_ms + 2000 {
            return Ok(false);
        }
        self.checked_ms = now_ms();
        if store.exists(STOPPED_KEY)? {
            return Ok(true);
        }
        let spend = crate::ledger::spend(store, &spec.cost).map_err(|e| SyncError::Other(e.to_string()))?;
        let fraction = spend.usd / limit;
        if fraction >= spec.cost.warn_fraction && !self.warned {
            self.warned = true;
            tracing::warn!("budget: {:.2} of {limit:.2} USD spent ({:.0}%)", spend.usd, 100.0 * fraction);
            let alert = serde_json::json!({ "spend_usd": spend.usd, "budget_usd": limit, "time_ms": now_ms() });
            let key = format!("ledger-alerts/budget-{:.0}.json", 100.0 * spec.cost.warn_fraction);
            match store.put_create(&key, serde_json::to_vec_pretty(&alert).unwrap()) {
                Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if fraction < 1.0 {
            return Ok(false);
        }
        let Some(last) = latest_commit(store)? else { return Ok(false) };
        // The final model is written if its round wrote no state.
        let (model_key, model_sha256) = if last.has_state() {
            (last.model_key.clone(), last.model_sha256.clone())
        } else {
            let (g, _) = Global::reach(store, &spec.sync, &last)?;
            put_state(store, last.round, "model", &g.theta, true)?
        };
        let stopped = Stopped {
            reason: "budget".into(),
            round: last.round,
            model_key,
            model_sha256,
            spend_usd: spend.usd,
            budget_usd: Some(limit),
            stopped_ms: now_ms(),
        };
        match store.put_create(STOPPED_KEY, serde_json::to_vec_pretty(&stopped).unwrap()) {
            Ok(()) => tracing::warn!(
                round = last.round,
                "budget exhausted ({:.2} of {limit:.2} USD): no new rounds; round {}'s model is final",
                spend.usd,
                last.round
            ),
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(true)
    }
}

enum Tick {
    Done,
    Committed(Box<Commit>),
    Wait,
}

/// One look at the store: open, close or wait for the next round.
fn tick(
    store: &Store,
    spec: &RunSpec,
    known: &mut Option<Commit>,
    heartbeats: &mut Heartbeats,
    scorer: &mut Option<Scorer>,
    held: &mut Option<Held>,
) -> Result<Tick, SyncError> {
    let base = match latest_commit_after(store, known.as_ref())? {
        Some(c) => c,
        None => ensure_genesis(store, spec)?,
    };
    *known = Some(base.clone());
    if base.round >= spec.sync.rounds {
        return Ok(Tick::Done);
    }
    let r = base.round + 1;
    let plan = match read_plan(store, r)? {
        Some(p) => p,
        None => match make_plan(spec, &base, {
            heartbeats.refresh(store, &base.run_id)?;
            heartbeats
        })? {
            None => return Ok(Tick::Wait),
            Some(p) => match store.put_create(&plan_key(r), serde_json::to_vec_pretty(&p).unwrap()) {
                Ok(()) => {
                    tracing::debug!(round = r, members = p.members.len(), "round planned");
                    p
                }
                Err(StoreError::AlreadyExists { .. }) => return Ok(Tick::Wait),
                Err(e) => return Err(e.into()),
            },
        },
    };
    // A member has reported once a record from it, for this run, round and base, is in the store;
    // one anyone else wrote under its name does not close the round early (it is rejected, with
    // its reason, only if still there when the round closes).
    let reported: Vec<String> = read_records(store, r)?
        .into_iter()
        .filter(|(name, rec)| rec.as_ref().is_ok_and(|rec| check_sender(spec, &plan, &base, name, rec).is_ok()))
        .map(|(n, _)| n)
        .collect();
    let waiting_for = |m: &&Member| !reported.contains(&m.worker);
    // Members whose lease ended will not report: their data goes back to the queue now rather
    // than at the deadline. A plan names only workers whose newest heartbeat was not leaving, so
    // a newest heartbeat that says leaving came after the one it was planned from, whatever its
    // time says (a worker can leave while the plan is being made, before `created_ms`).
    let mut left = Vec::new();
    for m in plan.members.iter().filter(waiting_for) {
        heartbeats.refresh_worker(store, &base.run_id, &m.worker)?;
        let hb = heartbeats.get(&m.worker).filter(|h| h.public_key == m.public_key);
        if hb.is_some_and(|h| h.leaving_ms.is_some()) {
            left.push(m.worker.clone());
        }
    }
    let closed_by = if plan.members.iter().all(|m| !waiting_for(&m)) {
        "all-reported"
    } else if plan.members.iter().filter(waiting_for).all(|m| left.contains(&m.worker)) {
        "reported-or-left"
    } else if now_ms() >= plan.deadline_ms {
        "deadline"
    } else {
        return Ok(Tick::Wait);
    };
    let commit = close_round(store, spec, &plan, &base, closed_by, scorer, held)?;
    match store.put_create(&commit_key(r), serde_json::to_vec_pretty(&commit).unwrap()) {
        Ok(()) => {
            tracing::debug!(
                round = r,
                accepted = commit.accepted.len(),
                rejected = commit.rejected.len(),
                closed_by = %commit.closed_by,
                "round committed"
            );
            if let Err(e) = prune_states(store, &spec.sync, r) {
                tracing::warn!(round = r, "could not prune old global states (they stay): {e}");
            }
            Ok(Tick::Committed(Box::new(commit)))
        }
        // Another coordinator committed this round first: theirs stands.
        Err(e) => {
            *held = None;
            match e {
                StoreError::AlreadyExists { .. } => Ok(Tick::Wait),
                e => Err(e.into()),
            }
        }
    }
}

/// Recomputes every committed round from genesis using the stored updates and checks each
/// resulting model hash against its commit; returns the number of rounds verified.
pub fn verify_history(store: &Store) -> Result<u64, SyncError> {
    let spec = crate::train::run::read_spec(store)?;
    let genesis = read_commit(store, 0)?.ok_or_else(|| SyncError::Other("no genesis commit".into()))?;
    let theta = ParamSet::from_safetensors(
        &store.get_verified(&genesis.model_key, &genesis.model_sha256)?,
        &genesis.model_key,
    )?;
    let momentum = ParamSet::zeros_like(&theta);
    let mut global = super::history::Global { round: 0, theta, momentum, sha256: genesis.model_sha256.clone() };
    let mut base = genesis;
    let mut r = 1;
    while let Some(c) = read_commit(store, r)? {
        let invalid = |reason: String| SyncError::Invalid { file: commit_key(r), reason };
        if c.run_id != base.run_id {
            return Err(invalid(format!("commit names run `{}`, the genesis `{}`", c.run_id, base.run_id)));
        }
        if !c.accepted.is_empty() {
            // Every accepted update: signed by its planned member for this run, round and base model.
            let plan = read_plan(store, r)?.ok_or_else(|| invalid("round has a commit but no plan".into()))?;
            for a in &c.accepted {
                let rec: UpdateRecord = serde_json::from_slice(&store.get(&record_key(r, &a.worker))?)
                    .map_err(|e| invalid(format!("{}: {e}", record_key(r, &a.worker))))?;
                check_sender(&spec, &plan, &base, &a.worker, &rec)
                    .map_err(|why| invalid(format!("accepted update of `{}`: {why}", a.worker)))?;
                if rec.update_sha256 != a.update_sha256 {
                    return Err(invalid(format!("accepted update of `{}` is not the one its record signs", a.worker)));
                }
            }
        }
        global.apply(store, &spec.sync, &c, &mut Default::default())?;
        base = c;
        r += 1;
    }
    Ok(r - 1)
}
