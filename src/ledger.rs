//! The cost ledger: each process's lease sessions (written beside its heartbeats by the round
//! loops) and the run's spend at its `[cost]` prices, read by `cost`, the dashboard and the
//! coordinator's budget stop.
//!
//! Spend is estimated from process lifetimes: a lease also bills the minutes between its creation
//! and the container's start, which no process can see; the estimate is therefore a lower bound.

use serde::{Deserialize, Serialize};

use crate::config::{CostConfig, Price};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
}

/// One process's stretch of lease time, rewritten with every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// `coordinator` or `worker`.
    pub role: String,
    pub name: String,
    pub started_ms: u64,
    pub last_seen_ms: u64,
    pub gpus: u32,
    /// The lease's own price when the process knows it (`SKYTRAIN_LEASE_PRICE=1500uakt`).
    #[serde(default)]
    pub price: Option<Price>,
}

impl Session {
    pub fn key(&self) -> String {
        format!("ledger/{}/{}-{}.json", self.role, self.name, self.started_ms)
    }

    pub fn hours(&self) -> f64 {
        self.last_seen_ms.saturating_sub(self.started_ms) as f64 / 3.6e6
    }
}

/// A lease price from the environment (`SKYTRAIN_LEASE_PRICE`, e.g. `1500uakt` or `2.5usdc`).
pub fn lease_price_from_env() -> Option<Price> {
    let v = std::env::var("SKYTRAIN_LEASE_PRICE").ok()?;
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    Some(Price { amount: v[..split].parse().ok()?, denom: v[split..].to_string() })
}

/// Spend of one process session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionCost {
    pub session: Session,
    pub hours: f64,
    pub gpu_hours: f64,
    pub usd: f64,
}

/// What a run has spent so far.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spend {
    pub sessions: Vec<SessionCost>,
    pub usd: f64,
    pub gpu_hours: f64,
    pub budget_usd: Option<f64>,
    /// Spend / budget.
    pub fraction: Option<f64>,
}

pub fn read_sessions(store: &Store) -> Result<Vec<Session>, CostError> {
    let mut out = Vec::new();
    for key in store.list("ledger")? {
        if let Some(b) = store.get_opt(&key)? {
            match serde_json::from_slice(&b) {
                Ok(s) => out.push(s),
                Err(e) => tracing::warn!(key, "unreadable ledger session, ignored: {e}"),
            }
        }
    }
    Ok(out)
}

/// Spend of every session in the store at the run's prices.
pub fn spend(store: &Store, cfg: &CostConfig) -> Result<Spend, CostError> {
    let mut sessions = Vec::new();
    for s in read_sessions(store)? {
        let price = s.price.clone().or_else(|| match s.role.as_str() {
            "coordinator" => cfg.coordinator_price.clone(),
            _ => cfg.worker_price.clone(),
        });
        let usd = match &price {
            Some(p) => cfg.usd_per_hour(p).map_err(CostError::Config)? * s.hours(),
            None => 0.0,
        };
        sessions.push(SessionCost { hours: s.hours(), gpu_hours: s.hours() * s.gpus as f64, usd, session: s });
    }
    let usd = sessions.iter().map(|s| s.usd).sum();
    let gpu_hours = sessions.iter().map(|s| s.gpu_hours).sum();
    Ok(Spend { sessions, usd, gpu_hours, budget_usd: cfg.budget_usd, fraction: cfg.budget_usd.map(|b| usd / b) })
}
