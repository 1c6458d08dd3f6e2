//! The command line on bad input (clear errors naming file and field, never a panic), sampling,
//! and the exported folder read back by Python `safetensors`.

mod common;

use std::process::{Command, Output};

use skytrain::train::checkpoint;

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    out
}

#[test]
fn bad_configs_are_refused_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    common::fails_with(common::bin().args(["run", "init", "nope.toml", "--store", s]), &["nope.toml"]);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\n[model]\nfamily = \"dit\"\nhiden = 64\n").unwrap();
    common::fails_with(
        common::bin().args(["run", "init", bad.to_str().unwrap(), "--store", s]),
        &["bad.toml", "hiden"],
    );
    std::fs::write(&bad, "name = \"x\"\n[model]\nfamily = \"dit\"\n[train]\nbatch_size = 7\ngrad_accum = 2\n").unwrap();
    common::fails_with(
        common::bin().args(["run", "init", bad.to_str().unwrap(), "--store", s]),
        &["bad.toml", "batch_size"],
    );
    std::fs::write(&bad, "name = \"x\"\n[model]\nfamily = \"dit\"\nhidden = \"wide\"\n").unwrap();
    common::fails_with(
        common::bin().args(["run", "init", bad.to_str().unwrap(), "--store", s]),
        &["bad.toml", "hidden"],
    );
    // Training where there is no store, and a store with no run spec.
    common::fails_with(common::bin().args(["train", "--store", s]), &["no store", s]);
    assert!(!store.exists(), "a failed command created the store");
    std::fs::create_dir(&store).unwrap();
    common::fails_with(common::bin().args(["train", "--store", s]), &["run.toml", "not found"]);
}

#[test]
fn bad_weights_are_refused_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    let ws = w.to_str().unwrap();
    common::fails_with(common::bin().args(["inspect", "--config", "tld-at1", "--weights", ws]), &["w.safetensors"]);
    std::fs::write(&w, b"not a safetensors file").unwrap();
    common::fails_with(
        common::bin().args(["inspect", "--config", "tld-at1", "--weights", ws]),
        &["w.safetensors", "safetensors"],
    );
    // A dit-tiny file offered as AT-1: the first missing tensor is named.
    let tiny = tch::no_grad(|| {
        skytrain::model::Model::new(&skytrain::config::ModelConfig::named("dit-tiny").unwrap(), tch::Device::Cpu)
    })
    .unwrap();
    std::fs::write(&w, tiny.to_safetensors(None)).unwrap();
    common::fails_with(
        common::bin().args(["inspect", "--config", "tld-at1", "--weights", ws]),
        &["w.safetensors", "denoiser_trans_block"],
    );
    // Right names, wrong shape.
    let small = skytrain::config::TldConfig { embed_dim: 128, ..Default::default() };
    let m = tch::no_grad(|| skytrain::model::Model::new(&skytrain::config::ModelConfig::Tld(small), tch::Device::Cpu))
        .unwrap();
    std::fs::write(&w, m.to_safetensors(None)).unwrap();
    common::fails_with(
        common::bin().args(["inspect", "--config", "tld-at1", "--weights", ws]),
        &["w.safetensors", "shape", "expected"],
    );
    let cfg = dir.path().join("c.json");
    std::fs::write(&cfg, "{\"family\": \"tld\", \"embed_dim\": 100}").unwrap();
    common::fails_with(
        common::bin().args(["inspect", "--config", cfg.to_str().unwrap(), "--weights", ws]),
        &["c.json", "embed_dim"],
    );
}

#[test]
fn train_sample_export_and_read_back_in_python() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = common::small_run(dir.path(), 12, 6);
    let s = dir.path().to_str().unwrap();
    assert!(run(common::bin().args(["train", "--store", s])).status.success());
    // Validation loss on held-out scenes encoded with the run's encoders; a set that fitted an
    // autoencoder of its own (other latent coordinates) is refused, naming it.
    let held_out = dir.path().join("held-out");
    let own = dir.path().join("own-encoders");
    for (out, from) in [(&held_out, Some(s)), (&own, None)] {
        let mut cmd = common::bin();
        cmd.args(["demo-data", "--images", "64", "--seed", "99", "--store", out.to_str().unwrap()]);
        if let Some(from) = from {
            cmd.args(["--encoders-from", from]);
        }
        common::ok(run(&mut cmd), "demo-data");
    }
    let eval = |val: &std::path::Path| {
        let mut cmd = common::bin();
        cmd.args(["eval-loss", "--store", s, "--samples", "64", "--val-store", val.to_str().unwrap()]);
        cmd
    };
    let scored: serde_json::Value = serde_json::from_str(&common::ok(run(&mut eval(&held_out)), "eval-loss")).unwrap();
    let loss = scored["validation_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{scored}");
    common::fails_with(&mut eval(&own), &["own-encoders", "other encoders", "image autoencoder", "--encoders-from"]);
    // A corrupted checkpoint file is detected by its manifest hash and named.
    let key = format!("{}/ema.safetensors", checkpoint::dir(12));
    let good = store.get(&key).unwrap();
    let mut bad = good.to_vec();
    bad[100] ^= 0xff;
    store.put(&key, bad).unwrap();
    common::fails_with(
        common::bin().args(["sample", "--store", s, "--prompt", "a red circle", "--out", "/dev/null"]),
        &["ema.safetensors", "sha256"],
    );
    store.put(&key, good).unwrap();

    let png = dir.path().join("grid.png");
    let out = run(common::bin()
        .args([
            "sample",
            "--store",
            s,
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square above a white circle",
            "--per-prompt",
            "2",
            "--steps",
            "4",
        ])
        .arg("--out")
        .arg(&png));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (2 * 34 + 2, 2 * 34 + 2));
    common::fails_with(
        common::bin().args(["sample", "--store", s, "--prompt", "a pink circle", "--out", "/dev/null"]),
        &["pink"],
    );

    let export = dir.path().join("export");
    let out = run(common::bin().args(["export", "--store", s, "--out", export.to_str().unwrap()]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let check = r#"
import json, sys
from safetensors import safe_open
from safetensors.numpy import load_file
d = sys.argv[1]
with safe_open(d + "/model.safetensors", "np") as f:
    meta = f.metadata()
    names = list(f.keys())
assert meta["skytrain.weights"] == "ema", meta
assert meta["skytrain.steps"] == "12", meta
t = load_file(d + "/model.safetensors")
cfg = json.load(open(d + "/config.json"))
assert cfg["family"] == "dit" and cfg["num_parameters"] == sum(v.size for v in t.values()), cfg
card = open(d + "/README.md").read()
assert "CC0-1.0" in card and "Parameters" in card
print(len(names), t["final.linear.weight"].shape)
"#;
    let out = run(Command::new(common::python()).args(["-c", check]).arg(&export));
    assert!(out.status.success(), "python check failed: {}", String::from_utf8_lossy(&out.stderr));
    // The exported weights are the checkpoint's EMA weights, bit for bit.
    let ema = skytrain::model::weights::from_safetensors(&store.get(&key).unwrap(), "ema").unwrap();
    let exported =
        skytrain::model::weights::from_safetensors(&std::fs::read(export.join("model.safetensors")).unwrap(), "export")
            .unwrap();
    assert_eq!(ema.len(), exported.len());
    for (name, t) in &ema {
        assert!(t.equal(&exported[name]), "{name} differs");
    }
    // The exported config.json loads as a model config.
    let out = run(common::bin()
        .args(["inspect", "--config"])
        .arg(export.join("config.json"))
        .arg("--weights")
        .arg(export.join("model.safetensors")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn demo_runs_end_to_end_through_the_round_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out_dir = dir.path().join("out");
    let out = run(common::bin()
        .args([
            "demo",
            "--steps",
            "40",
            "--images",
            "300",
            "--eval-images",
            "10",
            "--inner-steps",
            "10",
            "--workers",
            "2",
        ])
        .arg("--store")
        .arg(&store)
        .arg("--out")
        .arg(&out_dir));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("prompt fidelity") && stdout.contains("2 local workers"), "{stdout}");
    for f in [
        "samples.png",
        "model/model.safetensors",
        "model/config.json",
        "model/README.md",
        "model/encoders.json",
        "model/vae/autoencoder.safetensors",
        "model/text_encoder/text_encoder.safetensors",
    ] {
        assert!(out_dir.join(f).exists(), "{f} missing");
    }
    // The export alone samples; the run samples from its last committed round, reading only.
    let grid = dir.path().join("from-export.png");
    let out = run(common::bin()
        .args(["sample", "--prompt", "a red circle", "--steps", "2", "--per-prompt", "1", "--model"])
        .arg(out_dir.join("model"))
        .arg("--out")
        .arg(&grid));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let grid2 = dir.path().join("from-run.png");
    let out = run(common::bin()
        .args(["sample", "--prompt", "a red circle", "--steps", "2", "--per-prompt", "1", "--store"])
        .arg(&store)
        .arg("--out")
        .arg(&grid2));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&grid).unwrap(), std::fs::read(&grid2).unwrap(), "export and run sample alike");
    // Another size than the model's own: twice as wide; a size the decoder and patch cannot make
    // is refused with sizes that work.
    let (w, h) = image::image_dimensions(&grid).unwrap();
    let wide = dir.path().join("wide.png");
    let sample_at = |width: u32, height: u32, out: &std::path::Path| {
        run(common::bin()
            .args(["sample", "--prompt", "a red circle", "--steps", "2", "--per-prompt", "1", "--model"])
            .arg(out_dir.join("model"))
            .args(["--width", &width.to_string(), "--height", &height.to_string(), "--out"])
            .arg(out))
    };
    let side = h - 4; // one image, a 2 px gap around it
    let out = sample_at(2 * side, side, &wide);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(image::image_dimensions(&wide).unwrap(), (2 * side + 4, h), "(square grid was {w}×{h})");
    let out = sample_at(side + 1, side, &dir.path().join("odd.png"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--width") && err.contains("multiple of"), "{err}");
    // The model card names the machine it was trained on and the recipe (the demo's β2).
    let card = std::fs::read_to_string(out_dir.join("model/README.md")).unwrap();
    let cpu = skytrain::observe::telemetry::cpu_model();
    assert!(card.contains(&format!("- Hardware: CPU: {cpu}, ")), "{card}");
    assert!(
        card.contains("- Recipe: batch 16 × 1 accumulation; AdamW lr 1e-3 → 1e-4") && card.contains("β 0.9/0.95,"),
        "{card}"
    );
    let s = skytrain::store::Store::create(store.to_str().unwrap()).unwrap();
    assert_eq!(skytrain::sync::coordinator::verify_history(&s).unwrap(), 2);
}

#[test]
fn demo_in_one_process_checkpoints_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let demo = |steps: &str| {
        let out = run(common::bin()
            .args(["demo", "--workers", "0", "--steps", steps, "--images", "300", "--eval-images", "10"])
            .args(["--batch-size", "8", "--threads", "2"])
            .arg("--store")
            .arg(&store)
            .arg("--out")
            .arg(dir.path().join("out")));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    let first = demo("30");
    assert!(first.contains("in one process") && first.contains("prompt fidelity"), "{first}");
    // It timed both precisions and says which it trains in; the spec records the choice.
    assert!(first.contains("ms in bf16 and") && first.contains(": training in "), "{first}");
    let s = skytrain::store::Store::create(store.to_str().unwrap()).unwrap();
    assert_eq!(skytrain::train::checkpoint::list(&s).unwrap().last(), Some(&30));
    let fidelity: serde_json::Value = serde_json::from_slice(&s.get("eval/fidelity.json").unwrap()).unwrap();
    assert_eq!(fidelity["images"], 10);
    // The same store again: the spec is immutable, so the run is already done and nothing retrains.
    let again = demo("30");
    assert!(again.contains("trained 30 steps"), "{again}");
    assert!(!again.contains("ms in bf16 and"), "a resumed run keeps its spec's precision: {again}");
    assert_eq!(skytrain::train::checkpoint::list(&s).unwrap().last(), Some(&30));
}

/// A libtorch of another release, found through LD_LIBRARY_PATH, is refused by name and version
/// before any command runs. The libraries are hard links (so /proc/self/maps names the copy) in the
/// wheel's layout, beside a `version.py` that says 2.10.0.
#[test]
fn a_libtorch_of_another_release_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = std::fs::read_dir(common::torch_venv().join("lib"))
        .unwrap()
        .map(|e| e.unwrap().path().join("site-packages"))
        .find(|p| p.join("torch/lib/libtorch_cpu.so").exists())
        .expect("the torch wheel in the venv");
    let lib = dir.path().join("torch/lib");
    std::fs::create_dir_all(&lib).unwrap();
    for entry in std::fs::read_dir(real.join("torch/lib")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "so") || path.to_string_lossy().contains(".so.") {
            let to = lib.join(path.file_name().unwrap());
            std::fs::hard_link(&path, &to).or_else(|_| std::fs::copy(&path, &to).map(|_| ())).unwrap();
        }
    }
    std::os::unix::fs::symlink(real.join("nvidia"), dir.path().join("nvidia")).unwrap();
    std::fs::write(dir.path().join("torch/version.py"), "__version__ = '2.10.0+cu130'\n").unwrap();
    let mut cmd = common::bin();
    cmd.arg("models").env("LD_LIBRARY_PATH", &lib);
    common::fails_with(&mut cmd, &["is torch 2.10.0", "built for torch 2.11.0", lib.to_str().unwrap()]);
    // The same libraries with the right version file run.
    std::fs::write(dir.path().join("torch/version.py"), "__version__ = '2.11.0+cu130'\n").unwrap();
    let out = common::bin().arg("models").env("LD_LIBRARY_PATH", &lib).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
