//! skytrain: train an open text-to-image diffusion transformer on rented GPUs, through an object
//! store. Data flow: curate → encode → stream → train → sync → checkpoint → sample → publish,
//! with `store` under everything (see ../shared/DESIGN.md).
//!
//! `tch` (libtorch) is used only in `model`, `objective`, `optim`, `train`, `sample` and the demo's
//! encoders; `store`, `data` and `config` work on plain buffers.

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
pub mod model;
pub mod observe;
pub mod run_model;
pub mod sample;
pub mod store;
pub mod sync;
pub mod train;
