//! The cost ledger: lease prices per block → USD per hour, GPU-hours from the processes' ledger
//! sessions (written beside their heartbeats), spend against the run's budget, and forecasts.
//!
//! Spend is estimated from process lifetimes: a lease also bills the minutes between its creation
//! and the container's start, which no process can see; the estimate is therefore a lower bound.

use serde::{Deserialize, Serialize};

use crate::deploy::sdl::Price;
use crate::store::{Store, StoreError};

/// Prices and budget of a run (`[cost]` in the run spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostConfig {
    /// Seconds per block of the Akash chain (leases are priced per block).
    pub block_time_s: f64,
    /// USD per AKT for this run (e.g. a 30-day average); needed when a price is in uakt.
    pub akt_usd: Option<f64>,
    /// USD per ACT, when prices are in uact.
    pub act_usd: Option<f64>,
    /// Lease price of one worker, per block (a worker may report its own lease's price instead).
    pub worker_price: Option<Price>,
    pub coordinator_price: Option<Price>,
    /// Spend limit: the coordinator warns at `warn_fraction` of it and stops the run at 100%.
    pub budget_usd: Option<f64>,
    pub warn_fraction: f64,
}

impl Default for CostConfig {
    fn default() -> Self {
        CostConfig {
            block_time_s: 6.1,
            akt_usd: None,
            act_usd: None,
            worker_price: None,
            coordinator_price: None,
            budget_usd: None,
            warn_fraction: 0.8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
}

impl CostConfig {
    /// USD per hour of a lease at `price` per block.
    pub fn usd_per_hour(&self, price: &Price) -> Result<f64, CostError> {
        let rate = match price.denom.as_str() {
            "uakt" => {
                self.akt_usd.ok_or_else(|| CostError::Config("[cost] akt_usd is needed for prices in uakt".into()))?
            }
            "uact" => {
                self.act_usd.ok_or_else(|| CostError::Config("[cost] act_usd is needed for prices in uact".into()))?
            }
            "usdc" | "uusdc" => 1.0,
            d if d == crate::deploy::sdl::USDC_MAINNET || d == crate::deploy::sdl::USDC_SANDBOX => 1.0,
            d => return Err(CostError::Config(format!("[cost] unknown denom `{d}`"))),
        };
        if self.block_time_s <= 0.0 {
            return Err(CostError::Config("[cost] block_time_s must be positive".into()));
        }
        Ok(price.amount / 1e6 * rate * 3600.0 / self.block_time_s)
    }

    pub fn validate(&self) -> Result<(), String> {
        for p in [&self.worker_price, &self.coordinator_price].into_iter().flatten() {
            self.usd_per_hour(p).map_err(|e| e.to_string())?;
        }
        if let Some(b) = self.budget_usd {
            if b.is_nan() || b <= 0.0 {
                return Err("[cost] budget_usd must be positive".into());
            }
        }
        if !(0.0..=1.0).contains(&self.warn_fraction) {
            return Err("[cost] warn_fraction must be within 0..1".into());
        }
        Ok(())
    }
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
            Some(p) => cfg.usd_per_hour(p)? * s.hours(),
            None => 0.0,
        };
        sessions.push(SessionCost { hours: s.hours(), gpu_hours: s.hours() * s.gpus as f64, usd, session: s });
    }
    let usd = sessions.iter().map(|s| s.usd).sum();
    let gpu_hours = sessions.iter().map(|s| s.gpu_hours).sum();
    Ok(Spend { sessions, usd, gpu_hours, budget_usd: cfg.budget_usd, fraction: cfg.budget_usd.map(|b| usd / b) })
}

/// A forecast of a run before (or during) it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forecast {
    pub workers: u32,
    pub samples_per_s_per_worker: f64,
    pub samples: f64,
    pub sync_s_per_round: f64,
    pub hours: f64,
    pub gpu_hours: f64,
    pub usd: f64,
    pub usd_per_hour: f64,
    pub budget_usd: Option<f64>,
    pub within_budget: Option<bool>,
}

/// Wall time and cost of training `samples` more samples on `workers` workers of
/// `samples_per_s` each, plus `sync_s` of synchronisation per round over `rounds` rounds.
pub fn forecast(
    cfg: &CostConfig,
    workers: u32,
    gpus_per_worker: u32,
    samples_per_s: f64,
    samples: f64,
    rounds: u64,
    sync_s: f64,
) -> Result<Forecast, CostError> {
    if workers == 0 || samples_per_s.is_nan() || samples_per_s <= 0.0 {
        return Err(CostError::Config("forecast needs ≥ 1 worker and a positive throughput".into()));
    }
    let hours = (samples / (samples_per_s * workers as f64) + rounds as f64 * sync_s) / 3600.0;
    let worker_h = cfg.worker_price.as_ref().map(|p| cfg.usd_per_hour(p)).transpose()?.unwrap_or(0.0);
    let coord_h = cfg.coordinator_price.as_ref().map(|p| cfg.usd_per_hour(p)).transpose()?.unwrap_or(0.0);
    let usd_per_hour = worker_h * workers as f64 + coord_h;
    let usd = usd_per_hour * hours;
    Ok(Forecast {
        workers,
        samples_per_s_per_worker: samples_per_s,
        samples,
        sync_s_per_round: sync_s,
        hours,
        gpu_hours: hours * (workers * gpus_per_worker) as f64,
        usd,
        usd_per_hour,
        budget_usd: cfg.budget_usd,
        within_budget: cfg.budget_usd.map(|b| usd <= b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_prices_become_dollars_per_hour() {
        let cfg = CostConfig { akt_usd: Some(2.0), block_time_s: 6.0, ..Default::default() };
        // 1,000 uakt/block × 600 blocks/h = 0.6 AKT/h = 1.2 USD/h.
        let p = Price { denom: "uakt".into(), amount: 1000.0 };
        assert!((cfg.usd_per_hour(&p).unwrap() - 1.2).abs() < 1e-12);
        let usdc = Price { denom: crate::deploy::sdl::USDC_MAINNET.into(), amount: 1000.0 };
        assert!((cfg.usd_per_hour(&usdc).unwrap() - 0.6).abs() < 1e-12);
        let no_rate = CostConfig::default();
        assert!(no_rate.usd_per_hour(&p).unwrap_err().to_string().contains("akt_usd"));
        let f =
            forecast(&CostConfig { worker_price: Some(p), budget_usd: Some(10.0), ..cfg }, 4, 1, 100.0, 3.6e6, 0, 0.0)
                .unwrap();
        // 3.6M samples at 400/s = 2.5 h; 4 workers × 1.2 USD/h × 2.5 h = 12 USD > budget.
        assert!((f.hours - 2.5).abs() < 1e-9 && (f.usd - 12.0).abs() < 1e-9 && f.within_budget == Some(false));
    }
}
