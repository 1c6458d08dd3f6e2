//! `skytrain encode`: raw shards (images + captions) → encoded shards (VAE latents + text
//! embeddings as `.npy`), once, with frozen encoders loaded from Hugging Face layouts.
//!
//! Each output shard mirrors one input shard; its index object (`<shard>.json`) is written after it,
//! so a re-run skips finished shards, and the dataset manifest is written last. Posterior sampling
//! draws its noise from (seed, sample key), so the result does not depend on batching or threads.

pub mod frozen;
pub mod hf;
pub mod patch;
pub mod record;
pub mod text;
pub mod vae;
pub mod words;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use image::DynamicImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::data::buckets::Bucket;
use crate::data::curate::resize_crop;
use crate::data::manifest::{DatasetManifest, Encoding, ManifestError, ShardEntry};
use crate::data::mix_seed;
use crate::data::wds::{npy_bytes, read_shard, write_shard, Array, Dtype, Sample};
use crate::model::weights;
use crate::store::{sha256_hex, Store, StoreError};

use patch::PatchPca;
pub use text::TextEncoder;
pub use vae::Vae;
use words::WordEncoder;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{file}: {reason}")]
    Io { file: String, reason: String },
    #[error("{file}: {reason}")]
    Config { file: String, reason: String },
    #[error("{file}: {reason}")]
    Weights { file: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub batch: usize,
    pub dtype: Dtype,
    /// Sample the VAE posterior (noise from seed and key) instead of taking its mean.
    pub sample_posterior: bool,
    pub seed: u64,
    /// Remake every shard even if the output holds finished ones (made with other options).
    pub redo: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { batch: 32, dtype: Dtype::F16, sample_posterior: false, seed: 0, redo: false }
    }
}

/// A finished encoded shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EncodedIndex {
    /// What made this shard: the encoders (file hashes), the options and the input shard's hash.
    #[serde(default)]
    options: crate::data::manifest::ShardOptions,
    samples: u64,
    bytes: u64,
    sha256: String,
    skipped: Vec<String>,
    /// Samples per bucket (bucketed datasets).
    #[serde(default)]
    buckets: BTreeMap<String, u64>,
}

/// The image sizes a raw dataset holds: one square, or its aspect-ratio buckets.
#[derive(Debug, Clone)]
enum Sizes {
    Square(u32),
    Buckets(Vec<Bucket>),
}

impl Sizes {
    fn of(raw: &DatasetManifest, input: &Store) -> Result<Sizes, EncodeError> {
        let res = raw.resolution.ok_or_else(|| missing_resolution(input))?;
        let Some(names) = &raw.buckets else { return Ok(Sizes::Square(res)) };
        let buckets = names
            .iter()
            .map(|n| {
                Bucket::parse(n).ok_or_else(|| {
                    EncodeError::Invalid(format!("{}/manifest.json: bucket `{n}` is not WIDTHxHEIGHT", input.url()))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Sizes::Buckets(buckets))
    }

    fn all(&self) -> Vec<Bucket> {
        match self {
            Sizes::Square(res) => vec![Bucket::square(*res)],
            Sizes::Buckets(b) => b.clone(),
        }
    }

    /// Refuses sizes the image encoder cannot divide into latent cells.
    fn check_factor(&self, factor: i64, patch_name: &str) -> Result<(), EncodeError> {
        for b in self.all() {
            if b.width as i64 % factor != 0 || b.height as i64 % factor != 0 {
                return Err(EncodeError::Invalid(format!(
                    "image size {b} is not a multiple of the {patch_name}'s factor {factor} in both sides"
                )));
            }
        }
        Ok(())
    }
}

/// A chunk's decoded images by size: (index in the chunk, sample, pixels).
type BySize<'a> = BTreeMap<Bucket, Vec<(usize, &'a Sample, Vec<f32>)>>;

/// An image as the encoder takes it: RGB in [-1, 1], `[3, H, W]`, and its size.
type Pixels = (Vec<f32>, Bucket);

/// Image bytes (png/jpg/webp member) → pixels of one of the dataset's sizes (a square dataset's
/// off-size image is resized and cropped; a bucketed one's must be one of its buckets).
fn image_tensor(s: &Sample, sizes: &Sizes) -> Result<Pixels, String> {
    let bytes = ["png", "jpg", "jpeg", "webp"].iter().find_map(|e| s.get(e)).ok_or("no image member (png/jpg)")?;
    let img = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    let size = Bucket { width: img.width(), height: img.height() };
    let rgb = match sizes {
        Sizes::Square(res) if size == Bucket::square(*res) => img.to_rgb8(),
        Sizes::Square(res) => resize_crop(&img, *res),
        Sizes::Buckets(b) if b.contains(&size) => img.to_rgb8(),
        Sizes::Buckets(b) => {
            let names: Vec<String> = b.iter().map(Bucket::name).collect();
            return Err(format!("image is {size}, not one of the dataset's buckets {names:?}"));
        }
    };
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = p[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok((out, Bucket { width: w as u32, height: h as u32 }))
}

fn caption(s: &Sample) -> String {
    s.get("txt").map(|t| String::from_utf8_lossy(t).trim().to_string()).unwrap_or_default()
}

fn tensor_rows(t: &Tensor) -> Vec<Vec<f32>> {
    let n = t.size()[0];
    (0..n).map(|i| Vec::<f32>::try_from(t.get(i).to_kind(Kind::Float).contiguous().view([-1])).unwrap()).collect()
}

/// The frozen encoder pair `encode` runs: downloaded Hugging Face folders, or skytrain's own
/// encoders fitted on the dataset (for users without a hub). Either way their files are copied
/// into the encoded dataset (see `record`).
pub enum Encoders {
    Folders { vae: Box<Vae>, text: Box<TextEncoder>, vae_dir: PathBuf, text_dir: PathBuf },
    Fitted { ae: PatchPca, words: WordEncoder },
}

/// How `Encoders::fit` builds encoders from a curated dataset.
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Latent channels of the patch autoencoder (its patches are 2×2 RGB pixels).
    pub latent_channels: i64,
    /// Images the autoencoder is fitted on (the first ones in shard order).
    pub fit_images: usize,
    /// Width of the word encoder's token embeddings.
    pub text_dim: usize,
    pub seed: u64,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions { latent_channels: 6, fit_images: 4000, text_dim: 64, seed: 17 }
    }
}

impl Encoders {
    /// Loads a diffusers `AutoencoderKL` folder and a transformers text-model folder.
    pub fn load(vae_dir: &Path, text_dir: &Path, max_tokens: Option<usize>) -> Result<Encoders, EncodeError> {
        Ok(Encoders::Folders {
            vae: Box::new(Vae::load(vae_dir)?),
            text: Box::new(TextEncoder::load(text_dir, max_tokens)?),
            vae_dir: vae_dir.to_path_buf(),
            text_dir: text_dir.to_path_buf(),
        })
    }

    /// Fits a patch-PCA autoencoder on the raw dataset's images and builds a word encoder over
    /// its captions' vocabulary (as long as its longest caption): encoders that need no download.
    pub fn fit(input: &Store, opts: &FitOptions) -> Result<Encoders, EncodeError> {
        let raw = DatasetManifest::read(input)?;
        let sizes = Sizes::of(&raw, input)?;
        sizes.check_factor(2, "fitted autoencoder (2×2 patches)")?;
        let (mut pixels, mut vocab, mut longest) = (Vec::new(), std::collections::BTreeSet::new(), 0);
        for shard in &raw.shards {
            let bytes = input.get_verified(&shard.name, &shard.sha256)?;
            let (samples, _) = read_shard(&bytes, &shard.name);
            for s in &samples {
                let c = caption(s);
                longest = longest.max(c.split_whitespace().count());
                vocab.extend(c.split_whitespace().map(String::from));
                if pixels.len() < opts.fit_images {
                    if let Ok(img) = image_tensor(s, &sizes) {
                        pixels.push(img);
                    }
                }
            }
        }
        if pixels.is_empty() {
            return Err(EncodeError::Invalid(format!("{}: no readable image to fit the autoencoder on", input.url())));
        }
        // One batch per size, in a fixed order (the fit is reproducible).
        let mut by_size: std::collections::BTreeMap<Bucket, Vec<f32>> = Default::default();
        for (p, size) in pixels {
            by_size.entry(size).or_default().extend(p);
        }
        let batches: Vec<Tensor> = by_size
            .into_iter()
            .map(|(b, p)| {
                let n = (p.len() / (3 * b.width as usize * b.height as usize)) as i64;
                (Tensor::from_slice(&p).view([n, 3, b.height as i64, b.width as i64]) + 1.0) / 2.0
            })
            .collect();
        let ae = PatchPca::fit_many(&batches, 2, opts.latent_channels);
        let words = WordEncoder::new(vocab.into_iter().collect(), opts.text_dim, longest.max(1), opts.seed);
        Ok(Encoders::Fitted { ae, words })
    }

    /// Sets the token length to what the raw dataset's captions need: the longest caption's token
    /// count (special tokens included), capped by the length the text encoder was loaded with.
    /// Returns the length. Fitted encoders already size themselves to the captions.
    pub fn fit_token_length(&mut self, input: &Store) -> Result<usize, EncodeError> {
        let Encoders::Folders { text, .. } = self else { return Ok(self.text_shape().0) };
        let raw = DatasetManifest::read(input)?;
        let mut longest = 1;
        for shard in &raw.shards {
            let bytes = input.get_verified(&shard.name, &shard.sha256)?;
            for s in read_shard(&bytes, &shard.name).0 {
                longest = longest.max(text.count_tokens(&caption(&s))?);
            }
        }
        text.shorten(longest)?;
        Ok(text.shape().0)
    }

    /// Copies both encoders' files into `out` (`encoders/vae/`, `encoders/text/`) and records them.
    pub fn store(&self, out: &Store) -> Result<record::EncoderRecord, EncodeError> {
        use record::{EncoderKind, EncoderRef};
        let (vae, text) = match self {
            Encoders::Folders { text, vae_dir, text_dir, .. } => (
                EncoderRef::store_folder(EncoderKind::AutoencoderKl, vae_dir, out, "encoders/vae", None)?,
                EncoderRef::store_folder(EncoderKind::HfText, text_dir, out, "encoders/text", Some(text.shape().0))?,
            ),
            Encoders::Fitted { ae, words } => {
                let source = "fitted by skytrain encode";
                let ae_file = [("autoencoder.safetensors".to_string(), ae.to_safetensors())];
                let text_file = [("text_encoder.safetensors".to_string(), words.to_safetensors())];
                (
                    EncoderRef::store_files(EncoderKind::PatchPca, &ae_file, out, "encoders/vae", source, None)?,
                    EncoderRef::store_files(
                        EncoderKind::Words,
                        &text_file,
                        out,
                        "encoders/text",
                        source,
                        Some(words.len),
                    )?,
                )
            }
        };
        Ok(record::EncoderRecord { vae, text })
    }

    /// (latent channels, downsampling factor) of the image encoder.
    fn latent_layout(&self) -> (i64, i64) {
        match self {
            Encoders::Folders { vae, .. } => (vae.latent_channels, vae.factor),
            Encoders::Fitted { ae, .. } => (ae.channels, ae.patch),
        }
    }

    /// `(L, D)` of the per-token text output.
    fn text_shape(&self) -> (usize, usize) {
        match self {
            Encoders::Folders { text, .. } => text.shape(),
            Encoders::Fitted { words, .. } => (words.len, words.dim),
        }
    }

    fn names(&self) -> (String, String, f64) {
        match self {
            Encoders::Folders { vae, text, .. } => (vae.name.clone(), text.name().to_string(), vae.scaling_factor),
            Encoders::Fitted { .. } => ("patch-pca (fitted)".into(), "words (fitted)".into(), 1.0),
        }
    }

    /// Captions → `(tokens [B, L, D], pooled [B, D])`.
    fn encode_text(&self, captions: &[String]) -> Result<(Tensor, Tensor), EncodeError> {
        match self {
            Encoders::Folders { text, .. } => text.encode(captions),
            Encoders::Fitted { words, .. } => {
                let c = frozen::words_cond(words, captions)?;
                Ok((c.tokens, c.pooled))
            }
        }
    }

    /// Encodes a batch of `height × width` images: latents `[B, C, h, w]` and text `(tokens, pooled)`.
    pub fn encode_batch(
        &self,
        images: &[Vec<f32>],
        (height, width): (i64, i64),
        captions: &[String],
        keys: &[String],
        opts: &EncodeOptions,
    ) -> Result<(Tensor, Tensor, Tensor), EncodeError> {
        let b = images.len() as i64;
        let flat: Vec<f32> = images.concat();
        let x = Tensor::from_slice(&flat).view([b, 3, height, width]);
        let latents = match self {
            Encoders::Folders { vae, .. } => {
                let eps = opts.sample_posterior.then(|| posterior_noise(keys, vae, (height, width), opts.seed));
                vae.encode(&x, eps.as_ref())
            }
            Encoders::Fitted { ae, .. } => ae.encode(&((x + 1.0) / 2.0)),
        };
        let (tokens, pooled) = self.encode_text(captions)?;
        Ok((latents, tokens, pooled))
    }
}

/// The VAE posterior's noise for a batch, drawn from (seed, sample key): independent of batching.
fn posterior_noise(keys: &[String], vae: &Vae, (height, width): (i64, i64), seed: u64) -> Tensor {
    let f = vae.factor;
    let per = (vae.latent_channels * (height / f) * (width / f)) as usize;
    let noise: Vec<f32> = keys
        .iter()
        .flat_map(|k| {
            let key_seed = u64::from_str_radix(&sha256_hex(k.as_bytes())[..16], 16).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, key_seed));
            (0..per).map(move |_| StandardNormal.sample(&mut rng)).collect::<Vec<f32>>()
        })
        .collect();
    Tensor::from_slice(&noise).view([keys.len() as i64, vae.latent_channels, height / f, width / f])
}

fn missing_resolution(input: &Store) -> EncodeError {
    EncodeError::Invalid(format!(
        "{}/manifest.json: field `resolution` missing (a raw dataset from `skytrain curate`)",
        input.url()
    ))
}

/// Encodes every shard of the raw dataset at `input` into `out`; returns the manifest.
pub fn encode_dataset(
    input: &Store,
    out: &Store,
    enc: &Encoders,
    opts: &EncodeOptions,
    on_samples: &dyn Fn(u64),
) -> Result<DatasetManifest, EncodeError> {
    let raw = DatasetManifest::read(input)?;
    let res = raw.resolution.ok_or_else(|| missing_resolution(input))? as i64;
    let sizes = Sizes::of(&raw, input)?;
    let (channels, factor) = enc.latent_layout();
    sizes.check_factor(factor, "image encoder")?;
    let latent_of =
        |b: Bucket| vec![channels as usize, b.height as usize / factor as usize, b.width as usize / factor as usize];
    let (l, t) = enc.text_shape();
    let (vae_name, text_name, scaling_factor) = enc.names();
    let s = res / factor;
    // The empty caption's encoding, for caption dropout and guidance.
    let (null_tokens, null_pooled) = enc.encode_text(&[String::new()])?;
    let pooled_dim = null_pooled.size()[1] as usize;
    let null = weights::to_safetensors(
        &[("tokens".into(), null_tokens.get(0)), ("pooled".into(), null_pooled.get(0))],
        Some(HashMap::from([("text_encoder".to_string(), text_name.clone())])),
    );
    out.put("null-text.safetensors", null)?;
    let record = enc.store(out)?;
    // Everything that decides an encoded shard's bytes, besides its input shard.
    let mut common_options = crate::data::manifest::ShardOptions::new();
    for (name, r) in [("vae", &record.vae), ("text", &record.text)] {
        common_options.insert(format!("{name}_encoder"), serde_json::to_string(&(r.kind, &r.files)).unwrap());
    }
    common_options.insert("text_shape".into(), format!("{:?}", [l, t]));
    common_options.insert("resolution".into(), res.to_string());
    if let Sizes::Buckets(b) = &sizes {
        common_options.insert("buckets".into(), b.iter().map(Bucket::name).collect::<Vec<_>>().join(","));
    }
    common_options.insert("dtype".into(), format!("{:?}", opts.dtype));
    common_options.insert("sample_posterior".into(), opts.sample_posterior.to_string());
    if opts.sample_posterior {
        common_options.insert("seed".into(), opts.seed.to_string());
    }
    let mut manifest = DatasetManifest::new("encoded", input.url());
    manifest.resolution = raw.resolution;
    manifest.curation = raw.curation.clone();
    manifest.attribution = raw.attribution.clone();
    manifest.encoding = Some(Encoding {
        latent_shape: vec![channels as usize, s as usize, s as usize],
        text_shape: vec![l, t],
        pooled_dim,
        dtype: opts.dtype,
        vae: vae_name,
        text_encoder: text_name,
        scaling_factor,
        null_text: "null-text.safetensors".into(),
        encoders: Some(record.clone()),
        buckets: match &sizes {
            Sizes::Buckets(b) => b.iter().map(|&b| (b.name(), latent_of(b))).collect(),
            Sizes::Square(_) => Default::default(),
        },
    });
    // Attribution travels with the data.
    for key in ["ATTRIBUTION.md", "attribution.jsonl"] {
        if let Some(b) = input.get_opt(key)? {
            out.put(key, b)?;
        }
    }
    for shard in &raw.shards {
        let index_key = format!("{}.json", shard.name);
        let mut options = common_options.clone();
        options.insert("input_sha256".into(), shard.sha256.clone());
        let existing = if opts.redo { None } else { out.get_opt(&index_key)? };
        let index: EncodedIndex = match existing {
            Some(b) => {
                let index: EncodedIndex = serde_json::from_slice(&b).map_err(|e| {
                    EncodeError::Invalid(format!("{}/{index_key}: unreadable shard index: {e}", out.url()))
                })?;
                crate::data::manifest::compare_options(&index.options, &options).map_err(|diff| {
                    EncodeError::Invalid(format!(
                        "{}/{} was encoded with other options or input ({diff}): write to a new --out, or pass \
                         --redo to re-encode the dataset",
                        out.url(),
                        shard.name
                    ))
                })?;
                index
            }
            None => {
                let bytes = input.get_verified(&shard.name, &shard.sha256)?;
                let (samples, damage) = read_shard(&bytes, &shard.name);
                let mut skipped: Vec<String> = damage.iter().map(|d| format!("{}: {}", d.key, d.reason)).collect();
                let mut encoded = Vec::with_capacity(samples.len());
                let mut buckets: BTreeMap<String, u64> = BTreeMap::new();
                for chunk in samples.chunks(opts.batch.max(1)) {
                    let decoded = decode_images(chunk, &sizes);
                    // One encoder batch per image size, the samples written in their input order.
                    let mut by_size: BySize = BTreeMap::new();
                    for (i, (s, img)) in chunk.iter().zip(decoded).enumerate() {
                        match img {
                            Ok((pixels, size)) => by_size.entry(size).or_default().push((i, s, pixels)),
                            Err(e) => {
                                tracing::warn!(shard = %shard.name, key = %s.key, "skipping sample: {e}");
                                skipped.push(format!("{}: {e}", s.key));
                            }
                        }
                    }
                    let mut done: BTreeMap<usize, Sample> = BTreeMap::new();
                    for (size, ok) in by_size {
                        let images: Vec<Vec<f32>> = ok.iter().map(|(_, _, p)| p.clone()).collect();
                        let captions: Vec<String> = ok.iter().map(|(_, s, _)| caption(s)).collect();
                        let keys: Vec<String> = ok.iter().map(|(_, s, _)| s.key.clone()).collect();
                        let hw = (size.height as i64, size.width as i64);
                        let (lat, tok, pool) = enc.encode_batch(&images, hw, &captions, &keys, opts)?;
                        for (((&(i, smp, _), lat), tok), pool) in
                            ok.iter().zip(tensor_rows(&lat)).zip(tensor_rows(&tok)).zip(tensor_rows(&pool))
                        {
                            let latent = Array { shape: latent_of(size), data: lat };
                            let mut out_s = Sample::new(&smp.key)
                                .with("latent.npy", npy_bytes(&latent, opts.dtype))
                                .with("text.npy", npy_bytes(&Array { shape: vec![l, t], data: tok }, opts.dtype))
                                .with(
                                    "pooled.npy",
                                    npy_bytes(&Array { shape: vec![pooled_dim], data: pool }, opts.dtype),
                                )
                                .with("txt", caption(smp));
                            if let Some(j) = smp.get("json") {
                                out_s = out_s.with("json", j.to_vec());
                            }
                            if matches!(sizes, Sizes::Buckets(_)) {
                                *buckets.entry(size.name()).or_default() += 1;
                            }
                            done.insert(i, out_s);
                        }
                    }
                    on_samples(done.len() as u64);
                    encoded.extend(done.into_values());
                }
                let bytes = write_shard(&encoded);
                let index = EncodedIndex {
                    options,
                    buckets,
                    samples: encoded.len() as u64,
                    bytes: bytes.len() as u64,
                    sha256: sha256_hex(&bytes),
                    skipped,
                };
                if index.samples > 0 {
                    out.put(&shard.name, bytes)?;
                }
                out.put(&index_key, serde_json::to_vec(&index).unwrap())?;
                index
            }
        };
        if index.samples > 0 {
            manifest.shards.push(ShardEntry {
                name: shard.name.clone(),
                samples: index.samples,
                bytes: index.bytes,
                sha256: index.sha256,
                buckets: index.buckets,
            });
        }
    }
    if manifest.shards.is_empty() {
        return Err(EncodeError::Invalid(format!("{}: no sample could be encoded", input.url())));
    }
    manifest.write(out)?;
    Ok(manifest)
}

/// Decodes a chunk's images on rayon's pool.
fn decode_images(chunk: &[Sample], sizes: &Sizes) -> Vec<Result<Pixels, String>> {
    use rayon::prelude::*;
    chunk.par_iter().map(|s| image_tensor(s, sizes)).collect()
}

/// An image tensor `[B, 3, H, W]` in about [-1, 1] → 8-bit RGB images.
pub fn to_images(x: &Tensor) -> Vec<DynamicImage> {
    let x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to_kind(Kind::Uint8);
    let (b, _, h, w) = x.size4().unwrap();
    (0..b)
        .map(|i| {
            let data = Vec::<u8>::try_from(x.get(i).permute([1, 2, 0]).contiguous().view([-1])).unwrap();
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w as u32, h as u32, data).unwrap())
        })
        .collect()
}
