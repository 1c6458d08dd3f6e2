//! The demo's text encoder, built rather than downloaded: a fixed word vocabulary (the caption
//! grammar's words) with seeded random embeddings plus sinusoidal positions. Cross-attention in the
//! denoiser learns what the words mean; this encoder only has to keep them distinct and ordered.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::shapes::{COLORS, RELATIONS, SHAPES};

pub struct WordEncoder {
    pub vocab: Vec<String>,
    pub dim: usize,
    pub len: usize,
    table: Vec<f32>,
    pad: Vec<f32>,
}

impl WordEncoder {
    pub fn new(dim: usize, len: usize, seed: u64) -> WordEncoder {
        let mut vocab: Vec<String> = vec!["a".into()];
        vocab.extend(COLORS.iter().map(|c| c.0.to_string()));
        vocab.extend(SHAPES.iter().map(|s| s.to_string()));
        for r in RELATIONS {
            for w in r.split_whitespace() {
                if !vocab.iter().any(|v| v == w) {
                    vocab.push(w.to_string());
                }
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| StandardNormal.sample(&mut rng)).collect() };
        let table = draw(vocab.len() * dim);
        let pad = draw(dim).iter().map(|v| v * 0.1).collect();
        WordEncoder { vocab, dim, len, table, pad }
    }

    /// `(tokens [len·dim], pooled [dim])` for a caption; unknown words and over-long captions are
    /// errors naming the word.
    pub fn encode(&self, caption: &str) -> Result<(Vec<f32>, Vec<f32>), String> {
        let words: Vec<&str> = caption.split_whitespace().collect();
        if words.len() > self.len {
            return Err(format!(
                "caption `{caption}` has {} words, the encoder takes at most {}",
                words.len(),
                self.len
            ));
        }
        let mut tokens = Vec::with_capacity(self.len * self.dim);
        let mut pooled = vec![0f32; self.dim];
        for (pos, w) in words.iter().enumerate() {
            let id = self.vocab.iter().position(|v| v == w).ok_or_else(|| {
                format!("word `{w}` in caption `{caption}` is not in the demo vocabulary {:?}", self.vocab)
            })?;
            let emb = &self.table[id * self.dim..(id + 1) * self.dim];
            for (k, e) in emb.iter().enumerate() {
                let freq = 1.0 / 100f32.powf((k / 2 * 2) as f32 / self.dim as f32);
                let angle = pos as f32 * freq;
                let posenc = if k % 2 == 0 { angle.sin() } else { angle.cos() };
                tokens.push(e + 0.5 * posenc);
                pooled[k] += e / words.len() as f32;
            }
        }
        for _ in words.len()..self.len {
            tokens.extend_from_slice(&self.pad);
        }
        Ok((tokens, pooled))
    }
}
