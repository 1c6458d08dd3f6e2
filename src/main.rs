//! The `skytrain` command line: parse, then dispatch to `cli/`, one file per command group.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use skytrain::sample;

mod cli;

/// The process's allocator (see `skytrain::allocator` for why mimalloc, and how it reaches libtorch).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use cli::{data, model, ops, run, sync};

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
enum TensorboardCommand {
    Pull {
        #[arg(long)]
        store: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Metadata table -> licence-clean webdataset shards (licence allowlist, dedupe, resize).
    Curate(data::CurateArgs),
    /// Curated shards -> encoded shards (VAE latents + text embeddings as .npy), resumable; the
    /// encoders' files are stored with the dataset.
    Encode(data::EncodeArgs),
    /// Datasets: `index` foreign shards, `inspect` a manifest, `stream` positions through the loader.
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// Akash deployment: `sdl` writes an SDL for a run and a hardware plan.
    Deploy {
        #[command(subcommand)]
        command: ops::DeployCommand,
    },
    /// Spend so far (from the ledger) and forecasts, against the run's budget.
    Cost(ops::CostArgs),
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
    /// The whole pipeline on the embedded dataset (no download, CPU). Measured 2026-11-30 on 2-core
    /// VMs: 8 min 21 s on an AMD EPYC (Zen 4), 9 min 8 s on an Intel Xeon (2.1 GHz), after a cold
    /// `cargo build --release` of 5 min 39 s / ~4 min (README, BENCHMARKS.md).
    Demo(cli::demo::DemoArgs),
    /// The run in a store: `init` (immutable spec), `status`, `verify` (replay the committed rounds).
    Run {
        #[command(subcommand)]
        command: run::RunCommand,
    },
    /// Coordinates DiLoCo rounds (stateless: kill and restart it anywhere).
    Coordinate {
        #[arg(long)]
        store: String,
    },
    /// Joins a run as a DiLoCo worker: trains its share of each round, uploads signed updates.
    Work(sync::WorkArgs),
    /// Worker keys: `new` makes one and can add its public key to a run spec before `run init`.
    Key {
        #[command(subcommand)]
        command: run::KeyCommand,
    },
    /// Trains (or resumes) the run in a store on this machine.
    Train {
        #[arg(long)]
        store: String,
        /// Stop after this many steps in total (checkpointed), even if the spec asks for more.
        #[arg(long)]
        stop_at: Option<u64>,
    },
    /// Text -> image grid from a run's model (newest checkpoint's EMA or committed round) or an
    /// exported folder; reads only, unless `--record`.
    Sample(model::SampleArgs),
    /// Writes a self-contained Hugging Face-style folder from a run's model: weights, config,
    /// encoders, attributions and a model card.
    Export {
        #[arg(long)]
        store: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Lists the named model configurations with their parameter counts.
    Models,
    /// Validation loss of a run's current raw weights on a held-out latent set; prints JSON.
    EvalLoss {
        #[arg(long)]
        store: String,
        /// Store holding the held-out `data/latents.safetensors`, encoded with the run's encoders
        /// (e.g. made by `demo-data --seed 99 --encoders-from STORE`).
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
        /// Encode with this store's encoders instead of fitting new ones (a held-out set for
        /// `eval-loss --val-store`).
        #[arg(long)]
        encoders_from: Option<String>,
    },
    /// Measures prompt fidelity of a demo run's model on held-out random captions.
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
    BenchStep(model::BenchStepArgs),
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
    let command = Cli::parse().command;
    skytrain::libtorch::check_loaded()?;
    match command {
        Command::Demo(args) => cli::demo::demo(args),
        Command::DemoData { store, images, seed, encoders_from } => {
            cli::demo::demo_data(&store, images, seed, encoders_from.as_deref())
        }
        Command::Fidelity { store, images, steps, guidance, shift, seed } => {
            cli::demo::fidelity(&store, images, sample::Euler { steps, guidance, shift }, seed)
        }
        Command::Curate(args) => data::curate(args),
        Command::Encode(args) => data::encode(args),
        Command::Data { command } => data::data(command),
        Command::Run { command } => run::run_command(command),
        Command::Key { command } => run::key(command),
        Command::Train { store, stop_at } => run::train(&store, stop_at),
        Command::Coordinate { store } => sync::coordinate(&store),
        Command::Work(args) => sync::work(args),
        Command::Sample(args) => model::sample(args),
        Command::Export { store, out } => model::export(&store, &out),
        Command::EvalLoss { store, val_store, samples } => model::eval_loss(&store, &val_store, samples),
        Command::Inspect { config, weights } => model::inspect(&config, &weights),
        Command::Models => model::models(),
        Command::BenchStep(args) => model::bench_step(args),
        Command::Deploy { command } => ops::deploy(command),
        Command::Cost(args) => ops::cost_cmd(args),
        Command::Dashboard { store, port, bind } => ops::dashboard(store, port, bind),
        Command::Tensorboard { command: TensorboardCommand::Pull { store, out } } => ops::tensorboard_pull(store, out),
    }
}
