//! Commands on a run's model: `sample`, `export`, `eval-loss`, and the developer verbs `inspect`,
//! `models`, `bench-step`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use skytrain::config::{DataConfig, ModelConfig};
use skytrain::data::encode::frozen::FrozenEncoders;
use skytrain::data::manifest::{latents_record_key, LatentsRecord};
use skytrain::model::Model;
use skytrain::store::Store;
use skytrain::train::{checkpoint, run};
use skytrain::{export, run_model, sample};

/// The model of the run in `store` (see `run_model`), on the CPU.
fn model_of_run(store: &Store) -> Result<(skytrain::config::RunSpec, Model, run_model::RunModel)> {
    let spec = run::read_spec(store)?;
    let rm = run_model::latest_model(store, &spec)?;
    let mut model = Model::new(&spec.model, tch::Device::Cpu).map_err(anyhow::Error::msg)?;
    model.load_safetensors(&rm.weights, &format!("{}/{}", store.url(), rm.key))?;
    Ok((spec, model, rm))
}

#[derive(Args)]
pub struct SampleArgs {
    /// The run to sample (its newest checkpoint or committed round)…
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub store: Option<String>,
    /// …or an exported model folder (`skytrain export`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    #[arg(long, default_value = "grid.png")]
    pub out: PathBuf,
    #[arg(long, default_value_t = sample::DEFAULT_EULER.steps)]
    pub steps: usize,
    #[arg(long, default_value_t = sample::DEFAULT_EULER.guidance)]
    pub guidance: f64,
    /// Time shift of the Euler sampler's σ grid (1: uniform; `dit` models).
    #[arg(long, default_value_t = sample::DEFAULT_EULER.shift)]
    pub shift: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per prompt.
    #[arg(long, default_value_t = 4)]
    pub per_prompt: usize,
    /// Image width in pixels (a `dit` model samples any multiple of decoder scale × patch; default:
    /// the model's own size).
    #[arg(long, requires = "height")]
    pub width: Option<i64>,
    /// Image height in pixels.
    #[arg(long, requires = "width")]
    pub height: Option<i64>,
    /// Overrides the encoders the run's data records: a diffusers AutoencoderKL folder…
    #[arg(long, requires = "text", requires = "store")]
    pub vae: Option<PathBuf>,
    /// …and a transformers text-encoder folder (prompts are encoded to the model's token length).
    #[arg(long, requires = "vae")]
    pub text: Option<PathBuf>,
    /// Also keep the grid in the run, as `samples/adhoc/<unix ms>.png` and a TensorBoard image
    /// (run `samples-adhoc`) at the model's step (needs write access); without it sampling reads only.
    #[arg(long, requires = "store")]
    pub record: bool,
}

pub fn sample(a: SampleArgs) -> Result<()> {
    let (model, encoders, store) = match (&a.store, &a.model) {
        (Some(location), _) => {
            let store = Store::open(location)?;
            let (spec, model, rm) = model_of_run(&store)?;
            let encoders = match (&a.vae, &a.text) {
                (Some(vae), Some(text)) => {
                    let (tokens, _) = spec.model.text_shape();
                    FrozenEncoders::from_folders(vae, text, Some(tokens as usize))?
                }
                _ => {
                    let (data, record, _) = run::data_record(&store, &spec)?;
                    FrozenEncoders::from_store(&data, &record)?
                }
            };
            (model, encoders, Some((store, rm.steps)))
        }
        (None, Some(dir)) => {
            let (model, encoders) = export::load(dir)?;
            (model, encoders, None)
        }
        (None, None) => unreachable!("clap requires --store or --model"),
    };
    let prompts: Vec<String> = (0..a.per_prompt).flat_map(|_| a.prompt.iter().cloned()).collect();
    let sampler = sample::Euler { steps: a.steps, guidance: a.guidance, shift: a.shift };
    let latent_hw = match (a.width, a.height) {
        (Some(w), Some(h)) => Some(sample::latent_size_for(&model, &encoders, w, h).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let images = sample::prompts_to_images(&model, &encoders, &prompts, sampler, a.seed, latent_hw)?;
    let png = sample::grid_png(&images, a.prompt.len() as i64)?;
    std::fs::write(&a.out, &png).with_context(|| format!("cannot write {}", a.out.display()))?;
    match store.filter(|_| a.record) {
        Some((store, step)) => {
            let now = skytrain::sync::protocol::now_ms();
            let key = format!("samples/adhoc/{now}.png");
            store.put_create(&key, png.clone())?;
            let mut events = skytrain::observe::tensorboard::EventWriter::new(&store, "samples-adhoc");
            events.image("samples/adhoc", step, &png, now);
            events.flush()?;
            println!("wrote {} (and {key} and a TensorBoard image at step {step} in the run)", a.out.display());
        }
        None => println!("wrote {}", a.out.display()),
    }
    Ok(())
}

pub fn export(store: &str, out: &std::path::Path) -> Result<()> {
    let store = Store::open(store)?;
    let (spec, model, rm) = model_of_run(&store)?;
    let publication = export::collect(&store, &spec, &rm)?;
    export::export(&model, &publication, out)?;
    println!(
        "exported {} ({}; card licence {})",
        out.display(),
        publication.facts.weights,
        export::card_licence(&publication.provenance.licences)
    );
    Ok(())
}

/// Validation loss of a run's raw weights (the last written commit's θ, else the latest checkpoint's
/// model, not its EMA) on a held-out cached-latents set.
pub fn eval_loss(store_arg: &str, val_store: &str, samples: i64) -> Result<()> {
    let store = Store::open(store_arg)?;
    let spec = run::read_spec(&store)?;
    let mut model = Model::new(&spec.model, tch::Device::Cpu).map_err(anyhow::Error::msg)?;
    let (source, bytes) = match skytrain::sync::protocol::latest_state_commit(&store)? {
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
    let val = Store::open(val_store)?;
    let val_key = DataConfig::default().latents;
    let (_, run_encoders, _) = run::data_record(&store, &spec)
        .context("reading the encoders of the run's training data, to check the validation set's")?;
    let record_key = latents_record_key(&val_key);
    let val_encoders = serde_json::from_slice::<LatentsRecord>(&val.get(&record_key)?)
        .with_context(|| format!("{}/{record_key}: not a cached-latents record", val.url()))?
        .encoders;
    if let Some(why) = run_encoders.mismatch(&val_encoders) {
        bail!(
            "{}/{val_key} was encoded with other encoders than the run's training data ({why}): its \
             losses are in other coordinates; encode it with the run's (`demo-data --encoders-from {store_arg}`)",
            val.url(),
        );
    }
    let set = skytrain::train::LatentSet::from_safetensors(&val.get(&val_key)?, "validation set")?;
    let loss = skytrain::train::validation_loss(&model, &set, samples, 1234);
    println!(
        "{}",
        serde_json::json!({ "weights": source, "validation_loss": loss, "samples": samples.min(set.len() as i64) })
    );
    Ok(())
}

/// Loads a weights file into a model config and runs one forward pass (checks a conversion).
pub fn inspect(config: &str, weights: &std::path::Path) -> Result<()> {
    let cfg = ModelConfig::load(config).map_err(anyhow::Error::msg)?;
    let mut model = Model::new(&cfg, tch::Device::Cpu).map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(weights).with_context(|| format!("cannot read weights {}", weights.display()))?;
    model.load_safetensors(&bytes, &weights.display().to_string())?;
    let (shape, mean, std) = model.probe_forward();
    println!(
        "{}: {} parameters loaded; forward ok, output {shape:?} mean {mean:.6} std {std:.6}",
        weights.display(),
        model.num_params(),
    );
    Ok(())
}

pub fn models() -> Result<()> {
    for name in ModelConfig::NAMES {
        let cfg = ModelConfig::named(name).unwrap();
        let m = tch::no_grad(|| Model::new(&cfg, tch::Device::Cpu)).map_err(anyhow::Error::msg)?;
        println!("{name:10} {:>14} parameters", m.num_params());
    }
    Ok(())
}

#[derive(Args)]
pub struct BenchStepArgs {
    #[arg(long, default_value = "dit-bench")]
    pub model: String,
    #[arg(long, default_value_t = 8)]
    pub batch: i64,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// CPU threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    #[arg(long, default_value = "cpu")]
    pub device: skytrain::config::Device,
    /// bf16 matmuls/attention (for CUDA).
    #[arg(long)]
    pub bf16: bool,
    /// Writes init weights, batch and config here for the PyTorch reference.
    #[arg(long)]
    pub dump: Option<PathBuf>,
}

pub fn bench_step(a: BenchStepArgs) -> Result<()> {
    let cfg = ModelConfig::load(&a.model).map_err(anyhow::Error::msg)?;
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    let device = skytrain::train::tch_device(a.device);
    skytrain::train::check_device(device).map_err(anyhow::Error::msg)?;
    let opts = skytrain::bench::StepBenchOptions {
        batch: a.batch,
        warmup: a.warmup,
        steps: a.steps,
        device,
        bf16: a.bf16,
        dump: a.dump.as_deref(),
    };
    let r = skytrain::bench::train_step(&a.model, &cfg, &opts)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
