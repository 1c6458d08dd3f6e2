//! Forecasts of a run's cost and duration, before it starts or from its ledger (`crate::ledger`)
//! while it runs.

use serde::Serialize;

use crate::config::CostConfig;
use crate::ledger::CostError;

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
    let worker_h =
        cfg.worker_price.as_ref().map(|p| cfg.usd_per_hour(p)).transpose().map_err(CostError::Config)?.unwrap_or(0.0);
    let coord_h = cfg
        .coordinator_price
        .as_ref()
        .map(|p| cfg.usd_per_hour(p))
        .transpose()
        .map_err(CostError::Config)?
        .unwrap_or(0.0);
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
    use crate::config::Price;

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
