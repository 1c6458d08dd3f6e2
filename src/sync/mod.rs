//! Training across providers: elastic DiLoCo rounds through the object store (DESIGN §3–4).
//!
//! A round r+1 starts from the global parameters θ_r of commit r. The coordinator writes the
//! round's plan (members, data ranges, deadline); each member runs H inner AdamW steps on its
//! ranges and uploads its pseudo-gradient Δ = θ_r − θ_local (compressed, signed); the coordinator
//! validates, averages (weighted by samples), takes an outer Nesterov step and writes the commit
//! record create-only. Everything lives in the store: any process may be killed at any moment.

pub mod compress;
pub mod coordinator;
pub mod history;
pub mod keys;
pub mod outer;
pub mod params;
pub mod protocol;
pub mod scoring;
pub mod selfcheck;
pub mod sparse;
pub mod worker;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Store errors are the transient kind: the round loops wait and retry on them.
    #[error(transparent)]
    Store(Box<crate::store::StoreError>),
    #[error(transparent)]
    Params(#[from] params::ParamsError),
    #[error(transparent)]
    Run(Box<crate::train::run::RunError>),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("{0}")]
    Other(String),
}

impl From<crate::store::StoreError> for SyncError {
    fn from(e: crate::store::StoreError) -> Self {
        SyncError::Store(Box::new(e))
    }
}

impl From<crate::train::run::RunError> for SyncError {
    fn from(e: crate::train::run::RunError) -> Self {
        match e {
            crate::train::run::RunError::Store(s) => SyncError::Store(Box::new(s)),
            other => SyncError::Run(Box::new(other)),
        }
    }
}

/// How long a round loop has been unable to reach the store: store errors are waited out (with a
/// pause between tries) until `max` has passed, then they become fatal with a clear message.
pub struct Outage {
    since: Option<std::time::Instant>,
    max: std::time::Duration,
}

impl Outage {
    pub fn new(max: std::time::Duration) -> Outage {
        Outage { since: None, max }
    }

    /// The store answered.
    pub fn ok(&mut self) {
        self.since = None;
    }

    /// Records a store error: Ok after a pause while within the bound, Err once past it.
    pub fn wait_out(&mut self, e: &crate::store::StoreError, pause: std::time::Duration) -> Result<(), SyncError> {
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() > self.max {
            return Err(SyncError::Other(format!("store unreachable for {:?}, giving up: {e}", since.elapsed())));
        }
        tracing::warn!("store error, will retry: {e}");
        std::thread::sleep(pause);
        Ok(())
    }
}

/// Called by the coordinator after each commit it writes.
pub type CommitHook = Box<dyn FnMut(&protocol::Commit) + Send>;
/// Called by a worker after each update it sends: (round, mean inner loss, bytes).
pub type UpdateHook = Box<dyn FnMut(u64, f64, u64) + Send>;
