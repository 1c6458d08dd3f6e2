//! Training data, from a user's metadata table to batches in the trainer:
//! `curate` (licence filter, dedupe, resize → webdataset shards) → `encode` (cached latents and text
//! embeddings, in `encode`) → `stream` (shards read from the store into batches).
//!
//! Shards are webdataset tar files described by a dataset manifest (`manifest.json`, written last).

pub mod buckets;
pub mod curate;
pub mod dedupe;
pub mod encode;
pub mod licence;
pub mod manifest;
pub mod order;
pub mod stream;
pub mod wds;

pub use order::{mix_seed, DataPosition, Order};
