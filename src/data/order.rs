//! Cached training data (latents + text embeddings) and the deterministic order it is read in.
//!
//! The order depends only on (seed, epoch), and the position is two integers, so a checkpoint
//! records exactly where a resumed run picks up.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Where the reader stands: the epoch, and how many samples of its permutation were taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub cursor: u64,
}

/// Deterministic shuffled order over `len` samples, one permutation per epoch: the sample at
/// absolute position `g` (counting every sample ever drawn) is `perm(seed, g / len)[g % len]`.
/// Positions are what training steps and round plans hand out, so any split of the stream into
/// ranges reads exactly the samples one uninterrupted reader would.
#[derive(Debug, Clone)]
pub struct Order {
    seed: u64,
    len: usize,
    epoch: u64,
    perm: Vec<u32>,
}

/// SplitMix64 finaliser: decorrelates seeds derived from (seed, counter) pairs.
pub fn mix_seed(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Order {
    pub fn new(seed: u64, len: usize) -> Order {
        assert!(len > 0, "empty dataset");
        let mut o = Order { seed, len, epoch: 0, perm: Vec::new() };
        o.perm = o.permutation(0);
        o
    }

    fn permutation(&self, epoch: u64) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(self.seed, epoch));
        let mut p: Vec<u32> = (0..self.len as u32).collect();
        p.shuffle(&mut rng);
        p
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The (epoch, cursor) of absolute position `g`.
    pub fn position(&self, g: u64) -> DataPosition {
        DataPosition { epoch: g / self.len as u64, cursor: g % self.len as u64 }
    }

    /// The sample index at absolute position `g`.
    pub fn at(&mut self, g: u64) -> i64 {
        let DataPosition { epoch, cursor } = self.position(g);
        if epoch != self.epoch {
            self.epoch = epoch;
            self.perm = self.permutation(epoch);
        }
        self.perm[cursor as usize] as i64
    }

    /// Sample indices of positions `start..start + n`.
    pub fn range(&mut self, start: u64, n: u64) -> Vec<i64> {
        (start..start + n).map(|g| self.at(g)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_pure_function_of_position_and_covers_each_epoch() {
        let mut a = Order::new(7, 10);
        let first = a.range(0, 25);
        let mut sorted = first[..10].to_vec();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(first[..10], first[10..20], "epochs must be shuffled differently");
        // A fresh reader starting mid-stream (a resumed run, another worker) reads the same samples.
        assert_eq!(Order::new(7, 10).range(13, 12), first[13..25].to_vec());
        assert_eq!(a.position(23), DataPosition { epoch: 2, cursor: 3 });
    }
}
