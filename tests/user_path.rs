//! The path a user takes, through the README's commands only: their own table → curate → encode
//! (diffusers/transformers encoders) → key new --admit → run init → coordinate + work → sample →
//! export → sample --model; and the refusals that come before anything is written.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every file under `root` with its bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A user's table: 40 CC BY-SA images by one author, 8 CC0 ones, and one all-rights-reserved row.
fn user_table(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let colours =
        [("red", [220u8, 40, 40]), ("blue", [40, 60, 220]), ("green", [40, 180, 60]), ("yellow", [230, 210, 40])];
    let mut rows = String::new();
    for i in 0..49u32 {
        let (name, rgb) = colours[i as usize % colours.len()];
        let side = 8 + (i % 5) * 4;
        let (x0, y0) = ((i * 7) % (48 - side), (i * 11) % (48 - side));
        let img = image::RgbImage::from_fn(48, 48, |x, y| {
            let inside = x >= x0 && x < x0 + side && y >= y0 && y < y0 + side;
            if inside {
                image::Rgb(rgb)
            } else {
                image::Rgb([250 - (i as u8), 250, 245])
            }
        });
        let file = format!("img{i:03}.png");
        img.save(images.join(&file)).unwrap();
        let licence = match i {
            48 => "All rights reserved",
            40..=47 => "CC0 1.0",
            _ => "CC BY-SA 4.0",
        };
        rows.push_str(
            &serde_json::json!({
                "id": format!("u{i:03}"),
                "image": format!("images/{file}"),
                "caption": format!("a {name} square"),
                "licence": licence,
                "author": "Ann Example",
                "source": format!("https://example.org/works/{i}"),
            })
            .to_string(),
        );
        rows.push('\n');
    }
    let table = dir.join("table.jsonl");
    std::fs::write(&table, rows).unwrap();
    table
}

/// `skytrain encode RAW --out ENC` with the tiny diffusers VAE and the tiny CLIP text model.
fn encode_with_fixtures(raw: &Path, enc: &Path) -> Command {
    let mut c = common::bin();
    c.arg("encode").arg(raw).arg("--out").arg(enc);
    c.arg("--vae").arg(common::fixtures().join("vae-tiny"));
    c.arg("--text").arg(common::fixtures().join("clip-tiny"));
    c
}

const SPEC: &str = r#"# A user's run on their own shards (comments and layout survive `key new --admit`).
name = "user-run"

[model]            # 4×16×16 latents (tiny VAE at 32 px), 8 CLIP tokens of width 32
family = "dit"
latent_channels = 4
latent_size = 16
patch_size = 4
hidden = 64
depth = 2
heads = 2
text_dim = 32
text_len = 8
freq_dim = 32

[train]
seed = 3
batch_size = 8
lr = 1e-3
warmup_steps = 2
threads = 1

[data]
shards = "SHARDS"
window_shards = 2

[sync]
rounds = 4
inner_steps = 3
min_members = 2
quorum = 2
round_deadline_s = 600.0
heartbeat_timeout_s = 120.0
poll_ms = 100
keep_last = 1
keep_every = 0
"#;

#[test]
fn a_users_data_is_trained_across_workers_sampled_and_published() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, enc, run_store) = (d.join("raw"), d.join("enc"), d.join("run"));
    let table = user_table(d);
    let out = common::ok(
        common::bin()
            .args(["curate", table.to_str().unwrap(), "--resolution", "32", "--shard-size", "16"])
            .args(["--near-duplicate-bits", "0", "--out"])
            .arg(&raw)
            .output()
            .unwrap(),
        "curate",
    );
    assert!(out.contains("48 samples") && out.contains("licence"), "{out}");
    common::ok(
        encode_with_fixtures(&raw, &enc).args(["--max-tokens", "8", "--threads", "1"]).output().unwrap(),
        "encode",
    );
    let spec = d.join("run.toml");
    // A [model] whose shapes do not match the dataset is refused before anything is written, with
    // the values that would match.
    std::fs::write(&spec, SPEC.replace("SHARDS", enc.to_str().unwrap()).replace("text_len = 8", "text_len = 16"))
        .unwrap();
    common::fails_with(
        common::bin().args(["run", "init"]).arg(&spec).arg("--store").arg(&run_store),
        &["latent_channels = 4, latent_size = 16, text_len = 8, text_dim = 32"],
    );
    assert!(!run_store.exists());
    std::fs::write(&spec, SPEC.replace("SHARDS", enc.to_str().unwrap())).unwrap();
    for w in ["w1", "w2"] {
        common::ok(
            common::bin()
                .args(["key", "new", "--out"])
                .arg(d.join(format!("{w}.key")))
                .arg("--admit")
                .arg(&spec)
                .output()
                .unwrap(),
            "key new",
        );
    }
    let edited = std::fs::read_to_string(&spec).unwrap();
    assert!(edited.starts_with("# A user's run") && edited.contains("# 4×16×16 latents"), "{edited}");
    assert_eq!(edited.matches("admitted_keys").count(), 1, "{edited}");
    common::ok(
        common::bin().args(["run", "init"]).arg(&spec).arg("--store").arg(&run_store).output().unwrap(),
        "run init",
    );
    let s = run_store.to_str().unwrap();
    let mut children = vec![common::bin().args(["coordinate", "--store", s]).spawn().unwrap()];
    for w in ["w1", "w2"] {
        children.push(
            common::bin()
                .args(["work", "--store", s, "--name", w, "--no-selfcheck", "--key"])
                .arg(d.join(format!("{w}.key")))
                .spawn()
                .unwrap(),
        );
    }
    common::finish(&mut children, std::time::Duration::from_secs(1800));
    common::ok(common::bin().args(["run", "verify", "--store", s]).output().unwrap(), "run verify");
    // Retention: genesis and the newest round's state only; verify replayed from genesis above.
    let rounds: std::collections::BTreeSet<String> = snapshot(&run_store.join("state"))
        .keys()
        .map(|p| p.components().next().unwrap().as_os_str().to_string_lossy().into_owned())
        .collect();
    assert_eq!(rounds.into_iter().collect::<Vec<_>>(), ["0000000000", "0000000004"]);

    // Sampling reads only: the run's records are byte-identical afterwards.
    let before = snapshot(&run_store);
    let from_run = d.join("from-run.png");
    let sample = |args: &[&str], out: &Path| {
        common::ok(
            common::bin()
                .arg("sample")
                .args(args)
                .args(["--prompt", "a red square", "--prompt", "a blue square", "--per-prompt", "1", "--steps", "3"])
                .arg("--out")
                .arg(out)
                .output()
                .unwrap(),
            "sample",
        )
    };
    sample(&["--store", s], &from_run);
    assert!(before == snapshot(&run_store), "sampling changed the run's store");

    // The export is self-contained: weights, config, encoders, attributions, a card whose licence
    // follows from the data (CC BY-SA and CC0 → CC BY-SA).
    let export = d.join("export");
    common::ok(common::bin().args(["export", "--store", s, "--out"]).arg(&export).output().unwrap(), "export");
    let card = std::fs::read_to_string(export.join("README.md")).unwrap();
    assert!(card.contains("license: cc-by-sa-4.0"), "{card}");
    assert!(card.contains("| CC-BY-SA-4.0 | 40 |") && card.contains("| CC0-1.0 | 8 |"), "{card}");
    assert!(!card.contains("All rights reserved"), "{card}");
    assert!(card.contains("global model of DiLoCo round 4") && card.contains("H = 3"), "{card}");
    let attribution = std::fs::read_to_string(export.join("ATTRIBUTION.md")).unwrap();
    assert!(attribution.contains("Ann Example") && attribution.contains("CC-BY-SA-4.0"), "{attribution}");
    for f in ["model.safetensors", "config.json", "encoders.json", "vae/config.json", "text_encoder/tokenizer.json"] {
        assert!(export.join(f).is_file(), "{f} missing from the export");
    }
    // Alone: moved elsewhere, with the data and the run gone, it samples the same images.
    let moved = d.join("published");
    std::fs::rename(&export, &moved).unwrap();
    for gone in [&raw, &enc, &run_store] {
        std::fs::remove_dir_all(gone).unwrap();
    }
    let from_export = d.join("from-export.png");
    sample(&["--model", moved.to_str().unwrap()], &from_export);
    assert_eq!(std::fs::read(&from_run).unwrap(), std::fs::read(&from_export).unwrap());
    // A tampered encoder file is named.
    std::fs::write(moved.join("text_encoder/tokenizer.json"), "{}").unwrap();
    let out = common::bin()
        .args(["sample", "--prompt", "a red square", "--out", "/dev/null", "--model"])
        .arg(&moved)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tokenizer.json") && err.contains("sha256"), "{err}");
}

/// Runs `skytrain` in `cwd` and expects a failure naming every needle.
fn refused(cwd: &Path, args: &[&str], needles: &[&str]) {
    common::fails_with(common::bin().current_dir(cwd).args(args), needles);
}

#[test]
fn bad_specs_and_locations_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = "name = \"n\"\nmodel = \"dit-tiny\"\n";
    for (section, line, field) in [
        ("sync", "block_size = 0", "block_size"),
        ("sync", "outer_lr = nan", "outer_lr"),
        ("sync", "inner_steps = 0", "inner_steps"),
        ("sync", "round_deadline_s = -5.0", "round_deadline_s"),
        ("sync", "norm_bound = -1.0", "norm_bound"),
        ("sync", "outer_momentum = 1.5", "outer_momentum"),
        ("sync", "quorum = 4\nmin_members = 2", "quorum"),
        ("train", "device = \"gpu\"", "gpu"),
        ("data", "shards = \"gs://bucket/enc\"", "gs"),
    ] {
        let spec = d.join("bad.toml");
        std::fs::write(&spec, format!("{base}[{section}]\n{line}\n")).unwrap();
        // Serde's own errors (a device it cannot parse) quote the offending line instead of the table.
        let table = if section == "train" { line.to_string() } else { format!("[{section}]") };
        refused(d, &["run", "init", "bad.toml", "--store", "store"], &["bad.toml", &table, field]);
        assert!(!d.join("store").exists(), "{line}: the store was created");
    }
    std::fs::write(d.join("good.toml"), base).unwrap();
    for url in ["gs://bucket/run", "az://container/run", "ftp://host/run", "s3:/bucket/run", "S3:bucket"] {
        refused(d, &["run", "init", "good.toml", "--store", url], &[url, "s3://bucket/prefix"]);
    }
    // Nothing appeared beside the specs: no `gs:` folder, no store.
    let left: Vec<String> =
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    // Read-only commands never create a store.
    for args in [
        vec!["run", "status", "--store", "missing"],
        vec!["data", "inspect", "missing"],
        vec!["sample", "--store", "missing", "--prompt", "x", "--out", "/dev/null"],
        vec!["tensorboard", "pull", "--store", "missing", "--out", "tb"],
    ] {
        refused(d, &args, &["missing"]);
        assert!(!d.join("missing").exists(), "{args:?} created the store");
    }
    // An S3 store without credentials fails at once, naming the variables; no request is made
    // (the endpoint is a closed local port: a request would fail differently, after retries).
    let out = Command::new(env!("CARGO_BIN_EXE_skytrain"))
        .current_dir(d)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .args(["run", "status", "--store", "s3://bucket/run"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no credentials") && err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    // A key is not written when admitting it to a bad spec fails.
    std::fs::write(d.join("bad.toml"), format!("{base}[sync]\nblock_size = 0\n")).unwrap();
    refused(d, &["key", "new", "--out", "k.key", "--admit", "bad.toml"], &["bad.toml", "block_size"]);
    assert!(!d.join("k.key").exists());
}

#[test]
fn checkpoints_are_kept_by_retention_and_resume_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut spec) = common::small_run(dir.path(), 12, 2);
    // small_run wrote a spec with the default retention; this run keeps the newest 2 and every 4th.
    spec.train.keep_last = 2;
    spec.train.keep_every = 4;
    std::fs::remove_file(dir.path().join("run.toml")).unwrap();
    skytrain::train::run::init(&store, &spec).unwrap();
    let s = dir.path().to_str().unwrap();
    common::ok(common::bin().args(["train", "--store", s, "--stop-at", "7"]).output().unwrap(), "train to 7");
    assert_eq!(skytrain::train::checkpoint::list(&store).unwrap(), vec![4, 6, 7]);
    common::ok(common::bin().args(["train", "--store", s]).output().unwrap(), "train resumed");
    assert_eq!(skytrain::train::checkpoint::list(&store).unwrap(), vec![4, 8, 10, 12]);
    let left: Vec<String> = store.list("checkpoints").unwrap();
    assert!(
        left.iter().all(|k| ["0000000004", "0000000008", "0000000010", "0000000012"].iter().any(|s| k.contains(s))),
        "{left:?}"
    );
}

/// Without any download: `encode --fit` fits skytrain's own encoders on the user's data, a
/// single-process run trains on them, and its export samples alone.
#[test]
fn fitted_encoders_need_no_download() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, enc, run_store) = (d.join("raw"), d.join("enc"), d.join("run"));
    let table = user_table(d);
    common::ok(
        common::bin()
            .args(["curate", table.to_str().unwrap(), "--resolution", "32", "--near-duplicate-bits", "0", "--out"])
            .arg(&raw)
            .output()
            .unwrap(),
        "curate",
    );
    let out = common::ok(
        common::bin()
            .arg("encode")
            .arg(&raw)
            .arg("--out")
            .arg(&enc)
            .args(["--fit", "--latent-channels", "4", "--text-dim", "16", "--threads", "1"])
            .output()
            .unwrap(),
        "encode --fit",
    );
    assert!(out.contains("latent [4, 16, 16], text [3, 16]"), "{out}");
    let spec = SPEC
        .replace("SHARDS", enc.to_str().unwrap())
        .replace("text_dim = 32", "text_dim = 16")
        .replace("text_len = 8", "text_len = 3");
    let spec = spec.split("[sync]").next().unwrap().replace("seed = 3", "seed = 3\nsteps = 6\ncheckpoint_every = 3");
    std::fs::write(d.join("run.toml"), spec).unwrap();
    common::ok(
        common::bin().args(["run", "init"]).arg(d.join("run.toml")).arg("--store").arg(&run_store).output().unwrap(),
        "run init",
    );
    let s = run_store.to_str().unwrap();
    common::ok(common::bin().args(["train", "--store", s]).output().unwrap(), "train");
    let export = d.join("export");
    common::ok(common::bin().args(["export", "--store", s, "--out"]).arg(&export).output().unwrap(), "export");
    let record = std::fs::read_to_string(export.join("encoders.json")).unwrap();
    assert!(record.contains("patch-pca") && record.contains("words"), "{record}");
    let card = std::fs::read_to_string(export.join("README.md")).unwrap();
    assert!(card.contains("EMA weights of checkpoint 6") && card.contains("license: cc-by-sa-4.0"), "{card}");
    let grid = |args: &[&str], out: &Path| {
        common::ok(
            common::bin()
                .arg("sample")
                .args(args)
                .args(["--prompt", "a green square", "--per-prompt", "2", "--steps", "3", "--out"])
                .arg(out)
                .output()
                .unwrap(),
            "sample",
        );
        std::fs::read(out).unwrap()
    };
    let from_run = grid(&["--store", s], &d.join("a.png"));
    std::fs::remove_dir_all(&enc).unwrap();
    assert_eq!(from_run, grid(&["--model", export.to_str().unwrap()], &d.join("b.png")));
    // A word outside the fitted vocabulary is named.
    let out = common::bin()
        .args(["sample", "--prompt", "a purple square", "--out", "/dev/null", "--model"])
        .arg(&export)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("purple"), "{err}");
}

/// A re-run into an existing dataset with other options is refused, naming the option, or remakes
/// the shards with `--redo`; `data inspect --check` verifies shapes and dtypes, not just hashes.
#[test]
fn shards_always_match_their_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, enc) = (d.join("raw"), d.join("enc"));
    let table = user_table(d);
    let curate = |res: &str, extra: &[&str]| {
        common::bin()
            .args(["curate", table.to_str().unwrap(), "--resolution", res, "--near-duplicate-bits", "0", "--out"])
            .arg(&raw)
            .args(extra)
            .output()
            .unwrap()
    };
    common::ok(curate("32", &[]), "curate");
    common::ok(curate("32", &[]), "curate again, same options");
    let out = curate("64", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("resolution: was `32`, now `64`") && err.contains("--redo"), "{err}");
    common::ok(curate("64", &["--redo"]), "curate --redo");
    let inspect = |store: &Path| common::bin().args(["data", "inspect", "--check"]).arg(store).output().unwrap();
    let out = common::ok(inspect(&raw), "data inspect --check (raw)");
    assert!(out.contains("\"resolution\": 64") && out.contains("match the manifest"), "{out}");

    let encode = |tokens: &str, extra: &[&str]| {
        encode_with_fixtures(&raw, &enc).args(["--max-tokens", tokens, "--threads", "1"]).args(extra).output().unwrap()
    };
    common::ok(encode("8", &[]), "encode");
    // Without --max-tokens the length is what the longest caption needs (the tiny CLIP's small
    // vocabulary splits words into pieces; plus its start and end tokens), not the encoder's 77.
    let auto = d.join("enc-auto");
    let out = encode_with_fixtures(&raw, &auto).args(["--threads", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    common::ok(out, "encode (token length from the captions)");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(auto.join("manifest.json")).unwrap()).unwrap();
    let len = m["encoding"]["text_shape"][0].as_u64().unwrap();
    assert!((4..77).contains(&len), "{len}");
    assert!(err.contains(&format!("captions need at most {len} tokens")), "{err}");
    let out = encode("16", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("text_shape: was `[8, 32]`, now `[16, 32]`"), "{err}");
    common::ok(encode("16", &["--redo"]), "encode --redo");
    common::ok(inspect(&enc), "data inspect --check (encoded)");
    // A manifest that does not describe its shards is caught by --check.
    let manifest = enc.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m["encoding"]["text_shape"], serde_json::json!([16, 32]));
    m["encoding"]["text_shape"] = serde_json::json!([12, 32]);
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let out = inspect(&enc);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("text.npy is [16, 32], the manifest says [12, 32]"), "{err}");
}

/// Every dropped row is explained in `dropped.jsonl`: licence, duplicate (with the kept row it
/// matched), decode errors in the decoder's words, and images over the decode memory limit.
#[test]
fn dropped_rows_are_recorded_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let table = user_table(d);
    std::fs::write(d.join("images/broken.png"), b"\x89PNG not really").unwrap();
    image::RgbImage::from_pixel(1200, 1200, image::Rgb([10, 200, 30])).save(d.join("images/huge.png")).unwrap();
    let extra = [("copy-of-u007", "images/img007.png"), ("broken", "images/broken.png"), ("huge", "images/huge.png")]
        .iter()
        .map(|(id, image)| {
            serde_json::json!({ "id": id, "image": image, "caption": "a red square", "licence": "CC0",
                                "author": "x", "source": "y" })
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut text = std::fs::read_to_string(&table).unwrap();
    text.push_str(&extra);
    std::fs::write(&table, text + "\n").unwrap();
    let raw = d.join("raw");
    let out = common::ok(
        common::bin()
            .args(["curate", table.to_str().unwrap(), "--resolution", "32", "--max-decode-mb", "2", "--out"])
            .arg(&raw)
            .output()
            .unwrap(),
        "curate",
    );
    assert!(out.contains("dropped.jsonl"), "{out}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(raw.join("dropped.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |id: &str| lines.iter().find(|l| l["id"] == id).unwrap_or_else(|| panic!("{id} not in {lines:?}"));
    assert_eq!(of("u048")["reason"], "licence");
    assert!(of("u048")["detail"].as_str().unwrap().contains("All rights reserved"));
    assert_eq!((&of("copy-of-u007")["reason"], &of("copy-of-u007")["matched"]), (&"duplicate".into(), &"u007".into()));
    assert_eq!(of("broken")["reason"], "decode");
    assert_eq!(of("huge")["reason"], "too_large");
    assert!(of("huge")["detail"].as_str().unwrap().contains("--max-decode-mb 2"));
    // The counts in the manifest agree with the record, row for row.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(raw.join("manifest.json")).unwrap()).unwrap();
    let dropped: u64 = m["curation"]["dropped"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(dropped, lines.len() as u64);
    assert_eq!(m["curation"]["rows"].as_u64().unwrap(), m["curation"]["kept"].as_u64().unwrap() + dropped);
}
