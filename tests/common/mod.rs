//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use skytrain::config::{DataConfig, ModelConfig, RunSpec, TrainConfig};
use skytrain::store::Store;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skytrain"))
}

/// The Python interpreter of the venv scripts/setup.sh made (numpy, safetensors installed).
pub fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var("SKYTRAIN_VENV").map(PathBuf::from).unwrap_or_else(|_| root.join(".venv"));
    let py = venv.join("bin/python");
    assert!(py.exists(), "{} missing: run scripts/setup.sh first", py.display());
    py
}

/// A small run: dit-tiny on 256 embedded images, `steps` steps, checkpoint every `every`.
pub fn small_run(dir: &Path, steps: u64, every: u64) -> (Store, RunSpec) {
    let store = Store::open(dir.to_str().unwrap()).unwrap();
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
    };
    skytrain::run::init(&store, &spec).unwrap();
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
    let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
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
    };
    tweak(&mut spec);
    skytrain::run::init(&store, &spec).unwrap();
    (store, spec, paths)
}
