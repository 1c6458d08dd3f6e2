//! `coordinate` and `work`: the two roles of a DiLoCo run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use skytrain::store::Store;
use skytrain::sync::{self, protocol};

/// A flag SIGTERM and SIGINT set (a lease ending, Ctrl-C); a second signal exits at once.
fn leave_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

pub fn coordinate(store: &str) -> Result<()> {
    let store = Store::open(store)?;
    let stop = leave_flag()?;
    let on_commit = |c: &protocol::Commit| {
        let bytes: u64 = c.accepted.iter().map(|a| a.bytes).sum();
        println!(
            "round {:>5}: {} accepted, {} rejected, {} missing, loss {}, {} bytes in ({})",
            c.round,
            c.accepted.len(),
            c.rejected.len(),
            c.missing.len(),
            c.mean_loss.map_or("-".into(), |l| format!("{l:.4}")),
            bytes,
            c.closed_by
        );
        for r in &c.rejected {
            println!("             rejected {}: {}", r.worker, r.reason);
        }
    };
    let opts = sync::coordinator::CoordinatorOptions {
        on_commit: Some(Box::new(on_commit)),
        stop: Some(stop.clone()),
        ..Default::default()
    };
    sync::coordinator::run(&store, opts)?;
    if stop.load(Ordering::Relaxed) {
        println!("coordinator stopped by a signal; run `skytrain coordinate` again to continue");
    } else {
        println!("run complete");
    }
    Ok(())
}

#[derive(Args)]
pub struct WorkArgs {
    #[arg(long)]
    pub store: String,
    /// This worker's name (1–64 of [A-Za-z0-9_-]); keep it across restarts.
    #[arg(long)]
    pub name: String,
    /// Its ed25519 secret key file (`skytrain key new`).
    #[arg(long, required_unless_present = "key_env")]
    pub key: Option<PathBuf>,
    /// …or the environment variable holding the key's 64 hex digits (Akash deployments).
    #[arg(long)]
    pub key_env: Option<String>,
    /// Skip the start-up self-check (throughput and store bandwidth).
    #[arg(long)]
    pub no_selfcheck: bool,
    /// Seconds between SIGTERM (a lease ending) and SIGKILL: the worker finishes or uploads what it
    /// has within them, then says it is leaving. Default: inside Kubernetes' 30 s.
    #[arg(long, env = "SKYTRAIN_GRACE_S", default_value_t = sync::worker::DEFAULT_GRACE.as_secs_f64())]
    pub grace_s: f64,
}

pub fn work(a: WorkArgs) -> Result<()> {
    let store = Store::open(&a.store)?;
    let key = match (a.key, a.key_env) {
        (Some(path), _) => sync::keys::WorkerKey::load(&path)?,
        (None, Some(var)) => {
            let hex = std::env::var(&var).with_context(|| format!("--key-env {var}: not set"))?;
            sync::keys::WorkerKey::from_hex(&hex, &format!("${var}"))?
        }
        (None, None) => bail!("give --key or --key-env"),
    };
    let opts = sync::worker::WorkerOptions {
        name: a.name,
        key,
        hardware: skytrain::observe::telemetry::cpu_model(),
        max_outage: std::time::Duration::from_secs(600),
        on_update: None,
        selfcheck: !a.no_selfcheck,
        leave: Some(leave_flag()?),
        grace: std::time::Duration::try_from_secs_f64(a.grace_s)
            .map_err(|_| anyhow::anyhow!("--grace-s {}: expected seconds ≥ 0", a.grace_s))?,
    };
    sync::worker::run(&store, opts)?;
    Ok(())
}
