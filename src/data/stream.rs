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
//! Buckets. In a dataset curated into aspect-ratio buckets, a window's positions come in whole
//! batches of one bucket: each bucket's samples in the window are shuffled and cut into batches
//! (the last one topped up from the same bucket's start), and the batches are shuffled. The
//! window's length is known from the manifest's per-shard bucket counts, so the position → sample
//! map stays a pure function of (seed, position, batch size); batches start at multiples of the
//! batch size (training steps and round ranges do), so every batch is one tensor shape.
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
    #[error(
        "dataset {store}: positions {first}.. span buckets of latent shapes {a:?} and {b:?}; a bucketed \
         dataset's batches start at multiples of the loader's batch size {batch}"
    )]
    MixedBuckets { store: String, first: u64, a: Vec<usize>, b: Vec<usize>, batch: usize },
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
    /// Positions per batch: a bucketed dataset's windows are laid out in whole batches of one
    /// bucket, so the order depends on it (the run's `train.batch_size`). Unused otherwise.
    pub batch: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            seed: 0,
            window_shards: 4,
            prefetch_windows: 1,
            threads: 4,
            patience: Duration::from_secs(300),
            batch: 1,
        }
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
    /// `[C, H, W]` of every latent in the batch (one bucket).
    pub latent_shape: Vec<usize>,
    pub latents: BatchArray,
    pub text: BatchArray,
    pub pooled: BatchArray,
}

/// Where an epoch's windows start, in positions within the epoch.
struct EpochLayout {
    /// Shard indices (into the manifest) of each window, in read order.
    windows: Vec<Vec<usize>>,
    starts: Vec<u64>,
    /// Positions in the epoch (samples, plus the top-up of bucketed batches).
    len: u64,
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
    /// First absolute position of each epoch computed so far (bucketed epochs differ in length).
    epoch_starts: Vec<u64>,
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
    /// A bucketed dataset's bucket names by latent shape.
    buckets: HashMap<Vec<usize>, String>,
}

impl Source {
    fn batch(&self) -> Option<u64> {
        (!self.buckets.is_empty()).then_some(self.opts.batch as u64)
    }

    /// Positions a window of these shards takes: its samples, bucketed ones topped up to whole batches.
    fn window_len(&self, shards: &[usize]) -> u64 {
        let entries = shards.iter().map(|&s| &self.manifest.shards[s]);
        let Some(b) = self.batch() else { return entries.map(|e| e.samples).sum() };
        let mut per: BTreeMap<&str, u64> = BTreeMap::new();
        for e in entries {
            for (name, n) in &e.buckets {
                *per.entry(name).or_default() += n;
            }
        }
        per.values().map(|n| n.div_ceil(b) * b).sum()
    }

    /// Epoch `epoch`'s shard order cut into windows, and where each window starts.
    fn layout(&self, epoch: u64) -> EpochLayout {
        let mut order: Vec<usize> = (0..self.manifest.shards.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(self.opts.seed, 0x5A4D_0000 ^ epoch)));
        let windows: Vec<Vec<usize>> = order.chunks(self.opts.window_shards).map(|c| c.to_vec()).collect();
        let mut starts = Vec::with_capacity(windows.len());
        let mut at = 0;
        for w in &windows {
            starts.push(at);
            at += self.window_len(w);
        }
        EpochLayout { windows, starts, len: at }
    }
}

/// Damage counts, and the (shard, key) pairs already logged (each is logged once).
type DamageLog = (Damage, HashSet<(String, String)>);

impl ShardStream {
    /// Opens the encoded dataset at `store` (its `manifest.json`).
    pub fn open(store: Store, opts: StreamOptions) -> Result<ShardStream, StreamError> {
        let manifest = DatasetManifest::read(&store)?;
        let encoding = manifest.encoding(&store)?.clone();
        let opts = StreamOptions {
            window_shards: opts.window_shards.max(1),
            threads: opts.threads.max(1),
            batch: opts.batch.max(1),
            ..opts
        };
        let buckets: HashMap<Vec<usize>, String> =
            encoding.buckets.iter().map(|(name, shape)| (shape.clone(), name.clone())).collect();
        if !buckets.is_empty() {
            for s in &manifest.shards {
                let listed: u64 = s.buckets.values().sum();
                let unknown = s.buckets.keys().find(|b| !encoding.buckets.contains_key(*b));
                if listed != s.samples || unknown.is_some() {
                    return Err(ManifestError::Invalid {
                        file: format!("{}/{}", store.url(), super::manifest::MANIFEST),
                        reason: format!(
                            "shard `{}`: field `buckets` {:?} must count its {} samples in the encoding's buckets {:?}",
                            s.name,
                            s.buckets,
                            s.samples,
                            encoding.buckets.keys().collect::<Vec<_>>()
                        ),
                    }
                    .into());
                }
            }
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.threads).build().expect("thread pool");
        Ok(ShardStream {
            source: Arc::new(Source { store, manifest, encoding, opts, damage: Default::default(), pool, buckets }),
            layouts: HashMap::new(),
            epoch_starts: vec![0],
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

    /// Samples per epoch (a bucketed epoch takes a few more positions: the top-up of its
    /// batches, see the module docs).
    pub fn len(&self) -> u64 {
        self.source.manifest.samples()
    }

    /// Whether the dataset is curated into aspect-ratio buckets (batches drawn within one).
    pub fn is_bucketed(&self) -> bool {
        !self.source.buckets.is_empty()
    }

    /// The latent shapes samples can have: one, or one per bucket.
    pub fn latent_shapes(&self) -> Vec<Vec<usize>> {
        let e = &self.source.encoding;
        if e.buckets.is_empty() {
            vec![e.latent_shape.clone()]
        } else {
            e.buckets.values().cloned().collect()
        }
    }

    /// (epoch, position within it) of absolute position `g`; computed from the layouts alone.
    pub fn position(&self, g: u64) -> super::order::DataPosition {
        if !self.is_bucketed() {
            let n = self.len();
            return super::order::DataPosition { epoch: g / n, cursor: g % n };
        }
        let (mut epoch, mut start) = (0, 0);
        loop {
            let len = self.source.layout(epoch).len;
            if g < start + len {
                return super::order::DataPosition { epoch, cursor: g - start };
            }
            (epoch, start) = (epoch + 1, start + len);
        }
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
        let layout = Arc::new(self.source.layout(epoch));
        self.layouts.retain(|&e, _| e + 1 >= epoch);
        self.layouts.insert(epoch, layout.clone());
        layout
    }

    /// (epoch, window, slot within the window) of absolute position `g`.
    pub fn locate(&mut self, g: u64) -> (u64, usize, usize) {
        let (epoch, offset) = if self.is_bucketed() {
            // Epoch starts, extended as far as `g` (each epoch's length from its layout).
            while *self.epoch_starts.last().expect("epoch 0") <= g {
                let e = self.epoch_starts.len() as u64 - 1;
                let next = self.epoch_starts[e as usize] + self.layout(e).len;
                self.epoch_starts.push(next);
            }
            let e = self.epoch_starts.partition_point(|&s| s <= g) - 1;
            (e as u64, g - self.epoch_starts[e])
        } else {
            let n = self.len();
            (g / n, g % n)
        };
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
        let latent_shape = samples.first().map(|s| s.latent.shape.clone()).unwrap_or_default();
        if let Some(other) = samples.iter().find(|s| s.latent.shape != latent_shape) {
            return Err(StreamError::MixedBuckets {
                store: self.source.store.url().into(),
                first: positions[0],
                a: latent_shape,
                b: other.latent.shape.clone(),
                batch: self.source.opts.batch,
            });
        }
        Ok(Batch {
            keys: samples.iter().map(|s| s.key.clone()).collect(),
            latent_shape,
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
        let fits = if ext == "latent.npy" && !enc.buckets.is_empty() {
            enc.buckets.values().any(|b| *b == a.shape)
        } else {
            a.shape == shape
        };
        if !fits {
            let expected = if enc.buckets.is_empty() {
                format!("{shape:?}")
            } else {
                format!("one of the buckets' {:?}", enc.buckets.values().collect::<Vec<_>>())
            };
            return Err(format!("{ext}: shape {:?}, expected {expected}", a.shape));
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
    let Source { store, manifest, encoding: enc, opts, damage, pool, .. } = src;
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
    if let Some(batch) = src.batch() {
        return bucketed_window(src, epoch, w, shards, slots, batch as usize);
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

/// A bucketed window: each bucket's readable samples shuffled and cut into whole batches (the last
/// topped up from the bucket's start), as many as the manifest's counts give, then the batches
/// shuffled. A batch of a bucket with no readable sample here is served by the next batch that
/// has samples (whole batches, so one shape each).
fn bucketed_window(
    src: &Source,
    epoch: u64,
    w: usize,
    shards: &[usize],
    slots: Vec<Option<Arc<EncodedSample>>>,
    batch: usize,
) -> Result<Window, StreamError> {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for &s in shards {
        for (name, n) in &src.manifest.shards[s].buckets {
            *counts.entry(name).or_default() += n;
        }
    }
    let mut readable: HashMap<&str, Vec<Arc<EncodedSample>>> = HashMap::new();
    for s in slots.into_iter().flatten() {
        if let Some(name) = src.buckets.get(&s.latent.shape) {
            readable.entry(name.as_str()).or_default().push(s);
        }
    }
    let window_seed = mix_seed(src.opts.seed, (epoch << 20) ^ w as u64);
    let mut batches: Vec<Option<Vec<Arc<EncodedSample>>>> = Vec::new();
    for (i, (name, &n)) in counts.iter().enumerate() {
        let mut samples = readable.remove(name).unwrap_or_default();
        samples.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(window_seed, 1 + i as u64)));
        for k in 0..n.div_ceil(batch as u64) as usize {
            batches.push(
                (!samples.is_empty())
                    .then(|| (0..batch).map(|j| samples[(k * batch + j) % samples.len()].clone()).collect()),
            );
        }
    }
    batches.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(window_seed, 0)));
    let Some(first_ok) = batches.iter().position(|b| b.is_some()) else {
        return Err(StreamError::EmptyWindow { store: src.store.url().into(), epoch, window: w });
    };
    let mut fill = batches[first_ok].clone().expect("readable");
    let mut out = vec![Vec::new(); batches.len()];
    for j in (0..batches.len()).rev() {
        if let Some(b) = &batches[j] {
            fill = b.clone();
        }
        out[j] = fill.clone();
    }
    Ok(Window { samples: out.concat() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::manifest::ShardEntry;
    use crate::data::wds::{npy_bytes, write_shard, Array, Sample};

    /// A bucketed encoded dataset of 3 shards: `wide` latents [2, 2, 6] and `square` [2, 4, 4],
    /// in uneven numbers per shard.
    fn bucketed(dir: &std::path::Path) -> Store {
        let store = Store::create(dir.to_str().unwrap()).unwrap();
        let shapes = BTreeMap::from([("24x8".to_string(), vec![2, 2, 6]), ("16x16".to_string(), vec![2, 4, 4])]);
        let mut m = DatasetManifest::new("encoded", "test");
        for (i, (wide, square)) in [(5, 3), (2, 7), (6, 0)].into_iter().enumerate() {
            let mut samples = Vec::new();
            let mut buckets = BTreeMap::new();
            for (j, bucket) in std::iter::repeat_n("24x8", wide).chain(std::iter::repeat_n("16x16", square)).enumerate()
            {
                let shape = shapes[bucket].clone();
                let latent = Array { data: vec![j as f32; shape.iter().product()], shape };
                let text = Array { shape: vec![3, 4], data: vec![0.0; 12] };
                let pooled = Array { shape: vec![4], data: vec![0.0; 4] };
                samples.push(
                    Sample::new(format!("s{i}-{j}"))
                        .with("latent.npy", npy_bytes(&latent, Dtype::F32))
                        .with("text.npy", npy_bytes(&text, Dtype::F32))
                        .with("pooled.npy", npy_bytes(&pooled, Dtype::F32)),
                );
                *buckets.entry(bucket.to_string()).or_default() += 1;
            }
            let bytes = write_shard(&samples);
            let name = format!("shard-{i:06}.tar");
            m.shards.push(ShardEntry {
                name: name.clone(),
                samples: samples.len() as u64,
                bytes: bytes.len() as u64,
                sha256: crate::store::sha256_hex(&bytes),
                buckets,
            });
            store.put(&name, bytes).unwrap();
        }
        m.encoding = Some(Encoding {
            latent_shape: vec![2, 4, 4],
            buckets: shapes,
            text_shape: vec![3, 4],
            pooled_dim: 4,
            dtype: Dtype::F32,
            vae: "test".into(),
            text_encoder: "test".into(),
            scaling_factor: 1.0,
            null_text: "null-text.safetensors".into(),
            encoders: None,
        });
        m.write(&store).unwrap();
        store
    }

    #[test]
    fn bucketed_batches_hold_one_shape_and_the_order_is_a_function_of_position() {
        let dir = tempfile::tempdir().unwrap();
        let store = bucketed(dir.path());
        let opts = StreamOptions { seed: 3, window_shards: 2, batch: 4, ..Default::default() };
        let mut s = ShardStream::open(store.clone(), opts.clone()).unwrap();
        assert!(s.is_bucketed());
        let n = 4 * 30;
        let positions: Vec<u64> = (0..n).collect();
        let samples = s.samples(&positions).unwrap();
        for (k, batch) in positions.chunks(4).enumerate() {
            let b = s.batch(batch).unwrap();
            assert_eq!(b.keys.len(), 4);
            assert!(b.latent_shape == [2, 2, 6] || b.latent_shape == [2, 4, 4], "batch {k}: {:?}", b.latent_shape);
        }
        // Each epoch reads every sample (23), topped up to whole batches, and epochs differ.
        let mut g = 0;
        let mut epochs = Vec::new();
        while g < n {
            let e = s.position(g).epoch;
            let len = (g..n).take_while(|&x| s.position(x).epoch == e).count() as u64;
            assert_eq!(len % 4, 0, "epoch {e} is whole batches");
            let keys: std::collections::BTreeSet<&str> =
                samples[g as usize..(g + len) as usize].iter().map(|x| x.key.as_str()).collect();
            if g + len < n {
                assert_eq!(keys.len(), 23, "epoch {e} reads every sample");
                assert!(len < 23 + 2 * 2 * 3, "top-up is under a batch per bucket and window: {len}");
                epochs.push(samples[g as usize..(g + len) as usize].iter().map(|x| x.key.clone()).collect::<Vec<_>>());
            }
            g += len;
        }
        assert!(epochs.len() >= 2 && epochs[0] != epochs[1], "epochs are shuffled differently");
        // A fresh reader from the middle (a resumed run, another worker) reads the same samples.
        let mut fresh = ShardStream::open(store.clone(), opts.clone()).unwrap();
        let tail: Vec<String> = fresh.samples(&positions[52..]).unwrap().iter().map(|x| x.key.clone()).collect();
        let whole: Vec<String> = samples[52..].iter().map(|x| x.key.clone()).collect();
        assert_eq!(tail, whole);
        // The order depends on the batch size (part of the run spec).
        let mut other = ShardStream::open(store, StreamOptions { batch: 2, ..opts }).unwrap();
        let keys2: Vec<String> = other.samples(&positions[..40]).unwrap().iter().map(|x| x.key.clone()).collect();
        let keys4: Vec<String> = samples[..40].iter().map(|x| x.key.clone()).collect();
        assert_ne!(keys2, keys4);
        for batch in positions[..40].chunks(2) {
            other.batch(batch).unwrap();
        }
    }

    #[test]
    fn a_bucketed_manifest_whose_counts_do_not_add_up_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = bucketed(dir.path());
        let mut m = DatasetManifest::read(&store).unwrap();
        m.shards[1].buckets.insert("24x8".into(), 9);
        m.write(&store).unwrap();
        let err = ShardStream::open(store, StreamOptions::default()).err().unwrap().to_string();
        assert!(err.contains("shard-000001.tar") && err.contains("buckets"), "{err}");
    }
}
