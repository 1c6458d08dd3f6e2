//! `skytrain dashboard`: a web page on a local port showing a run as its store records it: loss
//! curves, throughput, workers (hardware, last seen, contribution, self-check, GPUs), rounds
//! (members, accepted and rejected updates), cost against budget, and the latest sample grid.
//!
//! The page is static HTML + vanilla JS drawing SVG (no front-end build, nothing fetched from
//! elsewhere); it polls `/api/state`, which reads the store on every request.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::Store;
use crate::sync::protocol;

#[derive(Debug, Clone, Serialize)]
pub struct StepPoint {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoundRow {
    pub round: u64,
    pub members: Vec<String>,
    pub accepted: Vec<String>,
    pub rejected: Vec<(String, String)>,
    pub missing: Vec<String>,
    pub mean_loss: Option<f64>,
    /// Samples trained by the accepted updates.
    pub samples: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub closed_by: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerRow {
    pub name: String,
    pub hardware: String,
    pub last_seen_s_ago: f64,
    pub samples_per_s: Option<f64>,
    /// Updates of this worker accepted into committed rounds.
    pub accepted_updates: u64,
    pub samples_contributed: u64,
    pub selfcheck: Option<crate::sync::selfcheck::SelfCheck>,
    pub gpus: Vec<crate::observe::telemetry::GpuReading>,
}

/// Everything the page shows, read from the store.
#[derive(Debug, Clone, Serialize)]
pub struct RunState {
    pub name: String,
    pub store: String,
    pub steps: Vec<StepPoint>,
    pub rounds: Vec<RoundRow>,
    pub planned_rounds: u64,
    /// Inner steps per round per worker (DiLoCo).
    pub inner_steps: u64,
    pub workers: Vec<WorkerRow>,
    pub spend: Option<crate::ledger::Spend>,
    pub stopped: Option<serde_json::Value>,
    pub latest_sample: Option<String>,
    pub errors: Vec<String>,
}

/// Reads a run's state; parts that fail to read are reported in `errors`, not fatal.
pub fn run_state(store: &Store) -> Result<RunState, crate::train::run::RunError> {
    let spec = crate::train::run::read_spec(store)?;
    let mut errors = Vec::new();
    let steps = crate::train::run::read_metrics(store)
        .map(|m| {
            m.iter()
                .map(|e| StepPoint {
                    step: e.stats.step,
                    loss: e.stats.loss,
                    lr: e.stats.lr,
                    samples_per_s: e.samples_per_s,
                })
                .collect()
        })
        .unwrap_or_else(|e| {
            errors.push(format!("metrics: {e}"));
            Vec::new()
        });
    let mut rounds = Vec::new();
    let mut contribution: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut prev_ms = protocol::read_commit(store, 0).ok().flatten().map(|c| c.committed_ms);
    let mut r = 1;
    while let Ok(Some(c)) = protocol::read_commit(store, r) {
        let members = protocol::read_plan(store, r)
            .ok()
            .flatten()
            .map(|p| p.members.into_iter().map(|m| m.worker).collect())
            .unwrap_or_default();
        for a in &c.accepted {
            let e = contribution.entry(a.worker.clone()).or_default();
            e.0 += 1;
            e.1 += a.samples;
        }
        rounds.push(RoundRow {
            round: r,
            members,
            accepted: c.accepted.iter().map(|a| a.worker.clone()).collect(),
            rejected: c.rejected.iter().map(|x| (x.worker.clone(), x.reason.clone())).collect(),
            missing: c.missing.clone(),
            mean_loss: c.mean_loss,
            samples: c.accepted.iter().map(|a| a.samples).sum(),
            bytes: c.accepted.iter().map(|a| a.bytes).sum(),
            seconds: prev_ms.map(|p| c.committed_ms.saturating_sub(p) as f64 / 1000.0).unwrap_or(0.0),
            closed_by: c.closed_by.clone(),
        });
        prev_ms = Some(c.committed_ms);
        r += 1;
    }
    let now = protocol::now_ms();
    let mut workers = Vec::new();
    // Each worker's newest validly signed heartbeat for this run.
    let run_id = crate::train::run::read_run_id(store).ok().flatten().unwrap_or_default();
    match protocol::read_heartbeats(store, &run_id) {
        Ok(heartbeats) => {
            for hb in heartbeats {
                let (n, samples) = contribution.get(&hb.worker).copied().unwrap_or_default();
                workers.push(WorkerRow {
                    name: hb.worker.clone(),
                    hardware: hb.hardware.clone(),
                    last_seen_s_ago: now.saturating_sub(hb.last_seen_ms) as f64 / 1000.0,
                    samples_per_s: hb.samples_per_s,
                    accepted_updates: n,
                    samples_contributed: samples,
                    selfcheck: hb.selfcheck.clone(),
                    gpus: hb.gpus.clone(),
                });
            }
        }
        Err(e) => errors.push(format!("workers: {e}")),
    }
    let spend = crate::ledger::spend(store, &spec.cost).map_err(|e| errors.push(format!("cost: {e}"))).ok();
    let stopped = store.get_opt(protocol::STOPPED_KEY).ok().flatten().and_then(|b| serde_json::from_slice(&b).ok());
    let latest_sample = store.list("samples").unwrap_or_default().into_iter().rfind(|k| k.ends_with(".png"));
    Ok(RunState {
        name: spec.name.clone(),
        store: store.url().to_string(),
        steps,
        rounds,
        planned_rounds: spec.sync.rounds,
        inner_steps: spec.sync.inner_steps,
        workers,
        spend,
        stopped,
        latest_sample,
        errors,
    })
}

const PAGE: &str = include_str!("dashboard.html");

/// Serves the dashboard for `store` on `addr` until the process ends. `ready` receives the bound
/// address (port 0 picks a free one).
pub fn serve(
    store: Store,
    addr: std::net::SocketAddr,
    ready: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    use axum::http::{header, StatusCode};
    use axum::response::{Html, IntoResponse, Response};
    use axum::routing::get;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        ready(listener.local_addr()?);
        let state_store = store.clone();
        let sample_store = store.clone();
        let app = axum::Router::new()
            .route("/", get(|| async { Html(PAGE) }))
            .route(
                "/api/state",
                get(move || {
                    let store = state_store.clone();
                    async move {
                        match tokio::task::spawn_blocking(move || run_state(&store)).await {
                            Ok(Ok(s)) => axum::Json(s).into_response(),
                            Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                        }
                    }
                }),
            )
            .route(
                "/api/sample.png",
                get(move || {
                    let store = sample_store.clone();
                    async move {
                        let png = tokio::task::spawn_blocking(move || {
                            let key = store.list("samples").ok()?.into_iter().rfind(|k| k.ends_with(".png"))?;
                            store.get(&key).ok()
                        })
                        .await
                        .ok()
                        .flatten();
                        match png {
                            Some(b) => Response::builder()
                                .header(header::CONTENT_TYPE, "image/png")
                                .body(axum::body::Body::from(b))
                                .unwrap(),
                            None => (StatusCode::NOT_FOUND, "no sample grid yet").into_response(),
                        }
                    }
                }),
            );
        axum::serve(listener, app).await
    })
}
