//! Watching a run, below every layer that reports: TensorBoard event files in the store
//! (`tensorboard`) and GPU/CPU telemetry (`telemetry`). The web dashboard reading them is
//! `crate::dashboard`; a worker's start-up self-check is `sync::selfcheck`.

pub mod telemetry;
pub mod tensorboard;
