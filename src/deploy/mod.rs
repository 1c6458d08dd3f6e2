//! Deploy and pay: Akash SDL manifests generated from the run spec and a hardware plan (`sdl`),
//! and the cost ledger: lease prices, GPU-hours from heartbeats, forecasts and budgets (`cost`).

pub mod cost;
pub mod delay;
pub mod gpus;
pub mod rehearse;
pub mod sdl;
