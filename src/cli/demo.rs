//! `demo`, `demo-data` and `fidelity`: the embedded pipeline, a client of the core. The library
//! runs the pipeline; this file holds its flags, draws its progress and starts its workers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use indicatif::ProgressBar;

use skytrain::config::ModelConfig;
use skytrain::data::encode::frozen::{FrozenEncoders, ImageCodec, TextCodec};
use skytrain::demo::{self, DemoHost, DemoOptions};
use skytrain::store::Store;
use skytrain::train::run;
use skytrain::{run_model, sample};

/// `encoders_from`: a store whose encoders to use instead of fitting new ones (a held-out set for
/// `eval-loss` must be in the training data's latent coordinates).
pub fn demo_data(store: &str, images: usize, seed: u64, encoders_from: Option<&str>) -> Result<()> {
    let store = Store::create(store)?;
    match encoders_from {
        Some(from) => demo::prepare_held_out(&store, &Store::open(from)?, images, seed)?,
        None => {
            let model = ModelConfig::named("dit-tiny").expect("a named config");
            demo::prepare_data(&store, &model, images, seed)?;
        }
    }
    println!("{images} images curated and encoded into {}", store.url());
    Ok(())
}

/// Prompt fidelity of a run on the demo's shapes data (its model and its fitted encoders).
pub fn fidelity(store: &str, images: usize, sampler: sample::Euler, seed: u64) -> Result<()> {
    let store = Store::open(store)?;
    let spec = run::read_spec(&store)?;
    let rm = run_model::latest_model(&store, &spec)?;
    let mut model = skytrain::model::Model::new(&spec.model, tch::Device::Cpu).map_err(anyhow::Error::msg)?;
    model.load_safetensors(&rm.weights, &rm.key)?;
    let (data, record, _) = run::data_record(&store, &spec)?;
    let FrozenEncoders { image: ImageCodec::Patch(ae), text: TextCodec::Words(enc) } =
        FrozenEncoders::from_store(&data, &record)?
    else {
        bail!(
            "{}: prompt fidelity checks the demo's shapes; this run's data was encoded with other encoders",
            store.url()
        )
    };
    let captions = demo::eval_captions(images, seed);
    let f = demo::measure_fidelity(&model, &ae, &enc, &captions, sampler, seed + 7)?;
    println!("{}", serde_json::to_string(&f)?);
    Ok(())
}

/// `skytrain demo`'s flags; defaults are `DemoOptions::default()`, the measured recipe.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Store the demo run lives in (local folder or s3://bucket/prefix).
    #[arg(long, default_value = "runs/demo")]
    pub store: String,
    /// Folder for the sample grid and the exported model.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// Images drawn for the training set.
    #[arg(long, default_value_t = DemoOptions::default().images)]
    pub images: usize,
    /// Optimizer steps (in all, over the workers when `workers` > 0); fidelity rises steeply with
    /// sequential steps (BENCHMARKS.md, "Demo").
    #[arg(long, default_value_t = DemoOptions::default().steps)]
    pub steps: u64,
    /// Batch size (per worker).
    #[arg(long, default_value_t = DemoOptions::default().batch_size)]
    pub batch_size: i64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Held-out captions the prompt fidelity is measured on.
    #[arg(long, default_value_t = DemoOptions::default().eval_images)]
    pub eval_images: usize,
    /// Local DiLoCo workers (0: train in this one process, with checkpoints). With 2, the same
    /// compute reaches about half the fidelity: each worker takes half the sequential steps.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Inner steps per DiLoCo round (H) when `workers` > 0.
    #[arg(long, default_value_t = DemoOptions::default().inner_steps)]
    pub inner_steps: u64,
    /// Training device (`cpu`, `cuda`); local workers share it.
    #[arg(long, default_value = "cpu")]
    pub device: skytrain::config::Device,
    /// libtorch CPU threads for single-process training (0: libtorch's default; workers use 1 each).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Model replicas on their own threads for single-process training (see `train.replicas`).
    #[arg(long, default_value_t = 1)]
    pub replicas: i64,
    /// A named model configuration or a config file; its latents must be C×16×16.
    #[arg(long, default_value = "dit-tiny")]
    pub model: String,
    /// Matmul precision (`bf16`, `f32`); by default the demo times a few steps of each on this
    /// machine and trains in the faster.
    #[arg(long)]
    pub precision: Option<String>,
}

impl DemoArgs {
    fn options(self) -> Result<DemoOptions> {
        use skytrain::config::Precision;
        let precision = match self.precision.as_deref() {
            None => None,
            Some("bf16") => Some(Precision::Bf16),
            Some("f32") => Some(Precision::F32),
            Some(other) => bail!("--precision `{other}`: expected bf16 or f32"),
        };
        Ok(DemoOptions {
            store: self.store,
            out: self.out,
            images: self.images,
            steps: self.steps,
            batch_size: self.batch_size,
            seed: self.seed,
            eval_images: self.eval_images,
            workers: self.workers,
            inner_steps: self.inner_steps,
            device: self.device,
            threads: self.threads,
            replicas: self.replicas,
            model: self.model,
            precision,
            ..DemoOptions::default()
        })
    }
}

/// The terminal: lines on stdout, a progress bar (or a log line every 250 steps / 5 rounds), and
/// workers started as `skytrain work` processes of this executable.
struct Terminal {
    bar: std::sync::Mutex<Option<ProgressBar>>,
}

impl Terminal {
    fn with_bar(&self, len: u64, what: &str, f: impl FnOnce(&ProgressBar)) {
        let mut bar = self.bar.lock().unwrap();
        let bar = bar.get_or_insert_with(|| super::progress::bar(len, what));
        f(bar);
        if bar.position() >= len {
            bar.finish_and_clear();
        }
    }
}

impl DemoHost for Terminal {
    fn say(&self, line: &str) {
        if let Some(bar) = self.bar.lock().unwrap().take() {
            bar.finish_and_clear();
        }
        println!("{line}");
    }

    fn step(&self, s: &skytrain::train::StepStats, total: u64) {
        self.with_bar(total, "train", |bar| {
            bar.set_position(s.step);
            bar.set_message(format!("loss {:.4}", s.loss));
            super::progress::log_every(bar, s.step, 250, || {
                format!("step {} loss {:.4} lr {:.2e}", s.step, s.loss, s.lr)
            });
        });
    }

    fn round(&self, c: &skytrain::sync::protocol::Commit, rounds: u64) {
        let bytes: u64 = c.accepted.iter().map(|a| a.bytes).sum();
        let loss = c.mean_loss.map_or("-".into(), |l| format!("{l:.4}"));
        self.with_bar(rounds, "rounds", |bar| {
            bar.set_position(c.round);
            bar.set_message(format!("members {} loss {loss} up {:.1} MB", c.accepted.len(), bytes as f64 / 1e6));
            if bar.is_hidden() && (c.round.is_multiple_of(5) || !c.rejected.is_empty()) {
                eprintln!(
                    "round {}: {} accepted, {} rejected, loss {loss}, {:.1} MB uploaded",
                    c.round,
                    c.accepted.len(),
                    c.rejected.len(),
                    bytes as f64 / 1e6
                );
            }
        });
    }

    fn launch_worker(&self, store: &str, name: &str, key: &Path) -> std::io::Result<std::process::Child> {
        std::process::Command::new(std::env::current_exe()?)
            .args(["work", "--store", store, "--name", name, "--key"])
            .arg(key)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
    }
}

pub fn demo(args: DemoArgs) -> Result<()> {
    let host: Arc<dyn DemoHost> = Arc::new(Terminal { bar: std::sync::Mutex::new(None) });
    demo::run_demo(&args.options()?, host)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, FromArgMatches};

    /// The command line's defaults are the library's (the demo's measured recipe).
    #[test]
    fn default_flags_are_the_measured_recipe() {
        let matches = DemoArgs::augment_args(clap::Command::new("demo")).get_matches_from(["demo"]);
        let opts = DemoArgs::from_arg_matches(&matches).unwrap().options().unwrap();
        let d = DemoOptions::default();
        assert_eq!((opts.steps, opts.batch_size, opts.workers, opts.replicas), (9_000, 16, 0, 1));
        assert_eq!((opts.images, opts.eval_images, opts.inner_steps), (d.images, d.eval_images, d.inner_steps));
        assert_eq!((opts.sampler, opts.model.as_str(), opts.store.as_str()), (d.sampler, "dit-tiny", "runs/demo"));
        assert_eq!(opts.precision, None, "measured by default");
    }
}
