//! The data pipeline on the real emoji dataset (npm `emoji-datasource-google`): curate → encode
//! (real MiniLM, tiny diffusers VAE) → stream into training, on a local folder and on a real S3
//! server (SeaweedFS), with Python `webdataset` reading and writing shards on the other side.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use skytrain::config::{DataConfig, DitConfig, ModelConfig, RunSpec, TrainConfig};
use skytrain::data::manifest::DatasetManifest;
use skytrain::data::stream::{ShardStream, StreamOptions};
use skytrain::store::Store;
use skytrain::train::{checkpoint, run};

fn losses(store: &Store) -> Vec<(u64, f64)> {
    run::read_metrics(store).unwrap().iter().map(|m| (m.stats.step, m.stats.loss)).collect()
}

#[test]
fn curate_the_emoji_set_counts_every_row_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let table = common::emoji_table();
    let raw = dir.path().join("raw");
    let raw_s = raw.to_str().unwrap();
    let report = common::curate(&table, raw_s, &["--shard-size", "500"]);
    let m = DatasetManifest::read(&Store::create(raw_s).unwrap()).unwrap();
    let c = m.curation.as_ref().unwrap();
    assert_eq!(c.rows, 3786);
    assert_eq!(c.kept + c.dropped.values().sum::<u64>(), 3786, "{report}");
    // Skin-tone and gender variants are near duplicates at 32 px (see the near-duplicate test).
    assert!(c.kept > 1000 && c.dropped.get("near_duplicate").is_some_and(|&n| n > 1000), "{report}");
    assert!(c.dropped["duplicate"] > 0, "the set has byte-identical images: {report}");
    assert_eq!(c.licences.get("Apache-2.0"), Some(&c.kept));
    assert_eq!(m.samples(), c.kept);
    // Apache-2.0 requires attribution: every kept work is listed.
    let attribution = std::fs::read_to_string(raw.join("attribution.jsonl")).unwrap();
    assert_eq!(attribution.lines().count() as u64, c.kept);
    assert!(std::fs::read_to_string(raw.join("ATTRIBUTION.md")).unwrap().contains("Google (Noto Emoji project)"));
    // Without Apache-2.0 in the allowlist nothing survives, and that is a clear error.
    let out =
        common::bin().args(["curate", table.to_str().unwrap(), "--out"]).arg(dir.path().join("none")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("licence"), "{}", String::from_utf8_lossy(&out.stderr));

    // Python webdataset reads the shards: keys, captions, 32×32 PNGs, licence metadata.
    let script = r#"
import glob, json, sys, webdataset as wds
n = 0
for s in wds.WebDataset(sorted(glob.glob(sys.argv[1] + "/shard-*.tar")), shardshuffle=False).decode("pil"):
    assert s["png"].size == (32, 32), s["png"].size
    assert s["txt"].startswith("an emoji of"), s["txt"]
    assert s["json"]["licence"] == "Apache-2.0" and s["json"]["author"], s["json"]
    n += 1
print(n)
"#;
    let out = std::process::Command::new(common::python()).args(["-c", script, raw_s]).output().unwrap();
    assert_eq!(common::ok(out, "python webdataset").trim(), m.samples().to_string());

    // Re-running redoes only what is missing, and gives the same bytes.
    let victim = &m.shards[3].name;
    std::fs::remove_file(raw.join(victim)).unwrap();
    std::fs::remove_file(raw.join(format!("{victim}.json"))).unwrap();
    let keep = raw.join(&m.shards[0].name);
    let mtime = std::fs::metadata(&keep).unwrap().modified().unwrap();
    common::curate(&table, raw_s, &["--shard-size", "500"]);
    let again = DatasetManifest::read(&Store::create(raw_s).unwrap()).unwrap();
    assert_eq!(again, m);
    assert_eq!(std::fs::metadata(&keep).unwrap().modified().unwrap(), mtime, "a finished shard was rewritten");

    // SIGKILLed mid-way: no manifest (or the complete one), and a re-run ends identical.
    let killed = dir.path().join("killed");
    let mut child = common::bin()
        .args(["curate", table.to_str().unwrap(), "--out", killed.to_str().unwrap(), "--resolution", "32"])
        .args(["--allow", common::ALLOW, "--shard-size", "500"])
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !killed.join("shard-000001.tar.json").exists() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    if status.signal() == Some(9) {
        let listed = killed.join("manifest.json").exists();
        assert!(!listed, "a killed curate left a manifest");
    }
    common::curate(&table, killed.to_str().unwrap(), &["--shard-size", "500"]);
    assert_eq!(DatasetManifest::read(&Store::create(killed.to_str().unwrap()).unwrap()).unwrap().shards, m.shards);
}

#[test]
fn licences_sizes_duplicates_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let img = |name: &str, w: u32, h: u32, seed: u8| {
        let p = dir.path().join(name);
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8 ^ seed, (y * 5) as u8, seed]))
            .save(&p)
            .unwrap();
        p.file_name().unwrap().to_str().unwrap().to_string()
    };
    let a = img("a.png", 64, 48, 1);
    let b = img("b.png", 40, 40, 90);
    let small = img("small.png", 8, 8, 3);
    std::fs::copy(dir.path().join(&a), dir.path().join("a-copy.png")).unwrap();
    std::fs::write(dir.path().join("broken.png"), b"not a png").unwrap();
    let rows = [
        ("1", a.as_str(), "https://creativecommons.org/licenses/by/4.0/", "Ann"),
        ("2", b.as_str(), "CC BY-SA 3.0", "Bo"),
        ("3", "a-copy.png", "cc0", ""),
        ("4", small.as_str(), "public domain", ""),
        ("5", "broken.png", "by", "Cy"),
        ("6", b.as_str(), "cc-by-nc-4.0", "Di"),
        ("7", "missing.png", "cc0", ""),
        ("8", b.as_str(), "all rights reserved", "Ed"),
    ];
    let jsonl: String = rows
        .iter()
        .map(|(id, image, licence, author)| {
            serde_json::json!({"id": id, "image": image, "caption": format!("picture {id}"), "license": licence,
                "author": author, "source_url": format!("https://example.org/{id}")})
            .to_string()
                + "\n"
        })
        .collect();
    let table = dir.path().join("table.jsonl");
    std::fs::write(&table, &jsonl).unwrap();
    let out = dir.path().join("out");
    let report = common::curate(&table, out.to_str().unwrap(), &["--min-side", "16"]);
    let m = DatasetManifest::read(&Store::create(out.to_str().unwrap()).unwrap()).unwrap();
    let c = m.curation.unwrap();
    let dropped = |r: &str| c.dropped.get(r).copied().unwrap_or(0);
    assert_eq!(c.kept, 2, "{report}");
    assert_eq!(
        (dropped("licence"), dropped("duplicate"), dropped("size"), dropped("decode"), dropped("fetch")),
        (2, 1, 1, 1, 1),
        "{report}"
    );
    let attribution = std::fs::read_to_string(out.join("attribution.jsonl")).unwrap();
    assert!(attribution.contains("\"CC-BY-4.0\"") && attribution.contains("\"CC-BY-SA-3.0\""), "{attribution}");

    // The same table as Parquet (written by pyarrow) curates to the same shards.
    let parquet = dir.path().join("table.parquet");
    let script =
        "import sys, pyarrow.json as pj, pyarrow.parquet as pq; pq.write_table(pj.read_json(sys.argv[1]), sys.argv[2])";
    let py =
        std::process::Command::new(common::python()).args(["-c", script]).arg(&table).arg(&parquet).output().unwrap();
    common::ok(py, "pyarrow");
    let out2 = dir.path().join("out2");
    common::curate(&parquet, out2.to_str().unwrap(), &["--min-side", "16"]);
    let m2 = DatasetManifest::read(&Store::create(out2.to_str().unwrap()).unwrap()).unwrap();
    assert_eq!(m2.shards, m.shards);

    // Images behind http:// URLs (a server on loopback) are fetched too; a 404 is a `fetch` drop.
    let mut server = std::process::Command::new(common::python())
        .args(["-u", "-m", "http.server", "--bind", "127.0.0.1", "0"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().unwrap()), &mut line).unwrap();
    let port: u16 = line
        .split("port ")
        .nth(1)
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let http_rows =
        [("h1", format!("http://127.0.0.1:{port}/{a}")), ("h2", format!("http://127.0.0.1:{port}/nothing-here.png"))];
    let http_table = dir.path().join("http.jsonl");
    let text: String = http_rows
        .iter()
        .map(|(id, url)| {
            serde_json::json!({"id": id, "image": url, "caption": "c", "licence": "cc0", "author": "", "source": url})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&http_table, text).unwrap();
    let http_out = dir.path().join("http-out");
    let report = common::curate(&http_table, http_out.to_str().unwrap(), &["--min-side", "16"]);
    let _ = server.kill();
    let _ = server.wait();
    let c = DatasetManifest::read(&Store::create(http_out.to_str().unwrap()).unwrap()).unwrap().curation.unwrap();
    assert_eq!((c.kept, c.dropped.get("fetch").copied()), (1, Some(1)), "{report}");

    // A table without a caption column is refused, naming the file and the field.
    std::fs::write(&table, "{\"id\": \"1\", \"image\": \"a.png\", \"licence\": \"cc0\"}\n").unwrap();
    let out =
        common::bin().args(["curate", table.to_str().unwrap(), "--out"]).arg(dir.path().join("x")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("table.jsonl") && err.contains("caption"), "{err}");
}

/// Keys of positions `start..start+n` as the loader streams them.
fn stream_keys(store: &Store, seed: u64, start: u64, n: u64) -> Vec<String> {
    let opts = StreamOptions { seed, window_shards: 2, ..Default::default() };
    let mut s = ShardStream::open(store.clone(), opts).unwrap();
    let positions: Vec<u64> = (start..start + n).collect();
    s.samples(&positions).unwrap().iter().map(|x| x.key.clone()).collect()
}

/// Trains `spec` twice under `dir`: run A uninterrupted; run B stopped at step 10, SIGKILLed once
/// checkpoint 20 exists, and resumed. Asserts both computed exactly the same losses and weights;
/// returns run A's folder.
fn train_twice_with_interruptions(dir: &Path, spec: &RunSpec, what: &str) -> std::path::PathBuf {
    let steps = spec.train.steps;
    let (a_dir, b_dir) = (dir.join("run-a"), dir.join("run-b"));
    let a = Store::create(a_dir.to_str().unwrap()).unwrap();
    let b = Store::create(b_dir.to_str().unwrap()).unwrap();
    run::init(&a, spec).unwrap();
    run::init(&b, spec).unwrap();
    common::ok(common::bin().args(["train", "--store", a_dir.to_str().unwrap()]).output().unwrap(), "train A");
    common::ok(
        common::bin().args(["train", "--store", b_dir.to_str().unwrap(), "--stop-at", "10"]).output().unwrap(),
        "train B",
    );
    let mut child = common::bin().args(["train", "--store", b_dir.to_str().unwrap()]).spawn().unwrap();
    let t0 = Instant::now();
    while !checkpoint::list(&b).unwrap().contains(&20) {
        assert!(t0.elapsed() < Duration::from_secs(300), "checkpoint 20 never appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    common::ok(common::bin().args(["train", "--store", b_dir.to_str().unwrap()]).output().unwrap(), "train B resumed");
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len() as u64, steps);
    assert!(la.iter().all(|(_, l)| l.is_finite()));
    assert_eq!(la, lb, "{what}: losses differ after stop/SIGKILL and resume");
    assert_eq!(
        checkpoint::read_file(&a, steps, "model.safetensors").unwrap(),
        checkpoint::read_file(&b, steps, "model.safetensors").unwrap()
    );
    a_dir
}

/// `skytrain sample` on the run in `run`: 4 steps, 2 images per prompt, the tiny VAE and the real
/// MiniLM, `extra` arguments; returns the grid written to `out`.
fn sample_with_fixtures(run: &Path, prompts: &[&str], extra: &[&str], out: &Path) -> image::DynamicImage {
    let mut cmd = common::bin();
    cmd.args(["sample", "--store", run.to_str().unwrap(), "--steps", "4", "--per-prompt", "2"]);
    for p in prompts {
        cmd.args(["--prompt", p]);
    }
    cmd.args(extra).arg("--vae").arg(common::fixtures().join("vae-tiny"));
    cmd.arg("--text").arg(common::minilm_dir()).arg("--out").arg(out);
    common::ok(cmd.output().unwrap(), "sample with the VAE and MiniLM");
    image::open(out).unwrap()
}

#[test]
fn encode_stream_and_train_resume_exactly_with_python_interop() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, enc) = common::encoded_emoji(dir.path(), 600, 64);
    let enc_store = Store::create(enc.to_str().unwrap()).unwrap();
    let m = DatasetManifest::read(&enc_store).unwrap();
    let n = m.samples();
    assert!(m.shards.len() >= 8 && n > 400, "{} shards, {n} samples", m.shards.len());
    let e = m.encoding.clone().unwrap();
    assert_eq!((e.latent_shape.clone(), e.text_shape.clone(), e.pooled_dim), (vec![4, 16, 16], vec![16, 384], 384));

    // Re-running encode redoes only a missing shard, with the same bytes.
    let victim = m.shards[2].name.clone();
    std::fs::remove_file(enc.join(&victim)).unwrap();
    std::fs::remove_file(enc.join(format!("{victim}.json"))).unwrap();
    common::encode(raw.to_str().unwrap(), enc.to_str().unwrap());
    assert_eq!(DatasetManifest::read(&enc_store).unwrap(), m);

    // Every epoch is a permutation of the dataset, different per epoch; any split of the positions
    // reads the same sequence.
    let all = stream_keys(&enc_store, 1, 0, 2 * n);
    let mut e0 = all[..n as usize].to_vec();
    let mut e1 = all[n as usize..].to_vec();
    assert_ne!(e0, e1);
    e0.sort();
    e1.sort();
    e0.dedup();
    assert_eq!(e0.len() as u64, n);
    assert_eq!(e0, e1);
    let mut split = stream_keys(&enc_store, 1, 0, 37);
    split.extend(stream_keys(&enc_store, 1, 37, 2 * n - 37));
    assert_eq!(split, all);
    assert_ne!(stream_keys(&enc_store, 2, 0, 50), all[..50].to_vec(), "the seed does not change the order");

    // Python webdataset + numpy read skytrain's encoded shards: same keys and values.
    let script = r#"
import glob, io, sys, numpy as np, webdataset as wds
for s in wds.WebDataset(sorted(glob.glob(sys.argv[1] + "/shard-*.tar")), shardshuffle=False):
    lat = np.load(io.BytesIO(s["latent.npy"])); txt = np.load(io.BytesIO(s["text.npy"]))
    assert lat.dtype == np.float16 and lat.shape == (4, 16, 16) and txt.shape == (16, 384), (lat.dtype, lat.shape, txt.shape)
    print(s["__key__"], float(lat.astype(np.float64).sum()), float(np.load(io.BytesIO(s["pooled.npy"])).astype(np.float64).sum()))
"#;
    let out = common::ok(
        std::process::Command::new(common::python()).args(["-c", script, enc.to_str().unwrap()]).output().unwrap(),
        "python webdataset (read)",
    );
    let py: std::collections::HashMap<String, (f64, f64)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0].to_string(), (f[1].parse().unwrap(), f[2].parse().unwrap()))
        })
        .collect();
    assert_eq!(py.len() as u64, n);
    let mut s = ShardStream::open(enc_store.clone(), StreamOptions { seed: 1, window_shards: 2, ..Default::default() })
        .unwrap();
    for x in s.samples(&(0..n).collect::<Vec<_>>()).unwrap() {
        let (lat, pooled) = py[&x.key];
        let sum = |v: &[f32]| v.iter().map(|&f| f as f64).sum::<f64>();
        assert!(
            (sum(&x.latent.to_f32()) - lat).abs() < 1e-3 && (sum(&x.pooled.to_f32()) - pooled).abs() < 1e-3,
            "{}",
            x.key
        );
    }

    // Shards written by Python webdataset are read by skytrain (after `skytrain data index`).
    let foreign = dir.path().join("foreign");
    let script = r#"
import io, os, sys, numpy as np, webdataset as wds
os.makedirs(sys.argv[1], exist_ok=True)
rng = np.random.default_rng(0)
def npy(a):
    b = io.BytesIO(); np.save(b, a); return b.getvalue()
for shard in range(3):
    with wds.TarWriter(f"{sys.argv[1]}/part-{shard:04d}.tar") as w:
        for i in range(10):
            w.write({"__key__": f"s{shard}_{i:03d}", "latent.npy": npy(np.full((4, 16, 16), shard * 100 + i, np.float32)),
                     "text.npy": npy(rng.standard_normal((16, 384)).astype(np.float32)),
                     "pooled.npy": npy(np.zeros(384, np.float32)), "txt": b"python"})
"#;
    common::ok(
        std::process::Command::new(common::python()).args(["-c", script, foreign.to_str().unwrap()]).output().unwrap(),
        "python webdataset (write)",
    );
    common::ok(common::bin().args(["data", "index", foreign.to_str().unwrap()]).output().unwrap(), "data index");
    let fstore = Store::create(foreign.to_str().unwrap()).unwrap();
    let mut s = ShardStream::open(fstore, StreamOptions::default()).unwrap();
    let got = s.samples(&(0..30).collect::<Vec<_>>()).unwrap();
    let mut keys: Vec<String> = got.iter().map(|x| x.key.clone()).collect();
    for x in &got {
        let (shard, i): (f32, f32) = (x.key[1..2].parse().unwrap(), x.key[3..].parse().unwrap());
        assert!(x.latent.to_f32().iter().all(|&v| v == shard * 100.0 + i), "{}", x.key);
    }
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 30);

    // Training streams the shards; stopped and resumed (also by SIGKILL) it reads exactly the
    // samples, and computes exactly the losses, of an uninterrupted run.
    let spec = common::stream_spec(enc.to_str().unwrap(), 40);
    let a_dir = train_twice_with_interruptions(dir.path(), &spec, "streamed run");

    // Sampling such a run: prompts through the real text encoder, latents through the VAE decoder.
    let img = sample_with_fixtures(&a_dir, &["an emoji of a cat", "a red heart"], &[], &dir.path().join("grid.png"));
    assert_eq!((img.width(), img.height()), (2 * (32 + 2) + 2, 2 * (32 + 2) + 2));
}

#[test]
fn damaged_shards_are_skipped_counted_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, enc) = common::encoded_emoji(dir.path(), 200, 50);
    let store = Store::create(enc.to_str().unwrap()).unwrap();
    let m = DatasetManifest::read(&store).unwrap();
    let n = m.samples();
    // Truncate one shard mid-way, and corrupt one sample's latent in another.
    let cut = enc.join(&m.shards[0].name);
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let other = enc.join(&m.shards[1].name);
    let mut bytes = std::fs::read(&other).unwrap();
    let at = bytes.windows(6).position(|w| w == b"\x93NUMPY").unwrap();
    bytes[at..at + 6].copy_from_slice(b"BROKEN");
    std::fs::write(&other, &bytes).unwrap();

    let out = common::bin()
        .args(["data", "stream", enc.to_str().unwrap(), "--n"])
        .arg(n.to_string())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = common::ok(out.clone(), "data stream");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.lines().count() as u64, n, "every position still yields a sample");
    assert!(stderr.contains(&m.shards[0].name) && stderr.contains(&m.shards[1].name), "{stderr}");
    assert!(stderr.contains("latent.npy"), "the corrupt member is named: {stderr}");
    assert!(stderr.contains("skipped"), "{stderr}");
    let mut s = ShardStream::open(store, StreamOptions::default()).unwrap();
    s.samples(&(0..n).collect::<Vec<_>>()).unwrap();
    let d = s.damage();
    assert!(d.samples >= 2 && d.by_shard.len() == 2, "{d:?}");
}

#[test]
fn on_s3_curate_encode_stream_and_survive_a_store_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut weed = common::Seaweed::start(&dir.path().join("weed"));
    let table = common::emoji_subset(dir.path(), 400);
    let envs = common::Seaweed::env();
    let with_env = |mut c: std::process::Command| {
        for (k, v) in &envs {
            c.env(k, v);
        }
        c
    };
    let mut c = with_env(common::bin());
    c.args(["curate", table.to_str().unwrap(), "--out", "s3://test/emoji/raw", "--resolution", "32"]);
    common::ok(c.args(["--allow", common::ALLOW, "--shard-size", "25"]).output().unwrap(), "curate to S3");
    let vae = common::fixtures().join("vae-tiny");
    let mut c = with_env(common::bin());
    c.args(["encode", "s3://test/emoji/raw", "--out", "s3://test/emoji/enc", "--max-tokens", "16"]);
    c.args(["--vae", vae.to_str().unwrap(), "--text", common::minilm_dir().to_str().unwrap()]);
    common::ok(c.output().unwrap(), "encode on S3");
    let s3 = Store::create("s3://test/emoji/enc").unwrap();
    let m = DatasetManifest::read(&s3).unwrap();
    assert!(m.shards.len() >= 12);

    // Wrong credentials: a clear error naming the store, not a hang.
    let mut c = with_env(common::bin());
    let out = c
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .args(["data", "stream", "s3://test/emoji/enc", "--n", "4"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("s3://test/emoji/enc") && err.contains("manifest.json"), "{err}");
    // A bucket that does not exist is named as such.
    let out = with_env(common::bin()).args(["data", "inspect", "s3://no-such-bucket/enc"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bucket `no-such-bucket` does not exist"), "{err}");

    // A local run streams from S3; the store is SIGKILLed at step 30 and restarted once the run has
    // hit the outage (a store read failed and is being retried), the run carries on and ends with
    // exactly the losses of a run that saw no outage.
    let steps = 300;
    let spec = common::stream_spec("s3://test/emoji/enc", steps);
    let spec = RunSpec {
        train: TrainConfig { checkpoint_every: 30, ..spec.train },
        data: DataConfig { window_shards: 1, ..spec.data },
        ..spec
    };
    let (a_dir, b_dir) = (dir.path().join("run-a"), dir.path().join("run-b"));
    let a = Store::create(a_dir.to_str().unwrap()).unwrap();
    let b = Store::create(b_dir.to_str().unwrap()).unwrap();
    run::init(&a, &spec).unwrap();
    run::init(&b, &spec).unwrap();
    common::ok(
        with_env(common::bin()).args(["train", "--store", a_dir.to_str().unwrap()]).output().unwrap(),
        "train A",
    );
    let mut child = with_env(common::bin())
        .args(["train", "--store", b_dir.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The child's stderr, line by line, to the test: the restart waits for the first retry.
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let t0 = Instant::now();
    while !checkpoint::list(&b).unwrap().contains(&30) {
        assert!(t0.elapsed() < Duration::from_secs(120), "checkpoint 30 never appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    weed.kill();
    let mut stderr = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_secs(300)) {
            Ok(line) => {
                let noticed = line.contains("retrying");
                stderr.push(line);
                if noticed {
                    break;
                }
            }
            Err(_) => panic!(
                "run B {} without a store read failing while the store was down: {}",
                if child.try_wait().unwrap().is_some() { "ended" } else { "went on for 300 s" },
                stderr.join("\n")
            ),
        }
    }
    assert!(child.try_wait().unwrap().is_none(), "run B ended while the store was down: {}", stderr.join("\n"));
    weed.restart();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    stderr.extend(lines.try_iter());
    assert!(status.success(), "run B failed: {}", stderr.join("\n"));
    assert_eq!(losses(&a), losses(&b));

    // Images referenced by s3:// URLs in the table are curated like local ones.
    let images = Store::create("s3://test/images").unwrap();
    let rows: Vec<String> = std::fs::read_to_string(&table)
        .unwrap()
        .lines()
        .take(5)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let local = v["image"].as_str().unwrap().to_string();
            let name = Path::new(&local).file_name().unwrap().to_str().unwrap().to_string();
            images.put(&name, std::fs::read(&local).unwrap()).unwrap();
            v["image"] = format!("s3://test/images/{name}").into();
            v.to_string()
        })
        .collect();
    let s3_table = dir.path().join("s3-table.jsonl");
    std::fs::write(&s3_table, rows.join("\n")).unwrap();
    let mut c = with_env(common::bin());
    c.args(["curate", s3_table.to_str().unwrap(), "--out", "s3://test/emoji/from-s3", "--resolution", "32"]);
    ok_s3(c.args(["--allow", common::ALLOW]).output().unwrap());
    let m = DatasetManifest::read(&Store::create("s3://test/emoji/from-s3").unwrap()).unwrap();
    assert_eq!(m.curation.unwrap().rows, 5);

    // The store gone for good: the loader gives up after its patience, with a clear message.
    weed.kill();
    let t0 = Instant::now();
    let out = with_env(common::bin())
        .args(["data", "stream", "s3://test/emoji/enc", "--n", "4", "--patience-s", "3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && t0.elapsed() < Duration::from_secs(60), "{err}");
    assert!(err.contains("s3://test/emoji/enc"), "{err}");
}

fn ok_s3(out: std::process::Output) {
    common::ok(out, "curate from s3:// images");
}

/// Near-duplicate removal, audited through `dropped.jsonl`: distinct thin-line icons (small content
/// on white, which a whole-image hash confuses) all survive, emoji skin-tone variants are dropped
/// as near duplicates of their own base emoji, and `--keep-colour-variants` keeps them.
#[test]
fn near_duplicates_spare_distinct_icons_and_catch_skin_tone_variants() {
    let dir = tempfile::tempdir().unwrap();
    // 400 distinct icons as PNG files and a metadata table.
    let icons = dir.path().join("icons");
    std::fs::create_dir_all(&icons).unwrap();
    let mut table = String::new();
    for seed in 0..400u64 {
        let file = icons.join(format!("{seed}.png"));
        skytrain::demo::icons::icon(seed).save(&file).unwrap();
        table += &serde_json::json!({
            "id": format!("icon-{seed}"), "image": file.to_str().unwrap(), "caption": format!("icon {seed}"),
            "licence": "CC0-1.0", "author": "skytrain", "source": "generated",
        })
        .to_string();
        table.push('\n');
    }
    let icon_table = dir.path().join("icons.jsonl");
    std::fs::write(&icon_table, table).unwrap();
    let out = dir.path().join("icons-raw");
    common::curate(&icon_table, out.to_str().unwrap(), &[]);
    let c = DatasetManifest::read(&Store::open(out.to_str().unwrap()).unwrap()).unwrap().curation.unwrap();
    let lost = c.dropped.get("near_duplicate").copied().unwrap_or(0);
    eprintln!("icons: {lost} of 400 dropped as near duplicates");
    assert!(lost <= 4, "distinct icons dropped as near duplicates: {:?}", c.dropped);

    // The emoji: every toned row dropped as a near duplicate names its own base emoji.
    let table = common::emoji_table();
    let out = dir.path().join("emoji-raw");
    let curate64 = |out: &std::path::Path, extra: &[&str]| {
        let mut cmd = common::bin();
        cmd.args(["curate", table.to_str().unwrap(), "--out", out.to_str().unwrap(), "--resolution", "64"]);
        common::ok(cmd.args(["--allow", common::ALLOW]).args(extra).output().unwrap(), "curate")
    };
    curate64(&out, &[]);
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&table).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let tones = ["1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff", "fe0f"];
    // The emoji an id varies: without skin tones, and without gender (man/woman/person, ♂/♀), whose
    // variants at 64 px differ by a few pixels of hair.
    let base = |id: &str| {
        id.split('-')
            .filter(|p| !tones.contains(p) && !["200d", "2640", "2642"].contains(p))
            .map(|p| if ["1f468", "1f469", "1f9d1"].contains(&p) { "person" } else { p })
            .collect::<Vec<_>>()
            .join("-")
    };
    let toned: Vec<&str> = rows
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .filter(|id| id.split('-').any(|p| p != "fe0f" && tones.contains(&p)))
        .collect();
    let drops: Vec<skytrain::data::curate::DropRecord> = std::fs::read_to_string(out.join("dropped.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let near: Vec<_> =
        drops.iter().filter(|d| d.reason == "near_duplicate" && toned.contains(&d.id.as_str())).collect();
    let own = near.iter().filter(|d| d.matched.as_deref().is_some_and(|m| base(m) == base(&d.id))).count();
    let caught = near.len();
    eprintln!(
        "emoji at 64 px: {caught} of {} skin-tone variants dropped as near duplicates ({:.1}%), {own} of them matched to \
         their own emoji (another tone or gender of it)",
        toned.len(),
        100.0 * caught as f64 / toned.len() as f64
    );
    assert!(caught * 10 >= toned.len() * 7, "skin-tone variants caught: {caught} of {}", toned.len());
    assert!(own * 10 >= caught * 8, "most matches should be within the emoji's own variants: {own} of {caught}");
    assert!(drops.iter().all(|d| d.reason != "near_duplicate" || d.detail.contains("silhouettes")));

    // Keeping colour variants keeps most of them (the rest match a sibling of the same colour: the
    // same tone of another gender, or an adjacent tone within the mean-colour tolerance).
    let out = dir.path().join("emoji-keep");
    curate64(&out, &["--keep-colour-variants"]);
    let kept_drops = std::fs::read_to_string(out.join("dropped.jsonl")).unwrap();
    let still = kept_drops
        .lines()
        .map(|l| serde_json::from_str::<skytrain::data::curate::DropRecord>(l).unwrap())
        .filter(|d| d.reason == "near_duplicate" && toned.contains(&d.id.as_str()))
        .count();
    eprintln!("with --keep-colour-variants: {still} toned rows dropped as near duplicates");
    assert!(still * 2 < caught, "--keep-colour-variants still drops {still} toned rows (default: {caught})");
}

/// Aspect-ratio buckets end to end on a wide/tall set (rows and columns of objects, 1:3 to 3:1):
/// curate keeps more of each image than a square crop, encode writes each bucket's latent shape,
/// training batches within a bucket and resumes exactly after a stop and a SIGKILL, and the model
/// samples at a non-square size.
#[test]
fn buckets_end_to_end_wide_and_tall_images_train_resume_and_sample() {
    let dir = tempfile::tempdir().unwrap();
    let table = skytrain::demo::rows::write_set(&dir.path().join("set"), 300).unwrap();
    let (square, raw, enc) = (dir.path().join("square"), dir.path().join("raw"), dir.path().join("enc"));
    let shards = ["--shard-size", "64"];
    common::curate(&table, square.to_str().unwrap(), &shards);
    let bucket_args = ["--buckets", "auto", "--bucket-step", "8", "--shard-size", "64"];
    let out = common::curate(&table, raw.to_str().unwrap(), &bucket_args);
    assert!(out.contains("buckets 24x40:") && out.contains("image area kept"), "{out}");
    let raw_store = Store::create(raw.to_str().unwrap()).unwrap();
    let m = DatasetManifest::read(&raw_store).unwrap();
    let names = m.buckets.clone().unwrap();
    assert_eq!(names, ["24x48", "24x40", "32x32", "40x24", "48x24"], "tall to wide");
    let kept = |m: &DatasetManifest| m.curation.as_ref().unwrap().area_kept.unwrap();
    let square_kept = kept(&DatasetManifest::read(&Store::create(square.to_str().unwrap()).unwrap()).unwrap());
    let (sq, bk) = (square_kept, kept(&m));
    assert!(bk.mean > sq.mean + 0.2 && bk.p10 > sq.p10, "area kept: buckets {bk:?}, square crop {sq:?}");
    assert_eq!(m.check(&raw_store).unwrap(), m.samples(), "every image is its bucket's size");
    // Each sample's record names its bucket; the manifest's counts add up.
    let tar = raw_store.get(&m.shards[0].name).unwrap();
    let (samples, _) = skytrain::data::wds::read_shard(&tar, "shard");
    let meta: serde_json::Value = serde_json::from_slice(samples[0].get("json").unwrap()).unwrap();
    assert!(names.contains(&meta["bucket"].as_str().unwrap().to_string()), "{meta}");
    assert!(m.shards.iter().all(|s| s.buckets.values().sum::<u64>() == s.samples));
    // A re-run with other buckets into the same output is refused, naming the option.
    let mut c = common::bin();
    c.args(["curate", table.to_str().unwrap(), "--out", raw.to_str().unwrap(), "--resolution", "32"]).args([
        "--allow",
        common::ALLOW,
        "--buckets",
        "32x32,48x24",
        "--shard-size",
        "64",
    ]);
    common::fails_with(&mut c, &["buckets", "--redo"]);

    common::encode(raw.to_str().unwrap(), enc.to_str().unwrap());
    let enc_store = Store::create(enc.to_str().unwrap()).unwrap();
    let em = DatasetManifest::read(&enc_store).unwrap();
    let e = em.encoding.clone().unwrap();
    assert_eq!(e.buckets["48x24"], [4, 12, 24]);
    assert_eq!(e.buckets["24x40"], [4, 20, 12]);
    assert_eq!(em.check(&enc_store).unwrap(), em.samples());

    // Models that cannot take the buckets are refused before anything is written.
    let spec = common::stream_spec(enc.to_str().unwrap(), 40);
    let refused = |model: ModelConfig, needles: &[&str]| {
        let bad = RunSpec { model, ..spec.clone() };
        let at = dir.path().join("refused");
        let err = run::check_data(&bad, at.to_str().unwrap()).unwrap_err().to_string();
        assert!(needles.iter().all(|n| err.contains(n)), "{err}");
        assert!(!at.exists());
    };
    let ModelConfig::Dit(dit) = spec.model.clone() else { unreachable!() };
    refused(ModelConfig::Dit(DitConfig { patch_size: 8, ..dit }), &["bucket 24x40", "[4, 20, 12]", "8×8 patches"]);
    let tld = skytrain::config::TldConfig { latent_channels: 4, latent_size: 16, ..Default::default() };
    refused(ModelConfig::Tld(tld), &["`tld`", "dit"]);
    run::check_data(&spec, dir.path().join("ok").to_str().unwrap()).unwrap();
    // One bucket that is not the model's square is still a bucketed dataset the model takes.
    let (raw1, enc1, run1) = (dir.path().join("raw1"), dir.path().join("enc1"), dir.path().join("run1"));
    common::curate(&table, raw1.to_str().unwrap(), &["--buckets", "48x24"]);
    common::encode(raw1.to_str().unwrap(), enc1.to_str().unwrap());
    let one = common::stream_spec(enc1.to_str().unwrap(), 2);
    run::init(&Store::create(run1.to_str().unwrap()).unwrap(), &one).unwrap();
    common::ok(common::bin().args(["train", "--store", run1.to_str().unwrap()]).output().unwrap(), "train on 48x24");

    // Trained with a stop and a SIGKILL, the run computes exactly the losses of an uninterrupted one.
    let a_dir = train_twice_with_interruptions(dir.path(), &spec, "bucketed run");

    // Sampled at a wide bucket's size through the VAE decoder.
    let size = ["--width", "48", "--height", "24"];
    let img = sample_with_fixtures(&a_dir, &["three red circles in a row"], &size, &dir.path().join("wide.png"));
    assert_eq!((img.width(), img.height()), (48 + 2 + 2, 2 * (24 + 2) + 2), "one column of 48×24 samples");
}
