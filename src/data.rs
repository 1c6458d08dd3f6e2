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

/// Deterministic shuffled order over `len` samples, one permutation per epoch.
#[derive(Debug, Clone)]
pub struct Order {
    seed: u64,
    len: usize,
    pos: DataPosition,
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
    pub fn new(seed: u64, len: usize, pos: DataPosition) -> Order {
        assert!(len > 0, "empty dataset");
        let mut o = Order { seed, len, pos, perm: Vec::new() };
        o.perm = o.permutation(pos.epoch);
        o
    }

    fn permutation(&self, epoch: u64) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(self.seed, epoch));
        let mut p: Vec<u32> = (0..self.len as u32).collect();
        p.shuffle(&mut rng);
        p
    }

    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// The next `n` sample indices, rolling into the next epoch when one ends.
    pub fn take(&mut self, n: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.pos.cursor as usize >= self.len {
                self.pos = DataPosition { epoch: self.pos.epoch + 1, cursor: 0 };
                self.perm = self.permutation(self.pos.epoch);
            }
            out.push(self.perm[self.pos.cursor as usize] as i64);
            self.pos.cursor += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_resumes_exactly_and_covers_each_epoch() {
        let mut a = Order::new(7, 10, DataPosition::default());
        let first: Vec<i64> = a.take(25);
        let mut sorted = first[..10].to_vec();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(first[..10], first[10..20], "epochs must be shuffled differently");
        let mut b = Order::new(7, 10, DataPosition::default());
        b.take(13);
        let mut c = Order::new(7, 10, b.position());
        assert_eq!(c.take(12), first[13..25].to_vec());
    }
}
