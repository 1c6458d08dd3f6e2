//! Training on one machine: the trainer (model, EMA, AdamW, data), the rectified-flow objective,
//! the optimizer and schedule, checkpoints in the store, and the one-machine loop (`run`).

pub mod checkpoint;
pub mod objective;
pub mod optim;
pub mod run;
mod trainer;

pub use trainer::*;
