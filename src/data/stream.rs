//! The streaming loader: encoded shards read from any object store into batches, without copying
//! the dataset first.
//!
//! Order. Each epoch shuffles the shard list from (seed, epoch) and cuts it into *windows* of
//! `window_shards` consecutive shards; the samples of a window are read in a seeded permutation of
//! the whole window. That mixes like a shuffle buffer as large as the window, but unlike a
//! streaming buffer (whose state is the whole history) the sample at absolute position `g` is a
//! pure function of `g`, the seed and the manifest. So a checkpoint's data position is the step
//! alone, a resumed run reads exactly the samples an uninterrupted one would, and the round
//! protocol can hand any worker any disjoint range of positions (workers read only the windows
//! their ranges cover).
//!
//! Loading. Windows are fetched and decoded by background threads, several shards at once, the
//! next window while the current one is read. A sample that is missing, truncated or malformed is
//! skipped, counted and logged with its shard and key; its slot is served by the next readable
//! sample of the same window, so positions stay deterministic. Store errors are retried with
//! backoff for `patience` and only then become fatal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::manifest::{DatasetManifest, Encoding, ManifestError};
use super::order::mix_seed;
use super::wds::{read_shard, Dtype, RawArray};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("dataset {store}: shard `{shard}` unreadable for {secs} s, giving up: {source}")]
    Unavailable {
        store: String,
        shard: String,
        secs: u64,
        #[source]
        source: Box<StoreError>,
    },
    #[error("dataset {store}: window {window} of epoch {epoch} has no readable sample")]
    EmptyWindow { store: String, epoch: u64, window: usize },
}

/// Loader settings; none of them changes which sample a position maps to except `window_shards`
/// (part of the run spec for that reason).
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub seed: u64,
    /// Shards shuffled together (the shuffle window).
    pub window_shards: usize,
    /// Windows fetched ahead of the one being read.
    pub prefetch_windows: usize,
    /// Shards fetched and decoded at once.
    pub threads: usize,
    /// How long a shard may stay unreadable (store down, network gone) before the run fails.
    pub patience: Duration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { seed: 0, window_shards: 4, prefetch_windows: 1, threads: 4, patience: Duration::from_secs(300) }
    }
}

/// One training sample, checked (shapes, finite values) but not converted: its arrays stay in
/// their stored dtype, as slices of the shard's bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedSample {
    pub key: String,
    pub latent: RawArray,
    pub text: RawArray,
    pub pooled: RawArray,
}

/// One member of a batch, row-major and contiguous: `B × shape` values of `dtype`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchArray {
    pub dtype: Dtype,
    pub data: Vec<u8>,
}

impl BatchArray {
    /// Concatenates the samples' arrays; mixed dtypes (foreign datasets) become f32.
    fn gather<'a>(arrays: impl Iterator<Item = &'a RawArray> + Clone) -> BatchArray {
        let first = arrays.clone().next().map(|a| a.dtype).unwrap_or(Dtype::F32);
        if arrays.clone().all(|a| a.dtype == first) {
            let mut data = Vec::with_capacity(arrays.clone().map(|a| a.data.len()).sum());
            for a in arrays {
                data.extend_from_slice(&a.data);
            }
            BatchArray { dtype: first, data }
        } else {
            let data = arrays.flat_map(|a| a.to_f32()).flat_map(f32::to_le_bytes).collect();
            BatchArray { dtype: Dtype::F32, data }
        }
    }
}

/// A batch: `latents [B, C, H, W]`, `text [B, L, T]`, `pooled [B, P]`, in stored dtypes.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub keys: Vec<String>,
    pub latents: BatchArray,
    pub text: BatchArray,
    pub pooled: BatchArray,
}

/// Where an epoch's windows start, in positions within the epoch.
struct EpochLayout {
    /// Shard indices (into the manifest) of each window, in read order.
    windows: Vec<Vec<usize>>,
    starts: Vec<u64>,
}

/// A loaded window: its samples in read order (slot `j` of the window's permutation).
struct Window {
    samples: Vec<Arc<EncodedSample>>,
}

type Pending = Receiver<Result<Window, StreamError>>;

/// Counts of what the loader had to skip.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Damage {
    pub samples: u64,
    pub by_shard: BTreeMap<String, u64>,
}

pub struct ShardStream {
    source: Arc<Source>,
    layouts: HashMap<u64, Arc<EpochLayout>>,
    loaded: BTreeMap<(u64, usize), Arc<Window>>,
    pending: HashMap<(u64, usize), Pending>,
}

/// What the background loaders share: the dataset, the settings, the damage log, and one thread
/// pool (`opts.threads` shards in flight) made once per stream.
struct Source {
    store: Store,
    manifest: DatasetManifest,
    encoding: Encoding,
    opts: StreamOptions,
    damage: Mutex<DamageLog>,
    pool: rayon::ThreadPool,
}

/// Damage counts, and the (shard, key) pairs already logged (each is logged once).
type DamageLog = (Damage, HashSet<(String, String)>);

impl ShardStream {
    /// Opens the encoded dataset at `store` (its `manifest.json`).
    pub fn open(store: Store, opts: StreamOptions) -> Result<ShardStream, StreamError> {
        let manifest = DatasetManifest::read(&store)?;
        let encoding = manifest.encoding(&store)?.clone();
        let opts = StreamOptions { window_shards: opts.window_shards.max(1), threads: opts.threads.max(1), ..opts };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.threads).build().expect("thread pool");
        Ok(ShardStream {
            source: Arc::new(Source { store, manifest, encoding, opts, damage: Default::default(), pool }),
            layouts: HashMap::new(),
            loaded: BTreeMap::new(),
            pending: HashMap::new(),
        })
    }

    pub fn manifest(&self) -> &DatasetManifest {
        &self.source.manifest
    }

    pub fn encoding(&self) -> &Encoding {
        &self.source.encoding
    }

    pub fn store(&self) -> &Store {
        &self.source.store
    }

    /// Samples per epoch.
    pub fn len(&self) -> u64 {
        self.source.manifest.samples()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn damage(&self) -> Damage {
        self.source.damage.lock().unwrap().0.clone()
    }

    fn layout(&mut self, epoch: u64) -> Arc<EpochLayout> {
        if let Some(l) = self.layouts.get(&epoch) {
            return l.clone();
        }
        let mut order: Vec<usize> = (0..self.source.manifest.shards.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(self.source.opts.seed, 0x5A4D_0000 ^ epoch)));
        let windows: Vec<Vec<usize>> = order.chunks(self.source.opts.window_shards).map(|c| c.to_vec()).collect();
        let mut starts = Vec::with_capacity(windows.len());
        let mut at = 0;
        for w in &windows {
            starts.push(at);
            at += w.iter().map(|&s| self.source.manifest.shards[s].samples).sum::<u64>();
        }
        let layout = Arc::new(EpochLayout { windows, starts });
        self.layouts.retain(|&e, _| e + 1 >= epoch);
        self.layouts.insert(epoch, layout.clone());
        layout
    }

    /// (epoch, window, slot within the window) of absolute position `g`.
    pub fn locate(&mut self, g: u64) -> (u64, usize, usize) {
        let n = self.len();
        let (epoch, offset) = (g / n, g % n);
        let layout = self.layout(epoch);
        let w = layout.starts.partition_point(|&s| s <= offset) - 1;
        (epoch, w, (offset - layout.starts[w]) as usize)
    }

    fn next_window(&mut self, epoch: u64, w: usize) -> (u64, usize) {
        if w + 1 < self.layout(epoch).windows.len() {
            (epoch, w + 1)
        } else {
            (epoch + 1, 0)
        }
    }

    /// Starts loading a window in the background unless it is loaded or loading.
    fn request(&mut self, epoch: u64, w: usize) {
        if self.loaded.contains_key(&(epoch, w)) || self.pending.contains_key(&(epoch, w)) {
            return;
        }
        let layout = self.layout(epoch);
        let shards = layout.windows[w].clone();
        let (tx, rx) = channel();
        let source = self.source.clone();
        std::thread::spawn(move || {
            let _ = tx.send(load_window(&source, epoch, w, &shards));
        });
        self.pending.insert((epoch, w), rx);
    }

    fn window(&mut self, epoch: u64, w: usize) -> Result<Arc<Window>, StreamError> {
        if let Some(win) = self.loaded.get(&(epoch, w)) {
            return Ok(win.clone());
        }
        self.request(epoch, w);
        let rx = self.pending.remove(&(epoch, w)).expect("requested");
        let win = Arc::new(rx.recv().expect("loader thread ended without a result")?);
        // Keep the window being read and later ones; earlier windows are done with.
        self.loaded.retain(|&k, _| k >= (epoch, w));
        self.loaded.insert((epoch, w), win.clone());
        Ok(win)
    }

    /// The samples at absolute positions `positions`, with the next windows requested ahead.
    pub fn samples(&mut self, positions: &[u64]) -> Result<Vec<Arc<EncodedSample>>, StreamError> {
        let mut out = Vec::with_capacity(positions.len());
        let mut current: Option<((u64, usize), Arc<Window>)> = None;
        for &g in positions {
            let (epoch, w, slot) = self.locate(g);
            // Window lookup and read-ahead once per window a batch touches, not per sample.
            if current.as_ref().map(|c| c.0) != Some((epoch, w)) {
                let win = self.window(epoch, w)?;
                let mut ahead = (epoch, w);
                for _ in 0..self.source.opts.prefetch_windows {
                    ahead = self.next_window(ahead.0, ahead.1);
                    self.request(ahead.0, ahead.1);
                }
                current = Some(((epoch, w), win));
            }
            out.push(current.as_ref().unwrap().1.samples[slot].clone());
        }
        Ok(out)
    }

    /// The shards a reader of positions `start..start + len` fetches: those of the windows the
    /// range touches. Disjoint ranges (what round plans hand out) share at most the windows at
    /// their boundaries.
    pub fn shards_for(&mut self, start: u64, len: u64) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        if len == 0 {
            return out;
        }
        let (epoch, w, _) = self.locate(start);
        let (mut at, end) = ((epoch, w), self.locate(start + len - 1));
        loop {
            let layout = self.layout(at.0);
            out.extend(layout.windows[at.1].iter().map(|&s| self.source.manifest.shards[s].name.clone()));
            if at == (end.0, end.1) {
                return out;
            }
            at = self.next_window(at.0, at.1);
        }
    }

    /// A batch of the samples at `positions`, concatenated row-major.
    pub fn batch(&mut self, positions: &[u64]) -> Result<Batch, StreamError> {
        let samples = self.samples(positions)?;
        Ok(Batch {
            keys: samples.iter().map(|s| s.key.clone()).collect(),
            latents: BatchArray::gather(samples.iter().map(|s| &s.latent)),
            text: BatchArray::gather(samples.iter().map(|s| &s.text)),
            pooled: BatchArray::gather(samples.iter().map(|s| &s.pooled)),
        })
    }
}

/// Reads a shard, retrying store errors until `patience` runs out.
fn fetch_patiently(store: &Store, key: &str, patience: Duration) -> Result<bytes::Bytes, StreamError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(500);
    loop {
        match store.get(key) {
            Ok(b) => return Ok(b),
            Err(e) if start.elapsed() >= patience || matches!(e, StoreError::BadUrl { .. }) => {
                return Err(StreamError::Unavailable {
                    store: store.url().into(),
                    shard: key.into(),
                    secs: start.elapsed().as_secs(),
                    source: Box::new(e),
                })
            }
            Err(e) => {
                tracing::warn!(shard = key, "dataset store error, retrying in {delay:?}: {e}");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Checks one sample's arrays against the dataset's encoding (shapes, finite values).
fn decode_sample(s: &super::wds::Sample, enc: &Encoding) -> Result<EncodedSample, String> {
    let get = |ext: &str, shape: &[usize]| -> Result<RawArray, String> {
        let bytes = s.members.get(ext).ok_or_else(|| format!("member `{ext}` missing"))?;
        let a = RawArray::parse(bytes).map_err(|e| format!("{ext}: {e}"))?;
        if a.shape != shape {
            return Err(format!("{ext}: shape {:?}, expected {shape:?}", a.shape));
        }
        if !a.all_finite() {
            return Err(format!("{ext}: non-finite values"));
        }
        Ok(a)
    };
    Ok(EncodedSample {
        key: s.key.clone(),
        latent: get("latent.npy", &enc.latent_shape)?,
        text: get("text.npy", &enc.text_shape)?,
        pooled: get("pooled.npy", &[enc.pooled_dim])?,
    })
}

/// Fetches and decodes a window's shards (several at once), then lays its samples out in the
/// window's permutation, readable samples standing in for damaged ones.
fn load_window(src: &Source, epoch: u64, w: usize, shards: &[usize]) -> Result<Window, StreamError> {
    let Source { store, manifest, encoding: enc, opts, damage, pool } = src;
    let load_shard = |&s: &usize| -> Result<Vec<Option<EncodedSample>>, StreamError> {
        let entry = &manifest.shards[s];
        let bytes = fetch_patiently(store, &entry.name, opts.patience)?;
        let (samples, broken) = read_shard(&bytes, &entry.name);
        let mut slots: Vec<Option<EncodedSample>> = Vec::with_capacity(entry.samples as usize);
        let report = |key: String, reason: String| {
            let mut d = damage.lock().unwrap();
            if d.1.insert((entry.name.clone(), key.clone())) {
                tracing::warn!(shard = %entry.name, key = %key, "skipping sample: {reason}");
                d.0.samples += 1;
                *d.0.by_shard.entry(entry.name.clone()).or_default() += 1;
            }
        };
        for b in broken {
            report(b.key, b.reason);
        }
        for s in samples.iter().take(entry.samples as usize) {
            match decode_sample(s, enc) {
                Ok(x) => slots.push(Some(x)),
                Err(reason) => {
                    report(s.key.clone(), reason);
                    slots.push(None);
                }
            }
        }
        if (samples.len() as u64) < entry.samples {
            report(
                format!("(samples {}..{})", samples.len(), entry.samples),
                format!("shard holds {} samples, the manifest lists {}", samples.len(), entry.samples),
            );
        }
        slots.resize(entry.samples as usize, None);
        Ok(slots)
    };
    // Several shards in flight at once, each fetched and decoded on its own thread.
    let decoded: Vec<_> = pool.install(|| shards.par_iter().map(load_shard).collect());
    let mut slots: Vec<Option<Arc<EncodedSample>>> = Vec::new();
    for d in decoded {
        slots.extend(d?.into_iter().map(|s| s.map(Arc::new)));
    }
    let mut perm: Vec<usize> = (0..slots.len()).collect();
    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(opts.seed, (epoch << 20) ^ w as u64)));
    let ordered: Vec<Option<Arc<EncodedSample>>> = perm.into_iter().map(|j| slots[j].clone()).collect();
    let Some(first_ok) = ordered.iter().position(|s| s.is_some()) else {
        return Err(StreamError::EmptyWindow { store: store.url().into(), epoch, window: w });
    };
    // A damaged slot is served by the next readable one (cyclically): deterministic, same length.
    let mut samples = vec![ordered[first_ok].clone().unwrap(); ordered.len()];
    let mut fill = ordered[first_ok].clone().unwrap();
    for j in (0..ordered.len()).rev() {
        if let Some(s) = &ordered[j] {
            fill = s.clone();
        }
        samples[j] = fill.clone();
    }
    Ok(Window { samples })
}
