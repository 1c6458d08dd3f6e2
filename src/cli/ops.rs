//! The operations commands of the `skytrain` binary: deploy (Akash SDL), cost, dashboard,
//! tensorboard.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use skytrain::config::RunSpec;
use skytrain::deploy::{cost, sdl};
use skytrain::store::Store;

#[derive(Subcommand)]
pub enum DeployCommand {
    /// Writes an Akash SDL (version 2.0) for a run: a CPU-only coordinator and one service per
    /// worker. Store credentials come from this process's AWS_* environment and end up in the
    /// deployment's environment, which providers can read: use credentials scoped to the run.
    Sdl {
        /// The run spec (TOML) the deployment trains.
        #[arg(long)]
        spec: PathBuf,
        /// The hardware plan (TOML): workers, GPU choices, resources, prices, placement.
        #[arg(long)]
        plan: PathBuf,
        /// The run's store (s3://bucket/prefix): what every service connects to.
        #[arg(long)]
        store: String,
        /// Worker key files (`skytrain key new`), one per worker, admitted in the spec.
        #[arg(long, required = true, num_args = 1..)]
        keys: Vec<PathBuf>,
        /// Output file (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// The same deployment at minimal resources with idle containers, to see who bids.
        #[arg(long)]
        probe: bool,
        /// One SDL per placement group (`<out stem>-<group>.yaml`), each deployed on its own, so a
        /// provider receives only its own worker's key.
        #[arg(long)]
        split: bool,
    },
    /// Runs a generated SDL on this machine: each service as a podman container from its image in a
    /// network namespace of its own behind WAN shaping, against a local SeaweedFS; ends leases the
    /// ways Akash does, then samples and exports the finished run. Needs root.
    Rehearse(super::rehearse::RehearseArgs),
    /// A TCP delay line (the rehearsal starts it inside a provider's namespace).
    #[command(hide = true)]
    DelayProxy(super::rehearse::DelayProxyArgs),
}

pub fn deploy(cmd: DeployCommand) -> Result<()> {
    match cmd {
        DeployCommand::Sdl { spec, plan, store, keys, out, probe, split } => {
            sdl_cmd(spec, plan, store, keys, out, probe, split)
        }
        DeployCommand::Rehearse(args) => super::rehearse::rehearse(args),
        DeployCommand::DelayProxy(args) => super::rehearse::delay_proxy(args),
    }
}

fn sdl_cmd(
    spec: PathBuf,
    plan: PathBuf,
    store: String,
    keys: Vec<PathBuf>,
    out: PathBuf,
    probe: bool,
    split: bool,
) -> Result<()> {
    let spec_file = spec.display().to_string();
    let spec = RunSpec::from_toml(&std::fs::read_to_string(&spec).with_context(|| spec_file.clone())?, &spec_file)
        .map_err(anyhow::Error::msg)?;
    let plan_file = plan.display().to_string();
    let plan =
        sdl::HardwarePlan::parse(&std::fs::read_to_string(&plan).with_context(|| plan_file.clone())?, &plan_file)?;
    if spec.train.device.is_cuda() && spec.train.replicas > plan.worker.gpu_units as i64 {
        bail!(
            "{plan_file}: field `worker.gpu_units` is {} but {spec_file} trains {} replicas per worker \
             (train.replicas), one GPU each",
            plan.worker.gpu_units,
            spec.train.replicas
        );
    }
    if !store.starts_with("s3://") {
        bail!("--store `{store}`: providers can only reach an S3-compatible store (s3://bucket/prefix)");
    }
    let mut worker_keys = Vec::new();
    for k in &keys {
        let key = skytrain::sync::keys::WorkerKey::load(k)?;
        if !spec.sync.admitted_keys.contains(&key.public_hex()) {
            bail!("{}: this worker key is not admitted in {spec_file} ([sync] admitted_keys)", k.display());
        }
        worker_keys.push(std::fs::read_to_string(k)?.trim().to_string());
    }
    let env: Vec<(String, String)> =
        ["AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ALLOW_HTTP"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
    if !env.iter().any(|(k, _)| k == "AWS_ACCESS_KEY_ID") {
        eprintln!("warning: AWS_ACCESS_KEY_ID is not set: the services get no store credentials");
    }
    let access = sdl::StoreAccess { url: store, env };
    let plan = if probe { plan.probe() } else { plan };
    let write = |path: &PathBuf, text: &str| {
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)).with_context(|| path.display().to_string())
    };
    if split {
        let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("deploy");
        let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("yaml");
        for (group, text) in sdl::generate_split(&spec.name, &plan, &access, &worker_keys, probe)? {
            let path = out.with_file_name(format!("{stem}-{group}.{ext}"));
            write(&path, &text)?;
            println!("{}: Akash SDL 2.0, placement group `{group}`", path.display());
        }
        return Ok(());
    }
    let text = sdl::generate(&spec.name, &plan, &access, &worker_keys, probe)?;
    write(&out, &text)?;
    let groups = 1 + plan.workers.div_ceil(plan.placement.workers_per_group.max(1));
    println!(
        "{}: Akash SDL 2.0, coordinator + {} worker service(s) in {groups} placement groups (orders){}",
        out.display(),
        plan.workers,
        if probe { " (probe: minimal resources)" } else { "" }
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct CostArgs {
    /// A run's store: spend so far (ledger sessions) and a forecast of the rest.
    #[arg(long, conflicts_with = "spec")]
    pub store: Option<String>,
    /// A run spec not started yet: forecast only.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Workers (forecast before the start).
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    #[arg(long, default_value_t = 1)]
    pub gpus_per_worker: u32,
    /// Measured training throughput of one worker (`skytrain bench-step`, or a worker's
    /// self-check); with --store it defaults to the workers' self-checks.
    #[arg(long)]
    pub samples_per_s: Option<f64>,
    /// Synchronisation time per round (upload + download), seconds; with --store it defaults to
    /// what the workers' self-checks measured (one update up, one model down), else 10.
    #[arg(long)]
    pub sync_s: Option<f64>,
    #[arg(long)]
    pub json: bool,
}

pub fn cost_cmd(a: CostArgs) -> Result<()> {
    let (spec, store) = match (&a.store, &a.spec) {
        (Some(s), _) => {
            let store = Store::open(s)?;
            (skytrain::train::run::read_spec(&store)?, Some(store))
        }
        (None, Some(p)) => {
            let f = p.display().to_string();
            (
                RunSpec::from_toml(&std::fs::read_to_string(p).with_context(|| f.clone())?, &f)
                    .map_err(anyhow::Error::msg)?,
                None,
            )
        }
        (None, None) => bail!("give --store (a run) or --spec (a run spec to forecast)"),
    };
    let per_worker_samples = (spec.train.batch_size as f64) * (spec.sync.inner_steps.max(1) as f64);
    let total_samples = if spec.sync.rounds > 0 {
        spec.sync.rounds as f64 * per_worker_samples * a.workers as f64
    } else {
        spec.train.steps as f64 * spec.train.batch_size as f64
    };
    let mut spent = None;
    let mut done_rounds = 0;
    let mut workers = a.workers;
    let mut rate = a.samples_per_s;
    let mut sync_s = a.sync_s;
    if let Some(store) = &store {
        spent = Some(skytrain::ledger::spend(store, &spec.cost)?);
        done_rounds = skytrain::sync::protocol::latest_commit(store)?.map(|c| c.round).unwrap_or(0);
        let state = skytrain::dashboard::run_state(store)?;
        let checks: Vec<f64> = state
            .workers
            .iter()
            .filter_map(|w| w.selfcheck.as_ref().map(|c| c.train_samples_per_s))
            .filter(|&x| x > 0.0)
            .collect();
        if !checks.is_empty() {
            workers = workers.max(checks.len() as u32);
            rate = rate.or(Some(checks.iter().sum::<f64>() / checks.len() as f64));
        }
        // The slowest worker's link decides when a round can close.
        let link = state
            .workers
            .iter()
            .filter_map(|w| w.selfcheck.as_ref())
            .map(|c| c.probe_mb / c.store_up_mb_s.max(1e-6) + c.probe_mb / c.store_down_mb_s.max(1e-6))
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        sync_s = sync_s.or(link);
    }
    let Some(rate) = rate else { bail!("no throughput: pass --samples-per-s (measure with `skytrain bench-step`)") };
    let left_rounds = spec.sync.rounds.saturating_sub(done_rounds);
    let left_samples =
        if spec.sync.rounds > 0 { total_samples * left_rounds as f64 / spec.sync.rounds as f64 } else { total_samples };
    let f = cost::forecast(
        &spec.cost,
        workers,
        a.gpus_per_worker,
        rate,
        left_samples,
        left_rounds,
        sync_s.unwrap_or(10.0),
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "spent": spent, "forecast_remaining": f }))?);
        return Ok(());
    }
    println!("run `{}`", spec.name);
    if let Some(s) = &spent {
        println!(
            "spent so far: {:.4} USD, {:.4} GPU-hours over {} process sessions",
            s.usd,
            s.gpu_hours,
            s.sessions.len()
        );
        for c in &s.sessions {
            println!(
                "  {:<12} {:<16} {:>8.4} h  {:>8.4} GPU-h  {:>10.4} USD",
                c.session.role, c.session.name, c.hours, c.gpu_hours, c.usd
            );
        }
    }
    println!(
        "forecast{}: {} worker(s) × {:.1} samples/s, {:.0} samples, {} rounds × {:.1} s sync → {:.2} h, {:.2} GPU-hours, {:.2} USD ({:.3} USD/h)",
        if store.is_some() { " (remaining)" } else { "" },
        f.workers,
        f.samples_per_s_per_worker,
        f.samples,
        left_rounds,
        f.sync_s_per_round,
        f.hours,
        f.gpu_hours,
        f.usd,
        f.usd_per_hour
    );
    if let Some(b) = spec.cost.budget_usd {
        let total = f.usd + spent.as_ref().map(|s| s.usd).unwrap_or(0.0);
        println!("budget: {b:.2} USD; projected total {total:.2} USD ({:.0}%)", 100.0 * total / b);
    }
    Ok(())
}

pub fn dashboard(store: String, port: u16, bind: String) -> Result<()> {
    let store = Store::open(&store)?;
    skytrain::train::run::read_spec(&store).context("the dashboard needs a run (run.toml) in the store")?;
    let addr: std::net::SocketAddr = format!("{bind}:{port}").parse().context("--bind/--port")?;
    skytrain::dashboard::serve(store, addr, |a| {
        println!("dashboard on http://{a}/");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}

pub fn tensorboard_pull(store: String, out: PathBuf) -> Result<()> {
    let n = skytrain::observe::tensorboard::pull(&Store::open(&store)?, &out)?;
    println!("{n} event files under {} (tensorboard --logdir {})", out.display(), out.display());
    Ok(())
}
