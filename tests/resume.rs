//! A run killed with SIGKILL and resumed produces the same losses, step for step, and the same
//! final weights as one that never stopped.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use skytrain::train::{checkpoint, run};

#[test]
fn sigkill_and_resume_matches_uninterrupted_run() {
    let steps = 60;
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (a, _) = common::small_run(a_dir.path(), steps, 10);
    let (b, _) = common::small_run(b_dir.path(), steps, 10);

    let out = common::bin().args(["train", "--store", a_dir.path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "uninterrupted run failed: {}", String::from_utf8_lossy(&out.stderr));

    // Run B: SIGKILL as soon as its first checkpoint is complete, then resume (twice).
    for kill_after in [10u64, 30] {
        let mut child = common::bin().args(["train", "--store", b_dir.path().to_str().unwrap()]).spawn().unwrap();
        let t0 = Instant::now();
        while !checkpoint::list(&b).unwrap().contains(&kill_after) {
            assert!(t0.elapsed() < Duration::from_secs(120), "checkpoint {kill_after} never appeared");
            assert!(child.try_wait().unwrap().is_none(), "run B ended before it could be killed");
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "run B was not killed but exited with {status}");
        assert!(!checkpoint::list(&b).unwrap().contains(&steps), "run B finished before the kill");
    }
    let out = common::bin().args(["train", "--store", b_dir.path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "resumed run failed: {}", String::from_utf8_lossy(&out.stderr));

    let la: Vec<(u64, f64)> = run::read_metrics(&a).unwrap().iter().map(|m| (m.stats.step, m.stats.loss)).collect();
    let lb: Vec<(u64, f64)> = run::read_metrics(&b).unwrap().iter().map(|m| (m.stats.step, m.stats.loss)).collect();
    assert_eq!(la.len() as u64, steps);
    assert_eq!(la, lb, "losses differ between the uninterrupted and the killed+resumed run");
    for file in ["model.safetensors", "ema.safetensors", "optim.safetensors"] {
        assert_eq!(
            checkpoint::read_file(&a, steps, file).unwrap(),
            checkpoint::read_file(&b, steps, file).unwrap(),
            "{file} differs at the final step"
        );
    }
}

/// Data parallelism inside one process: two replicas on two threads take the same steps as one
/// model accumulating the same two micro-batches (up to summation order and thread count), and
/// are deterministic run to run.
#[test]
fn replicas_match_gradient_accumulation_and_repeat_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (store, spec) = common::small_run(dir.path(), 20, 100);
    let train = |grad_accum: i64, replicas: i64| {
        let mut spec = spec.clone();
        spec.train.grad_accum = grad_accum;
        spec.train.replicas = replicas;
        let set =
            skytrain::train::LatentSet::from_safetensors(&store.get(&spec.data.latents).unwrap(), "latents").unwrap();
        let mut trainer = skytrain::train::Trainer::new(spec, set).unwrap();
        let losses: Vec<f64> = (0..20).map(|_| trainer.train_step().unwrap().loss).collect();
        (losses, trainer.model.to_safetensors(None))
    };
    let (accumulated, _) = train(2, 1);
    let (replicated, weights) = train(1, 2);
    for (step, (a, r)) in accumulated.iter().zip(&replicated).enumerate() {
        assert!((a - r).abs() <= 1e-4 * a.abs(), "step {step}: accumulation {a} vs replicas {r}");
    }
    assert!(accumulated.last() < accumulated.first(), "the loss falls: {accumulated:?}");
    assert_eq!(train(1, 2), (replicated, weights), "two runs with replicas differ");
    let mut bad = spec.clone();
    bad.train.replicas = 3; // batch 8 is not a multiple of 2 × 3
    let err = bad.train.validate().unwrap_err();
    assert!(err.contains("replicas"), "{err}");
}
