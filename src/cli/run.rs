//! `run init|status|verify|rounds`, `train`, `key new`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use skytrain::config::RunSpec;
use skytrain::store::Store;
use skytrain::sync::{self, protocol};
use skytrain::train::run;

#[derive(Subcommand)]
pub enum RunCommand {
    /// Writes a run spec (TOML) into a store, create-only.
    Init {
        spec: PathBuf,
        #[arg(long)]
        store: String,
    },
    /// Rounds, workers and the latest commit.
    Status {
        #[arg(long)]
        store: String,
    },
    /// Replays every committed round from genesis and checks each model hash.
    Verify {
        #[arg(long)]
        store: String,
    },
    /// One JSON line per committed round: timing, members' inner seconds, bytes, loss.
    Rounds {
        #[arg(long)]
        store: String,
    },
}

pub fn run_command(command: RunCommand) -> Result<()> {
    match command {
        RunCommand::Init { spec, store } => {
            let text =
                std::fs::read_to_string(&spec).with_context(|| format!("cannot read run spec {}", spec.display()))?;
            let spec = RunSpec::from_toml(&text, &spec.display().to_string()).map_err(anyhow::Error::msg)?;
            run::check_data(&spec, &store)?;
            let store = Store::create(&store)?;
            store.probe_create_only()?;
            run::init(&store, &spec)?;
            println!("run `{}` initialised in {}", spec.name, store.url());
            Ok(())
        }
        RunCommand::Status { store } => status(&Store::open(&store)?),
        RunCommand::Rounds { store } => rounds(&Store::open(&store)?),
        RunCommand::Verify { store } => {
            let n = sync::coordinator::verify_history(&Store::open(&store)?)?;
            println!("{n} committed rounds replayed from genesis: every model hash matches its commit");
            Ok(())
        }
    }
}

fn status(store: &Store) -> Result<()> {
    let spec = run::read_spec(store)?;
    let latest = protocol::latest_commit(store)?;
    println!("run `{}`: {} rounds of {} inner steps", spec.name, spec.sync.rounds, spec.sync.inner_steps);
    match &latest {
        None => println!("no round committed yet"),
        Some(c) => println!(
            "round {} committed ({}), {} accepted, {} rejected, loss {}",
            c.round,
            c.closed_by,
            c.accepted.len(),
            c.rejected.len(),
            c.mean_loss.map_or("-".into(), |l| format!("{l:.4}"))
        ),
    }
    let now = protocol::now_ms();
    for h in protocol::read_heartbeats(store, &skytrain::train::run::read_run_id(store)?.unwrap_or_default())? {
        println!(
            "worker {:20} last seen {:>6.1} s ago, round {:?}, {:.1} samples/s, {}",
            h.worker,
            now.saturating_sub(h.last_seen_ms) as f64 / 1e3,
            h.round,
            h.samples_per_s.unwrap_or(0.0),
            h.hardware
        );
    }
    Ok(())
}

fn rounds(store: &Store) -> Result<()> {
    let mut r = 1;
    while let Some(c) = protocol::read_commit(store, r)? {
        let plan = protocol::read_plan(store, r)?.context("committed round without a plan")?;
        let (mut inner, mut fetched) = (serde_json::Map::new(), serde_json::Map::new());
        for (name, rec) in protocol::read_records(store, r)? {
            if let Ok(rec) = rec {
                inner.insert(name.clone(), serde_json::json!(rec.inner_seconds));
                fetched.insert(name, serde_json::json!(rec.fetched_bytes));
            }
        }
        let line = serde_json::json!({
            "round": r,
            "planned_ms": plan.created_ms,
            "committed_ms": c.committed_ms,
            "members": plan.members.iter().map(|m| m.worker.clone()).collect::<Vec<_>>(),
            "inner_seconds": inner,
            "fetched_bytes": fetched,
            "bytes": c.accepted.iter().map(|a| a.bytes).sum::<u64>(),
            "mean_loss": c.mean_loss,
            "closed_by": c.closed_by,
        });
        println!("{line}");
        r += 1;
    }
    Ok(())
}

/// `skytrain train`: one machine trains (or resumes) the run in a store.
pub fn train(store: &str, stop_at: Option<u64>) -> Result<()> {
    let store = Store::open(store)?;
    let (mut trainer, sha) = run::open_trainer(&store)?;
    let total = stop_at.unwrap_or(trainer.spec.train.steps).min(trainer.spec.train.steps);
    let bar = super::progress::bar(total, "train");
    bar.set_position(trainer.step);
    let log = trainer.spec.train.log_every;
    let mut on_step = |s: &skytrain::train::StepStats| {
        bar.set_position(s.step);
        bar.set_message(format!("loss {:.4}", s.loss));
        super::progress::log_every(&bar, s.step, log, || {
            format!("step {} loss {:.6} lr {:.3e} grad_norm {:.3}", s.step, s.loss, s.lr, s.grad_norm)
        });
    };
    run::train(&store, &mut trainer, &sha, run::TrainOptions { stop_at, on_step: Some(&mut on_step) })?;
    bar.finish_and_clear();
    println!("trained to step {}", trainer.step);
    Ok(())
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Makes an ed25519 key; prints its public key.
    New {
        #[arg(long)]
        out: PathBuf,
        /// Adds the public key to `[sync] admitted_keys` of this run spec file, in place (comments
        /// and layout kept).
        #[arg(long)]
        admit: Option<PathBuf>,
    },
}

pub fn key(command: KeyCommand) -> Result<()> {
    let KeyCommand::New { out, admit } = command;
    let key = sync::keys::WorkerKey::generate();
    let public = key.public_hex();
    // The spec is parsed and edited in memory before anything is written.
    let admitted = match &admit {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            Some(skytrain::config::admit_key(&text, &path.display().to_string(), &public).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    key.save(&out)?;
    if let (Some(path), Some(text)) = (&admit, admitted) {
        let tmp = path.with_extension("toml.partial");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&out);
            return Err(e).with_context(|| format!("cannot write {} (key file not kept)", path.display()));
        }
        eprintln!("admitted in {}", path.display());
    }
    println!("{public}");
    Ok(())
}
