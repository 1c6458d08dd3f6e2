//! The `skytrain` command line.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use skytrain::config::{ModelConfig, RunSpec};
use skytrain::demo::{self, DemoOptions};
use skytrain::model::Model;
use skytrain::store::Store;
use skytrain::sync::{self, protocol};
use skytrain::{checkpoint, export, run, sample};

mod data_cli;
mod ops_cli;

#[derive(Parser)]
#[command(
    name = "skytrain",
    version,
    about = "Train an open text-to-image diffusion transformer through an object store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum RunCommand {
    /// Writes a run spec (TOML) into a store, create-only.
    Init {
        spec: PathBuf,
        #[arg(long)]
        store: String,
    },
    /// Rounds, workers and the latest commit.
    Status {
        #[arg(long)]
        store: String,
    },
    /// Replays every committed round from genesis and checks each model hash.
    Verify {
        #[arg(long)]
        store: String,
    },
    /// One JSON line per committed round: timing, members' inner seconds, bytes, loss.
    Rounds {
        #[arg(long)]
        store: String,
    },
}

#[derive(Subcommand)]
enum TensorboardCommand {
    Pull {
        #[arg(long)]
        store: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Makes an ed25519 key; prints its public key.
    New {
        #[arg(long)]
        out: PathBuf,
        /// Adds the public key to `[sync] admitted_keys` of this run spec file.
        #[arg(long)]
        admit: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Metadata table -> licence-clean webdataset shards (licence allowlist, dedupe, resize).
    Curate(data_cli::CurateArgs),
    /// Curated shards -> encoded shards (VAE latents + text embeddings as .npy), resumable.
    Encode(data_cli::EncodeArgs),
    /// Datasets: `index` foreign shards, `inspect` a manifest, `stream` positions through the loader.
    Data {
        #[command(subcommand)]
        command: data_cli::DataCommand,
    },
    /// Akash deployment: `sdl` writes an SDL for a run and a hardware plan.
    Deploy {
        #[command(subcommand)]
        command: ops_cli::DeployCommand,
    },
    /// Spend so far (from the ledger) and forecasts, against the run's budget.
    Cost(ops_cli::CostArgs),
    /// Serves a web dashboard of a run on a local port.
    Dashboard {
        #[arg(long)]
        store: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
    },
    /// TensorBoard: `pull` copies a run's event files to a folder for `tensorboard --logdir`.
    Tensorboard {
        #[command(subcommand)]
        command: TensorboardCommand,
    },
    /// The whole pipeline on the embedded dataset (no download, CPU; about 9 minutes on 2 cores).
    Demo(DemoOptions),
    /// The run in a store: `init` (immutable spec), `status`, `verify` (replay the committed rounds).
    Run {
        #[command(subcommand)]
        command: RunCommand,
    },
    /// Coordinates DiLoCo rounds (stateless: kill and restart it anywhere).
    Coordinate {
        #[arg(long)]
        store: String,
    },
    /// Joins a run as a DiLoCo worker: trains its share of each round, uploads signed updates.
    Work {
        #[arg(long)]
        store: String,
        /// This worker's name (1–64 of [A-Za-z0-9_-]); keep it across restarts.
        #[arg(long)]
        name: String,
        /// Its ed25519 secret key file (`skytrain key new`).
        #[arg(long, required_unless_present = "key_env")]
        key: Option<PathBuf>,
        /// …or the environment variable holding the key's 64 hex digits (Akash deployments).
        #[arg(long)]
        key_env: Option<String>,
        /// Skip the start-up self-check (throughput and store bandwidth).
        #[arg(long)]
        no_selfcheck: bool,
    },
    /// Worker keys: `new` makes one and can add its public key to a run spec before `run init`.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Trains (or resumes) the run in a store on this machine.
    Train {
        #[arg(long)]
        store: String,
        /// Stop after this many steps in total (checkpointed), even if the spec asks for more.
        #[arg(long)]
        stop_at: Option<u64>,
    },
    /// Text -> image grid from a run's latest checkpoint (EMA weights).
    Sample {
        #[arg(long)]
        store: String,
        #[arg(long, required = true)]
        prompt: Vec<String>,
        #[arg(long, default_value = "grid.png")]
        out: PathBuf,
        #[arg(long, default_value_t = sample::DEFAULT_EULER.steps)]
        steps: usize,
        #[arg(long, default_value_t = sample::DEFAULT_EULER.guidance)]
        guidance: f64,
        /// Time shift of the Euler sampler's σ grid (1: uniform; `dit` models).
        #[arg(long, default_value_t = sample::DEFAULT_EULER.shift)]
        shift: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Images per prompt.
        #[arg(long, default_value_t = 4)]
        per_prompt: usize,
        /// For runs trained on encoded shards: the AutoencoderKL folder used by `skytrain encode`.
        #[arg(long, requires = "text")]
        vae: Option<PathBuf>,
        /// …and its text encoder folder (prompts are encoded to the model's token length).
        #[arg(long, requires = "vae")]
        text: Option<PathBuf>,
    },
    /// Writes a Hugging Face-style folder from a run's latest checkpoint.
    Export {
        #[arg(long)]
        store: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Lists the named model configurations with their parameter counts.
    Models,
    /// Validation loss of a run's current model (DiLoCo: the last commit's θ; one process: the
    /// latest checkpoint's raw weights) on a held-out latent set; prints JSON.
    EvalLoss {
        #[arg(long)]
        store: String,
        /// Store holding the held-out `data/latents.safetensors` (e.g. made by `demo-data --seed 99`).
        #[arg(long)]
        val_store: String,
        #[arg(long, default_value_t = 512)]
        samples: i64,
    },
    /// Curates and encodes the embedded dataset into a store (what `demo` trains on).
    DemoData {
        #[arg(long)]
        store: String,
        #[arg(long, default_value_t = 20000)]
        images: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Measures prompt fidelity of a demo run's latest checkpoint on held-out random captions.
    Fidelity {
        #[arg(long)]
        store: String,
        #[arg(long, default_value_t = 200)]
        images: usize,
        #[arg(long, default_value_t = sample::DEFAULT_EULER.steps)]
        steps: usize,
        #[arg(long, default_value_t = sample::DEFAULT_EULER.guidance)]
        guidance: f64,
        /// Time shift of the Euler sampler's σ grid (1: uniform).
        #[arg(long, default_value_t = sample::DEFAULT_EULER.shift)]
        shift: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Times training steps (fwd + loss + bwd + AdamW) of a named model on one fixed batch; prints JSON.
    BenchStep {
        #[arg(long, default_value = "dit-bench")]
        model: String,
        #[arg(long, default_value_t = 8)]
        batch: i64,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// CPU threads (0: libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: i32,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// bf16 matmuls/attention (for CUDA).
        #[arg(long)]
        bf16: bool,
        /// Writes init weights, batch and config here for the PyTorch reference.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
    /// Loads a weights file into a model config and runs one forward pass (checks a conversion).
    Inspect {
        /// A named config (`tld-at1`, `dit-s`, …) or a config file (.json/.toml).
        #[arg(long)]
        config: String,
        #[arg(long)]
        weights: PathBuf,
    },
}

fn main() -> Result<()> {
    skytrain::allocator::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo(opts) => demo::run_demo(&opts),
        Command::Run { command } => run_command(command),
        Command::Curate(args) => data_cli::curate(args),
        Command::Encode(args) => data_cli::encode(args),
        Command::Data { command } => data_cli::data(command),
        Command::Deploy { command } => ops_cli::deploy(command),
        Command::Cost(args) => ops_cli::cost_cmd(args),
        Command::Dashboard { store, port, bind } => ops_cli::dashboard(store, port, bind),
        Command::Tensorboard { command: TensorboardCommand::Pull { store, out } } => {
            ops_cli::tensorboard_pull(store, out)
        }
        Command::Coordinate { store } => {
            let store = Store::open(&store)?;
            let on_commit = |c: &protocol::Commit| {
                let bytes: u64 = c.accepted.iter().map(|a| a.bytes).sum();
                println!(
                    "round {:>5}: {} accepted, {} rejected, {} missing, loss {}, {} bytes in ({})",
                    c.round,
                    c.accepted.len(),
                    c.rejected.len(),
                    c.missing.len(),
                    c.mean_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    bytes,
                    c.closed_by
                );
                for r in &c.rejected {
                    println!("             rejected {}: {}", r.worker, r.reason);
                }
            };
            let opts =
                sync::coordinator::CoordinatorOptions { on_commit: Some(Box::new(on_commit)), ..Default::default() };
            sync::coordinator::run(&store, opts)?;
            println!("run complete");
            Ok(())
        }
        Command::Work { store, name, key, key_env, no_selfcheck } => {
            let store = Store::open(&store)?;
            let key = match (key, key_env) {
                (Some(path), _) => sync::keys::WorkerKey::load(&path)?,
                (None, Some(var)) => {
                    let hex = std::env::var(&var).with_context(|| format!("--key-env {var}: not set"))?;
                    sync::keys::WorkerKey::from_hex(&hex, &format!("${var}"))?
                }
                (None, None) => bail!("give --key or --key-env"),
            };
            let opts = sync::worker::WorkerOptions {
                name,
                key,
                hardware: skytrain::observe::telemetry::cpu_model(),
                max_outage: std::time::Duration::from_secs(600),
                on_update: None,
                selfcheck: !no_selfcheck,
            };
            sync::worker::run(&store, opts)?;
            Ok(())
        }
        Command::Key { command: KeyCommand::New { out, admit } } => {
            let key = sync::keys::WorkerKey::generate();
            key.save(&out)?;
            let public = key.public_hex();
            if let Some(spec_path) = admit {
                let text = std::fs::read_to_string(&spec_path)
                    .with_context(|| format!("cannot read {}", spec_path.display()))?;
                let mut spec =
                    RunSpec::from_toml(&text, &spec_path.display().to_string()).map_err(anyhow::Error::msg)?;
                spec.sync.admitted_keys.push(public.clone());
                let tmp = spec_path.with_extension("toml.partial");
                std::fs::write(&tmp, spec.to_toml())?;
                std::fs::rename(&tmp, &spec_path)?;
                eprintln!("admitted in {}", spec_path.display());
            }
            println!("{public}");
            Ok(())
        }
        Command::Train { store, stop_at } => {
            let store = Store::open(&store)?;
            let (mut trainer, sha) = run::open_trainer(&store)?;
            let total = stop_at.unwrap_or(trainer.spec.train.steps).min(trainer.spec.train.steps);
            let bar = skytrain::progress::bar(total, "train");
            bar.set_position(trainer.step);
            let log = trainer.spec.train.log_every;
            let mut on_step = |s: &skytrain::train::StepStats| {
                bar.set_position(s.step);
                bar.set_message(format!("loss {:.4}", s.loss));
                skytrain::progress::log_every(&bar, s.step, log, || {
                    format!("step {} loss {:.6} lr {:.3e} grad_norm {:.3}", s.step, s.loss, s.lr, s.grad_norm)
                });
            };
            run::train(&store, &mut trainer, &sha, run::TrainOptions { stop_at, on_step: Some(&mut on_step) })?;
            bar.finish_and_clear();
            println!("trained to step {}", trainer.step);
            Ok(())
        }
        Command::Sample { store, prompt, out, steps, guidance, shift, seed, per_prompt, vae, text } => {
            let store = Store::open(&store)?;
            let prompts: Vec<String> = (0..per_prompt).flat_map(|_| prompt.iter().cloned()).collect();
            let spec = run::read_spec(&store)?;
            let model = load_model(&store)?;
            let draw = |text: &skytrain::model::TextCond, null: &skytrain::model::TextCond| match model.config {
                ModelConfig::Tld(_) => sample::at1(&model, text, null, steps, guidance, seed),
                ModelConfig::Dit(_) => {
                    sample::euler(&model, text, null, sample::Euler { steps, guidance, shift }, seed)
                }
            };
            let images = match (vae, text) {
                (Some(vae), Some(text)) => {
                    // The frozen encoders the run's data was encoded with (see `skytrain encode`).
                    let vae = skytrain::encode::Vae::load(&vae)?;
                    let enc = skytrain::encode::TextEncoder::load(&text, Some(spec.model.text_shape().0 as usize))?;
                    let cond = |texts: &[String]| -> Result<skytrain::model::TextCond> {
                        let (tokens, pooled) = enc.encode(texts)?;
                        Ok(skytrain::model::TextCond { tokens, pooled })
                    };
                    let lat = draw(&cond(&prompts)?, &cond(&[String::new()])?);
                    (vae.decode(&lat.to_device(tch::Device::Cpu)) + 1.0) / 2.0
                }
                _ => {
                    let (ae, enc) = demo_encoders(&store)?;
                    let text = demo::encode_captions(&enc, &prompts)?.to_device(model.device);
                    let null = demo::encode_captions(&enc, &[String::new()])?.to_device(model.device);
                    ae.decode(&draw(&text, &null))
                }
            };
            let png = sample::grid_png(&images, prompt.len() as i64)?;
            std::fs::write(&out, &png).with_context(|| format!("cannot write {}", out.display()))?;
            // Recorded in the run too: the dashboard shows the latest grid, TensorBoard all of them.
            let step = checkpoint::list(&store)?.last().copied().unwrap_or(0);
            store.put(&format!("samples/{step:010}.png"), png.clone())?;
            let mut events = skytrain::observe::tensorboard::EventWriter::new(&store, "samples");
            events.image("samples/grid", step, &png, protocol::now_ms());
            events.flush()?;
            println!("wrote {} (and samples/{step:010}.png in the run)", out.display());
            Ok(())
        }
        Command::Export { store, out } => {
            let store = Store::open(&store)?;
            let (model, ae, _) = load_for_sampling(&store)?;
            let spec = run::read_spec(&store)?;
            let step = *checkpoint::list(&store)?.last().context("no checkpoint")?;
            let metrics = run::read_metrics(&store)?;
            let mut facts_metrics = Vec::new();
            if !metrics.is_empty() {
                let tail = &metrics[metrics.len().saturating_sub(100)..];
                let loss = tail.iter().map(|m| m.stats.loss).sum::<f64>() / tail.len() as f64;
                facts_metrics.push(("final training loss (mean of last 100 steps)".to_string(), format!("{loss:.4}")));
            }
            if let Some(f) = store.get_opt("eval/fidelity.json")? {
                let f: serde_json::Value = serde_json::from_slice(&f).context("eval/fidelity.json")?;
                facts_metrics.push(("prompt fidelity, all checks".to_string(), format!("{}", f["all"])));
            }
            let wall = match (metrics.first(), metrics.last()) {
                (Some(a), Some(b)) => chrono::DateTime::parse_from_rfc3339(&b.time)
                    .and_then(|t1| {
                        chrono::DateTime::parse_from_rfc3339(&a.time)
                            .map(|t0| (t1 - t0).num_milliseconds() as f64 / 1e3)
                    })
                    .unwrap_or(0.0),
                _ => 0.0,
            };
            let data =
                skytrain::train::LatentSet::from_safetensors(&store.get(&spec.data.latents)?, &spec.data.latents)?;
            let facts = export::RunFacts {
                run_name: spec.name,
                steps: step,
                recipe: spec.train.describe(),
                hardware: format!("{} (as trained)", spec.train.device),
                wall_time_s: wall,
                metrics: facts_metrics,
                data: vec![demo::data_source(data.len())],
                extra_files: vec![("autoencoder.safetensors".into(), ae.to_safetensors())],
            };
            export::export(&model, &facts, &out)?;
            println!("exported {}", out.display());
            Ok(())
        }
        Command::Inspect { config, weights } => {
            let cfg = ModelConfig::load(&config).map_err(anyhow::Error::msg)?;
            let mut model = Model::new(&cfg, tch::Device::Cpu).map_err(anyhow::Error::msg)?;
            let bytes =
                std::fs::read(&weights).with_context(|| format!("cannot read weights {}", weights.display()))?;
            model.load_safetensors(&bytes, &weights.display().to_string())?;
            let [c, s, _] = cfg.latent_shape();
            let (l, t) = cfg.text_shape();
            let text = skytrain::model::TextCond {
                tokens: tch::Tensor::zeros([1, l, t], (tch::Kind::Float, tch::Device::Cpu)),
                pooled: tch::Tensor::zeros([1, t], (tch::Kind::Float, tch::Device::Cpu)),
            };
            let x = tch::Tensor::zeros([1, c, s, s], (tch::Kind::Float, tch::Device::Cpu));
            let out = tch::no_grad(|| model.forward(&x, &tch::Tensor::from_slice(&[0.5f32]), &text));
            println!(
                "{}: {} parameters loaded; forward ok, output {:?} mean {:.6} std {:.6}",
                weights.display(),
                model.num_params(),
                out.size(),
                out.mean(tch::Kind::Float).double_value(&[]),
                out.std(true).double_value(&[])
            );
            Ok(())
        }
        Command::BenchStep { model, batch, warmup, steps, threads, device, bf16, dump } => {
            let cfg = ModelConfig::load(&model).map_err(anyhow::Error::msg)?;
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let device = skytrain::train::parse_device(&device).map_err(anyhow::Error::msg)?;
            skytrain::train::check_device(device).map_err(anyhow::Error::msg)?;
            let opts = skytrain::bench::StepBenchOptions { batch, warmup, steps, device, bf16, dump: dump.as_deref() };
            let r = skytrain::bench::train_step(&model, &cfg, &opts)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Fidelity { store, images, steps, guidance, shift, seed } => {
            let store = Store::open(&store)?;
            let (model, ae, enc) = load_for_sampling(&store)?;
            let captions = demo::eval_captions(images, seed);
            let sampler = sample::Euler { steps, guidance, shift };
            let f = demo::measure_fidelity(&model, &ae, &enc, &captions, sampler, seed + 7)?;
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }
        Command::EvalLoss { store, val_store, samples } => {
            let store = Store::open(&store)?;
            let spec = run::read_spec(&store)?;
            let mut model = Model::new(&spec.model, tch::Device::Cpu).map_err(anyhow::Error::msg)?;
            let (source, bytes) = match protocol::latest_commit(&store)? {
                Some(c) if c.round > 0 => (c.model_key.clone(), store.get_verified(&c.model_key, &c.model_sha256)?),
                _ => {
                    let step = *checkpoint::list(&store)?.last().context("no commit and no checkpoint")?;
                    (
                        format!("{}/model.safetensors", checkpoint::dir(step)),
                        checkpoint::read_file(&store, step, "model.safetensors")?,
                    )
                }
            };
            model.load_safetensors(&bytes, &source)?;
            let val = Store::open(&val_store)?;
            let set =
                skytrain::train::LatentSet::from_safetensors(&val.get("data/latents.safetensors")?, "validation set")?;
            let loss = skytrain::train::validation_loss(&model, &set, samples, 1234);
            println!(
                "{}",
                serde_json::json!({ "weights": source, "validation_loss": loss, "samples": samples.min(set.len() as i64) })
            );
            Ok(())
        }
        Command::DemoData { store, images, seed } => {
            let store = Store::open(&store)?;
            let model = ModelConfig::named("dit-tiny").unwrap();
            demo::prepare_data(&store, &model, images, seed)?;
            println!("{images} images curated and encoded into {}", store.url());
            Ok(())
        }
        Command::Models => {
            for name in ModelConfig::NAMES {
                let cfg = ModelConfig::named(name).unwrap();
                let m = tch::no_grad(|| Model::new(&cfg, tch::Device::Cpu)).map_err(anyhow::Error::msg)?;
                println!("{name:10} {:>14} parameters", m.num_params());
            }
            Ok(())
        }
    }
}

/// The EMA model of a run's latest checkpoint plus the demo encoders stored with the run.
/// The EMA weights of a run's latest checkpoint.
fn load_model(store: &Store) -> Result<Model> {
    let spec = run::read_spec(store)?;
    let Some(&step) = checkpoint::list(store)?.last() else {
        bail!("{}: no complete checkpoint (checkpoints/*/MANIFEST.json) yet", store.url())
    };
    let mut model = Model::new(&spec.model, tch::Device::Cpu).map_err(anyhow::Error::msg)?;
    let ema = checkpoint::read_file(store, step, "ema.safetensors")?;
    model.load_safetensors(&ema, &format!("{}/{}/ema.safetensors", store.url(), checkpoint::dir(step)))?;
    Ok(model)
}

/// The embedded demo's autoencoder and text encoder, as its run stored them.
fn demo_encoders(store: &Store) -> Result<(demo::autoencoder::PatchPca, demo::text::WordEncoder)> {
    if !store.exists(demo::AUTOENCODER_KEY)? {
        anyhow::bail!(
            "this run has no built-in autoencoder ({}): for runs on encoded shards pass --vae and --text",
            demo::AUTOENCODER_KEY
        );
    }
    let enc = demo::Encoders::load(store)?;
    Ok((enc.autoencoder, enc.text))
}

fn load_for_sampling(store: &Store) -> Result<(Model, demo::autoencoder::PatchPca, demo::text::WordEncoder)> {
    let (ae, enc) = demo_encoders(store)?;
    Ok((load_model(store)?, ae, enc))
}

fn run_command(command: RunCommand) -> Result<()> {
    match command {
        RunCommand::Init { spec, store } => {
            let text =
                std::fs::read_to_string(&spec).with_context(|| format!("cannot read run spec {}", spec.display()))?;
            let spec = RunSpec::from_toml(&text, &spec.display().to_string()).map_err(anyhow::Error::msg)?;
            run::init(&Store::open(&store)?, &spec)?;
            println!("run `{}` initialised in {store}", spec.name);
            Ok(())
        }
        RunCommand::Status { store } => {
            let store = Store::open(&store)?;
            let spec = run::read_spec(&store)?;
            let latest = protocol::latest_commit(&store)?;
            println!("run `{}`: {} rounds of {} inner steps", spec.name, spec.sync.rounds, spec.sync.inner_steps);
            match &latest {
                None => println!("no round committed yet"),
                Some(c) => println!(
                    "round {} committed ({}), {} accepted, {} rejected, loss {}",
                    c.round,
                    c.closed_by,
                    c.accepted.len(),
                    c.rejected.len(),
                    c.mean_loss.map_or("-".into(), |l| format!("{l:.4}"))
                ),
            }
            let now = protocol::now_ms();
            for h in protocol::read_heartbeats(&store)? {
                println!(
                    "worker {:20} last seen {:>6.1} s ago, round {:?}, {:.1} samples/s, {}",
                    h.worker,
                    now.saturating_sub(h.last_seen_ms) as f64 / 1e3,
                    h.round,
                    h.samples_per_s.unwrap_or(0.0),
                    h.hardware
                );
            }
            Ok(())
        }
        RunCommand::Rounds { store } => {
            let store = Store::open(&store)?;
            let mut r = 1;
            while let Some(c) = protocol::read_commit(&store, r)? {
                let plan = protocol::read_plan(&store, r)?.context("committed round without a plan")?;
                let mut inner = serde_json::Map::new();
                for (name, rec) in protocol::read_records(&store, r)? {
                    if let Ok(rec) = rec {
                        inner.insert(name, serde_json::json!(rec.inner_seconds));
                    }
                }
                let line = serde_json::json!({
                    "round": r,
                    "planned_ms": plan.created_ms,
                    "committed_ms": c.committed_ms,
                    "members": plan.members.iter().map(|m| m.worker.clone()).collect::<Vec<_>>(),
                    "inner_seconds": inner,
                    "bytes": c.accepted.iter().map(|a| a.bytes).sum::<u64>(),
                    "mean_loss": c.mean_loss,
                    "closed_by": c.closed_by,
                });
                println!("{line}");
                r += 1;
            }
            Ok(())
        }
        RunCommand::Verify { store } => {
            let n = sync::coordinator::verify_history(&Store::open(&store)?)?;
            println!("{n} committed rounds replayed from genesis: every model hash matches its commit");
            Ok(())
        }
    }
}
