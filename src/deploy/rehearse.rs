//! A deployment rehearsed on one machine: every service of a generated SDL runs as a local podman
//! container from its image, with exactly the SDL's command, environment and CPU/memory limits,
//! against a local SeaweedFS standing in for the run's S3 store. Each service gets its own network
//! namespace (its "provider") behind its own WAN shaping, and can reach the store and nothing else;
//! then leases end the ways Akash ends them.
//!
//! The network: a bridge inside a namespace of its own (`<tag>-wan`, so the host's interfaces are
//! not on it), the store's namespace on it at `.1`, each provider at `.10+i` and this process's
//! host side at `.254`. Provider ports and the host port are `isolated` bridge ports: they reach
//! only the store's port, never each other. Needs root, `ip`/`bridge`/`tc` (iproute2), podman and
//! SeaweedFS's `weed`. Everything made is removed when the [`Rehearsal`] is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::store::Store;
use crate::sync::protocol;

/// Where the rehearsal's store listens, from every namespace on the bridge.
pub const SUBNET: &str = "10.213.77";

#[derive(Debug, thiserror::Error)]
pub enum RehearseError {
    #[error("{file}: {reason}")]
    Sdl { file: String, reason: String },
    #[error("`{command}` failed: {reason}")]
    Command { command: String, reason: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    #[error("{0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, RehearseError>;

/// One SDL service as the rehearsal runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cpu: f64,
    /// Canonical SDL size (`2Gi`).
    pub memory: String,
}

#[derive(Deserialize)]
struct Sdl {
    services: BTreeMap<String, SdlService>,
    profiles: SdlProfiles,
    deployment: BTreeMap<String, BTreeMap<String, SdlPlacement>>,
}
#[derive(Deserialize)]
struct SdlService {
    image: String,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
}
#[derive(Deserialize)]
struct SdlProfiles {
    compute: BTreeMap<String, SdlCompute>,
}
#[derive(Deserialize)]
struct SdlCompute {
    resources: SdlResources,
}
#[derive(Deserialize)]
struct SdlResources {
    cpu: SdlCpu,
    memory: SdlMemory,
}
#[derive(Deserialize)]
struct SdlCpu {
    units: serde_yaml_ng::Value,
}
#[derive(Deserialize)]
struct SdlMemory {
    size: String,
}
#[derive(Deserialize)]
struct SdlPlacement {
    profile: String,
}

/// The services of an SDL (as `deploy sdl` writes them), with their profiles' CPU and memory.
pub fn services(yaml: &str, file: &str) -> Result<Vec<Service>> {
    let bad = |reason: String| RehearseError::Sdl { file: file.into(), reason };
    let sdl: Sdl = serde_yaml_ng::from_str(yaml).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (name, svc) in sdl.services {
        let placement = sdl
            .deployment
            .get(&name)
            .and_then(|groups| groups.values().next())
            .ok_or_else(|| bad(format!("service `{name}` has no deployment entry")))?;
        let compute = sdl
            .profiles
            .compute
            .get(&placement.profile)
            .ok_or_else(|| bad(format!("deployment.{name}: no compute profile `{}`", placement.profile)))?;
        let cpu = match &compute.resources.cpu.units {
            serde_yaml_ng::Value::Number(n) => n.as_f64(),
            serde_yaml_ng::Value::String(s) => {
                s.strip_suffix('m').map_or(s.parse().ok(), |m| m.parse::<f64>().ok().map(|v| v / 1000.0))
            }
            _ => None,
        }
        .filter(|c| *c > 0.0)
        .ok_or_else(|| bad(format!("profiles.compute.{}.resources.cpu.units: expected a number", placement.profile)))?;
        let memory = super::sdl::canonical_size(&compute.resources.memory.size)
            .map_err(|e| bad(format!("profiles.compute.{}.resources.memory.size: {e}", placement.profile)))?;
        let env = svc
            .env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| bad(format!("services.{name}.env: `{kv}` is not NAME=value")))
            })
            .collect::<Result<_>>()?;
        let command = svc.command.into_iter().chain(svc.args).collect();
        out.push(Service { name, image: svc.image, command, env, cpu, memory });
    }
    Ok(out)
}

/// Rate (and delay, where the kernel has netem) on each provider's link, both directions.
#[derive(Debug, Clone)]
pub struct Wan {
    /// tc rate, e.g. `50mbit`.
    pub rate: String,
    pub delay_ms: u32,
}

/// What happens to leases during the rehearsal, in committed rounds.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// After this round worker-1's lease ends: SIGTERM, then SIGKILL after `grace` (podman stop).
    pub term_after: u64,
    /// After this round worker-2 is SIGKILLed; its container restarts, as Kubernetes restarts it.
    pub kill_after: u64,
    /// After this round worker-3's provider is lost (link cut, container killed, namespace
    /// deleted) and a replacement starts in a new namespace with the same name and key.
    pub lose_after: u64,
    pub grace: Duration,
}

pub struct Options {
    pub sdl_file: String,
    /// A prepared run (`run init` and its data) in a local folder, copied into the S3 store.
    pub run_dir: PathBuf,
    pub weed: PathBuf,
    pub wan: Wan,
    pub schedule: Schedule,
    /// Give up (and tear down) if the run has not finished after this long.
    pub limit: Duration,
    /// Where containers' logs and the store's data go.
    pub work_dir: PathBuf,
    /// Starts a TCP delay line ([`super::delay`]) inside a namespace: (namespace, listen port,
    /// upstream, delay). Used for the WAN delay where the kernel has no netem.
    pub delay_proxy: Option<DelayLauncher>,
}

/// Starts `skytrain deploy delay-proxy` (or any delay line) in a namespace.
pub type DelayLauncher = Box<dyn Fn(&str, u16, std::net::SocketAddr, Duration) -> std::io::Result<Child>>;

/// An event worth telling the user, as it happens.
pub type Say<'a> = &'a mut dyn FnMut(String);

/// The rehearsal's network, store and containers; torn down on drop.
pub struct Rehearsal {
    tag: String,
    namespaces: Vec<String>,
    containers: Vec<String>,
    weed: Option<Child>,
    /// Delay lines by namespace.
    proxies: Vec<(String, Child)>,
    /// The run's store as this process reaches it (through the host port on the bridge).
    pub store: Store,
    /// Lease events that happened: (round after which, what).
    pub events: Vec<(u64, String)>,
    netem: bool,
}

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| RehearseError::Command { command: shown.clone(), reason: e.to_string() })?;
    if !out.status.success() {
        return Err(RehearseError::Command {
            command: shown,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// podman with this project's settings (scripts/containers.conf) unless the user chose their own.
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    if std::env::var_os("CONTAINERS_CONF").is_none() {
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/containers.conf");
        if conf.exists() {
            cmd.env("CONTAINERS_CONF", conf);
        }
    }
    cmd
}

impl Rehearsal {
    fn wan_ns(&self) -> String {
        format!("{}-wan", self.tag)
    }

    /// A namespace on the bridge at `.host`; `isolated` ports reach only non-isolated ones.
    fn attach(&mut self, ns: Option<&str>, link: &str, host: u8, isolated: bool, wan: Option<&Wan>) -> Result<()> {
        let wan_ns = self.wan_ns();
        let (outer, inner) = (format!("{link}w"), format!("{link}n"));
        ip(&["link", "add", &outer, "netns", &wan_ns, "type", "veth", "peer", "name", &inner])?;
        in_ns(&wan_ns, &["ip", "link", "set", &outer, "master", "br0", "up"])?;
        if isolated {
            in_ns(&wan_ns, &["bridge", "link", "set", "dev", &outer, "isolated", "on"])?;
        }
        let addr = format!("{SUBNET}.{host}/24");
        let exec = |args: &[&str]| match ns {
            Some(ns) => in_ns(ns, args),
            None => run_cmd(Command::new(args[0]).args(&args[1..])),
        };
        if let Some(ns) = ns {
            ip(&["link", "set", &inner, "netns", ns])?;
            exec(&["ip", "link", "set", "lo", "up"])?;
        }
        exec(&["ip", "addr", "add", &addr, "dev", &inner])?;
        exec(&["ip", "link", "set", &inner, "up"])?;
        if let Some(w) = wan {
            // Upload shaped on the provider's side, download on the bridge's side of its link.
            let delay = format!("{}ms", w.delay_ms);
            let shape = |on_wan: bool, dev: &str| -> Result<()> {
                let netem = ["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", &delay, "rate", &w.rate];
                let tbf = [
                    "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", &w.rate, "burst", "64kb", "latency", "1s",
                ];
                let run = |args: &[&str]| if on_wan { in_ns(&wan_ns, args) } else { exec(args) };
                if self.netem && run(&netem).is_ok() {
                    return Ok(());
                }
                run(&tbf).map(|_| ())
            };
            shape(false, &inner)?;
            shape(true, &outer)?;
        }
        Ok(())
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    /// Starts `svc` in a new provider namespace `ns` at `.host`; the container is named `container`.
    fn start_service(
        &mut self,
        svc: &Service,
        ns: &str,
        link: &str,
        host: u8,
        wan: &Wan,
        delay: Option<&DelayLauncher>,
    ) -> Result<String> {
        self.add_ns(ns)?;
        self.attach(Some(ns), link, host, true, Some(wan))?;
        // Without netem the link's delay comes from a delay line inside the provider, between the
        // services and the store.
        let mut endpoint = format!("http://{SUBNET}.1:8333");
        if let (false, true, Some(launch)) = (self.netem, wan.delay_ms > 0, delay) {
            let upstream: std::net::SocketAddr = format!("{SUBNET}.1:8333").parse().expect("address");
            let child = launch(ns, 8333, upstream, Duration::from_millis(wan.delay_ms as u64))
                .map_err(|e| RehearseError::Other(format!("delay line in {ns}: {e}")))?;
            self.proxies.push((ns.to_string(), child));
            endpoint = "http://127.0.0.1:8333".into();
        }
        let container = format!("{ns}-c");
        let cpus = svc.cpu.min(std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64));
        let bytes = super::sdl::size_bytes(&svc.memory)
            .ok_or_else(|| RehearseError::Other(format!("memory {}", svc.memory)))?;
        let mut cmd = podman();
        cmd.args(["run", "-d", "--name", &container, "--network", &format!("ns:/run/netns/{ns}")]).args([
            "--cpus",
            &format!("{cpus}"),
            "--memory",
            &format!("{bytes}"),
        ]);
        for (k, v) in &svc.env {
            // The store stands in for the SDL's: same bucket, prefix and credentials, local endpoint.
            if k != "AWS_ENDPOINT_URL" && k != "AWS_ALLOW_HTTP" {
                cmd.args(["--env", &format!("{k}={v}")]);
            }
        }
        cmd.args(["--env", &format!("AWS_ENDPOINT_URL={endpoint}"), "--env", "AWS_ALLOW_HTTP=true"]);
        cmd.arg(&svc.image).args(&svc.command);
        let _ = run_cmd(podman().args(["rm", "-f", &container]));
        run_cmd(&mut cmd)?;
        self.containers.push(container.clone());
        Ok(container)
    }

    /// Sets up the network and the store, copies the prepared run in, starts every service.
    pub fn start(services: &[Service], opts: &Options, say: Say) -> Result<(Rehearsal, BTreeMap<String, String>)> {
        let tag = format!("sk{:04x}", std::process::id() & 0xffff);
        let env: BTreeMap<String, String> = services.iter().flat_map(|s| s.env.iter().cloned()).collect();
        let url = env.get("SKYTRAIN_STORE").cloned().ok_or_else(|| RehearseError::Sdl {
            file: opts.sdl_file.clone(),
            reason: "no SKYTRAIN_STORE in the services' environment".into(),
        })?;
        let bucket = url
            .strip_prefix("s3://")
            .and_then(|r| r.split('/').next())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| RehearseError::Sdl {
                file: opts.sdl_file.clone(),
                reason: format!("SKYTRAIN_STORE `{url}` is not s3://bucket/prefix"),
            })?
            .to_string();
        for image in services.iter().map(|s| &s.image).collect::<std::collections::BTreeSet<_>>() {
            run_cmd(podman().args(["image", "exists", image])).map_err(|_| {
                RehearseError::Other(format!(
                    "image `{image}` is not in local podman storage: build it first (README, Deploy)"
                ))
            })?;
        }
        let netem = {
            let probe = format!("{tag}-probe");
            ip(&["netns", "add", &probe])?;
            let ok = in_ns(&probe, &["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]).is_ok();
            let _ = ip(&["netns", "del", &probe]);
            ok
        };
        let mut r = Rehearsal {
            tag: tag.clone(),
            namespaces: Vec::new(),
            containers: Vec::new(),
            weed: None,
            proxies: Vec::new(),
            store: Store::open(opts.run_dir.to_str().unwrap_or_default())?,
            events: Vec::new(),
            netem,
        };
        if !netem {
            let delay = match (&opts.delay_proxy, opts.wan.delay_ms) {
                (_, 0) => "no added delay".to_string(),
                (Some(_), ms) => format!("{ms} ms each way from a delay line in each provider"),
                (None, _) => "without added delay".to_string(),
            };
            say(format!("this kernel has no netem: links are rate-limited to {} with tbf, {delay}", opts.wan.rate));
        }
        // The WAN bridge, the store's namespace at .1 and this process's port at .254.
        let wan_ns = r.wan_ns();
        r.add_ns(&wan_ns)?;
        in_ns(&wan_ns, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(&wan_ns, &["ip", "link", "set", "br0", "up"])?;
        let store_ns = format!("{tag}-store");
        r.add_ns(&store_ns)?;
        r.attach(Some(&store_ns), &format!("{tag}s"), 1, false, None)?;
        r.attach(None, &format!("{tag}h"), 254, true, None)?;
        let data = opts.work_dir.join("store");
        std::fs::create_dir_all(&data).map_err(|e| RehearseError::Other(format!("{}: {e}", data.display())))?;
        let log = std::fs::File::create(opts.work_dir.join("seaweedfs.log"))
            .map_err(|e| RehearseError::Other(format!("{}: {e}", opts.work_dir.display())))?;
        let mut weed = Command::new("ip");
        weed.args(["netns", "exec", &store_ns])
            .arg(&opts.weed)
            .args([
                "mini",
                &format!("-dir={}", data.display()),
                &format!("-ip={SUBNET}.1"),
                &format!("-ip.bind={SUBNET}.1"),
            ])
            .args([format!("-bucket={bucket}").as_str(), "-admin.ui=false", "-webdav=false"])
            .stdout(log.try_clone().map_err(|e| RehearseError::Other(e.to_string()))?)
            .stderr(log);
        for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            if let Some(v) = env.get(k) {
                weed.env(k, v);
            }
        }
        r.weed = Some(weed.spawn().map_err(|e| RehearseError::Command {
            command: format!("{}", opts.weed.display()),
            reason: e.to_string(),
        })?);
        say(format!("store: SeaweedFS at http://{SUBNET}.1:8333 (bucket `{bucket}`) in namespace {store_ns}"));
        // This process reaches it as the services do, with the SDL's credentials.
        for (k, v) in &env {
            if k.starts_with("AWS_") {
                std::env::set_var(k, v);
            }
        }
        std::env::set_var("AWS_ENDPOINT_URL", format!("http://{SUBNET}.1:8333"));
        std::env::set_var("AWS_ALLOW_HTTP", "true");
        let t0 = Instant::now();
        let store = loop {
            match Store::create(&url).and_then(|s| s.put("rehearsal-ready", "ok").map(|()| s)) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > Duration::from_secs(60) => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        };
        // The prepared run, object by object.
        let local = std::mem::replace(&mut r.store, store);
        let keys = local.list("")?;
        for key in &keys {
            r.store.put(key, local.get(key)?)?;
        }
        say(format!("copied the prepared run ({} objects) from {} to {url}", keys.len(), opts.run_dir.display()));
        for (i, svc) in services.iter().enumerate() {
            let ns = format!("{tag}-{}", svc.name);
            let c =
                r.start_service(svc, &ns, &format!("{tag}{i}"), 10 + i as u8, &opts.wan, opts.delay_proxy.as_ref())?;
            say(format!("{}: container {c} in namespace {ns} ({} CPU, {} memory)", svc.name, svc.cpu, svc.memory));
        }
        Ok((r, env))
    }

    /// Runs the lease schedule until the coordinator's container exits; returns its exit code.
    pub fn drive(&mut self, services: &[Service], opts: &Options, say: Say) -> Result<i32> {
        let spec = crate::train::run::read_spec(&self.store).map_err(|e| RehearseError::Other(e.to_string()))?;
        let t0 = Instant::now();
        let coordinator = format!("{}-coordinator-c", self.tag);
        let (mut termed, mut killed, mut lost) = (false, false, false);
        let (mut round, mut known) = (0, None);
        loop {
            // The store is the services' as much as ours: a failed look (the store busy, a
            // transient error) is tried again next tick, as the services do.
            match protocol::latest_commit_after(&self.store, known.as_ref()) {
                Ok(c) => {
                    round = c.as_ref().map_or(0, |c| c.round);
                    known = c;
                }
                Err(e) => tracing::warn!("rehearsal: could not read the latest round, trying again: {e}"),
            }
            if !termed && round >= opts.schedule.term_after {
                if let Some(c) = self.worker_container(1) {
                    let t = Instant::now();
                    run_cmd(podman().args(["stop", "-t", &opts.schedule.grace.as_secs().to_string(), &c]))?;
                    let what = format!(
                        "worker-1's lease ended: SIGTERM, grace {} s (stopped after {:.1} s)",
                        opts.schedule.grace.as_secs(),
                        t.elapsed().as_secs_f64()
                    );
                    say(format!("after round {round}: {what}"));
                    self.events.push((round, what));
                }
                termed = true;
            }
            if !killed && round >= opts.schedule.kill_after {
                if let Some(c) = self.worker_container(2) {
                    run_cmd(podman().args(["kill", "-s", "KILL", &c]))?;
                    run_cmd(podman().args(["start", &c]))?;
                    let what = "worker-2 SIGKILLed; its container restarted (as Kubernetes restarts it)".to_string();
                    say(format!("after round {round}: {what}"));
                    self.events.push((round, what));
                }
                killed = true;
            }
            if !lost && round >= opts.schedule.lose_after {
                if let Some(svc) = services.iter().find(|s| s.name == "worker-3") {
                    let ns = format!("{}-worker-3", self.tag);
                    let i = services.iter().position(|s| s.name == "worker-3").unwrap_or(0);
                    // The provider vanishes: its link first (no goodbye), then its machine.
                    let _ = in_ns(&self.wan_ns(), &["ip", "link", "del", &format!("{}{i}w", self.tag)]);
                    let c = format!("{ns}-c");
                    let _ = run_cmd(podman().args(["kill", "-s", "KILL", &c]));
                    let _ = run_cmd(podman().args(["rm", "-f", &c]));
                    for (_, mut p) in self.proxies.extract_if(.., |(n, _)| n == &ns) {
                        let _ = p.kill();
                        let _ = p.wait();
                    }
                    let _ = ip(&["netns", "del", &ns]);
                    self.namespaces.retain(|n| n != &ns);
                    let replacement = format!("{}-worker-3r", self.tag);
                    let c = self.start_service(
                        svc,
                        &replacement,
                        &format!("{}r", self.tag),
                        100,
                        &opts.wan,
                        opts.delay_proxy.as_ref(),
                    )?;
                    let what = format!("worker-3's provider lost (link cut, container killed, namespace deleted); replacement {c} started on a new provider");
                    say(format!("after round {round}: {what}"));
                    self.events.push((round, what));
                }
                lost = true;
            }
            let state =
                run_cmd(podman().args(["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", &coordinator]))?;
            let mut parts = state.split_whitespace();
            if parts.next() == Some("exited") {
                let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(-1);
                return Ok(code);
            }
            if t0.elapsed() > opts.limit {
                return Err(RehearseError::Other(format!(
                    "the run did not finish within {:?} (round {round} of {})",
                    opts.limit, spec.sync.rounds
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn worker_container(&self, i: usize) -> Option<String> {
        let c = format!("{}-worker-{i}-c", self.tag);
        self.containers.contains(&c).then_some(c)
    }

    /// Every container's log, into `dir/<container>.log`.
    pub fn save_logs(&self, dir: &Path) {
        for c in &self.containers {
            if let Ok(out) = podman().args(["logs", c]).stderr(Stdio::piped()).output() {
                let mut text = out.stdout;
                text.extend_from_slice(&out.stderr);
                let _ = std::fs::write(dir.join(format!("{c}.log")), text);
            }
        }
    }
}

impl Drop for Rehearsal {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman().args(["rm", "-f", "-t", "0", c]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        for (_, p) in &mut self.proxies {
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Some(mut w) = self.weed.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = ip(&["link", "del", &format!("{}hn", self.tag)]);
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
