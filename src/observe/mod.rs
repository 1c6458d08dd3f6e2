//! Watching a run: TensorBoard event files in the store (`tensorboard`), GPU telemetry through
//! NVML (`telemetry`), a worker's start-up self-check (`selfcheck`) and the web dashboard
//! (`dashboard`).

pub mod dashboard;
pub mod selfcheck;
pub mod telemetry;
pub mod tensorboard;
