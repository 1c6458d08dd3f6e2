//! Elastic DiLoCo rounds through the store, with real processes: equivalence with plain training,
//! SIGKILL of any process, a worker joining mid-run, and a hostile worker.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use skytrain::store::Store;
use skytrain::sync::protocol::{self, Commit};
use skytrain::sync::{coordinator, params::ParamSet};

fn coordinator_proc(store: &Store) -> Child {
    let dir = store.url().strip_prefix("file://").unwrap().to_string();
    common::bin().args(["coordinate", "--store", &dir]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

fn worker_proc(store: &Store, name: &str, key: &std::path::Path) -> Child {
    let dir = store.url().strip_prefix("file://").unwrap().to_string();
    common::bin()
        .args(["work", "--store", &dir, "--name", name, "--key"])
        .arg(key)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for_round(store: &Store, round: u64, limit: Duration) -> Commit {
    let t0 = Instant::now();
    loop {
        if let Some(c) = protocol::read_commit(store, round).unwrap() {
            return c;
        }
        assert!(t0.elapsed() < limit, "round {round} not committed within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(children: &mut [Child], limit: Duration) {
    let t0 = Instant::now();
    for c in children.iter_mut() {
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success(), "process exited with {status}");
                break;
            }
            assert!(t0.elapsed() < limit, "process did not finish within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn one_worker_h1_uncompressed_reproduces_plain_training() {
    let rounds = 8;
    let dir = tempfile::tempdir().unwrap();
    let (store, spec, keys) = common::diloco_run(dir.path(), rounds, 1, &["w0"], |s| {
        s.sync.outer_lr = 1.0;
        s.sync.outer_momentum = 0.0;
        s.sync.codec = skytrain::sync::compress::Codec::F32;
    });
    let mut procs = vec![coordinator_proc(&store), worker_proc(&store, "w0", &keys[0])];
    finish(&mut procs, Duration::from_secs(120));
    // The same spec trained by a single process.
    let single = tempfile::tempdir().unwrap();
    let s2 = Store::open(single.path().to_str().unwrap()).unwrap();
    s2.put("data/latents.safetensors", store.get("data/latents.safetensors").unwrap()).unwrap();
    let mut plain = spec.clone();
    plain.train.checkpoint_every = rounds;
    skytrain::run::init(&s2, &plain).unwrap();
    let out = common::bin().args(["train", "--store", single.path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plain_losses: Vec<f64> = skytrain::run::read_metrics(&s2).unwrap().iter().map(|m| m.stats.loss).collect();
    let diloco_losses: Vec<f64> =
        (1..=rounds).map(|r| protocol::read_commit(&store, r).unwrap().unwrap().mean_loss.unwrap()).collect();
    assert_eq!(plain_losses.len(), diloco_losses.len());
    for (i, (a, b)) in plain_losses.iter().zip(&diloco_losses).enumerate() {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "step {i}: plain {a} vs DiLoCo {b}");
    }
    // And the final models agree within floating-point tolerance.
    let c = protocol::read_commit(&store, rounds).unwrap().unwrap();
    let theta = ParamSet::from_safetensors(&store.get(&c.model_key).unwrap(), "θ").unwrap();
    let ck = skytrain::checkpoint::read_file(&s2, rounds, "model.safetensors").unwrap();
    let plain_theta = ParamSet::from_safetensors(&ck, "plain").unwrap();
    let max_diff = theta
        .data
        .iter()
        .flatten()
        .zip(plain_theta.data.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "final models differ by {max_diff}");
}

#[test]
fn sigkill_any_process_repeatedly_and_the_run_completes_exactly() {
    let rounds = 10;
    let dir = tempfile::tempdir().unwrap();
    let names = ["w0", "w1", "w2"];
    let (store, _, keys) = common::diloco_run(dir.path(), rounds, 2, &names, |s| s.sync.round_deadline_s = 8.0);
    let mut procs: Vec<Child> = vec![coordinator_proc(&store)];
    for (n, k) in names.iter().zip(&keys) {
        procs.push(worker_proc(&store, n, k));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let t0 = Instant::now();
    let mut kills = 0;
    while protocol::read_commit(&store, rounds).unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(240), "run did not complete under kills");
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));
        let i = rng.random_range(0..procs.len());
        if procs[i].try_wait().unwrap().is_some() {
            continue;
        }
        procs[i].kill().unwrap(); // SIGKILL
        procs[i].wait().unwrap();
        kills += 1;
        std::thread::sleep(Duration::from_millis(rng.random_range(100..800)));
        procs[i] = if i == 0 { coordinator_proc(&store) } else { worker_proc(&store, names[i - 1], &keys[i - 1]) };
    }
    assert!(kills >= 3, "only {kills} kills happened");
    finish(&mut procs, Duration::from_secs(60));
    // Every round committed exactly once, in order, and the final model is the replay of the
    // committed updates from the initial model.
    for r in 0..=rounds {
        let c = protocol::read_commit(&store, r).unwrap().unwrap_or_else(|| panic!("round {r} lost"));
        assert_eq!(c.round, r);
    }
    assert!(protocol::read_commit(&store, rounds + 1).unwrap().is_none());
    assert_eq!(coordinator::verify_history(&store).unwrap(), rounds);
    let accepted: usize = (1..=rounds).map(|r| protocol::read_commit(&store, r).unwrap().unwrap().accepted.len()).sum();
    assert!(accepted >= rounds as usize, "too few accepted updates: {accepted}");
}

#[test]
fn a_worker_joining_mid_run_trains_from_the_next_round() {
    let rounds = 8;
    let dir = tempfile::tempdir().unwrap();
    let (store, _, keys) = common::diloco_run(dir.path(), rounds, 2, &["early", "late"], |_| {});
    let mut procs = vec![coordinator_proc(&store), worker_proc(&store, "early", &keys[0])];
    wait_for_round(&store, 3, Duration::from_secs(60));
    procs.push(worker_proc(&store, "late", &keys[1]));
    finish(&mut procs, Duration::from_secs(120));
    let members = |r: u64| -> Vec<String> {
        protocol::read_plan(&store, r).unwrap().unwrap().members.into_iter().map(|m| m.worker).collect()
    };
    let first_late =
        (1..=rounds).find(|&r| members(r).contains(&"late".to_string())).expect("late worker never joined");
    assert!(first_late >= 4, "late worker planned into round {first_late}, before it started");
    let joined = protocol::read_commit(&store, rounds).unwrap().unwrap();
    assert!(joined.accepted.iter().any(|a| a.worker == "late"), "late worker's update not used: {joined:?}");
    assert_eq!(coordinator::verify_history(&store).unwrap(), rounds);
}
