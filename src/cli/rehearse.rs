//! `deploy rehearse`: an SDL run on this machine (see `skytrain::deploy::rehearse`), then the
//! finished run summarised, sampled and exported.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use skytrain::deploy::rehearse::{self, Options, Schedule, Wan};
use skytrain::sync::protocol;

#[derive(Args)]
pub struct RehearseArgs {
    /// The SDL (`skytrain deploy sdl`); its images must be in local podman storage.
    #[arg(long)]
    pub sdl: PathBuf,
    /// The prepared run in a local folder (`skytrain run init` plus its data), copied into the
    /// rehearsal's store under the SDL's SKYTRAIN_STORE.
    #[arg(long)]
    pub run: PathBuf,
    /// Where logs, the sample grid and the exported model go.
    #[arg(long, default_value = "rehearsal")]
    pub out: PathBuf,
    /// Each provider's link rate, both directions (tc syntax).
    #[arg(long, default_value = "50mbit")]
    pub rate: String,
    /// Each provider's added one-way delay (where the kernel has netem).
    #[arg(long, default_value_t = 50)]
    pub delay_ms: u32,
    /// After this committed round worker-1's lease ends (SIGTERM, SIGKILL after the grace).
    #[arg(long, default_value_t = 1)]
    pub term_after: u64,
    /// After this round worker-2 is SIGKILLed and its container restarted.
    #[arg(long, default_value_t = 2)]
    pub kill_after: u64,
    /// After this round worker-3's provider is lost and a replacement started elsewhere.
    #[arg(long, default_value_t = 3)]
    pub lose_after: u64,
    /// Seconds between SIGTERM and SIGKILL when a lease ends.
    #[arg(long, default_value_t = 30)]
    pub grace_s: u64,
    /// SeaweedFS's `weed` (default: on PATH, else the project's .venv).
    #[arg(long)]
    pub weed: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub limit_s: u64,
    /// Prompts for the sample grid of the finished run.
    #[arg(long, default_values_t = ["a red circle".to_string()])]
    pub prompt: Vec<String>,
}

/// Starts this binary's `deploy delay-proxy` inside namespace `ns`.
fn delay_line(
    ns: &str,
    port: u16,
    upstream: std::net::SocketAddr,
    delay: Duration,
) -> std::io::Result<std::process::Child> {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(std::env::current_exe()?)
        .args(["deploy", "delay-proxy", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &upstream.to_string()])
        .args(["--delay-ms", &delay.as_millis().to_string()])
        .stdin(std::process::Stdio::null())
        .spawn()
}

#[derive(Args)]
pub struct DelayProxyArgs {
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    #[arg(long)]
    pub upstream: std::net::SocketAddr,
    #[arg(long)]
    pub delay_ms: u64,
}

/// `deploy delay-proxy`: the rehearsal's delay line for kernels without netem.
pub fn delay_proxy(a: DelayProxyArgs) -> Result<()> {
    skytrain::deploy::delay::serve(a.listen, a.upstream, Duration::from_millis(a.delay_ms))
        .with_context(|| format!("delay proxy on {}", a.listen))
}

fn find_weed() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/weed");
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("weed"))
        .chain(std::iter::once(venv))
        .find(|p| p.is_file())
}

pub fn rehearse(a: RehearseArgs) -> Result<()> {
    let file = a.sdl.display().to_string();
    let services = rehearse::services(&std::fs::read_to_string(&a.sdl).with_context(|| file.clone())?, &file)?;
    if !services.iter().any(|s| s.name == "coordinator") {
        bail!("{file}: no `coordinator` service (generate the SDL with `skytrain deploy sdl`)");
    }
    let weed = match a.weed.or_else(find_weed) {
        Some(w) => w,
        None => bail!("SeaweedFS's `weed` not found: pass --weed (scripts/setup.sh installs it into .venv)"),
    };
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    let out = a.out.canonicalize()?;
    let opts = Options {
        sdl_file: file,
        run_dir: a.run.clone(),
        weed,
        wan: Wan { rate: a.rate, delay_ms: a.delay_ms },
        schedule: Schedule {
            term_after: a.term_after,
            kill_after: a.kill_after,
            lose_after: a.lose_after,
            grace: Duration::from_secs(a.grace_s),
        },
        limit: Duration::from_secs(a.limit_s),
        work_dir: out.clone(),
        delay_proxy: Some(Box::new(delay_line)),
    };
    let t0 = std::time::Instant::now();
    let mut say = |line: String| println!("[{:>6.1}s] {line}", t0.elapsed().as_secs_f64());
    let (mut r, env) = rehearse::Rehearsal::start(&services, &opts, &mut say)?;
    let code = r.drive(&services, &opts, &mut say);
    r.save_logs(&out);
    let code = code?;
    if code != 0 {
        bail!("the coordinator exited with {code} (logs in {})", out.display());
    }
    say("run complete".into());

    // Summary from the store: rounds, members, bytes, lease sessions.
    let last = protocol::latest_commit(&r.store)?.map_or(0, |c| c.round);
    let (mut up, mut members) = (0u64, Vec::new());
    for round in 1..=last {
        let c = protocol::read_commit(&r.store, round)?.context("a committed round vanished")?;
        let plan = protocol::read_plan(&r.store, round)?.context("a planned round vanished")?;
        up += c.accepted.iter().map(|a| a.bytes).sum::<u64>();
        members.push(format!(
            "r{round}: {}/{} {}",
            c.accepted.len(),
            plan.members.len(),
            if c.closed_by == "all-reported" { String::new() } else { format!("({})", c.closed_by) }
        ));
    }
    println!("rounds: {last}; accepted/planned per round: {}", members.join(", "));
    println!("updates uploaded and accepted: {:.1} MB", up as f64 / 1e6);
    println!("lease sessions (cost ledger):");
    for s in skytrain::ledger::read_sessions(&r.store)? {
        println!("  {:<12} {:<10} {:>7.1} s", s.role, s.name, (s.last_seen_ms - s.started_ms) as f64 / 1e3);
    }
    for (round, what) in &r.events {
        println!("event after round {round}: {what}");
    }
    // The finished run, as a user would take it: sampled and exported.
    let url = env.get("SKYTRAIN_STORE").cloned().unwrap_or_default();
    let grid = out.join("samples.png");
    super::model::sample(super::model::SampleArgs {
        store: Some(url.clone()),
        model: None,
        prompt: a.prompt,
        out: grid,
        steps: skytrain::sample::DEFAULT_EULER.steps,
        guidance: skytrain::sample::DEFAULT_EULER.guidance,
        shift: skytrain::sample::DEFAULT_EULER.shift,
        seed: 0,
        per_prompt: 4,
        width: None,
        height: None,
        vae: None,
        text: None,
        record: false,
    })?;
    super::model::export(&url, &out.join("model"))?;
    say(format!(
        "rehearsal done in {:.0} s; logs, samples.png and model/ in {}",
        t0.elapsed().as_secs_f64(),
        out.display()
    ));
    Ok(())
}
