//! `coordinate` and `work`: the two roles of a DiLoCo run.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use skytrain::store::Store;
use skytrain::sync::{self, protocol};

pub fn coordinate(store: &str) -> Result<()> {
    let store = Store::open(store)?;
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
    let opts = sync::coordinator::CoordinatorOptions { on_commit: Some(Box::new(on_commit)), ..Default::default() };
    sync::coordinator::run(&store, opts)?;
    println!("run complete");
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
    };
    sync::worker::run(&store, opts)?;
    Ok(())
}
