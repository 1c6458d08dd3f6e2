//! Scoring updates by their effect before they are averaged (after Templar's "Gauntlet"): the loss
//! of θ and of θ − α·Δ (a step of `score_step` along the update: whether it is a descent
//! direction, which the full step of a few noisy inner steps need not show) on two sets at fixed
//! noise: the member's own first samples of the round, and held-out samples the round fixes (the
//! next positions no one has trained on yet), in whole batches. An update must lower the held-out
//! loss, and lower it per unit of its norm (how well it points down the real data's loss, which
//! scaling cannot fake) by at least a fraction of the round's median, unless the measurement's
//! standard error leaves room for it to; of two near-identical updates, the one whose record
//! reached the store later is a copy (free riding: a copier has the original only once it is
//! uploaded), and on a tie the one that fits its own member's data less. Everything scored is in the store (θ, the
//! updates, the plan), so anyone can recompute a round's scores.

use super::params::ParamSet;
use super::protocol::{prefix, DataRange, Plan, Score};
use super::SyncError;
use crate::config::{RunSpec, SyncConfig};
use crate::data::mix_seed;
use crate::store::Store;
use crate::train::Trainer;

/// The model and data the coordinator scores with, opened once.
pub struct Scorer {
    trainer: Trainer,
}

/// One update to score: its member's consumed data and its decoded pseudo-gradient.
pub struct Entry<'a> {
    pub worker: &'a str,
    /// When its record reached the store (the store's clock).
    pub uploaded_ms: u64,
    pub consumed: &'a [DataRange],
    pub delta: &'a ParamSet,
}

impl Scorer {
    pub fn open(store: &Store, spec: &RunSpec) -> Result<Scorer, SyncError> {
        let data = crate::train::run::open_data(store, spec)?;
        // Every core: the workers wait on the commit while it scores. (Scores recomputed with
        // another thread count can differ in the last bits of the float reductions.)
        let mut spec = spec.clone();
        spec.train.threads = 0;
        let trainer = Trainer::with_data(spec, data).map_err(SyncError::Other)?;
        Ok(Scorer { trainer })
    }

    fn load(&mut self, weights: &ParamSet) -> Result<(), SyncError> {
        self.trainer
            .load_weights(&weights.to_safetensors(), "scored weights")
            .map_err(|e| SyncError::Other(e.to_string()))
    }

    /// The loaded weights' fixed-noise loss of each sample at `positions`: in one pass, or one
    /// training batch at a time in a bucketed dataset (a batch is one bucket).
    fn losses(&mut self, positions: &[u64], seed: u64) -> Result<Vec<f64>, SyncError> {
        let b = if self.trainer.data.is_bucketed() {
            self.trainer.spec.train.batch_size as usize
        } else {
            positions.len().max(1)
        };
        let mut out = Vec::with_capacity(positions.len());
        for (i, batch) in positions.chunks(b).enumerate() {
            out.extend(
                self.trainer.losses_at(batch, mix_seed(seed, i as u64)).map_err(crate::train::run::RunError::from)?,
            );
        }
        Ok(out)
    }

    /// Scores each entry against θ for round `plan`.
    pub fn score(
        &mut self,
        spec: &RunSpec,
        plan: &Plan,
        theta: &ParamSet,
        entries: &[Entry],
    ) -> Result<Vec<Score>, SyncError> {
        // Whole batches from batch-aligned starts (one bucket each in a bucketed dataset).
        let b = spec.train.batch_size as u64;
        let n = (spec.sync.score_batch as u64).div_ceil(b) * b;
        let held_out: Vec<u64> = (plan.next_position..plan.next_position + n).collect();
        let alpha = spec.sync.score_step as f32;
        let seed = mix_seed(spec.train.seed ^ 0x5C0E, plan.round);
        // Each member's first training batch of the round.
        let owns: Vec<Vec<u64>> = entries
            .iter()
            .map(|e| {
                let own: Vec<u64> = prefix(e.consumed, b).iter().flat_map(|r| r.start..r.start + r.len).collect();
                own[..own.len() / b as usize * b as usize].to_vec()
            })
            .collect();
        // θ loaded once for every "before" loss, then each member's θ − α·Δ for its "after" pair.
        self.load(theta)?;
        let held_out_before = self.losses(&held_out, seed)?;
        let own_before = owns.iter().map(|own| self.losses(own, seed)).collect::<Result<Vec<_>, _>>()?;
        let mut scores = Vec::with_capacity(entries.len());
        for ((e, own), own_before) in entries.iter().zip(&owns).zip(own_before) {
            let mut after = theta.clone();
            for (p, d) in after.data.iter_mut().zip(&e.delta.data) {
                for (x, y) in p.iter_mut().zip(d) {
                    *x -= alpha * y;
                }
            }
            self.load(&after)?;
            let held_out_after = self.losses(&held_out, seed)?;
            let gains: Vec<f64> = held_out_before.iter().zip(&held_out_after).map(|(x, y)| x - y).collect();
            scores.push(Score {
                held_out_before: mean(&held_out_before),
                held_out_after: mean(&held_out_after),
                held_out_gain_se: standard_error(&gains),
                own_before: mean(&own_before),
                own_after: mean(&self.losses(own, seed)?),
            });
        }
        Ok(scores)
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Standard error of the mean of `x` (0 for fewer than two values).
fn standard_error(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (x.len() - 1) as f64;
    (var / x.len() as f64).sqrt()
}

fn cosine(a: &ParamSet, b: &ParamSet) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.data.iter().flatten().zip(b.data.iter().flatten()) {
        ab += *x as f64 * *y as f64;
        aa += *x as f64 * *x as f64;
        bb += *y as f64 * *y as f64;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Why each scored update is rejected (None: kept), in order.
pub fn judge(entries: &[Entry], scores: &[Score], cfg: &SyncConfig) -> Vec<Option<String>> {
    let mut out: Vec<Option<String>> = vec![None; entries.len()];
    for i in 0..entries.len() {
        for j in i + 1..entries.len() {
            let c = cosine(entries[i].delta, entries[j].delta);
            if c >= cfg.duplicate_cosine {
                let later =
                    (entries[j].uploaded_ms, -scores[j].own_gain()) >= (entries[i].uploaded_ms, -scores[i].own_gain());
                let (copy, original) = if later { (j, i) } else { (i, j) };
                out[copy] = Some(format!(
                    "a near copy (cosine {c:.4}) of `{}`'s update: free riding",
                    entries[original].worker
                ));
            }
        }
    }
    // Held-out gain per unit norm: how well each update points down the real data's loss. An
    // update is judged by the most favourable value its measurement allows (gain + z·se): late in
    // training an honest update's effect on a few dozen samples is within the noise, and only a
    // deficit the measurement shows is grounds to reject it.
    let norm = |i: usize| entries[i].delta.l2_norm().max(f64::MIN_POSITIVE);
    let efficiency: Vec<f64> = (0..entries.len()).map(|i| scores[i].held_out_gain() / norm(i)).collect();
    let kept: Vec<f64> = (0..entries.len()).filter(|&i| out[i].is_none()).map(|i| efficiency[i]).collect();
    let median = super::outer::median(&kept);
    for (i, s) in scores.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        let gain = s.held_out_gain();
        let upper = gain + cfg.score_z * s.held_out_gain_se;
        if upper <= 0.0 || upper / norm(i) < cfg.score_min_fraction * median {
            out[i] = Some(format!(
                "does not improve the held-out loss enough: {:.5} → {:.5} (gain {gain:.2e} ± {:.1e}, at most \
                 {:.2e} per unit of norm; the round's median {median:.2e}, at least {} of it needed); own samples \
                 {:.5} → {:.5}",
                s.held_out_before,
                s.held_out_after,
                s.held_out_gain_se,
                upper / norm(i),
                cfg.score_min_fraction,
                s.own_before,
                s.own_after
            ));
        }
    }
    out
}
