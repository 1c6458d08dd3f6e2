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
    };
    skytrain::run::init(&store, &spec).unwrap();
    (store, spec)
}
