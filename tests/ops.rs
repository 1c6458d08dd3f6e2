//! Deploy, watch, pay: generated Akash SDLs validated by Akash's own validator, TensorBoard event
//! files read by TensorBoard, a budget that stops a real DiLoCo run, and the dashboard rendered by
//! headless Chromium.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use skytrain::store::Store;
use skytrain::sync::protocol;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const PLAN: &str = r#"
image = "ghcr.io/example/skytrain:0.1.0"
workers = 3
[worker]
cpu = 8
memory = "64Gi"
storage = "200Gi"
gpu_units = 1
gpu = [{ model = "a100", ram = "80Gi", interface = "sxm" }, { model = "a100", ram = "80Gi", interface = "pcie" }, { model = "h100" }]
shm = { size = "32Gi" }
price = { denom = "uakt", amount = 100000 }
[coordinator]
cpu = 1
memory = "2Gi"
storage = "5Gi"
price = { denom = "uakt", amount = 1000 }
[placement]
attributes = { region = "us-west" }
signed_by_any = ["akash1365yvmc4s7awdyj3n2sav7xfx76adc6dnmlx63"]
"#;

/// A run spec admitting `n` worker keys (written under `dir`), as `skytrain key new --admit` does.
fn spec_with_keys(dir: &Path, n: usize) -> (PathBuf, Vec<PathBuf>) {
    let spec = dir.join("run.toml");
    let mut s = common::stream_spec("s3://bucket/data/enc", 100);
    s.name = "at2".into();
    std::fs::write(&spec, s.to_toml()).unwrap();
    let keys: Vec<PathBuf> = (0..n)
        .map(|i| {
            let k = dir.join(format!("w{i}.key"));
            let out = common::bin().args(["key", "new", "--out"]).arg(&k).arg("--admit").arg(&spec).output().unwrap();
            common::ok(out, "key new");
            k
        })
        .collect();
    (spec, keys)
}

fn sdl(spec: &Path, plan: &Path, keys: &[PathBuf], out: &Path, extra: &[&str]) -> std::process::Output {
    common::bin()
        .args(["deploy", "sdl", "--spec"])
        .arg(spec)
        .arg("--plan")
        .arg(plan)
        .args(["--store", "s3://skytrain-runs/at2"])
        .arg("--out")
        .arg(out)
        .arg("--keys")
        .args(keys)
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", "scoped-key")
        .env("AWS_SECRET_ACCESS_KEY", "scoped-secret")
        .env("AWS_ENDPOINT_URL", "https://s3.example.org")
        .output()
        .unwrap()
}

#[test]
fn generated_sdls_pass_akash_validation_and_bad_plans_are_refused() {
    let out = Command::new(root().join("tests/akash/install.sh")).output().unwrap();
    common::ok(out, "npm ci (tests/akash)");
    let dir = tempfile::tempdir().unwrap();
    let (spec, keys) = spec_with_keys(dir.path(), 4);
    let plans = [
        ("full", PLAN.to_string()),
        (
            "h100-usdc",
            PLAN.replace("workers = 3", "workers = 2")
                .replace(
                    r#"gpu = [{ model = "a100", ram = "80Gi", interface = "sxm" }, { model = "a100", ram = "80Gi", interface = "pcie" }, { model = "h100" }]"#,
                    r#"gpu = [{ model = "h100", interface = "sxm" }]"#,
                )
                .replace(r#"price = { denom = "uakt", amount = 100000 }"#, r#"price = { denom = "usdc", amount = 250000 }"#),
        ),
        ("no-shm-no-placement", PLAN.replace("shm = { size = \"32Gi\" }\n", "").replace(
            "[placement]\nattributes = { region = \"us-west\" }\nsigned_by_any = [\"akash1365yvmc4s7awdyj3n2sav7xfx76adc6dnmlx63\"]\n",
            "",
        )),
        ("sandbox", format!("network = \"sandbox\"\n{}", PLAN.replace("denom = \"uakt\", amount = 100000", "denom = \"usdc\", amount = 9"))),
        // Four workers, sizes in lowercase (Akash reads units in any case) and the USDC denom in
        // lowercase: written canonically.
        (
            "four-lowercase",
            PLAN.replace("workers = 3", "workers = 4").replace("memory = \"64Gi\"", "memory = \"64gi\"").replace(
                "denom = \"uakt\", amount = 100000",
                &format!("denom = \"{}\", amount = 250000", skytrain::deploy::sdl::USDC_MAINNET.to_ascii_lowercase()),
            ),
        ),
        // Two workers per provider where a user wants several GPUs from one.
        ("colocated", PLAN.replace("[placement]\n", "[placement]\nworkers_per_group = 2\n")),
    ];
    let mut files = Vec::new();
    for (name, text) in &plans {
        let plan = dir.path().join(format!("{name}.toml"));
        std::fs::write(&plan, text).unwrap();
        for probe in [false, true] {
            let out_file = dir.path().join(format!("{name}{}.yaml", if probe { "-probe" } else { "" }));
            let out = sdl(&spec, &plan, &keys, &out_file, if probe { &["--probe"] } else { &[] });
            common::ok(out, &format!("deploy sdl {name}"));
            files.push(out_file);
        }
    }
    // The README's examples stay valid: examples/run.toml (with 4 admitted keys) + examples/deploy.toml.
    let example_spec = dir.path().join("example-run.toml");
    std::fs::copy(root().join("examples/run.toml"), &example_spec).unwrap();
    let example_keys: Vec<PathBuf> = (0..4)
        .map(|i| {
            let k = dir.path().join(format!("example-w{i}.key"));
            common::ok(
                common::bin().args(["key", "new", "--out"]).arg(&k).arg("--admit").arg(&example_spec).output().unwrap(),
                "key new",
            );
            k
        })
        .collect();
    let example_sdl = dir.path().join("example.yaml");
    common::ok(
        sdl(&example_spec, &root().join("examples/deploy.toml"), &example_keys, &example_sdl, &[]),
        "deploy sdl (examples)",
    );
    files.push(example_sdl);
    // One SDL per placement group: each file one service, a worker's holding only its own key.
    let split_plan = dir.path().join("four-lowercase.toml");
    common::ok(sdl(&spec, &split_plan, &keys, &dir.path().join("split.yaml"), &["--split"]), "deploy sdl --split");
    let split: Vec<PathBuf> = ["coordinator", "worker-1", "worker-2", "worker-3", "worker-4"]
        .iter()
        .map(|g| dir.path().join(format!("split-{g}.yaml")))
        .collect();
    let mut keys_seen = Vec::new();
    for f in &split {
        let text = std::fs::read_to_string(f).unwrap();
        let held: Vec<&str> = text.lines().filter(|l| l.contains("SKYTRAIN_WORKER_KEY=")).collect();
        assert!(held.len() <= 1, "{}: {held:?}", f.display());
        keys_seen.extend(held.iter().map(|l| l.trim().to_string()));
    }
    keys_seen.sort();
    keys_seen.dedup();
    assert_eq!(keys_seen.len(), 4, "every worker's key in exactly one file");
    files.extend(split.iter().cloned());

    // Each SDL against the network its plan names (the USDC denom differs between them).
    let mut results: Vec<serde_json::Value> = Vec::new();
    for network in ["mainnet", "sandbox"] {
        let these: Vec<&PathBuf> =
            files.iter().filter(|f| f.to_str().unwrap().contains("sandbox") == (network == "sandbox")).collect();
        let mut node = Command::new("node");
        node.current_dir(root().join("tests/akash")).env("AKASH_NETWORK", network).arg("validate.mjs").args(&these);
        let out = common::ok(node.output().unwrap(), &format!("Akash validateSDL/generateManifest ({network})"));
        results.extend(out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()));
    }
    assert_eq!(results.len(), files.len());
    for r in &results {
        assert_eq!(r["schemaErrors"], serde_json::json!([]), "{r}");
        assert_eq!(r["manifestOk"], true, "{r}");
    }
    // Akash's own manifest: one group (one order, one lease) per service, so each worker can land
    // on a different provider; co-location groups workers on request.
    let groups_of = |name: &str| -> Vec<(String, Vec<String>)> {
        let r = results.iter().find(|r| r["file"].as_str().unwrap().ends_with(&format!("/{name}.yaml"))).unwrap();
        r["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                let services = g["services"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string());
                (g["name"].as_str().unwrap().to_string(), services.collect())
            })
            .collect()
    };
    for g in ["coordinator", "worker-1", "worker-4"] {
        assert_eq!(groups_of(&format!("split-{g}")), vec![(g.to_string(), vec![g.to_string()])]);
    }
    let four = groups_of("four-lowercase");
    assert_eq!(four.len(), 5, "{four:?}");
    assert!(four.iter().all(|(_, services)| services.len() == 1), "{four:?}");
    assert_eq!(groups_of("full").len(), 4);
    let colocated = groups_of("colocated");
    assert_eq!(colocated.len(), 3, "{colocated:?}");
    assert!(colocated.iter().any(|(g, s)| g == "workers-1" && s.len() == 2), "{colocated:?}");
    let lower: serde_json::Value = serde_yaml_ng_value(&dir.path().join("four-lowercase.yaml"));
    assert_eq!(lower["profiles"]["compute"]["worker"]["resources"]["memory"]["size"], "64Gi");
    assert_eq!(
        lower["profiles"]["placement"]["worker-4"]["pricing"]["worker"]["denom"],
        skytrain::deploy::sdl::USDC_MAINNET
    );
    // The full SDL: a coordinator and one service per worker, each with its own key.
    let full: serde_json::Value = serde_yaml_ng_value(&files[0]);
    let services = full["services"].as_object().unwrap();
    assert_eq!(services.len(), 4);
    let worker_env = |w: &str| {
        full["services"][w]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(worker_env("worker-1").iter().any(|e| e.starts_with("SKYTRAIN_WORKER_KEY=")));
    assert_ne!(worker_env("worker-1"), worker_env("worker-2"));
    assert!(worker_env("worker-3").contains(&"AWS_ACCESS_KEY_ID=scoped-key".to_string()));
    assert_eq!(
        full["profiles"]["compute"]["worker"]["resources"]["gpu"]["attributes"]["vendor"]["nvidia"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert!(
        full["profiles"]["compute"]["coordinator"]["resources"].get("gpu").is_none(),
        "the coordinator is CPU-only"
    );
    let h100: serde_json::Value = serde_yaml_ng_value(&files[2]);
    assert_eq!(
        h100["profiles"]["placement"]["worker-1"]["pricing"]["worker"]["denom"],
        skytrain::deploy::sdl::USDC_MAINNET
    );

    // Invalid plans: refused by skytrain, with the field named, before any SDL is written.
    for (from, to, field) in [
        (
            r#"gpu = [{ model = "a100", ram = "80Gi", interface = "sxm" }, { model = "a100", ram = "80Gi", interface = "pcie" }, { model = "h100" }]"#,
            "",
            "worker.gpu",
        ),
        ("shm = { size = \"32Gi\" }", "shm = { size = \"32Gi\", persistent = true }", "worker.shm.persistent"),
        ("denom = \"uakt\", amount = 100000", "denom = \"ueth\", amount = 100000", "worker.price.denom"),
        ("memory = \"64Gi\"", "memory = \"68719476736\"", "worker.memory"),
        // A model no Akash provider lists never gets a bid: refused with the likely meaning.
        ("{ model = \"h100\" }", "{ model = \"nvidia h100\" }", "Did you mean `h100`"),
        (
            "denom = \"uakt\", amount = 100000",
            "denom = \"ibc/12C6A0C374171B595A0A9E18B83FA09D295FB1F2D8C6DAA3AC28683471752D84\", amount = 1",
            "worker.price.denom",
        ),
    ] {
        let plan = dir.path().join("bad.toml");
        std::fs::write(&plan, PLAN.replace(from, to)).unwrap();
        let out_file = dir.path().join("bad.yaml");
        let out = sdl(&spec, &plan, &keys, &out_file, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("bad.toml") && err.contains(field), "{field}: {err}");
        assert!(!out_file.exists(), "an SDL was written for an invalid plan");
    }
    // A key the spec does not admit is refused too.
    let stranger = dir.path().join("stranger.key");
    skytrain::sync::keys::WorkerKey::generate().save(&stranger).unwrap();
    let plan = dir.path().join("full.toml");
    let out = sdl(&spec, &plan, &[keys[0].clone(), keys[1].clone(), stranger], &dir.path().join("x.yaml"), &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not admitted"));
    // A spec that trains 2 replicas per worker on CUDA needs 2 GPUs per worker.
    let text = std::fs::read_to_string(&spec).unwrap();
    let mut two = skytrain::config::RunSpec::from_toml(&text, "run.toml").unwrap();
    two.train.device = skytrain::config::Device::Cuda(0);
    two.train.replicas = 2;
    let two_file = dir.path().join("two.toml");
    std::fs::write(&two_file, two.to_toml()).unwrap();
    let out = sdl(&two_file, &plan, &keys, &dir.path().join("y.yaml"), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("worker.gpu_units") && err.contains("replicas"), "{err}");
}

fn serde_yaml_ng_value(path: &Path) -> serde_json::Value {
    // The SDL is YAML; Python is not needed to read it back: node already validated it, and the
    // test only inspects the structure skytrain wrote.
    let out = Command::new("node")
        .current_dir(root().join("tests/akash"))
        .args(["-e", "const y=require('js-yaml');const fs=require('fs');console.log(JSON.stringify(y.load(fs.readFileSync(process.argv[1],'utf8'))))"])
        .arg(path)
        .output()
        .unwrap();
    serde_json::from_str(&common::ok(out, "js-yaml")).unwrap()
}

#[test]
fn tensorboard_reads_the_event_files() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = common::small_run(dir.path(), 20, 10);
    common::ok(common::bin().args(["train", "--store", dir.path().to_str().unwrap()]).output().unwrap(), "train");
    let grid = dir.path().join("grid.png");
    let out = common::bin()
        .args(["sample", "--store", dir.path().to_str().unwrap(), "--prompt", "a red circle above a blue square"])
        .args(["--steps", "4", "--per-prompt", "2", "--record", "--out"])
        .arg(&grid)
        .output()
        .unwrap();
    common::ok(out, "sample");
    let logdir = dir.path().join("tb");
    common::ok(
        common::bin()
            .args(["tensorboard", "pull", "--store", dir.path().to_str().unwrap(), "--out"])
            .arg(&logdir)
            .output()
            .unwrap(),
        "tensorboard pull",
    );
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out = {}
for run in ["train", "samples-adhoc"]:
    acc = EventAccumulator(f"{sys.argv[1]}/{run}", size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    out[run] = {"scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
                "images": {t: [[e.step, e.width, e.height] for e in acc.Images(t)] for t in tags["images"]}}
print(json.dumps(out))
"#;
    let out = common::ok(
        Command::new(common::python()).args(["-c", script]).arg(&logdir).output().unwrap(),
        "tensorboard EventAccumulator",
    );
    let tb: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let metrics = skytrain::train::run::read_metrics(&store).unwrap();
    let loss = tb["train"]["scalars"]["train/loss"].as_array().unwrap();
    assert_eq!(loss.len(), metrics.len());
    for (e, m) in loss.iter().zip(&metrics) {
        assert_eq!(e[0].as_u64().unwrap(), m.stats.step);
        assert!((e[1].as_f64().unwrap() - m.stats.loss).abs() < 1e-5 * m.stats.loss.abs().max(1.0));
    }
    for tag in ["train/lr", "train/grad_norm", "train/samples_per_s"] {
        assert_eq!(tb["train"]["scalars"][tag].as_array().unwrap().len(), metrics.len(), "{tag}");
    }
    let images = tb["samples-adhoc"]["images"]["samples/adhoc"].as_array().unwrap();
    let png = image::open(&grid).unwrap();
    assert_eq!(images[0], serde_json::json!([20, png.width(), png.height()]));
}

/// A DiLoCo run whose budget is exhausted after round 2, whatever the machine's speed: the real
/// processes' lease time costs little (~2 USD/h each), and once round 2 has committed the test
/// adds the ledger session of a two-hour lease that ended earlier (3.6 USD), as a replaced worker
/// leaves one; the coordinator then finds the 3 USD budget spent.
fn budget_run(dir: &Path) -> (Store, skytrain::config::RunSpec) {
    let price = |amount| Some(skytrain::config::Price { denom: "usdc".into(), amount });
    let (store, spec, keys) = common::diloco_run(dir, 200, 2, &["w1", "w2"], |s| {
        s.cost.worker_price = price(3.05e3);
        s.cost.coordinator_price = price(3.05e2);
        s.cost.budget_usd = Some(3.0);
    });
    let loc = store.url().trim_start_matches("file://").to_string();
    let mut procs = vec![common::bin()
        .args(["coordinate", "--store", &loc])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()];
    for (name, key) in ["w1", "w2"].iter().zip(&keys) {
        procs.push(
            common::bin()
                .args(["work", "--store", &loc, "--name", name, "--key"])
                .arg(key)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let t0 = std::time::Instant::now();
    while !store.exists(&protocol::commit_key(2)).unwrap() {
        assert!(t0.elapsed() < Duration::from_secs(1200), "round 2 never committed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let now = protocol::now_ms();
    let ended = skytrain::ledger::Session {
        role: "worker".into(),
        name: "w0".into(),
        started_ms: now - 2 * 3_600_000,
        last_seen_ms: now,
        gpus: 1,
        price: None,
    };
    store.put(&ended.key(), serde_json::to_vec(&ended).unwrap()).unwrap();
    // Finishing well before 200 rounds means the budget stopped the run (checked by the caller).
    common::finish(&mut procs, Duration::from_secs(1200));
    (store, spec)
}

#[test]
fn the_budget_stops_the_run_and_the_dashboard_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, spec) = budget_run(dir.path());
    let stopped: protocol::Stopped = serde_json::from_slice(&store.get(protocol::STOPPED_KEY).unwrap()).unwrap();
    assert_eq!(stopped.reason, "budget");
    assert!(stopped.spend_usd >= 3.0);
    let last = protocol::latest_commit(&store).unwrap().unwrap();
    assert_eq!(last.round, stopped.round, "a round was committed after the stop");
    assert!(last.round >= 2 && last.round < spec.sync.rounds, "round {}", last.round);
    assert_eq!(
        (stopped.model_key.clone(), stopped.model_sha256.clone()),
        (last.model_key.clone(), last.model_sha256.clone())
    );
    assert!(store.exists("ledger-alerts/budget-80.json").unwrap(), "no warning at 80%");
    // `skytrain cost` reports the ledger: both workers, the coordinator and the ended lease.
    let loc = store.url().trim_start_matches("file://").to_string();
    let out = common::ok(common::bin().args(["cost", "--store", &loc, "--json"]).output().unwrap(), "cost");
    let cost: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(cost["spent"]["usd"].as_f64().unwrap() >= 3.0);
    assert_eq!(cost["spent"]["sessions"].as_array().unwrap().len(), 4);
    assert!(
        cost["forecast_remaining"]["samples_per_s_per_worker"].as_f64().unwrap() > 0.0,
        "self-checks not used: {cost}"
    );

    // A sample grid, as the demo or `skytrain sample` leaves one.
    let grid = image::RgbImage::from_fn(96, 48, |x, y| image::Rgb([(x * 2) as u8, (y * 5) as u8, 160]));
    let mut png = Vec::new();
    grid.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    store.put("samples/0000000007.png", png).unwrap();

    // The dashboard, rendered by headless Chromium: numbers match the store, plots drawn.
    let mut server = KillOnDrop(
        common::bin().args(["dashboard", "--store", &loc, "--port", "0"]).stdout(Stdio::piped()).spawn().unwrap(),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("dashboard on ").unwrap_or_else(|| panic!("unexpected: {line}")).to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let profile = dir.path().join("chromium-profile");
    let chromium = |extra: &[String]| {
        Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
            .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--window-size=1280,2000", "--virtual-time-budget=10000"])
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium (Debian package `chromium`; .ci/run installs it)")
    };
    let dom = common::ok(chromium(&["--dump-dom".into()]), "chromium --dump-dom");
    let text_of = |id: &str| -> String {
        let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("#{id} missing"));
        let open = dom[start..].find('>').unwrap() + start + 1;
        let close = dom[open..].find('<').unwrap() + open;
        dom[open..close].to_string()
    };
    assert!(dom.contains("data-loaded=\"true\""), "the page did not render the run: {}", &dom[..dom.len().min(2000)]);
    assert_eq!(text_of("run-name"), spec.name);
    assert_eq!(text_of("rounds-count"), last.round.to_string());
    assert_eq!(text_of("workers-count"), "2");
    assert!(text_of("stopped").contains("budget"));
    assert!(text_of("budget-text").contains("of 3.00 USD"), "{}", text_of("budget-text"));
    // (The page's script holds the same markup as templates: count rendered rows and paths only.)
    let rendered_rows = (1..=last.round).filter(|r| dom.contains(&format!("data-round=\"{r}\""))).count() as u64;
    assert_eq!(rendered_rows, last.round.min(50));
    assert!(dom.contains("class=\"series\" d=\"M"), "no loss curve drawn");
    assert!(dom.contains("samples/0000000007.png"));
    let shot = dir.path().join("dashboard.png");
    common::ok(chromium(&[format!("--screenshot={}", shot.display())]), "chromium --screenshot");
    let img = image::open(&shot).unwrap().to_rgb8();
    let mut colours = std::collections::HashSet::new();
    let non_background = img
        .pixels()
        .filter(|p| {
            colours.insert(p.0);
            p.0 != [246, 247, 249] && p.0 != [255, 255, 255]
        })
        .count();
    assert!(
        colours.len() > 50 && non_background > (img.width() * img.height() / 50) as usize,
        "blank screenshot: {} colours",
        colours.len()
    );
    let keep = std::env::var("SKYTRAIN_SCREENSHOT").ok().map(PathBuf::from);
    if let Some(p) = keep {
        std::fs::copy(&shot, p).unwrap();
    }
    drop(server);
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
