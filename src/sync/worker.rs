//! A worker: joins the run by heartbeating, trains H inner steps on its planned data each round
//! it is a member of, and uploads its signed, compressed pseudo-gradient. Its inner AdamW state and
//! error-feedback residual live only in memory: a restarted worker starts fresh from the global
//! model, as DiLoCo allows, and nothing of the run's is lost with it.
//!
//! Between rounds it keeps the global model and outer momentum and reaches the next round's by
//! applying that round's accepted updates (`history`), checked against the commit's model hash:
//! with the sparse codec a few kilobytes per member instead of the model's 4 bytes per parameter.
//! The model is fetched whole only to join, to recover, or when the updates would cost more.
//!
//! With `overlap_steps` the sync hides behind compute: a second thread sends the update and
//! catches up while this one trains the next round's first steps from the local model, which are
//! then moved onto θ_r (a one-step-delayed outer update).
//!
//! A lease that ends stops the container with SIGTERM and a grace period. When `leave` is set the
//! worker finishes its round's update if that fits in the grace period, or uploads the part it has
//! trained (a prefix of its assignment, which the coordinator accepts), then writes a last
//! heartbeat saying it is leaving, so the coordinator returns the rest of its data at once instead
//! of waiting for the round's deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::history::Global;
use super::params::ParamSet;
use super::protocol::*;
use super::{compress, keys::WorkerKey, SyncError};
use crate::store::{sha256_hex, Store};
use crate::train::Trainer;

pub struct WorkerOptions {
    pub name: String,
    pub key: WorkerKey,
    pub hardware: String,
    pub max_outage: Duration,
    /// Called after each uploaded update: (round, mean inner loss, bytes uploaded).
    pub on_update: Option<super::UpdateHook>,
    /// Measure training throughput and store bandwidth at start (published in the heartbeat).
    pub selfcheck: bool,
    /// Set when the lease is ending (the binary sets it on SIGTERM).
    pub leave: Option<Arc<AtomicBool>>,
    /// How long after `leave` is set the process may still run (the lease's grace period).
    pub grace: Duration,
}

/// What runs a round's inner steps: the [`Trainer`], or, to measure the protocol at a model size
/// this machine cannot train, a stand-in that takes a measured step time (`examples/standin_worker.rs`).
pub trait InnerLoop {
    /// Starts the round's local model at θ (`file` names it in errors).
    fn start(&mut self, theta: &ParamSet, file: &str) -> Result<(), SyncError>;
    /// One inner step on the samples at `batch` (`index`: its batch number in the run) at `lr`;
    /// returns the loss.
    fn step(&mut self, batch: &[u64], index: u64, lr: f64) -> Result<f64, SyncError>;
    /// The local model after the round's steps.
    fn local(&mut self) -> Result<ParamSet, SyncError>;
    /// Carries the steps trained ahead from `from` over to θ: the local model moves by θ − `from`,
    /// the optimizer state stays.
    fn rebase(&mut self, theta: &ParamSet, from: &ParamSet) -> Result<(), SyncError> {
        let mut local = self.local()?;
        let moves = theta.data.iter().flatten().zip(from.data.iter().flatten());
        for (l, (t, f)) in local.data.iter_mut().flatten().zip(moves) {
            *l += t - f;
        }
        self.start(&local, "the local model of the steps trained ahead")
    }
    /// What it runs on, for the heartbeat, and the GPUs it holds, for the cost ledger.
    fn hardware(&self, host: &str) -> (String, u32);
}

impl InnerLoop for Trainer {
    fn start(&mut self, theta: &ParamSet, file: &str) -> Result<(), SyncError> {
        self.load_weights(&theta.to_safetensors(), file)
            .map_err(|e| SyncError::Invalid { file: file.to_string(), reason: e.to_string() })
    }

    fn step(&mut self, batch: &[u64], index: u64, lr: f64) -> Result<f64, SyncError> {
        Ok(self.step_on(batch, index, lr).map_err(crate::train::run::RunError::from)?.loss)
    }

    fn local(&mut self) -> Result<ParamSet, SyncError> {
        Ok(ParamSet::from_safetensors(&self.model.to_safetensors(None), "local model")?)
    }

    fn hardware(&self, host: &str) -> (String, u32) {
        // One GPU per replica (train.replicas) on CUDA.
        let gpus = if self.model.device.is_cuda() { self.spec.train.replicas as u32 } else { 0 };
        (format!("{host}, {} libtorch threads", tch::get_num_threads()), gpus)
    }
}

/// The default grace: inside the 30 s that Kubernetes (under Akash's providers) allows by default
/// between SIGTERM and SIGKILL, with a margin for the last heartbeat.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(25);

/// When the worker must be done, once it has been asked to leave.
struct Leaving<'a> {
    flag: Option<&'a AtomicBool>,
    grace: Duration,
    since: std::cell::Cell<Option<Instant>>,
}

impl Leaving<'_> {
    /// The instant by which everything must be uploaded, once leaving (None while not).
    fn deadline(&self) -> Option<Instant> {
        if !self.flag?.load(Ordering::Relaxed) {
            return None;
        }
        let since = self.since.get().unwrap_or_else(Instant::now);
        self.since.set(Some(since));
        Some(since + self.grace)
    }
}

/// What the training loop tells the heartbeat: the round it last worked on and its samples/s (as
/// f64 bits).
#[derive(Default)]
struct Progress {
    round: AtomicU64,
    samples_per_s: AtomicU64,
}

/// Writes the heartbeat, signed, every `every` until `stop`, with the training loop's `progress`.
/// The heartbeat also carries GPU telemetry and rewrites this process's ledger session (its lease
/// time so far, for the cost ledger).
fn heartbeat_loop(
    store: Store,
    key: WorkerKey,
    mut hb: Heartbeat,
    every: Duration,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    mut session: crate::ledger::Session,
) -> (Heartbeat, Option<String>, crate::ledger::Session) {
    // (returns the oldest heartbeat object still in the store, for the last beat to replace)
    let telemetry = crate::observe::telemetry::Telemetry::start();
    // The last two heartbeat objects: the one before them is deleted as a new one is written, so a
    // reader that listed a key just before its deletion still finds the other.
    let mut written: std::collections::VecDeque<String> = Default::default();
    while !stop.load(Ordering::Relaxed) {
        hb.last_seen_ms = now_ms();
        let r = progress.round.load(Ordering::Relaxed);
        hb.round = (r > 0).then_some(r);
        let t = f64::from_bits(progress.samples_per_s.load(Ordering::Relaxed));
        hb.samples_per_s = (t > 0.0).then_some(t);
        hb.gpus = telemetry.read();
        hb.sign(&key);
        let expired = if written.len() >= 2 { written.front().cloned() } else { None };
        match put_heartbeat(&store, &hb, expired.as_deref()) {
            Ok(k) => {
                if expired.is_some() {
                    written.pop_front();
                }
                written.push_back(k);
            }
            Err(e) => tracing::warn!("heartbeat failed, will retry: {e}"),
        }
        session.last_seen_ms = hb.last_seen_ms;
        if let Err(e) = store.put(&session.key(), serde_json::to_vec(&session).unwrap()) {
            tracing::warn!("ledger session not written, will retry: {e}");
        }
        let t0 = Instant::now();
        while t0.elapsed() < every && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    (hb, written.pop_front(), session)
}

/// Runs a worker that trains with the run's model on the run's data.
pub fn run(store: &Store, opts: WorkerOptions) -> Result<(), SyncError> {
    let spec = crate::train::run::read_spec(store)?;
    let data = crate::train::run::open_data(store, &spec)?;
    let mut trainer = Trainer::with_data(spec.clone(), data).map_err(SyncError::Other)?;
    run_with(store, opts, &mut trainer)
}

/// Runs a worker whose inner steps `inner` takes.
pub fn run_with(store: &Store, mut opts: WorkerOptions, inner: &mut dyn InnerLoop) -> Result<(), SyncError> {
    if !valid_worker_name(&opts.name) {
        return Err(SyncError::Other(format!("worker name `{}`: use 1–64 of [A-Za-z0-9_-]", opts.name)));
    }
    let spec = crate::train::run::read_spec(store)?;
    store.probe_create_only()?;
    let public_key = opts.key.public_hex();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let started_ms = now_ms();
    let run_id = crate::train::run::read_run_id(store)?.unwrap_or_default();
    let selfcheck = if opts.selfcheck {
        match crate::sync::selfcheck::run(&spec, store, &opts.name, 3) {
            Ok(c) => {
                tracing::info!(
                    "self-check: {:.1} samples/s, store ↑{:.1} ↓{:.1} MB/s",
                    c.train_samples_per_s,
                    c.store_up_mb_s,
                    c.store_down_mb_s
                );
                Some(c)
            }
            Err(e) => {
                tracing::warn!("self-check failed (store): {e}");
                None
            }
        }
    } else {
        None
    };
    let (hardware, gpus) = inner.hardware(&opts.hardware);
    let hb = Heartbeat {
        worker: opts.name.clone(),
        public_key: public_key.clone(),
        started_ms,
        last_seen_ms: now_ms(),
        hardware,
        samples_per_s: selfcheck.as_ref().map(|c| c.train_samples_per_s).filter(|&t| t > 0.0),
        round: None,
        selfcheck,
        gpus: Vec::new(),
        leaving_ms: None,
        run_id,
        signature: String::new(),
    };
    let session = crate::ledger::Session {
        role: "worker".into(),
        name: opts.name.clone(),
        started_ms,
        last_seen_ms: started_ms,
        gpus,
        price: crate::ledger::lease_price_from_env(),
    };
    let every = Duration::from_secs_f64((spec.sync.heartbeat_timeout_s / 4.0).clamp(0.2, 15.0));
    let hb_thread = {
        let (store, key, stop, progress) = (store.clone(), opts.key.clone(), stop.clone(), progress.clone());
        std::thread::spawn(move || heartbeat_loop(store, key, hb, every, stop, progress, session))
    };
    let mut events = crate::observe::tensorboard::EventWriter::new(store, &format!("worker-{}", opts.name));
    let poll = Duration::from_millis(spec.sync.poll_ms.max(10));
    let mut error_feedback: Option<ParamSet> = None;
    let mut global: Option<Global> = None;
    let mut prefetched = Prefetched::default();
    let mut head_start = None;
    let mut known = None;
    let mut outage = super::Outage::new(opts.max_outage);
    let mut stop_checked_ms = 0;
    let leaving = Leaving { flag: opts.leave.as_deref(), grace: opts.grace, since: Default::default() };
    let result = loop {
        if leaving.deadline().is_some() {
            break Ok(());
        }
        let state = RoundState {
            error_feedback: &mut error_feedback,
            global: &mut global,
            prefetched: &mut prefetched,
            head_start: &mut head_start,
            known: &mut known,
        };
        match work_once(store, &spec, inner, &opts, &public_key, state, &leaving) {
            Ok(Step::Done) => break Ok(()),
            Ok(Step::Worked { round, loss, bytes, fetched, samples_per_s }) => {
                outage.ok();
                progress.round.store(round, Ordering::Relaxed);
                progress.samples_per_s.store(samples_per_s.to_bits(), Ordering::Relaxed);
                let t = now_ms();
                events.scalar("worker/inner_loss", round, loss, t);
                events.scalar("worker/bytes_sent", round, bytes as f64, t);
                events.scalar("worker/bytes_fetched", round, fetched as f64, t);
                events.scalar("worker/samples_per_s", round, samples_per_s, t);
                if round.is_multiple_of(10) {
                    if let Err(e) = events.flush() {
                        tracing::warn!("tensorboard events not written: {e}");
                    }
                }
                if let Some(cb) = opts.on_update.as_mut() {
                    cb(round, loss, bytes);
                }
            }
            Ok(Step::Idle) => {
                outage.ok();
                // A run stopped early (budget) plans no more rounds: while idle, look for its stop
                // record, at most once a second.
                if now_ms() >= stop_checked_ms + 1000 {
                    stop_checked_ms = now_ms();
                    if store.exists(STOPPED_KEY).unwrap_or(false) {
                        tracing::warn!("the run was stopped (stopped.json); leaving");
                        break Ok(());
                    }
                }
                std::thread::sleep(poll);
            }
            Err(SyncError::Store(e)) => {
                if let Err(fatal) = outage.wait_out(&e, poll.max(Duration::from_secs(1))) {
                    break Err(fatal);
                }
            }
            Err(e) => break Err(e),
        }
    };
    stop.store(true, Ordering::Relaxed);
    let last_beat = hb_thread.join();
    if let (Some(_), Ok((mut hb, previous, mut session))) = (leaving.deadline(), last_beat) {
        hb.leaving_ms = Some(now_ms());
        hb.last_seen_ms = now_ms();
        hb.sign(&opts.key);
        session.last_seen_ms = hb.last_seen_ms;
        let written = put_heartbeat(store, &hb, previous.as_deref())
            .and_then(|_| store.put(&session.key(), serde_json::to_vec(&session).unwrap()));
        match written {
            Ok(()) => tracing::warn!("leaving (lease ending): told the coordinator"),
            Err(e) => tracing::warn!("leaving (lease ending); the last heartbeat was not written: {e}"),
        }
    }
    if let Err(e) = events.flush() {
        tracing::warn!("tensorboard events not written: {e}");
    }
    result
}

enum Step {
    Done,
    Idle,
    Worked { round: u64, loss: f64, bytes: u64, fetched: u64, samples_per_s: f64 },
}

/// What a worker carries from round to round: its error-feedback residual, the global state and
/// the payloads of the round it sent to.
struct RoundState<'a> {
    error_feedback: &'a mut Option<ParamSet>,
    global: &'a mut Option<Global>,
    prefetched: &'a mut Prefetched,
    head_start: &'a mut Option<HeadStart>,
    /// The newest commit seen: the next poll reads forward from it instead of listing every round.
    known: &'a mut Option<Commit>,
}

/// Round r+1's first inner steps, trained while round r closes (`overlap_steps`): from this
/// worker's own round-r local model (its estimate of θ_r), on the data it expects to be planned.
struct HeadStart {
    round: u64,
    ranges: Vec<DataRange>,
    /// The local model the steps started from.
    from: ParamSet,
    losses: Vec<f64>,
    seconds: f64,
}

/// Update payloads of the round this worker has sent to, gathered while that round closes so that
/// catching up needs only the commit: its own, kept as it is sent, and the other members' as their
/// records appear. Each matches its signed record's hash here and the commit's when applied.
#[derive(Default)]
struct Prefetched {
    round: u64,
    payloads: HashMap<String, Bytes>,
    /// Bytes downloaded here and not yet reported (they count as the next catch-up's).
    downloaded: u64,
}

impl Prefetched {
    fn keep(&mut self, round: u64, key: String, payload: Bytes) {
        if self.round != round {
            self.payloads.clear();
            self.round = round;
        }
        self.payloads.insert(key, payload);
    }

    /// Fetches the payloads of round `plan.round`'s members whose records are in, while they
    /// total at most `budget` bytes (what fetching the model whole would cost).
    fn gather(&mut self, store: &Store, plan: &Plan, budget: u64) -> Result<(), SyncError> {
        let mut held: u64 =
            if self.round == plan.round { self.payloads.values().map(|p| p.len() as u64).sum() } else { 0 };
        for m in &plan.members {
            let key = update_key(plan.round, &m.worker);
            if self.round == plan.round && self.payloads.contains_key(&key) {
                continue;
            }
            let Some(b) = store.get_opt(&record_key(plan.round, &m.worker))? else { continue };
            let Ok(rec) = serde_json::from_slice::<UpdateRecord>(&b) else { continue };
            if held + rec.bytes > budget {
                return Ok(());
            }
            match store.get_opt(&key)? {
                Some(payload) if sha256_hex(&payload) == rec.update_sha256 => {
                    held += payload.len() as u64;
                    self.downloaded += payload.len() as u64;
                    self.keep(plan.round, key, payload);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Brings `global` to commit `base`: by applying the accepted updates of each round since (when
/// they are fewer bytes than the model and momentum), each checked against its commit's model
/// hash; else, or if that fails, by fetching the last written state and replaying the rounds since
/// (`Global::reach`). Returns bytes fetched.
fn catch_up(
    store: &Store,
    spec: &crate::config::RunSpec,
    global: &mut Option<Global>,
    prefetched: &mut Prefetched,
    base: &Commit,
) -> Result<u64, SyncError> {
    if let Some(g) = global.as_mut() {
        if g.round == base.round && g.sha256 == base.model_sha256 {
            return Ok(0);
        }
        if g.round < base.round {
            let mut commits = Vec::new();
            for r in g.round + 1..base.round {
                commits.push(read_commit(store, r)?.ok_or_else(|| SyncError::Other(format!("commit {r} missing")))?);
            }
            commits.push(base.clone());
            let updates: u64 = commits.iter().flat_map(|c| &c.accepted).map(|a| a.bytes).sum();
            if updates < 8 * g.theta.numel() as u64 {
                let mut fetched = 0;
                let mut failed = None;
                for c in &commits {
                    match g.apply(store, &spec.sync, c, &mut prefetched.payloads) {
                        Ok(b) => fetched += b,
                        Err(SyncError::Store(e)) => return Err(SyncError::Store(e)),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    None => return Ok(fetched),
                    Some(e) => tracing::warn!("could not apply the rounds' updates ({e}); fetching the model whole"),
                }
            }
        }
    }
    *global = None;
    let (g, bytes) = Global::reach(store, &spec.sync, base)?;
    *global = Some(g);
    Ok(bytes)
}

fn work_once(
    store: &Store,
    spec: &crate::config::RunSpec,
    inner: &mut dyn InnerLoop,
    opts: &WorkerOptions,
    public_key: &str,
    state: RoundState,
    leaving: &Leaving,
) -> Result<Step, SyncError> {
    let Some(base) = latest_commit_after(store, state.known.as_ref())? else { return Ok(Step::Idle) };
    *state.known = Some(base.clone());
    if base.round >= spec.sync.rounds {
        return Ok(Step::Done);
    }
    let r = base.round + 1;
    let Some(plan) = read_plan(store, r)? else { return Ok(Step::Idle) };
    let Some(member) = plan.members.iter().find(|m| m.worker == opts.name) else { return Ok(Step::Idle) };
    if member.public_key != public_key || now_ms() >= plan.deadline_ms {
        return Ok(Step::Idle);
    }
    // Already sent (this process before a restart)? Only a record this key signed for this run,
    // round and base counts: one someone else put under our name is overwritten.
    if let Some(b) = store.get_opt(&record_key(r, &opts.name))? {
        let ours = serde_json::from_slice::<UpdateRecord>(&b)
            .is_ok_and(|rec| rec.check_binding(&base.run_id, r, &base.model_sha256, public_key).is_ok());
        if ours {
            if let Some(g) = state.global.as_ref() {
                state.prefetched.gather(store, &plan, 4 * g.theta.numel() as u64)?;
            }
            return Ok(Step::Idle);
        }
        tracing::warn!(round = r, "a record not signed by this worker sits under its name; sending ours over it");
    }
    // Start from θ_r.
    let caught_up = Instant::now();
    let fetched = catch_up(store, spec, state.global, state.prefetched, &base)?
        + std::mem::take(&mut state.prefetched.downloaded);
    tracing::info!(round = r, fetched, seconds = caught_up.elapsed().as_secs_f64(), "caught up");
    let theta = &state.global.as_ref().expect("caught up").theta;
    let label = if base.has_state() { base.model_key.clone() } else { format!("round {}'s model", base.round) };
    // Steps trained ahead on this very data are kept, moved onto θ_r; otherwise start from θ_r.
    let (mut losses, ahead_seconds) = match state.head_start.take() {
        Some(ahead) if ahead.round == r && ahead.ranges == member.ranges => {
            inner.rebase(theta, &ahead.from)?;
            tracing::info!(round = r, steps = ahead.losses.len(), "steps trained ahead kept, moved onto θ_r");
            (ahead.losses, ahead.seconds)
        }
        ahead => {
            if ahead.is_some_and(|a| a.round == r) {
                tracing::info!(round = r, "steps trained ahead discarded: the plan gave other data");
            }
            inner.start(theta, &label)?;
            (Vec::new(), 0.0)
        }
    };
    let overlapped_steps = losses.len() as u64;
    // H inner steps over the planned positions, stopping early if the deadline comes close.
    let b = spec.train.batch_size as u64;
    let positions: Vec<u64> = member.ranges.iter().flat_map(|r| r.start..r.start + r.len).collect();
    let t0 = Instant::now();
    inner_steps(inner, spec, r, &positions, Some(plan.deadline_ms), leaving, &mut losses)?;
    if losses.is_empty() {
        return Ok(Step::Idle);
    }
    let inner_seconds = t0.elapsed().as_secs_f64() + ahead_seconds;
    let samples = losses.len() as u64 * b;
    // Δ = θ_r − θ_local, compressed with error feedback.
    let mut delta = inner.local()?;
    for (d, t) in delta.data.iter_mut().zip(&theta.data) {
        for (x, y) in d.iter_mut().zip(t) {
            *x = y - *x;
        }
    }
    let ef = state.error_feedback.get_or_insert_with(|| ParamSet::zeros_like(theta));
    let record = UpdateRecord {
        run_id: base.run_id.clone(),
        round: r,
        base_sha256: base.model_sha256.clone(),
        worker: opts.name.clone(),
        public_key: public_key.to_string(),
        samples,
        consumed: prefix(&member.ranges, samples),
        update_sha256: String::new(),
        bytes: 0,
        mean_loss: losses.iter().sum::<f64>() / losses.len().max(1) as f64,
        inner_seconds,
        fetched_bytes: fetched,
        overlapped_steps,
        signature: String::new(),
    };
    let sent = if spec.sync.overlap_steps > 0 && r < spec.sync.rounds {
        let key = &opts.key;
        let send = |delta: &ParamSet| send_update(store, spec, key, record, delta, ef);
        let (sent, ahead) = send_while_training_ahead(
            store,
            spec,
            inner,
            &plan,
            &opts.name,
            send,
            delta,
            state.global,
            state.prefetched,
            leaving,
        )?;
        *state.head_start = ahead;
        sent
    } else {
        let (sent, payload) = send_update(store, spec, &opts.key, record, &delta, ef)?;
        state.prefetched.keep(r, update_key(r, &opts.name), payload);
        sent
    };
    Ok(Step::Worked {
        round: r,
        loss: sent.mean_loss,
        bytes: sent.bytes,
        fetched,
        samples_per_s: samples as f64 / inner_seconds.max(1e-9),
    })
}

/// Encodes Δ with error feedback `ef`, completes and signs `record` and uploads both (payload
/// first, record last); returns the record and the payload, which the worker keeps.
fn send_update(
    store: &Store,
    spec: &crate::config::RunSpec,
    key: &WorkerKey,
    mut record: UpdateRecord,
    delta: &ParamSet,
    ef: &mut ParamSet,
) -> Result<(UpdateRecord, Bytes), SyncError> {
    let encoding = Instant::now();
    let payload = Bytes::from(compress::encode(delta, ef, &spec.sync));
    let encode_seconds = encoding.elapsed().as_secs_f64();
    record.update_sha256 = sha256_hex(&payload);
    record.bytes = payload.len() as u64;
    record.sign(key);
    let uploading = Instant::now();
    store.put(&update_key(record.round, &record.worker), payload.clone())?;
    store.put(&record_key(record.round, &record.worker), serde_json::to_vec_pretty(&record).unwrap())?;
    let (r, samples, loss, bytes) = (record.round, record.samples, record.mean_loss, record.bytes);
    let upload_seconds = uploading.elapsed().as_secs_f64();
    tracing::info!(round = r, samples, loss, bytes, encode_seconds, upload_seconds, "update sent");
    Ok((record, payload))
}

/// Inner steps on the batches of `positions` from the `losses.len()`-th on, the round's step
/// numbering (its learning rates and batch indices) continuing from there. Stops early when the
/// plan's `deadline_ms` comes close or when leaving: a planned round then sends what it has if the
/// rest does not fit the grace period; steps trained ahead (no plan, no deadline yet) stop at once.
fn inner_steps(
    inner: &mut dyn InnerLoop,
    spec: &crate::config::RunSpec,
    r: u64,
    positions: &[u64],
    deadline_ms: Option<u64>,
    leaving: &Leaving,
    losses: &mut Vec<f64>,
) -> Result<(), SyncError> {
    let b = spec.train.batch_size as usize;
    let total_inner = spec.sync.total_inner_steps();
    let (t0, first) = (Instant::now(), losses.len());
    for (h, batch) in positions.chunks_exact(b).enumerate().skip(first) {
        let done = (h - first) as u64;
        let per_step = (t0.elapsed().as_millis() as u64).checked_div(done).unwrap_or(0);
        if let Some(deadline_ms) = deadline_ms {
            if done > 0 && now_ms() + 2 * per_step + 1000 >= deadline_ms {
                tracing::warn!(round = r, steps = h, "deadline near: stopping inner steps early");
                break;
            }
        }
        // Leaving: keep training while the rest of the round and the upload still fit the grace
        // period (the upload's share: a fifth of it, at least 2 s); otherwise send what is done.
        if let Some(by) = leaving.deadline() {
            let Some(_) = deadline_ms else { break };
            let left = (positions.len() / b - h) as u32;
            let reserve = (leaving.grace / 5).max(Duration::from_secs(2));
            if Instant::now() + Duration::from_millis(per_step) * left + reserve >= by {
                tracing::warn!(round = r, steps = h, "leaving: uploading the steps done so far");
                break;
            }
        }
        let step = (r - 1) * spec.sync.inner_steps + h as u64;
        let lr = crate::train::optim::lr_at(&spec.train, step, total_inner);
        let loss = inner.step(batch, batch[0] / b as u64, lr)?;
        if !loss.is_finite() {
            return Err(SyncError::Other(format!("inner loss became {loss} in round {r}")));
        }
        losses.push(loss);
    }
    Ok(())
}

/// Sends round `plan.round`'s update (`send`) in a second thread while this one trains the first
/// `overlap_steps` of the next round on the data `name` expects to be planned, on from where the
/// local model is. Once sent, the second thread gathers the round's payloads and, when it is
/// committed, brings the global model to it; it also keeps where the steps ahead started, the
/// local model θ − Δ (made in Δ's buffer: a model's worth of memory).
#[allow(clippy::too_many_arguments)]
fn send_while_training_ahead(
    store: &Store,
    spec: &crate::config::RunSpec,
    inner: &mut dyn InnerLoop,
    plan: &Plan,
    name: &str,
    send: impl FnOnce(&ParamSet) -> Result<(UpdateRecord, Bytes), SyncError> + Send,
    mut delta: ParamSet,
    global: &mut Option<Global>,
    prefetched: &mut Prefetched,
    leaving: &Leaving,
) -> Result<(UpdateRecord, Option<HeadStart>), SyncError> {
    let per_member = spec.sync.inner_steps * spec.train.batch_size as u64;
    let ranges = predicted_ranges(plan, name, per_member).unwrap_or_default();
    let ahead: Vec<u64> = ranges.iter().flat_map(|r| r.start..r.start + r.len).collect();
    let ahead = &ahead[..ahead.len().min((spec.sync.overlap_steps * spec.train.batch_size as u64) as usize)];
    let (t0, sent_flag, stop) = (Instant::now(), AtomicBool::new(false), AtomicBool::new(false));
    let mut losses = Vec::new();
    let (trained, seconds, background) = std::thread::scope(|s| {
        let background = s.spawn(|| -> Result<_, SyncError> {
            let (record, payload) = send(&delta)?;
            prefetched.keep(plan.round, update_key(plan.round, name), payload);
            sent_flag.store(true, Ordering::Relaxed);
            let theta = &global.as_ref().expect("caught up before the round").theta;
            for (d, t) in delta.data.iter_mut().flatten().zip(theta.data.iter().flatten()) {
                *d = t - *d;
            }
            let reached = reach_when_committed(store, spec, plan, global, prefetched, &stop);
            Ok((record, delta, reached))
        });
        let trained = inner_steps(inner, spec, plan.round + 1, ahead, None, leaving, &mut losses);
        let seconds = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        (trained, seconds, background.join().expect("the sending thread does not panic"))
    });
    let (record, from, reached) = background?;
    match reached {
        Ok(bytes) => prefetched.downloaded += bytes,
        // The next round catches up again, in the foreground.
        Err(e) => tracing::warn!(round = plan.round, "catching up while training ahead failed: {e}"),
    }
    trained?;
    if losses.is_empty() {
        return Ok((record, None));
    }
    let (r, steps) = (plan.round + 1, losses.len());
    tracing::info!(round = r, steps, seconds, "trained ahead while round {} closed", plan.round);
    Ok((record, Some(HeadStart { round: r, ranges, from, losses, seconds })))
}

/// Until `stop`: gathers the payloads of `plan`'s round as they come and, once it is committed,
/// brings `global` to its commit. Returns bytes fetched.
fn reach_when_committed(
    store: &Store,
    spec: &crate::config::RunSpec,
    plan: &Plan,
    global: &mut Option<Global>,
    prefetched: &mut Prefetched,
    stop: &AtomicBool,
) -> Result<u64, SyncError> {
    let poll = Duration::from_millis(spec.sync.poll_ms.max(10));
    while !stop.load(Ordering::Relaxed) {
        if let Some(commit) = read_commit(store, plan.round)? {
            return catch_up(store, spec, global, prefetched, &commit);
        }
        if let Some(g) = global.as_ref() {
            prefetched.gather(store, plan, 4 * g.theta.numel() as u64)?;
        }
        std::thread::sleep(poll);
    }
    Ok(0)
}
