//! The outer step on plain buffers: averaging pseudo-gradients and SGD with (Nesterov) momentum,
//! as in DiLoCo. Shared by the coordinator and by history replay, so both compute bit-identical
//! results in the same order.

use super::params::ParamSet;
use crate::config::{Robust, SyncConfig};

/// Combines accepted pseudo-gradients `(Δ_i, samples_i)` in the given order.
pub fn aggregate(updates: &[(ParamSet, u64)], cfg: &SyncConfig) -> ParamSet {
    assert!(!updates.is_empty(), "aggregate needs at least one update");
    let total: u64 = updates.iter().map(|(_, s)| *s).sum();
    let mut out = ParamSet::zeros_like(&updates[0].0);
    match cfg.robust {
        Robust::None | Robust::ClipToMedian => {
            let scales: Vec<f32> = if cfg.robust == Robust::ClipToMedian {
                let norms: Vec<f64> = updates.iter().map(|(d, _)| d.l2_norm()).collect();
                let med = median(&norms);
                norms.iter().map(|&n| if n > med && n > 0.0 { (med / n) as f32 } else { 1.0 }).collect()
            } else {
                vec![1.0; updates.len()]
            };
            let mut mean = WeightedMean::new(&out, total, cfg.mean_over_senders);
            for ((d, samples), scale) in updates.iter().zip(&scales) {
                mean.add(d, *samples, *scale);
            }
            out = mean.finish();
        }
        Robust::TrimmedMean => {
            let trim = if updates.len() > 2 * cfg.trim { cfg.trim } else { 0 };
            let mut column = vec![0f32; updates.len()];
            for t in 0..out.data.len() {
                for j in 0..out.data[t].len() {
                    for (c, (d, _)) in column.iter_mut().zip(updates) {
                        *c = d.data[t][j];
                    }
                    column.sort_by(f32::total_cmp);
                    let kept = &column[trim..column.len() - trim];
                    out.data[t][j] = kept.iter().sum::<f32>() / kept.len() as f32;
                }
            }
        }
    }
    out
}

/// The samples-weighted mean of updates added one at a time, as [`aggregate`] computes it without
/// trimming (bit for bit), so a replay need not hold every decoded update at once.
///
/// Over senders, each entry is divided by the weight of the updates in which it is non-zero
/// rather than by all of them: a sparse update's unsent entries are "no opinion", not a vote for
/// zero, so an entry only one member of eight sent is not shrunk eightfold. Not for int8: there a
/// value quantised to zero is a vote for a small value, and dropping it would inflate the rest.
pub struct WeightedMean {
    sum: ParamSet,
    /// Per entry, the weights of the updates that sent it (over senders only).
    weight: Option<ParamSet>,
    total: u64,
}

impl WeightedMean {
    /// A mean of updates shaped like `like` whose samples add up to `total`; `over_senders` as
    /// `SyncConfig::mean_over_senders`.
    pub fn new(like: &ParamSet, total: u64, over_senders: bool) -> WeightedMean {
        let weight = over_senders.then(|| ParamSet::zeros_like(like));
        WeightedMean { sum: ParamSet::zeros_like(like), weight, total }
    }

    fn fraction(&self, samples: u64) -> f32 {
        (samples as f64 / self.total.max(1) as f64) as f32
    }

    /// Adds `scale` × update `d` of `samples` samples.
    pub fn add(&mut self, d: &ParamSet, samples: u64, scale: f32) {
        let w = self.fraction(samples);
        let f = w * scale;
        for (t, (o, x)) in self.sum.data.iter_mut().zip(&d.data).enumerate() {
            for (a, b) in o.iter_mut().zip(x) {
                *a += f * b;
            }
            if let Some(weight) = self.weight.as_mut() {
                for (c, b) in weight.data[t].iter_mut().zip(x) {
                    if *b != 0.0 {
                        *c += w;
                    }
                }
            }
        }
    }

    /// Adds `scale` × a sparse update given by its entries (flat index, value; indices
    /// increasing). Bit for bit what [`WeightedMean::add`] gives for the dense update: adding
    /// f·0 = +0 to a sum that started at +0 changes nothing.
    pub fn add_entries(&mut self, entries: &[(usize, f32)], samples: u64, scale: f32) {
        let w = self.fraction(samples);
        let f = w * scale;
        let (mut t, mut start) = (0, 0);
        for &(i, v) in entries {
            while t < self.sum.data.len() && i >= start + self.sum.data[t].len() {
                start += self.sum.data[t].len();
                t += 1;
            }
            if t < self.sum.data.len() {
                self.sum.data[t][i - start] += f * v;
                if let Some(weight) = self.weight.as_mut().filter(|_| v != 0.0) {
                    weight.data[t][i - start] += w;
                }
            }
        }
    }

    pub fn finish(mut self) -> ParamSet {
        if let Some(weight) = &self.weight {
            for (o, c) in self.sum.data.iter_mut().zip(&weight.data) {
                for (a, c) in o.iter_mut().zip(c) {
                    if *c > 0.0 {
                        *a /= c;
                    }
                }
            }
        }
        self.sum
    }
}

/// θ ← θ − lr·(Δ̄ + μ·m) with m ← μ·m + Δ̄ (Nesterov), or θ ← θ − lr·m (heavy ball).
pub fn step(theta: &mut ParamSet, momentum: &mut ParamSet, avg: &ParamSet, cfg: &SyncConfig) {
    let (lr, mu) = (cfg.outer_lr as f32, cfg.outer_momentum as f32);
    for ((p, m), g) in theta.data.iter_mut().zip(momentum.data.iter_mut()).zip(&avg.data) {
        for ((p, m), g) in p.iter_mut().zip(m.iter_mut()).zip(g) {
            *m = mu * *m + g;
            let d = if cfg.nesterov { g + mu * *m } else { *m };
            *p -= lr * d;
        }
    }
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: Vec<f32>) -> ParamSet {
        ParamSet { names: vec!["w".into()], shapes: vec![vec![v.len()]], data: vec![v] }
    }

    #[test]
    fn weighted_mean_and_outer_step() {
        let cfg = SyncConfig { outer_lr: 1.0, outer_momentum: 0.0, ..SyncConfig::default() };
        let avg = aggregate(&[(set(vec![1.0, 2.0]), 1), (set(vec![4.0, 8.0]), 3)], &cfg);
        assert_eq!(avg.data[0], vec![3.25, 6.5]);
        // lr 1, no momentum: θ − Δ̄.
        let mut theta = set(vec![10.0, 10.0]);
        let mut m = set(vec![0.0, 0.0]);
        step(&mut theta, &mut m, &avg, &cfg);
        assert_eq!(theta.data[0], vec![6.75, 3.5]);
        // Nesterov with μ = 0.9: second step moves by g + μ(μ m + g).
        let cfg = SyncConfig { outer_lr: 0.5, outer_momentum: 0.9, ..SyncConfig::default() };
        let mut theta = set(vec![0.0]);
        let mut m = set(vec![0.0]);
        step(&mut theta, &mut m, &set(vec![1.0]), &cfg);
        assert!((theta.data[0][0] - -0.95).abs() < 1e-6);
        step(&mut theta, &mut m, &set(vec![1.0]), &cfg);
        assert!((theta.data[0][0] - (-0.95 - 0.5 * (1.0 + 0.9 * 1.9))).abs() < 1e-5);
    }

    #[test]
    fn sparse_entries_sum_bit_for_bit_as_their_dense_update() {
        let like = ParamSet {
            names: vec!["a".into(), "b".into()],
            shapes: vec![vec![3], vec![4]],
            data: vec![vec![0.0; 3], vec![0.0; 4]],
        };
        let entries = [vec![(0, 0.3f32), (2, -0.0), (5, 1e-3)], vec![(1, -2.5f32), (3, 0.7), (6, 1e-30)]];
        let dense = |e: &[(usize, f32)]| {
            let mut flat = [0f32; 7];
            e.iter().for_each(|&(i, v)| flat[i] = v);
            ParamSet { data: vec![flat[..3].to_vec(), flat[3..].to_vec()], ..like.clone() }
        };
        let bits = |p: ParamSet| p.data.concat().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for over_senders in [false, true] {
            let new = || WeightedMean::new(&like, 7, over_senders);
            let (mut by_entries, mut by_dense) = (new(), new());
            for (e, samples) in entries.iter().zip([3, 4]) {
                by_entries.add_entries(e, samples, 0.9);
                by_dense.add(&dense(e), samples, 0.9);
            }
            assert_eq!(bits(by_entries.finish()), bits(by_dense.finish()), "over senders: {over_senders}");
        }
    }

    #[test]
    fn the_mean_over_senders_divides_each_entry_by_the_weight_of_those_that_sent_it() {
        let ups = vec![(set(vec![2.0, 0.0, 1.0]), 1), (set(vec![0.0, 0.0, 3.0]), 3)];
        let cfg = SyncConfig { mean_over_senders: true, ..SyncConfig::default() };
        // Entry 0: only the first sent it (its own value); entry 1: nobody (0); entry 2: both.
        assert_eq!(aggregate(&ups, &cfg).data[0], vec![2.0, 0.0, 0.25 * 1.0 + 0.75 * 3.0]);
        let all = aggregate(&ups, &SyncConfig { mean_over_senders: false, ..cfg });
        assert_eq!(all.data[0], vec![0.5, 0.0, 2.5]);
    }

    #[test]
    fn robust_aggregation_limits_an_outlier() {
        let ups = vec![(set(vec![1.0]), 1), (set(vec![1.2]), 1), (set(vec![1000.0]), 1)];
        let trimmed = aggregate(&ups, &SyncConfig { robust: Robust::TrimmedMean, trim: 1, ..SyncConfig::default() });
        assert_eq!(trimmed.data[0], vec![1.2]);
        let clipped = aggregate(&ups, &SyncConfig { robust: Robust::ClipToMedian, ..SyncConfig::default() });
        assert!((clipped.data[0][0] - (1.0 + 1.2 + 1.2) / 3.0).abs() < 1e-5);
    }
}
