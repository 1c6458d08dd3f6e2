//! Akash SDL (version 2.0) for a run: one small CPU-only coordinator service and one service per
//! worker (each with its own signing key), all talking only to the run's object store. Each
//! service gets its own placement group, so each is a separate order any provider can win and one
//! provider's outage costs one worker (`[placement] workers_per_group` co-locates workers).
//!
//! The hardware plan is checked before anything is written: a plan the Akash schema or the
//! providers would refuse (no GPU model, a persistent `ram` volume, an unknown price denom) is an
//! error naming the field. Tests run every generated SDL through Akash's own validator
//! (`@akashnetwork/chain-sdk`).
//!
//! Providers can read a deployment's environment: the store credentials passed here should be
//! scoped to the run's prefix (a bucket policy or an access key per run), never account-wide.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::config::{Price, USDC_MAINNET, USDC_SANDBOX};

#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct PlanError {
    pub file: String,
    pub reason: String,
}

/// One acceptable GPU: providers tag the same card differently, so a plan lists alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuChoice {
    pub model: String,
    #[serde(default)]
    pub ram: Option<String>,
    /// `pcie` or `sxm`.
    #[serde(default)]
    pub interface: Option<String>,
    /// A model missing from skytrain's copy of Akash's GPU table (`deploy::gpus`) that providers
    /// list now: skip the check.
    #[serde(default)]
    pub unlisted: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShmVolume {
    pub size: String,
    /// Must stay false: a `ram` volume cannot be persistent (kept only to refuse it clearly).
    #[serde(default)]
    pub persistent: bool,
}

/// Resources and price of one service's profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub cpu: f64,
    pub memory: String,
    pub storage: String,
    #[serde(default)]
    pub gpu_units: u32,
    #[serde(default)]
    pub gpu: Vec<GpuChoice>,
    /// A `ram`-class volume mounted at /dev/shm (AT-1 had to ask providers for a bigger one).
    #[serde(default)]
    pub shm: Option<ShmVolume>,
    pub price: Price,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Workers per placement group. On Akash a group is one order, won by one provider as one
    /// lease: 1 (the default) lets every worker land on a different provider, so no single
    /// provider's outage stops the run; more co-locates that many workers on one provider.
    #[serde(default = "one")]
    pub workers_per_group: u32,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Auditors, any of which must have signed the provider's attributes.
    #[serde(default)]
    pub signed_by_any: Vec<String>,
    #[serde(default)]
    pub signed_by_all: Vec<String>,
}

/// The hardware plan (`deploy.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwarePlan {
    /// Container image with the `skytrain` binary on its PATH.
    pub image: String,
    pub workers: u32,
    /// `mainnet` or `sandbox`: which USDC denom `usdc` means.
    #[serde(default = "default_network")]
    pub network: String,
    pub worker: Profile,
    pub coordinator: Profile,
    #[serde(default)]
    pub placement: Placement,
}

fn one() -> u32 {
    1
}

impl Default for Placement {
    fn default() -> Self {
        Placement { workers_per_group: 1, attributes: BTreeMap::new(), signed_by_any: vec![], signed_by_all: vec![] }
    }
}

fn default_network() -> String {
    "mainnet".into()
}

/// Where the run lives and how to reach it: passed to every service as environment.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreAccess {
    pub url: String,
    /// Extra environment: `AWS_ENDPOINT_URL`, `AWS_REGION`, credentials, …
    pub env: Vec<(String, String)>,
}

impl HardwarePlan {
    pub fn parse(text: &str, file: &str) -> Result<HardwarePlan, PlanError> {
        let plan: HardwarePlan =
            toml::from_str(text).map_err(|e| PlanError { file: file.into(), reason: e.to_string() })?;
        plan.validate(file)?;
        Ok(plan)
    }

    /// Refuses what Akash or its providers would refuse, naming the field.
    pub fn validate(&self, file: &str) -> Result<(), PlanError> {
        let err = |field: &str, reason: String| {
            Err(PlanError { file: file.into(), reason: format!("field `{field}`: {reason}") })
        };
        if self.image.trim().is_empty() {
            return err("image", "a container image is required".into());
        }
        if self.workers == 0 {
            return err("workers", "at least one worker".into());
        }
        if !matches!(self.network.as_str(), "mainnet" | "sandbox") {
            return err("network", format!("`{}` is not mainnet or sandbox", self.network));
        }
        for (name, p) in [("worker", &self.worker), ("coordinator", &self.coordinator)] {
            if p.cpu <= 0.0 {
                return err(&format!("{name}.cpu"), "must be positive".into());
            }
            for (field, size) in [("memory", &p.memory), ("storage", &p.storage)] {
                if let Err(reason) = canonical_size(size) {
                    return err(&format!("{name}.{field}"), reason);
                }
            }
            if p.gpu_units > 0 && p.gpu.is_empty() {
                return err(
                    &format!("{name}.gpu"),
                    "GPU units requested but no GPU model listed (e.g. [{ model = \"h100\" }])".into(),
                );
            }
            if p.gpu_units == 0 && !p.gpu.is_empty() {
                return err(&format!("{name}.gpu_units"), "GPU models listed but gpu_units is 0".into());
            }
            for (i, g) in p.gpu.iter().enumerate() {
                if g.model.trim().is_empty() {
                    return err(&format!("{name}.gpu[{i}].model"), "empty GPU model".into());
                }
                if !g.unlisted {
                    if let Err(reason) = super::gpus::check(&g.model, g.ram.as_deref()) {
                        return err(&format!("{name}.gpu[{i}].model"), reason);
                    }
                }
                if let Some(i_f) = &g.interface {
                    if !matches!(i_f.as_str(), "pcie" | "sxm") {
                        return err(&format!("{name}.gpu[{i}].interface"), format!("`{i_f}` is not pcie or sxm"));
                    }
                }
                if let Some(ram) = &g.ram {
                    if let Err(reason) = canonical_size(ram) {
                        return err(&format!("{name}.gpu[{i}].ram"), reason);
                    }
                }
            }
            if let Some(shm) = &p.shm {
                if shm.persistent {
                    return err(
                        &format!("{name}.shm.persistent"),
                        "a ram-class /dev/shm volume cannot be persistent".into(),
                    );
                }
                if let Err(reason) = canonical_size(&shm.size) {
                    return err(&format!("{name}.shm.size"), reason);
                }
            }
            self.denom(&p.price.denom).map_err(|reason| PlanError {
                file: file.into(),
                reason: format!("field `{name}.price.denom`: {reason}"),
            })?;
            if !(p.price.amount >= 0.0 && p.price.amount.is_finite()) {
                return err(&format!("{name}.price.amount"), "must be a non-negative number".into());
            }
        }
        if self.worker.gpu_units == 0 {
            return err("worker.gpu_units", "workers train on GPUs: request at least 1".into());
        }
        if self.placement.workers_per_group == 0 {
            return err("placement.workers_per_group", "must be at least 1".into());
        }
        Ok(())
    }

    /// The on-chain denom for a plan's denom. Akash prices leases in uakt, uact or the network's
    /// own USDC IBC denom, exactly: an `ibc/…` spelling is accepted in any case and written as the
    /// network's, any other `ibc/…` hash is refused.
    pub fn denom(&self, denom: &str) -> Result<String, String> {
        let usdc = if self.network == "sandbox" { USDC_SANDBOX } else { USDC_MAINNET };
        match denom {
            "uakt" | "uact" => Ok(denom.into()),
            "usdc" | "uusdc" => Ok(usdc.into()),
            d if d.eq_ignore_ascii_case(usdc) => Ok(usdc.into()),
            d if d.to_ascii_lowercase().starts_with("ibc/") => Err(format!(
                "`{d}` is not the {} USDC denom `{usdc}`, the only IBC denom Akash accepts for pricing there (or write usdc)",
                self.network
            )),
            d => Err(format!("unknown denom `{d}` (expected uakt, uact, usdc or the network's USDC ibc/… denom)")),
        }
    }

    /// The same deployment at minimal resources (one worker, 1 CPU, small memory and disk, same GPU
    /// choices and prices), to see which providers bid before asking for the full size.
    pub fn probe(&self) -> HardwarePlan {
        let small = |p: &Profile| Profile {
            cpu: 1.0,
            memory: "1Gi".into(),
            storage: "1Gi".into(),
            shm: p.shm.as_ref().map(|_| ShmVolume { size: "64Mi".into(), persistent: false }),
            gpu_units: p.gpu_units.min(1),
            ..p.clone()
        };
        HardwarePlan { workers: 1, worker: small(&self.worker), coordinator: small(&self.coordinator), ..self.clone() }
    }
}

/// A size as Akash's SDL parser reads it (chain-sdk `sizes.ts`: a number, a prefix k/m/g/t/p/e
/// and an optional `i` for powers of 1024, case-insensitive), written the canonical way (`64Gi`,
/// `512Mi`, `100G`). A number without a unit is refused: Akash's manifest generator throws on it.
pub fn canonical_size(s: &str) -> Result<String, String> {
    let hint = "a size like 64Gi or 512Mi (Ki, Mi, Gi, Ti, Pi, Ei: powers of 1024; k, M, G, T, P, E or kB, MB, …: powers of 1000; case does not matter)";
    let digits = s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = s.trim()[digits.len()..].to_ascii_lowercase();
    let value = digits.parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0);
    let (Some(_), Some(prefix)) = (value, unit.chars().next()) else {
        return Err(if value.is_some() && unit.is_empty() {
            format!("`{s}` has no unit: {hint}")
        } else {
            format!("`{s}` is not {hint}")
        });
    };
    let Some(power) = "kmgtpe".find(prefix) else { return Err(format!("`{s}` is not {hint}")) };
    let prefix = if power == 0 { 'k' } else { prefix.to_ascii_uppercase() };
    match &unit[1..] {
        "i" => Ok(format!("{digits}{}i", prefix.to_ascii_uppercase())),
        "" | "b" => Ok(format!("{digits}{prefix}")),
        _ => Err(format!("`{s}` is not {hint}")),
    }
}

/// Bytes in a size [`canonical_size`] accepts.
pub fn size_bytes(s: &str) -> Option<u64> {
    let canonical = canonical_size(s).ok()?;
    let digits = canonical.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &canonical[digits.len()..];
    let power = "kMGTPE".find(unit.chars().next()?.to_ascii_uppercase())? as i32 + 1;
    let base: f64 = if unit.ends_with('i') { 1024.0 } else { 1000.0 };
    Some((digits.parse::<f64>().ok()? * base.powi(power)) as u64)
}

fn size(s: &str) -> String {
    canonical_size(s).expect("sizes are validated before an SDL is generated")
}

fn profile_yaml(p: &Profile) -> serde_json::Value {
    use serde_json::json;
    let mut storage = vec![json!({ "size": size(&p.storage) })];
    if let Some(shm) = &p.shm {
        storage.push(
            json!({ "name": "shm", "size": size(&shm.size), "attributes": { "class": "ram", "persistent": false } }),
        );
    }
    let mut resources = json!({
        "cpu": { "units": p.cpu },
        "memory": { "size": size(&p.memory) },
        "storage": storage,
    });
    if p.gpu_units > 0 {
        let models: Vec<serde_json::Value> = p
            .gpu
            .iter()
            .map(|g| {
                let mut m = serde_json::Map::new();
                m.insert("model".into(), g.model.to_ascii_lowercase().into());
                if let Some(r) = &g.ram {
                    m.insert("ram".into(), size(r).into());
                }
                if let Some(i) = &g.interface {
                    m.insert("interface".into(), i.clone().into());
                }
                serde_json::Value::Object(m)
            })
            .collect();
        resources["gpu"] = json!({ "units": p.gpu_units, "attributes": { "vendor": { "nvidia": models } } });
    }
    json!({ "resources": resources })
}

/// The SDL for `run_name` under `plan`, with `store` passed to every service and one secret key
/// (hex) per worker. `probe` swaps the containers' commands for an idle one.
pub fn generate(
    run_name: &str,
    plan: &HardwarePlan,
    store: &StoreAccess,
    worker_keys: &[String],
    probe: bool,
) -> Result<String, PlanError> {
    let sdl = sdl_value(run_name, plan, store, worker_keys, probe)?;
    Ok(header(run_name, probe) + &serde_yaml_ng::to_string(&sdl).expect("SDL serialises"))
}

/// The same deployment as one SDL per placement group (the coordinator, each worker or group of
/// co-located workers), each deployed on its own: a provider then receives only its own service's
/// manifest, hence only its own worker's key. Returns (group name, SDL).
pub fn generate_split(
    run_name: &str,
    plan: &HardwarePlan,
    store: &StoreAccess,
    worker_keys: &[String],
    probe: bool,
) -> Result<Vec<(String, String)>, PlanError> {
    let sdl = sdl_value(run_name, plan, store, worker_keys, probe)?;
    let placements = sdl["profiles"]["placement"].as_object().expect("placements").clone();
    let deployment = sdl["deployment"].as_object().expect("deployment").clone();
    let mut out = Vec::new();
    for (group, placement) in placements {
        let services: Vec<&String> = deployment
            .iter()
            .filter(|(_, d)| d.as_object().is_some_and(|d| d.contains_key(&group)))
            .map(|(name, _)| name)
            .collect();
        let mut part = sdl.clone();
        part["services"] = services
            .iter()
            .map(|n| ((*n).clone(), sdl["services"][n.as_str()].clone()))
            .collect::<serde_json::Map<_, _>>()
            .into();
        part["deployment"] = services
            .iter()
            .map(|n| ((*n).clone(), deployment[n.as_str()].clone()))
            .collect::<serde_json::Map<_, _>>()
            .into();
        let profiles: std::collections::BTreeSet<String> = services
            .iter()
            .filter_map(|n| deployment[n.as_str()][&group]["profile"].as_str().map(str::to_string))
            .collect();
        part["profiles"]["compute"] = profiles
            .iter()
            .map(|p| (p.clone(), sdl["profiles"]["compute"][p].clone()))
            .collect::<serde_json::Map<_, _>>()
            .into();
        part["profiles"]["placement"] = serde_json::json!({ group.clone(): placement });
        let text = header(run_name, probe) + &serde_yaml_ng::to_string(&part).expect("SDL serialises");
        out.push((group, text));
    }
    Ok(out)
}

fn header(run_name: &str, probe: bool) -> String {
    format!(
        "# Akash SDL for skytrain run `{run_name}`{} — generated by `skytrain deploy sdl`.\n\
         # Providers can read this deployment's environment: use store credentials scoped to the run's\n\
         # prefix, and a fresh key per worker (admitted in the run spec).\n",
        if probe { " (probe: minimal resources, idle containers)" } else { "" }
    )
}

fn sdl_value(
    run_name: &str,
    plan: &HardwarePlan,
    store: &StoreAccess,
    worker_keys: &[String],
    probe: bool,
) -> Result<serde_json::Value, PlanError> {
    use serde_json::json;
    plan.validate("plan")?;
    if worker_keys.len() < plan.workers as usize {
        return Err(PlanError {
            file: "plan".into(),
            reason: format!("{} workers planned but {} worker keys given", plan.workers, worker_keys.len()),
        });
    }
    let base_env: Vec<String> = std::iter::once(format!("SKYTRAIN_STORE={}", store.url))
        .chain(store.env.iter().map(|(k, v)| format!("{k}={v}")))
        .chain(std::iter::once(format!("SKYTRAIN_RUN={run_name}")))
        .collect();
    let idle = ["sh", "-c", "echo skytrain probe: lease up; sleep infinity"];
    let mut services = serde_json::Map::new();
    let mut deployment = serde_json::Map::new();
    let mut placements = serde_json::Map::new();
    // Every placement group carries the plan's attributes and auditors and prices its own profile.
    let group = |profile: &str, price: &Price| {
        let mut g =
            json!({ "pricing": { profile: { "denom": plan.denom(&price.denom).unwrap(), "amount": price.amount } } });
        if !plan.placement.attributes.is_empty() {
            g["attributes"] = json!(plan.placement.attributes);
        }
        let (any, all) = (&plan.placement.signed_by_any, &plan.placement.signed_by_all);
        if !any.is_empty() || !all.is_empty() {
            let mut s = serde_json::Map::new();
            if !any.is_empty() {
                s.insert("anyOf".into(), json!(any));
            }
            if !all.is_empty() {
                s.insert("allOf".into(), json!(all));
            }
            g["signedBy"] = serde_json::Value::Object(s);
        }
        g
    };
    let shm_params = |p: &Profile| p.shm.as_ref().map(|_| json!({ "storage": { "shm": { "mount": "/dev/shm" } } }));
    let coordinator_cmd = ["sh", "-c", "exec skytrain coordinate --store \"$SKYTRAIN_STORE\""];
    let mut coordinator = json!({
        "image": plan.image,
        "command": if probe { idle.to_vec() } else { coordinator_cmd.to_vec() },
        "env": base_env,
    });
    if let Some(p) = shm_params(&plan.coordinator) {
        coordinator["params"] = p;
    }
    services.insert("coordinator".into(), coordinator);
    deployment.insert("coordinator".into(), json!({ "coordinator": { "profile": "coordinator", "count": 1 } }));
    placements.insert("coordinator".into(), group("coordinator", &plan.coordinator.price));
    let per_group = plan.placement.workers_per_group.max(1) as usize;
    for (i, key) in worker_keys.iter().take(plan.workers as usize).enumerate() {
        let name = format!("worker-{}", i + 1);
        let group_name = if per_group == 1 { name.clone() } else { format!("workers-{}", i / per_group + 1) };
        let mut env = base_env.clone();
        env.push(format!("SKYTRAIN_WORKER_NAME={name}"));
        env.push(format!("SKYTRAIN_WORKER_KEY={key}"));
        let cmd = [
            "sh",
            "-c",
            "exec skytrain work --store \"$SKYTRAIN_STORE\" --name \"$SKYTRAIN_WORKER_NAME\" --key-env SKYTRAIN_WORKER_KEY",
        ];
        let mut svc =
            json!({ "image": plan.image, "command": if probe { idle.to_vec() } else { cmd.to_vec() }, "env": env });
        if let Some(p) = shm_params(&plan.worker) {
            svc["params"] = p;
        }
        services.insert(name.clone(), svc);
        let mut placement = serde_json::Map::new();
        placement.insert(group_name.clone(), json!({ "profile": "worker", "count": 1 }));
        deployment.insert(name, serde_json::Value::Object(placement));
        placements.entry(group_name).or_insert_with(|| group("worker", &plan.worker.price));
    }
    let sdl = json!({
        "version": "2.0",
        "services": services,
        "profiles": {
            "compute": { "coordinator": profile_yaml(&plan.coordinator), "worker": profile_yaml(&plan.worker) },
            "placement": placements,
        },
        "deployment": deployment,
    });
    Ok(sdl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> &'static str {
        r#"
image = "ghcr.io/example/skytrain:0.1"
workers = 2
[worker]
cpu = 8
memory = "64Gi"
storage = "100Gi"
gpu_units = 1
gpu = [{ model = "a100", ram = "80Gi", interface = "sxm" }, { model = "h100" }]
shm = { size = "16Gi" }
price = { denom = "usdc", amount = 1500 }
[coordinator]
cpu = 1
memory = "2Gi"
storage = "5Gi"
price = { denom = "uakt", amount = 100 }
"#
    }

    #[test]
    fn invalid_plans_are_refused_with_the_field() {
        assert!(HardwarePlan::parse(plan(), "p.toml").is_ok());
        for (from, to, field) in [
            (
                "gpu = [{ model = \"a100\", ram = \"80Gi\", interface = \"sxm\" }, { model = \"h100\" }]",
                "",
                "worker.gpu",
            ),
            ("shm = { size = \"16Gi\" }", "shm = { size = \"16Gi\", persistent = true }", "worker.shm.persistent"),
            ("denom = \"usdc\"", "denom = \"dollars\"", "worker.price.denom"),
            ("interface = \"sxm\"", "interface = \"nvlink\"", "worker.gpu[0].interface"),
            ("memory = \"64Gi\"", "memory = \"lots\"", "worker.memory"),
            ("memory = \"64Gi\"", "memory = \"68719476736\"", "worker.memory"),
            (
                "denom = \"usdc\"",
                "denom = \"ibc/0000000000000000000000000000000000000000000000000000000000000000\"",
                "worker.price.denom",
            ),
            ("workers = 2", "workers = 0", "workers"),
        ] {
            let text = plan().replace(from, to);
            let err = HardwarePlan::parse(&text, "p.toml").unwrap_err().to_string();
            assert!(err.starts_with("p.toml") && err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn sizes_are_read_as_akash_does_and_written_canonically() {
        for (given, canonical) in [
            ("64Gi", "64Gi"),
            ("64gi", "64Gi"),
            ("64GI", "64Gi"),
            ("512mi", "512Mi"),
            ("100G", "100G"),
            ("100gb", "100G"),
            ("1k", "1k"),
            ("1.5Ti", "1.5Ti"),
        ] {
            assert_eq!(canonical_size(given).unwrap(), canonical, "{given}");
        }
        for bad in ["68719476736", "lots", "64", "64x", "64Gix", "-1Gi", "0Gi", ""] {
            assert!(canonical_size(bad).is_err(), "{bad}");
        }
        assert!(canonical_size("68719476736").unwrap_err().contains("no unit"));
    }

    #[test]
    fn sdl_has_one_service_per_worker_and_the_usdc_denom() {
        let p = HardwarePlan::parse(plan(), "p.toml").unwrap();
        let store = StoreAccess { url: "s3://b/runs/r1".into(), env: vec![("AWS_REGION".into(), "x".into())] };
        let keys = vec!["aa".repeat(32), "bb".repeat(32)];
        let sdl = generate("r1", &p, &store, &keys, false).unwrap();
        let v: serde_json::Value = serde_yaml_ng::from_str(&sdl).unwrap();
        assert_eq!(v["version"], "2.0");
        assert!(v["services"]["worker-2"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == &format!("SKYTRAIN_WORKER_KEY={}", keys[1])));
        assert_eq!(v["profiles"]["placement"]["worker-2"]["pricing"]["worker"]["denom"], USDC_MAINNET);
        assert_eq!(v["profiles"]["placement"].as_object().unwrap().len(), 3, "one group per service");
        assert_eq!(v["deployment"]["worker-2"]["worker-2"]["profile"], "worker");
        assert_eq!(v["profiles"]["compute"]["worker"]["resources"]["storage"][1]["attributes"]["class"], "ram");
        assert!(generate("r1", &p, &store, &keys[..1], false).is_err());
        // Any case of the network's USDC denom is written canonically; co-location on request.
        let lower = plan()
            .replace("denom = \"usdc\"", &format!("denom = \"{}\"", USDC_MAINNET.to_ascii_lowercase()))
            .replace("[coordinator]", "[placement]\nworkers_per_group = 2\n[coordinator]");
        let p = HardwarePlan::parse(&lower, "p.toml").unwrap();
        let v: serde_json::Value = serde_yaml_ng::from_str(&generate("r1", &p, &store, &keys, false).unwrap()).unwrap();
        assert_eq!(v["profiles"]["placement"]["workers-1"]["pricing"]["worker"]["denom"], USDC_MAINNET);
        assert_eq!(v["profiles"]["placement"].as_object().unwrap().len(), 2);
        assert_eq!(v["deployment"]["worker-2"]["workers-1"]["count"], 1);
        let probe: serde_json::Value =
            serde_yaml_ng::from_str(&generate("r1", &p.probe(), &store, &keys, true).unwrap()).unwrap();
        assert_eq!(probe["profiles"]["compute"]["worker"]["resources"]["cpu"]["units"], 1.0);
        assert!(probe["services"].get("worker-2").is_none());
    }
}
