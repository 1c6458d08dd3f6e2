//! The data commands of the `skytrain` binary: curate, encode, and dataset inspection.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::progress;
use skytrain::data::curate::{self, CurateOptions, Fetcher, ImageFormat};
use skytrain::data::licence::Allowlist;
use skytrain::store::Store;

#[derive(Args)]
pub struct CurateArgs {
    /// Metadata table: `.jsonl` or `.parquet` with id, image, caption, licence, author, source.
    pub table: PathBuf,
    /// Where the shards go (local folder or s3://bucket/prefix).
    #[arg(long)]
    pub out: String,
    /// Output side in pixels; with --buckets, the side of the square each bucket's area matches.
    #[arg(long, default_value_t = 256)]
    pub resolution: u32,
    /// Aspect-ratio buckets instead of a square centre crop: `auto` (sizes of about
    /// resolution² pixels, sides multiples of --bucket-step, aspect up to --bucket-max-aspect), or
    /// a list of WIDTHxHEIGHT sizes (`64x64,96x48,48x96`). Each image goes to the bucket nearest
    /// its aspect ratio.
    #[arg(long)]
    pub buckets: Option<String>,
    /// How an image fits its bucket: `crop` the small remainder, or `pad` with white.
    #[arg(long, value_enum, default_value = "crop", requires = "buckets")]
    pub bucket_fit: BucketFit,
    /// With `--buckets auto`: widest aspect ratio (width/height and height/width).
    #[arg(long, default_value_t = 2.0, requires = "buckets")]
    pub bucket_max_aspect: f64,
    /// With `--buckets auto`: bucket sides are multiples of this many pixels (the image encoder's
    /// factor × the model's patch size: 8 × 2 for an SD VAE and a patch-2 DiT).
    #[arg(long, default_value_t = 16, requires = "buckets")]
    pub bucket_step: u32,
    /// Drop images whose shorter side is below this (default: half the resolution).
    #[arg(long)]
    pub min_side: Option<u32>,
    #[arg(long, default_value_t = 1000)]
    pub shard_size: usize,
    /// Comma-separated licence families (any version): e.g. cc0,pdm,cc-by,cc-by-sa,apache-2.0.
    #[arg(long, default_value = "cc0,pdm,cc-by,cc-by-sa")]
    pub allow: String,
    #[arg(long, value_enum, default_value = "png")]
    pub format: Format,
    /// Near-duplicate radius in bits of the content's 64-bit difference hash (0 disables, at most
    /// 3); the silhouettes must match too.
    #[arg(long, default_value_t = CurateOptions::default().near_duplicate_bits)]
    pub near_duplicate_bits: u32,
    /// Keep recoloured variants (same drawing, other mean colour, e.g. emoji skin tones) as
    /// distinct images instead of dropping them as near duplicates.
    #[arg(long)]
    pub keep_colour_variants: bool,
    #[arg(long, default_value = "shard")]
    pub prefix: String,
    /// Remake every shard, even where the output holds finished ones (e.g. made with other options).
    #[arg(long)]
    pub redo: bool,
    /// Most memory one image's decoder may allocate, MiB; larger images are dropped as `too_large`.
    #[arg(long, default_value_t = CurateOptions::default().max_decode_mb)]
    pub max_decode_mb: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BucketFit {
    Crop,
    Pad,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Png,
    Jpg,
}

pub fn curate(a: CurateArgs) -> Result<()> {
    use skytrain::data::buckets::{Buckets, Fit};
    let rows = curate::read_table(&a.table)?;
    let fit = match a.bucket_fit {
        BucketFit::Crop => Fit::Crop,
        BucketFit::Pad => Fit::Pad,
    };
    let buckets = match a.buckets.as_deref() {
        None => None,
        Some("auto") => Some(Buckets::auto(a.resolution, a.bucket_step, a.bucket_max_aspect, fit)),
        Some(list) => Some(Buckets::parse(list, fit)),
    }
    .transpose()
    .map_err(anyhow::Error::msg)
    .context("--buckets")?;
    let opts = CurateOptions {
        resolution: a.resolution,
        buckets,
        min_side: a.min_side.unwrap_or(a.resolution / 2),
        shard_size: a.shard_size,
        allow: Allowlist::parse(&a.allow).map_err(anyhow::Error::msg).context("--allow")?,
        format: match a.format {
            Format::Png => ImageFormat::Png,
            Format::Jpg => ImageFormat::Jpg,
        },
        near_duplicate_bits: a.near_duplicate_bits,
        keep_colour_variants: a.keep_colour_variants,
        prefix: a.prefix,
        redo: a.redo,
        max_decode_mb: a.max_decode_mb,
    };
    let out = Store::create(&a.out)?;
    let base = a.table.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let fetcher = Fetcher::new(&base);
    let bar = progress::bar(rows.len() as u64, "curate");
    let done = std::sync::atomic::AtomicU64::new(0);
    let on_row = |n: u64| {
        bar.inc(n);
        let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        progress::log_every(&bar, d, 1000, || format!("curate: {d}/{} rows", rows.len()));
    };
    let source = a.table.display().to_string();
    let m = curate::curate(&rows, &source, &fetcher, &out, &opts, &on_row)?;
    bar.finish_and_clear();
    let stats = m.curation.as_ref().expect("curation stats");
    println!("{} rows -> {} samples in {} shards at {}", stats.rows, stats.kept, m.shards.len(), out.url());
    for (reason, n) in &stats.dropped {
        println!("  dropped {n:>6} ({reason})");
    }
    for (l, n) in &stats.licences {
        println!("  kept    {n:>6} {l}");
    }
    if let Some(k) = &stats.area_kept {
        println!(
            "  image area kept after resizing: mean {:.1}%, worst tenth ≤ {:.1}%, min {:.1}%",
            100.0 * k.mean,
            100.0 * k.p10,
            100.0 * k.min
        );
    }
    if m.buckets.is_some() {
        let mut per: std::collections::BTreeMap<&str, u64> = Default::default();
        for s in &m.shards {
            for (b, n) in &s.buckets {
                *per.entry(b).or_default() += n;
            }
        }
        let list: Vec<String> = per.iter().map(|(b, n)| format!("{b}: {n}")).collect();
        println!("  buckets {}", list.join(", "));
    }
    if let Some(d) = &m.dropped {
        println!("  every dropped row, with its reason: {}/{d}", out.url());
    }
    Ok(())
}

#[derive(Args)]
pub struct EncodeArgs {
    /// A curated (raw) dataset: local folder or s3://bucket/prefix with manifest.json.
    pub input: String,
    /// Where the encoded shards go.
    #[arg(long)]
    pub out: String,
    /// diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors), or a
    /// pipeline folder with a `vae/` subfolder.
    #[arg(long, required_unless_present = "fit", requires = "text")]
    pub vae: Option<PathBuf>,
    /// Text encoder folder (transformers layout: config.json, model.safetensors, tokenizer.json):
    /// CLIP text model or BERT/MiniLM.
    #[arg(long, requires = "vae")]
    pub text: Option<PathBuf>,
    /// Instead of downloaded encoders, fit skytrain's own on this dataset: a patch-PCA
    /// autoencoder (2×2 patches) on its images and a word encoder over its captions' vocabulary.
    #[arg(long, conflicts_with_all = ["vae", "text", "max_tokens", "sample_posterior"])]
    pub fit: bool,
    /// With --fit: latent channels of the autoencoder.
    #[arg(long, default_value_t = skytrain::data::encode::FitOptions::default().latent_channels, requires = "fit")]
    pub latent_channels: i64,
    /// With --fit: width of the word encoder's token embeddings.
    #[arg(long, default_value_t = skytrain::data::encode::FitOptions::default().text_dim, requires = "fit")]
    pub text_dim: usize,
    /// Tokens per caption (default: what the longest caption needs, at most the encoder's own
    /// length, 77 for CLIP).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Sample the VAE posterior (noise from --seed and the sample key) instead of its mean.
    #[arg(long)]
    pub sample_posterior: bool,
    /// Re-encode every shard, even where the output holds finished ones (e.g. other encoders).
    #[arg(long)]
    pub redo: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// libtorch threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
}

pub fn encode(a: EncodeArgs) -> Result<()> {
    use skytrain::data::encode::{self, EncodeOptions, Encoders, FitOptions};
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    let input = Store::open(&a.input)?;
    let out = Store::create(&a.out)?;
    let enc = match (&a.vae, &a.text) {
        (Some(vae), Some(text)) => {
            let mut enc = Encoders::load(vae, text, a.max_tokens)?;
            if a.max_tokens.is_none() {
                let len = enc.fit_token_length(&input)?;
                eprintln!("encode: captions need at most {len} tokens; encoding to {len} (--max-tokens overrides)");
            }
            enc
        }
        _ => {
            let fit = FitOptions { latent_channels: a.latent_channels, text_dim: a.text_dim, ..FitOptions::default() };
            Encoders::fit(&input, &fit)?
        }
    };
    let opts = EncodeOptions {
        batch: a.batch,
        dtype: a.dtype.parse().map_err(anyhow::Error::msg).context("--dtype")?,
        sample_posterior: a.sample_posterior,
        seed: a.seed,
        redo: a.redo,
    };
    let total = skytrain::data::manifest::DatasetManifest::read(&input)?.samples();
    let bar = progress::bar(total, "encode");
    let done = std::sync::atomic::AtomicU64::new(0);
    let t0 = std::time::Instant::now();
    let on = |n: u64| {
        bar.inc(n);
        let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        progress::log_every(&bar, d, 256, || format!("encode: {d}/{total} samples"));
    };
    let m = encode::encode_dataset(&input, &out, &enc, &opts, &on)?;
    bar.finish_and_clear();
    let e = m.encoding.as_ref().expect("encoding");
    let secs = t0.elapsed().as_secs_f64();
    let fresh = done.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{} samples in {} shards at {}: latent {:?}, text {:?}, pooled {} ({:?}); {fresh} encoded now in {secs:.1} s ({:.1} samples/s)",
        m.samples(),
        m.shards.len(),
        out.url(),
        e.latent_shape,
        e.text_shape,
        e.pooled_dim,
        e.dtype,
        fresh as f64 / secs.max(1e-9)
    );
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Writes a manifest for encoded shards written by another tool (e.g. Python webdataset).
    Index {
        store: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// A dataset's manifest summary; `--check` reads every shard and verifies hashes and samples.
    Inspect {
        store: String,
        #[arg(long)]
        check: bool,
    },
    /// Streams positions `start..start+n` through the loader and prints one line per sample
    /// (key), as training would read them.
    Stream {
        store: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        #[arg(long, default_value_t = 16)]
        n: u64,
        #[arg(long, default_value_t = 4)]
        window_shards: usize,
        /// The run's batch size (a bucketed dataset's order is laid out in whole batches).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Seconds a shard may stay unreadable before giving up.
        #[arg(long, default_value_t = 300)]
        patience_s: u64,
    },
    /// Benchmark P3: loader throughput in samples/s delivered as batches of tensors (bench/p3.sh).
    Bench {
        store: String,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 20000)]
        samples: u64,
        #[arg(long, default_value_t = 4)]
        window_shards: usize,
        /// Shards fetched and decoded at once.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
}

pub fn data(cmd: DataCommand) -> Result<()> {
    use skytrain::data::manifest::{index_encoded, DatasetManifest};
    use skytrain::data::stream::{ShardStream, StreamOptions};
    match cmd {
        DataCommand::Index { store, dtype } => {
            let store = Store::open(&store)?;
            let m = index_encoded(&store, dtype.parse().map_err(anyhow::Error::msg).context("--dtype")?)?;
            println!("{} samples in {} shards indexed at {}", m.samples(), m.shards.len(), store.url());
        }
        DataCommand::Inspect { store, check } => {
            let store = Store::open(&store)?;
            let m = DatasetManifest::read(&store)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "kind": m.kind, "samples": m.samples(), "shards": m.shards.len(), "resolution": m.resolution,
                    "buckets": m.buckets, "curation": m.curation, "encoding": m.encoding, "source": m.source,
                }))?
            );
            if check {
                let n = m.check(&store)?;
                println!(
                    "all {} shards verified: {n} samples match the manifest (hashes, counts, shapes, dtypes)",
                    m.shards.len()
                );
            }
        }
        DataCommand::Stream { store, seed, start, n, window_shards, batch, patience_s } => {
            let patience = std::time::Duration::from_secs(patience_s);
            let opts = StreamOptions { seed, window_shards, patience, batch, ..Default::default() };
            let mut s = ShardStream::open(Store::open(&store)?, opts)?;
            let positions: Vec<u64> = (start..start + n).collect();
            for (g, sample) in positions.iter().zip(s.samples(&positions)?) {
                let shape: Vec<String> = sample.latent.shape.iter().map(|d| d.to_string()).collect();
                println!("{g}\t{}\t{}", sample.key, shape.join("x"));
            }
            let d = s.damage();
            if d.samples > 0 {
                eprintln!("skipped {} damaged samples: {:?}", d.samples, d.by_shard);
            }
        }
        DataCommand::Bench { store, batch, samples, window_shards, threads } => {
            bench_loader(&store, batch, samples, window_shards, threads)?
        }
    }
    Ok(())
}

/// Benchmark P3 (skytrain side): the loader delivering batches of tensors, as the trainer gets them.
pub fn bench_loader(store: &str, batch: usize, samples: u64, window_shards: usize, threads: usize) -> Result<()> {
    use skytrain::data::stream::{ShardStream, StreamOptions};
    use skytrain::train::TrainData;
    // The f16 → f32 conversion is the only libtorch work here; idle OpenMP workers would spin.
    tch::set_num_threads(1);
    let opts = StreamOptions { seed: 0, window_shards, threads, batch, ..Default::default() };
    let stream = ShardStream::open(Store::open(store)?, opts)?;
    let null_text = skytrain::model::TextCond {
        tokens: tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)),
        pooled: tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)),
    };
    let mut data = TrainData::Stream { stream: Box::new(stream), null_text };
    let t0 = std::time::Instant::now();
    let mut delivered = 0u64;
    let mut checksum = 0.0;
    while delivered < samples {
        let positions: Vec<u64> = (delivered..delivered + batch as u64).collect();
        let (latents, text) = data.batch(&positions, tch::Device::Cpu)?;
        checksum += latents.double_value(&[0, 0, 0, 0]) + text.pooled.double_value(&[0, 0]);
        delivered += batch as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"samples": delivered, "seconds": secs, "samples_per_s": delivered as f64 / secs, "checksum": checksum})
    );
    Ok(())
}
