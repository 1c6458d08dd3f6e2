//! `skytrain curate`: a metadata table (JSON Lines or Parquet) → licence-clean webdataset shards.
//!
//! Per row: licence normalised and checked against the allowlist; image fetched (local path,
//! `file://`, `s3://`, `http(s)://`), decoded, too-small images dropped, exact duplicates (sha256 of
//! the source bytes) and near duplicates (64-bit difference hash within a Hamming radius) dropped,
//! the rest resized: centre-cropped to a square, or (with buckets) into the aspect-ratio bucket
//! nearest their own (`data::buckets`). Every drop is recorded with its reason.
//!
//! Resumable and atomic: the licence-passing rows are cut into fixed chunks, chunk `i` becomes shard
//! `i`; a shard's tar is written first and its index (`<shard>.json`: keys, hashes, drop counts,
//! attributions) second, so a shard with an index is finished and a re-run skips it. The dataset
//! manifest and the attribution files come last.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use image::{DynamicImage, GenericImageView, RgbImage};
use serde::{Deserialize, Serialize};

use super::buckets::{fit_into, flatten_alpha, Bucket, Buckets, Fit};
use super::dedupe::{Fingerprint, Seen};
use super::licence::{Allowlist, Licence};
use super::manifest::{CurationStats, DatasetManifest, ShardEntry};
use super::wds::{sanitize_key, write_shard, Sample};
use crate::store::{sha256_hex, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CurateError {
    #[error("{file}: {reason}")]
    Table { file: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
}

/// One row of the user's metadata table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub image: String,
    pub caption: String,
    pub licence: String,
    pub author: String,
    pub source: String,
}

/// Column names accepted for each field (first match wins).
const FIELDS: [(&str, &[&str]); 6] = [
    ("id", &["id", "key", "uid"]),
    ("image", &["image", "image_path", "path", "url", "image_url", "location", "file"]),
    ("caption", &["caption", "text", "alt", "title"]),
    ("licence", &["licence", "license", "license_url", "licence_url", "rights"]),
    ("author", &["author", "attribution", "creator", "artist", "credit"]),
    ("source", &["source", "source_url", "page_url", "landing_url", "origin"]),
];

fn row_from_fields(fields: &HashMap<String, String>, file: &str, line: usize) -> Result<Row, CurateError> {
    let mut vals: Vec<String> = Vec::new();
    for (name, aliases) in FIELDS {
        let v = aliases.iter().find_map(|a| fields.get(*a)).cloned();
        match v {
            Some(v) if !v.trim().is_empty() || name == "author" || name == "source" => vals.push(v),
            _ => {
                return Err(CurateError::Table {
                    file: file.into(),
                    reason: format!("row {line}: missing field `{name}` (accepted names: {})", aliases.join(", ")),
                })
            }
        }
    }
    let [id, image, caption, licence, author, source]: [String; 6] = vals.try_into().unwrap();
    Ok(Row { id, image, caption, licence, author, source })
}

/// Reads a metadata table: `.jsonl`/`.json` (one object per line) or `.parquet`.
pub fn read_table(path: &Path) -> Result<Vec<Row>, CurateError> {
    let file = path.display().to_string();
    let err = |reason: String| CurateError::Table { file: file.clone(), reason };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "jsonl" | "json" | "ndjson" => {
            let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
            let mut rows = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let obj: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(line).map_err(|e| err(format!("row {}: not a JSON object: {e}", i + 1)))?;
                let fields = obj
                    .into_iter()
                    .filter_map(|(k, v)| match v {
                        serde_json::Value::String(s) => Some((k, s)),
                        serde_json::Value::Number(n) => Some((k, n.to_string())),
                        _ => None,
                    })
                    .collect();
                rows.push(row_from_fields(&fields, &file, i + 1)?);
            }
            Ok(rows)
        }
        "parquet" => read_parquet(path),
        other => Err(err(format!("unknown table format `.{other}` (expected .jsonl or .parquet)"))),
    }
}

#[cfg(feature = "parquet")]
fn read_parquet(path: &Path) -> Result<Vec<Row>, CurateError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let file = path.display().to_string();
    let err = |reason: String| CurateError::Table { file: file.clone(), reason };
    let f = std::fs::File::open(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let reader = SerializedFileReader::new(f).map_err(|e| err(format!("not a Parquet file: {e}")))?;
    let mut rows = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(|e| err(e.to_string()))?.enumerate() {
        let row = row.map_err(|e| err(format!("row {}: {e}", i + 1)))?;
        let fields = row
            .get_column_iter()
            .filter_map(|(k, v)| match v {
                Field::Str(s) => Some((k.clone(), s.clone())),
                Field::Int(_) | Field::Long(_) | Field::UInt(_) | Field::ULong(_) => Some((k.clone(), v.to_string())),
                _ => None,
            })
            .collect();
        rows.push(row_from_fields(&fields, &file, i + 1)?);
    }
    Ok(rows)
}

#[cfg(not(feature = "parquet"))]
fn read_parquet(path: &Path) -> Result<Vec<Row>, CurateError> {
    Err(CurateError::Table { file: path.display().to_string(), reason: "built without the `parquet` feature".into() })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Png,
    Jpg,
}

/// How to curate.
#[derive(Debug, Clone)]
pub struct CurateOptions {
    /// Output side in pixels (square), or the side of the square whose area the buckets share.
    pub resolution: u32,
    /// Aspect-ratio buckets; `None` centre-crops every image to `resolution²`.
    pub buckets: Option<Buckets>,
    /// Images whose shorter side is below this are dropped (`size`).
    pub min_side: u32,
    /// Licence-passing rows per shard.
    pub shard_size: usize,
    pub allow: Allowlist,
    pub format: ImageFormat,
    /// Near duplicates: difference hashes of the content within this many bits, with matching
    /// silhouettes (`data::dedupe`; 0 disables; at most 3).
    pub near_duplicate_bits: u32,
    /// Recoloured variants (same drawing, other mean colour: emoji skin tones) are kept as
    /// distinct images instead of dropped as near duplicates.
    pub keep_colour_variants: bool,
    pub prefix: String,
    /// Remake every shard even if the output holds finished ones (made with other options).
    pub redo: bool,
    /// Most memory one image's decoder may allocate, MiB; larger images are dropped as `too_large`.
    pub max_decode_mb: u64,
}

/// The options that decide a shard's content, and a hash of its input rows.
fn shard_options(opts: &CurateOptions, chunk: &[(&Row, Licence)]) -> crate::data::manifest::ShardOptions {
    let rows: Vec<String> = chunk
        .iter()
        .map(|(r, l)| {
            [&r.id, &r.image, &r.caption, &l.to_string(), &r.author, &r.source].map(|f| f.as_str()).join("\u{1f}")
        })
        .collect();
    [
        ("resolution", opts.resolution.to_string()),
        ("min_side", opts.min_side.to_string()),
        ("shard_size", opts.shard_size.to_string()),
        ("allow", format!("{:?}", opts.allow)),
        ("format", format!("{:?}", opts.format)),
        ("near_duplicate_bits", opts.near_duplicate_bits.to_string()),
        ("near_duplicate_test", "content-box dhash + silhouette".to_string()),
        ("keep_colour_variants", opts.keep_colour_variants.to_string()),
        ("max_decode_mb", opts.max_decode_mb.to_string()),
        ("rows_sha256", crate::store::sha256_hex(rows.join("\n").as_bytes())),
    ]
    .into_iter()
    .chain(opts.buckets.as_ref().map(|b| ("buckets", format!("{} ({:?})", b.names().join(","), b.fit))))
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Default for CurateOptions {
    fn default() -> Self {
        CurateOptions {
            resolution: 256,
            buckets: None,
            min_side: 64,
            shard_size: 1000,
            allow: Allowlist::default(),
            format: ImageFormat::Png,
            near_duplicate_bits: 3,
            keep_colour_variants: false,
            redo: false,
            max_decode_mb: 2048,
            prefix: "shard".into(),
        }
    }
}

/// A work that needs credit: one line of the attribution file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribution {
    pub key: String,
    pub id: String,
    pub title: String,
    pub author: String,
    pub licence: String,
    pub source: String,
}

/// A finished shard's index: what a re-run needs to skip it and keep deduplicating across shards.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ShardIndex {
    /// What made this shard: the options and a hash of its input rows.
    #[serde(default)]
    options: crate::data::manifest::ShardOptions,
    samples: u64,
    bytes: u64,
    sha256: String,
    content_hashes: Vec<String>,
    /// Near-duplicate fingerprints of the kept samples, in order.
    #[serde(default)]
    fingerprints: Vec<Fingerprint>,
    /// The ids of the kept samples, in order (what a later duplicate is reported to match).
    #[serde(default)]
    kept_ids: Vec<String>,
    /// Kept samples per bucket (`WxH`).
    #[serde(default)]
    buckets: BTreeMap<String, u64>,
    /// The share of each kept sample's source area that survived resizing, in order.
    #[serde(default)]
    area_kept: Vec<f32>,
    dropped: BTreeMap<String, u64>,
    /// Every row dropped from this shard's rows, with its reason.
    #[serde(default)]
    drops: Vec<DropRecord>,
    licences: BTreeMap<String, u64>,
    attributions: Vec<Attribution>,
}

/// One dropped row, a line of `dropped.jsonl`: which row, why, the detail (e.g. the decoder's own
/// message), and for duplicates the kept row it matched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DropRecord {
    pub id: String,
    pub reason: String,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
}

/// The key of the drop record beside the manifest.
pub const DROPPED: &str = "dropped.jsonl";

/// Shorter side to `res`, centre crop to `res × res`, transparency composited over white.
pub fn resize_crop(img: &DynamicImage, res: u32) -> RgbImage {
    fit_into(&flatten_alpha(img), Bucket::square(res), Fit::Crop).0
}

/// The image resized as `opts` asks: its bucket, the result, and the share of its area kept.
fn resize_for(img: &DynamicImage, opts: &CurateOptions) -> (Bucket, RgbImage, f64) {
    let rgb = flatten_alpha(img);
    let (bucket, fit) = match &opts.buckets {
        Some(b) => (b.nearest(rgb.width(), rgb.height()), b.fit),
        None => (Bucket::square(opts.resolution), Fit::Crop),
    };
    let (out, kept) = fit_into(&rgb, bucket, fit);
    (bucket, out, kept)
}

/// Fetches image bytes from a path or URL, keeping one store per bucket/origin.
pub struct Fetcher {
    base: PathBuf,
    stores: Mutex<HashMap<String, Store>>,
}

impl Fetcher {
    /// Relative paths in the table resolve against `base` (the table's folder).
    pub fn new(base: &Path) -> Fetcher {
        Fetcher { base: base.to_path_buf(), stores: Mutex::new(HashMap::new()) }
    }

    pub fn fetch(&self, location: &str) -> Result<Vec<u8>, String> {
        for scheme in ["s3://", "http://", "https://"] {
            if let Some(rest) = location.strip_prefix(scheme) {
                let (root, key) = rest.split_once('/').ok_or_else(|| format!("no object key in `{location}`"))?;
                let root = format!("{scheme}{root}");
                let store = {
                    let mut stores = self.stores.lock().unwrap();
                    match stores.get(&root) {
                        Some(s) => s.clone(),
                        None => {
                            let s = Store::open(&root).map_err(|e| e.to_string())?;
                            stores.insert(root.clone(), s.clone());
                            s
                        }
                    }
                };
                return store.get(key).map(|b| b.to_vec()).map_err(|e| e.to_string());
            }
        }
        let path = location.strip_prefix("file://").unwrap_or(location);
        let path = self.base.join(path);
        std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// What happened to one licence-passing row before deduplication.
enum Prepared {
    Dropped(&'static str, String),
    Image { content: String, print: Fingerprint, encoded: Vec<u8>, bucket: Bucket, area_kept: f64 },
}

fn prepare(row: &Row, fetcher: &Fetcher, opts: &CurateOptions) -> Prepared {
    let bytes = match fetcher.fetch(&row.image) {
        Ok(b) => b,
        Err(e) => return Prepared::Dropped("fetch", e),
    };
    let img = match decode_limited(&bytes, opts.max_decode_mb) {
        Ok(i) => i,
        Err(image::ImageError::Limits(e)) => {
            let detail = format!("decoding needs more than --max-decode-mb {} MiB ({e})", opts.max_decode_mb);
            return Prepared::Dropped("too_large", detail);
        }
        Err(e) => return Prepared::Dropped("decode", e.to_string()),
    };
    let (w, h) = img.dimensions();
    if w.min(h) < opts.min_side {
        return Prepared::Dropped("size", format!("{w}×{h} is below {} px", opts.min_side));
    }
    let (bucket, out, area_kept) = resize_for(&img, opts);
    let print = Fingerprint::of(&out);
    let mut encoded = Vec::new();
    let fmt = match opts.format {
        ImageFormat::Png => image::ImageFormat::Png,
        ImageFormat::Jpg => image::ImageFormat::Jpeg,
    };
    DynamicImage::ImageRgb8(out).write_to(&mut std::io::Cursor::new(&mut encoded), fmt).expect("in-memory encode");
    Prepared::Image { content: sha256_hex(&bytes), print, encoded, bucket, area_kept }
}

fn shard_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:06}.tar")
}

/// Curates `rows` into shards under `out`, reporting progress per row; returns the manifest.
pub fn curate(
    rows: &[Row],
    source: &str,
    fetcher: &Fetcher,
    out: &Store,
    opts: &CurateOptions,
    on_row: &(dyn Fn(u64) + Sync),
) -> Result<DatasetManifest, CurateError> {
    if opts.resolution == 0 || opts.shard_size == 0 {
        return Err(CurateError::Invalid("resolution and shard size must be positive".into()));
    }
    if opts.near_duplicate_bits > 3 {
        return Err(CurateError::Invalid("near-duplicate radius is at most 3 bits".into()));
    }
    let mut stats = CurationStats { rows: rows.len() as u64, ..Default::default() };
    let mut drops: Vec<DropRecord> = Vec::new();
    let mut passing: Vec<(&Row, Licence)> = Vec::new();
    let mut ids = HashSet::new();
    for row in rows {
        match Licence::parse(&row.licence) {
            Some(l) if opts.allow.allows(&l) => {
                if !ids.insert(sanitize_key(&row.id)) {
                    return Err(CurateError::Invalid(format!(
                        "{source}: id `{}` appears twice (ids must be unique after replacing all but [A-Za-z0-9_-])",
                        row.id
                    )));
                }
                passing.push((row, l))
            }
            parsed => {
                *stats.dropped.entry("licence".into()).or_default() += 1;
                let detail = match parsed {
                    Some(l) => format!("licence `{}` ({l}) is not in the allowlist {:?}", row.licence, opts.allow),
                    None => format!("licence `{}` is not one skytrain recognises", row.licence),
                };
                drops.push(DropRecord { id: row.id.clone(), reason: "licence".into(), detail, matched: None });
                on_row(1);
            }
        }
    }
    let mut seen = Seen::default();
    let mut manifest = DatasetManifest::new("raw", source);
    manifest.resolution = Some(opts.resolution);
    manifest.buckets = opts.buckets.as_ref().map(Buckets::names);
    let mut area_kept: Vec<f32> = Vec::new();
    let mut attributions = Vec::new();
    for (i, chunk) in passing.chunks(opts.shard_size).enumerate() {
        let name = shard_name(&opts.prefix, i);
        let index_key = format!("{name}.json");
        let options = shard_options(opts, chunk);
        let existing = if opts.redo { None } else { out.get_opt(&index_key)? };
        let index = match existing {
            Some(b) => {
                let index: ShardIndex = serde_json::from_slice(&b).map_err(|e| {
                    CurateError::Invalid(format!("{}/{index_key}: unreadable shard index: {e}", out.url()))
                })?;
                crate::data::manifest::compare_options(&index.options, &options).map_err(|diff| {
                    CurateError::Invalid(format!(
                        "{}/{name} was made with other options or input rows ({diff}): write to a new --out, \
                         or pass --redo to remake the dataset",
                        out.url()
                    ))
                })?;
                on_row(chunk.len() as u64);
                let ids = index.kept_ids.iter().map(String::as_str).chain(std::iter::repeat(""));
                for ((c, print), id) in index.content_hashes.iter().zip(&index.fingerprints).zip(ids) {
                    seen.add(c, *print, id);
                }
                index
            }
            None => {
                let (mut index, tar) = curate_shard(chunk, fetcher, opts, &mut seen, on_row);
                index.options = options;
                if index.samples > 0 {
                    out.put(&name, tar)?;
                }
                out.put(&index_key, serde_json::to_vec(&index).unwrap())?;
                index
            }
        };
        for (reason, n) in &index.dropped {
            *stats.dropped.entry(reason.clone()).or_default() += n;
        }
        for (l, n) in &index.licences {
            *stats.licences.entry(l.clone()).or_default() += n;
        }
        stats.kept += index.samples;
        area_kept.extend(&index.area_kept);
        drops.extend(index.drops.iter().cloned());
        attributions.extend(index.attributions.iter().cloned());
        if index.samples > 0 {
            manifest.shards.push(ShardEntry {
                name,
                samples: index.samples,
                bytes: index.bytes,
                sha256: index.sha256,
                buckets: if opts.buckets.is_some() { index.buckets.clone() } else { BTreeMap::new() },
            });
        }
    }
    if manifest.shards.is_empty() {
        return Err(CurateError::Invalid(format!("{source}: no row survived curation ({:?})", stats.dropped)));
    }
    write_attributions(out, &attributions)?;
    manifest.attribution = Some("ATTRIBUTION.md".into());
    let jsonl: String = drops.iter().map(|d| serde_json::to_string(d).unwrap() + "\n").collect();
    out.put(DROPPED, jsonl)?;
    manifest.dropped = Some(DROPPED.into());
    stats.area_kept = crate::data::manifest::AreaKept::of(&area_kept);
    manifest.curation = Some(stats);
    manifest.write(out)?;
    Ok(manifest)
}

/// Fetches and prepares a chunk in parallel, then deduplicates it in row order (deterministic).
/// Decodes an image with at most `max_mb` MiB of decoder allocations (the image crate's default is
/// 512 MiB, which a valid 10k×16k PNG exceeds).
fn decode_limited(bytes: &[u8], max_mb: u64) -> image::ImageResult<DynamicImage> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_mb.saturating_mul(1 << 20));
    reader.limits(limits);
    reader.decode()
}

fn curate_shard(
    chunk: &[(&Row, Licence)],
    fetcher: &Fetcher,
    opts: &CurateOptions,
    seen: &mut Seen,
    on_row: &(dyn Fn(u64) + Sync),
) -> (ShardIndex, Vec<u8>) {
    use rayon::prelude::*;
    // Fetch, decode and resize on rayon's pool (all cores); deduplication below stays in row order.
    let prepared: Vec<Prepared> = chunk
        .par_iter()
        .map(|(row, _)| {
            let p = prepare(row, fetcher, opts);
            on_row(1);
            p
        })
        .collect();
    let mut index = ShardIndex::default();
    let mut samples = Vec::new();
    let ext = match opts.format {
        ImageFormat::Png => "png",
        ImageFormat::Jpg => "jpg",
    };
    for ((row, licence), p) in chunk.iter().zip(prepared) {
        // The kept row this image duplicates exactly, else nearly, looked up once.
        let (exact, near) = match &p {
            Prepared::Image { content, print, .. } => match seen.content.get(content) {
                Some(kept) => (Some(kept.clone()), None),
                None => (None, seen.near(print, opts.near_duplicate_bits, opts.keep_colour_variants)),
            },
            Prepared::Dropped(..) => (None, None),
        };
        let (reason, detail, matched) = match (p, exact, near) {
            (Prepared::Dropped(reason, why), _, _) => {
                tracing::debug!(id = %row.id, image = %row.image, "dropped ({reason}): {why}");
                (reason, why, None)
            }
            (Prepared::Image { content, .. }, Some(kept), _) => {
                ("duplicate", format!("the same bytes (sha256 {}) as a kept row", &content[..16]), Some(kept))
            }
            (Prepared::Image { .. }, None, Some(m)) => {
                let detail = format!(
                    "content's difference hash within {} bits of a kept row's, silhouettes overlapping {:.0}%",
                    m.bits,
                    100.0 * m.iou
                );
                ("near_duplicate", detail, Some(m.kept))
            }
            (Prepared::Image { content, print, encoded, bucket, area_kept }, None, None) => {
                seen.add(&content, print, &row.id);
                index.kept_ids.push(row.id.clone());
                *index.buckets.entry(bucket.name()).or_default() += 1;
                index.area_kept.push(area_kept as f32);
                let key = sanitize_key(&row.id);
                let meta = serde_json::json!({
                    "id": row.id, "licence": licence.to_string(), "licence_raw": row.licence,
                    "author": row.author, "source": row.source, "caption": row.caption,
                    "bucket": bucket.name(), "area_kept": (area_kept * 1e4).round() / 1e4,
                });
                samples.push(
                    Sample::new(&key)
                        .with(ext, encoded)
                        .with("txt", row.caption.clone())
                        .with("json", serde_json::to_vec(&meta).unwrap()),
                );
                index.content_hashes.push(content);
                index.fingerprints.push(print);
                *index.licences.entry(licence.to_string()).or_default() += 1;
                if licence.requires_attribution() {
                    index.attributions.push(Attribution {
                        key,
                        id: row.id.clone(),
                        title: row.caption.clone(),
                        author: row.author.clone(),
                        licence: licence.to_string(),
                        source: row.source.clone(),
                    });
                }
                continue;
            }
        };
        *index.dropped.entry(reason.into()).or_default() += 1;
        index.drops.push(DropRecord { id: row.id.clone(), reason: reason.into(), detail, matched });
    }
    let bytes = write_shard(&samples);
    index.samples = samples.len() as u64;
    index.bytes = bytes.len() as u64;
    index.sha256 = sha256_hex(&bytes);
    (index, bytes)
}

/// `ATTRIBUTION.md` for people, `attribution.jsonl` for tools (model cards read it).
fn write_attributions(out: &Store, items: &[Attribution]) -> Result<(), StoreError> {
    let mut jsonl = String::new();
    let mut md = String::from(
        "# Attribution\n\nThis dataset contains the following works, used under the licences named. \
         Works under CC0 or the Public Domain Mark need no credit and are not listed.\n\n\
         | work | author | licence | source |\n|---|---|---|---|\n",
    );
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    for a in items {
        jsonl.push_str(&serde_json::to_string(a).unwrap());
        jsonl.push('\n');
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            cell(&a.title),
            cell(if a.author.is_empty() { "(unknown)" } else { &a.author }),
            a.licence,
            cell(&a.source)
        ));
    }
    out.put("attribution.jsonl", jsonl)?;
    out.put("ATTRIBUTION.md", md)
}

/// Reads back a curated dataset's attributions.
pub fn read_attributions(store: &Store) -> Result<Vec<Attribution>, CurateError> {
    let Some(b) = store.get_opt("attribution.jsonl")? else { return Ok(Vec::new()) };
    String::from_utf8_lossy(&b)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| CurateError::Invalid(format!("{}/attribution.jsonl: {e}", store.url())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::imageops::FilterType;

    #[test]
    fn a_gradient_image_is_matched_rescaled_but_not_mirrored() {
        let img = RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 0]));
        let small = image::imageops::resize(&img, 40, 40, FilterType::Triangle);
        let flipped = image::imageops::flip_horizontal(&img);
        let mut seen = Seen::default();
        seen.add("a", Fingerprint::of(&img), "row-a");
        assert_eq!(seen.near(&Fingerprint::of(&small), 2, false).map(|m| m.kept), Some("row-a".into()));
        assert!(seen.near(&Fingerprint::of(&flipped), 3, false).is_none());
    }

    #[test]
    fn resize_crop_centres_and_composites_alpha() {
        let mut img = image::RgbaImage::from_pixel(100, 50, image::Rgba([0, 0, 0, 0]));
        img.put_pixel(50, 25, image::Rgba([255, 0, 0, 255]));
        let out = resize_crop(&DynamicImage::ImageRgba8(img), 20);
        assert_eq!(out.dimensions(), (20, 20));
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
    }
}
