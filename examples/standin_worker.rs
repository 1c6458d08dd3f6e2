//! A DiLoCo worker whose inner steps are a calibrated stand-in: each takes a fixed time (measured on
//! the GPU the model would train on) instead of computing, and the round's local model is θ minus a
//! seeded pseudo-gradient. Everything else is the real worker (`sync::worker::run_with`):
//! heartbeats, plans, catch-up by updates, the codec, signing, uploads. It measures the protocol at
//! a model size this machine cannot train (P5 at dit-b size, `bench/p5_scale.sh`).
//!
//!   cargo run --release --example standin_worker -- STORE NAME KEY_FILE STEP_SECONDS

use std::time::Duration;

use skytrain::sync::params::ParamSet;
use skytrain::sync::worker::{InnerLoop, WorkerOptions};
use skytrain::sync::SyncError;

struct StandIn {
    step: Duration,
    seed: u64,
    rounds: u64,
    theta: Option<ParamSet>,
}

impl InnerLoop for StandIn {
    fn start(&mut self, theta: &ParamSet, _file: &str) -> Result<(), SyncError> {
        self.theta = Some(theta.clone());
        self.rounds += 1;
        Ok(())
    }

    /// Takes the step's measured time; there is no loss to report (0).
    fn step(&mut self, _batch: &[u64], _index: u64, _lr: f64) -> Result<f64, SyncError> {
        std::thread::sleep(self.step);
        Ok(0.0)
    }

    /// θ − g with g uniform in ±1e-4 per parameter from a hash of (worker, round, index): a dense
    /// pseudo-gradient, so every codec sends what it would for a trained one, made in one cheap
    /// pass (on a GPU this is part of the step time already counted).
    fn local(&mut self) -> Result<ParamSet, SyncError> {
        let mut local = self.theta.take().expect("start comes first");
        let key = self.seed ^ self.rounds.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for (i, x) in local.data.iter_mut().flatten().enumerate() {
            let u = (splitmix64(key ^ i as u64) >> 40) as f32 / (1u64 << 24) as f32;
            *x -= (u - 0.5) * 2e-4;
        }
        Ok(local)
    }

    /// Steps trained ahead are stand-ins too: the round goes on from θ.
    fn rebase(&mut self, theta: &ParamSet, _from: &ParamSet) -> Result<(), SyncError> {
        self.start(theta, "")
    }

    fn hardware(&self, host: &str) -> (String, u32) {
        (format!("{host}, stand-in inner steps of {:.3} s", self.step.as_secs_f64()), 0)
    }
}

/// SplitMix64's finaliser (Steele et al. 2014): a fast, well-mixed hash of a counter.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args: Vec<String> = std::env::args().collect();
    let [_, store, name, key, step_s] = args.as_slice() else {
        anyhow::bail!("usage: standin_worker STORE NAME KEY_FILE STEP_SECONDS");
    };
    let step: f64 = step_s.parse().map_err(|_| anyhow::anyhow!("STEP_SECONDS `{step_s}`: expected seconds"))?;
    let store = skytrain::store::Store::open(store)?;
    let opts = WorkerOptions {
        name: name.clone(),
        key: skytrain::sync::keys::WorkerKey::load(std::path::Path::new(key))?,
        hardware: skytrain::observe::telemetry::cpu_model(),
        max_outage: Duration::from_secs(600),
        on_update: None,
        selfcheck: false,
        leave: None,
        grace: skytrain::sync::worker::DEFAULT_GRACE,
    };
    let seed = name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut inner = StandIn { step: Duration::from_secs_f64(step), seed, rounds: 0, theta: None };
    skytrain::sync::worker::run_with(&store, opts, &mut inner)?;
    Ok(())
}
