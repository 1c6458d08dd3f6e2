//! skytrain: train an open text-to-image diffusion transformer on rented GPUs, through an object
//! store. Data flow: `data` (curate → encode → stream) → `train` (trainer, checkpoints, one-machine
//! loop) → `sync` (DiLoCo rounds) → `run_model` → `sample` / `export`, with `store`, `config` and
//! `tensorfile` under everything, `ledger` and `observe` beside, `dashboard`, `deploy` and `demo` on
//! top (see ../shared/DESIGN.md). Lower layers never import higher ones; the library never prints,
//! parses a command line or spawns its own executable (the binary, `src/main.rs` + `src/cli/`,
//! does).
//!
//! `tch` (libtorch) is used by the model, the trainer, the encoders, sampling and export (and the
//! worker's self-check); `store`, `config`, the data stream, the ledger and the round protocol
//! work on plain buffers.

// tch's `+=` on tensors is an in-place add, which autograd refuses on activations it saved for
// backward; `x = x + y` is the intended, out-of-place form throughout the model code.
#![allow(clippy::assign_op_pattern)]

pub mod allocator;
pub mod bench;
pub mod config;
pub mod dashboard;
pub mod data;
pub mod demo;
pub mod deploy;
pub mod export;
pub mod ledger;
pub mod libtorch;
pub mod model;
pub mod observe;
pub mod run_model;
pub mod sample;
pub mod store;
pub mod sync;
pub mod tensorfile;
pub mod train;
