//! The dataset manifest: the one object that makes a set of shards a dataset. Written last, after
//! every shard it lists, with each shard's sample count and sha256, so a reader never sees a half
//! dataset and can plan positions (epochs, worker ranges) without opening a shard.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "skytrain-wds/1";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
}

/// The options (and input hashes) a shard was made with, recorded in its index object: a re-run
/// with other options into the same output must not reuse it silently.
pub type ShardOptions = BTreeMap<String, String>;

/// Compares the options a finished shard was made with against this run's; `Err` names each
/// option that differs (`name: was X, now Y`).
pub fn compare_options(recorded: &ShardOptions, now: &ShardOptions) -> Result<(), String> {
    let mut diffs = Vec::new();
    for key in recorded.keys().chain(now.keys()).collect::<std::collections::BTreeSet<_>>() {
        let (a, b) = (recorded.get(key), now.get(key));
        if a != b {
            let show = |v: Option<&String>| v.map_or("(not recorded)".to_string(), |v| format!("`{v}`"));
            diffs.push(format!("{key}: was {}, now {}", show(a), show(b)));
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("; "))
    }
}

/// One shard of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Object key relative to the dataset prefix, e.g. `shard-000003.tar`.
    pub name: String,
    pub samples: u64,
    pub bytes: u64,
    pub sha256: String,
    /// Samples per aspect-ratio bucket (`WxH` in pixels) in a bucketed dataset; empty otherwise.
    /// The loader plans its batches from these counts without opening the shard.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub buckets: BTreeMap<String, u64>,
}

/// What `encode` put into each sample of an encoded dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Encoding {
    /// Latent shape `[C, H, W]` (member `latent.npy`) at the nominal square resolution.
    pub latent_shape: Vec<usize>,
    /// A bucketed dataset's latent shape per bucket (`WxH` in pixels → `[C, H/f, W/f]`); every
    /// sample has one of these shapes. Empty: every sample has `latent_shape`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub buckets: BTreeMap<String, Vec<usize>>,
    /// Per-token text embedding shape `[L, T]` (member `text.npy`).
    pub text_shape: Vec<usize>,
    /// Pooled text embedding width `T_pooled` (member `pooled.npy`).
    pub pooled_dim: usize,
    pub dtype: crate::data::wds::Dtype,
    /// The frozen encoders used, by name and weights hash.
    pub vae: String,
    pub text_encoder: String,
    pub scaling_factor: f64,
    /// The empty caption's encoding (for caption dropout / guidance), a safetensors object.
    pub null_text: String,
    /// The encoders' files in this dataset's store (absent for shards indexed from another tool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoders: Option<crate::data::encode::record::EncoderRecord>,
}

/// Where a dataset's samples came from and under which licences: what a model card states.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The input table or dataset it was made from.
    pub source: String,
    pub samples: u64,
    /// Samples per licence (SPDX-style, as `curate` normalised them).
    pub licences: BTreeMap<String, u64>,
    /// Key of `ATTRIBUTION.md` in the dataset's store, when credit is owed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<String>,
}

/// What a cached-latents file (a run's `[data] latents`, as the demo writes) records beside it, at
/// [`latents_record_key`]: the encoders that made it and where its samples came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentsRecord {
    pub encoders: crate::data::encode::record::EncoderRecord,
    pub provenance: Provenance,
}

/// `data/latents.safetensors` → `data/latents.json`.
pub fn latents_record_key(latents_key: &str) -> String {
    format!("{}.json", latents_key.strip_suffix(".safetensors").unwrap_or(latents_key))
}

/// Counts a curation run reports: rows in, rows kept, rows dropped per reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CurationStats {
    pub rows: u64,
    pub kept: u64,
    pub dropped: BTreeMap<String, u64>,
    /// Kept samples per normalised licence.
    pub licences: BTreeMap<String, u64>,
    /// How much of the kept images' source area survived resizing (cropping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_kept: Option<AreaKept>,
}

/// Shares of the source images' area kept after resizing, over the kept samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AreaKept {
    pub mean: f64,
    /// The 10th percentile: what the worst-cut tenth of the images keeps at most.
    pub p10: f64,
    pub min: f64,
}

impl AreaKept {
    pub fn of(shares: &[f32]) -> Option<AreaKept> {
        if shares.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = shares.iter().map(|&x| x as f64).collect();
        v.sort_by(f64::total_cmp);
        let round = |x: f64| (x * 1e4).round() / 1e4;
        Some(AreaKept {
            mean: round(v.iter().sum::<f64>() / v.len() as f64),
            p10: round(v[(v.len() - 1) / 10]),
            min: round(v[0]),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetManifest {
    pub format: String,
    /// `raw` (images + captions) or `encoded` (latents + text embeddings).
    pub kind: String,
    pub shards: Vec<ShardEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<u32>,
    /// A bucketed raw dataset's buckets (`WxH` in pixels, about `resolution²` each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curation: Option<CurationStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// Where the data came from (the dataset this one was made from, or the input table).
    #[serde(default)]
    pub source: String,
    /// Key of the attribution file, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<String>,
    /// Key of the record of every dropped row (`curate`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<String>,
}

impl DatasetManifest {
    pub fn new(kind: &str, source: &str) -> DatasetManifest {
        DatasetManifest {
            format: FORMAT.into(),
            kind: kind.into(),
            shards: Vec::new(),
            resolution: None,
            buckets: None,
            curation: None,
            encoding: None,
            source: source.into(),
            attribution: None,
            dropped: None,
        }
    }

    pub fn samples(&self) -> u64 {
        self.shards.iter().map(|s| s.samples).sum()
    }

    /// The data's origin and licences, for model cards.
    pub fn provenance(&self) -> Provenance {
        Provenance {
            source: self.source.clone(),
            samples: self.samples(),
            licences: self.curation.as_ref().map(|c| c.licences.clone()).unwrap_or_default(),
            attribution: self.attribution.clone(),
        }
    }

    /// Reads and checks the manifest of the dataset at `store`'s root.
    pub fn read(store: &Store) -> Result<DatasetManifest, ManifestError> {
        let file = format!("{}/{MANIFEST}", store.url());
        let bytes = store.get(MANIFEST)?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        let m: DatasetManifest = serde_path_to_error::deserialize(de).map_err(|e| ManifestError::Invalid {
            file: file.clone(),
            reason: format!("field `{}`: {}", e.path(), e.inner()),
        })?;
        if m.format != FORMAT {
            return Err(ManifestError::Invalid {
                file,
                reason: format!("field `format` is `{}`, expected `{FORMAT}`", m.format),
            });
        }
        if m.shards.is_empty() {
            return Err(ManifestError::Invalid { file, reason: "field `shards` is empty".into() });
        }
        Ok(m)
    }

    /// Requires an encoded dataset and returns its encoding.
    pub fn encoding(&self, store: &Store) -> Result<&Encoding, ManifestError> {
        self.encoding.as_ref().filter(|_| self.kind == "encoded").ok_or_else(|| ManifestError::Invalid {
            file: format!("{}/{MANIFEST}", store.url()),
            reason: format!(
                "dataset kind is `{}`; training needs an encoded dataset (run `skytrain encode`)",
                self.kind
            ),
        })
    }

    /// Writes the manifest; call after every shard it lists is in the store.
    pub fn write(&self, store: &Store) -> Result<(), StoreError> {
        store.put(MANIFEST, serde_json::to_vec_pretty(self).unwrap())
    }

    /// Reads every shard and checks it against the manifest: its sha256, its sample count, and
    /// each sample's content: images at the manifest's resolution (raw), or latent, text and pooled
    /// arrays of the recorded shapes and dtype (encoded). Returns the samples checked.
    pub fn check(&self, store: &Store) -> Result<u64, ManifestError> {
        let mut checked = 0;
        for s in &self.shards {
            let bytes = store.get_verified(&s.name, &s.sha256)?;
            let (samples, damage) = crate::data::wds::read_shard(&bytes, &s.name);
            let bad = |reason: String| ManifestError::Invalid { file: format!("{}/{}", store.url(), s.name), reason };
            if samples.len() as u64 != s.samples || !damage.is_empty() {
                return Err(bad(format!(
                    "{} samples readable, the manifest lists {} ({damage:?})",
                    samples.len(),
                    s.samples
                )));
            }
            let mut buckets: BTreeMap<String, u64> = BTreeMap::new();
            for sample in &samples {
                let bucket = self.check_sample(sample).map_err(|e| bad(format!("sample `{}`: {e}", sample.key)))?;
                if let Some(b) = bucket {
                    *buckets.entry(b).or_default() += 1;
                }
                checked += 1;
            }
            if !s.buckets.is_empty() && buckets != s.buckets {
                return Err(bad(format!("samples per bucket are {buckets:?}, the manifest lists {:?}", s.buckets)));
            }
        }
        Ok(checked)
    }

    /// Checks one sample's members against the manifest; returns its bucket in a bucketed dataset.
    fn check_sample(&self, s: &crate::data::wds::Sample) -> Result<Option<String>, String> {
        if let Some(e) = self.encoding.as_ref().filter(|_| self.kind == "encoded") {
            let dtype = match e.dtype {
                crate::data::wds::Dtype::F16 => "'<f2'",
                crate::data::wds::Dtype::F32 => "'<f4'",
            };
            let read = |member: &str| -> Result<Vec<usize>, String> {
                let bytes = s.get(member).ok_or(format!("no `{member}`"))?;
                let npy = npyz::NpyFile::new(bytes).map_err(|err| format!("{member}: not a .npy file: {err}"))?;
                let descr = npy.dtype().descr();
                if descr != dtype {
                    return Err(format!("{member} is {descr}, the manifest says {dtype}"));
                }
                Ok(npy.shape().iter().map(|&d| d as usize).collect())
            };
            for (member, shape) in [("text.npy", e.text_shape.clone()), ("pooled.npy", vec![e.pooled_dim])] {
                let got = read(member)?;
                if got != shape {
                    return Err(format!("{member} is {got:?}, the manifest says {shape:?}"));
                }
            }
            let latent = read("latent.npy")?;
            if e.buckets.is_empty() {
                if latent != e.latent_shape {
                    return Err(format!("latent.npy is {latent:?}, the manifest says {:?}", e.latent_shape));
                }
                return Ok(None);
            }
            return match e.buckets.iter().find(|(_, shape)| **shape == latent) {
                Some((name, _)) => Ok(Some(name.clone())),
                None => Err(format!("latent.npy is {latent:?}, not the shape of any bucket ({:?})", e.buckets)),
            };
        }
        if let Some(res) = self.resolution {
            let image = ["png", "jpg", "jpeg", "webp"].iter().find_map(|e| s.get(e)).ok_or("no image member")?;
            let (w, h) = image::ImageReader::new(std::io::Cursor::new(image))
                .with_guessed_format()
                .map_err(|e| e.to_string())?
                .into_dimensions()
                .map_err(|e| format!("image: {e}"))?;
            if let Some(buckets) = &self.buckets {
                let name = format!("{w}x{h}");
                if !buckets.contains(&name) {
                    return Err(format!("image is {w}×{h}, not one of the manifest's buckets {buckets:?}"));
                }
                return Ok(Some(name));
            }
            if (w, h) != (res, res) {
                return Err(format!("image is {w}×{h}, the manifest's resolution is {res}"));
            }
        }
        Ok(None)
    }
}

/// Builds a manifest for encoded shards some other tool wrote (e.g. Python `webdataset`): every
/// `.tar` at the store's root is read once to count its samples; shapes come from the first
/// sample. Without a `null-text.safetensors`, the empty caption is encoded as zeros (written).
pub fn index_encoded(store: &Store, dtype: crate::data::wds::Dtype) -> Result<DatasetManifest, ManifestError> {
    use crate::data::wds::{parse_npy, read_shard};
    let invalid =
        |file: &str, reason: String| ManifestError::Invalid { file: format!("{}/{file}", store.url()), reason };
    let mut m = DatasetManifest::new("encoded", store.url());
    let mut shapes: Option<(Vec<usize>, Vec<usize>, usize)> = None;
    for name in store.list("")?.into_iter().filter(|k| k.ends_with(".tar") && !k.contains('/')) {
        let bytes = store.get(&name)?;
        let (samples, damage) = read_shard(&bytes, &name);
        for d in &damage {
            tracing::warn!(shard = %name, key = %d.key, "{}", d.reason);
        }
        if shapes.is_none() {
            if let Some(s) = samples.first() {
                let shape = |ext: &str| -> Result<Vec<usize>, ManifestError> {
                    let b = s
                        .get(ext)
                        .ok_or_else(|| invalid(&name, format!("sample `{}` has no `{ext}` member", s.key)))?;
                    Ok(parse_npy(b).map_err(|e| invalid(&name, format!("sample `{}`, {ext}: {e}", s.key)))?.shape)
                };
                let pooled = shape("pooled.npy")?;
                if pooled.len() != 1 {
                    return Err(invalid(&name, format!("pooled.npy has shape {pooled:?}, expected [P]")));
                }
                shapes = Some((shape("latent.npy")?, shape("text.npy")?, pooled[0]));
            }
        }
        if !samples.is_empty() {
            m.shards.push(ShardEntry {
                name: name.clone(),
                samples: samples.len() as u64,
                bytes: bytes.len() as u64,
                sha256: crate::store::sha256_hex(&bytes),
                buckets: BTreeMap::new(),
            });
        }
    }
    let Some((latent_shape, text_shape, pooled_dim)) = shapes else {
        return Err(invalid(MANIFEST, "no readable .tar shard at the dataset root".into()));
    };
    let null_text = "null-text.safetensors".to_string();
    if !store.exists(&null_text)? {
        tracing::warn!("{}: no null-text.safetensors; the empty caption is encoded as zeros", store.url());
        let zeros = |n: usize| vec![0u8; 4 * n];
        let (l, t) = (text_shape[0], text_shape[1]);
        let (tok, pool) = (zeros(l * t), zeros(pooled_dim));
        let views = vec![
            ("pooled", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![pooled_dim], &pool).unwrap()),
            ("tokens", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![l, t], &tok).unwrap()),
        ];
        store.put(&null_text, safetensors::serialize(views, None).unwrap())?;
    }
    m.encoding = Some(Encoding {
        latent_shape,
        text_shape,
        pooled_dim,
        dtype,
        vae: "unknown (indexed)".into(),
        text_encoder: "unknown (indexed)".into(),
        scaling_factor: 1.0,
        null_text,
        encoders: None,
        buckets: BTreeMap::new(),
    });
    m.write(store)?;
    Ok(m)
}
