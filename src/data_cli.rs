//! The data commands of the `skytrain` binary: curate, encode, and dataset inspection.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use skytrain::data::curate::{self, CurateOptions, Fetcher, ImageFormat};
use skytrain::data::licence::Allowlist;
use skytrain::progress;
use skytrain::store::Store;

#[derive(Args)]
pub struct CurateArgs {
    /// Metadata table: `.jsonl` or `.parquet` with id, image, caption, licence, author, source.
    pub table: PathBuf,
    /// Where the shards go (local folder or s3://bucket/prefix).
    #[arg(long)]
    pub out: String,
    #[arg(long, default_value_t = 256)]
    pub resolution: u32,
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
    /// Near-duplicate radius in bits of the 64-bit difference hash (0 disables, at most 3).
    #[arg(long, default_value_t = 2)]
    pub near_duplicate_bits: u32,
    #[arg(long, default_value = "shard")]
    pub prefix: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Png,
    Jpg,
}

pub fn curate(a: CurateArgs) -> Result<()> {
    let rows = curate::read_table(&a.table)?;
    let opts = CurateOptions {
        resolution: a.resolution,
        min_side: a.min_side.unwrap_or(a.resolution / 2),
        shard_size: a.shard_size,
        allow: Allowlist::parse(&a.allow).map_err(anyhow::Error::msg).context("--allow")?,
        format: match a.format {
            Format::Png => ImageFormat::Png,
            Format::Jpg => ImageFormat::Jpg,
        },
        near_duplicate_bits: a.near_duplicate_bits,
        prefix: a.prefix,
        ..Default::default()
    };
    let out = Store::open(&a.out)?;
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
    Ok(())
}
