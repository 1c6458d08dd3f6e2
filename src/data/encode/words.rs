//! A text encoder built rather than downloaded (the demo's): a closed word vocabulary (e.g. a
//! caption grammar's words) with seeded random tables. Token i of a caption of n words is
//!
//! `words[w_i] + context[w_{i-1}] + positions[i] + positions_from_end[n-1-i]`
//!
//! The context term is what a trained contextual encoder (CLIP, T5) gives a word for free: the
//! token for "circle" in "a red circle" also says "red", so the denoiser binds colour to shape
//! with one cross-attention lookup instead of learning to combine two tokens (BENCHMARKS.md, "Demo"). Positions counted from both ends put the first
//! object's words and the last object's words at fixed offsets whatever the relation's length.
//! Which object goes where ("above", "to the left of") needs words related across the caption,
//! which a fixed table cannot give: `dit-tiny`'s text refiner block learns that.
//! The tables are stored with the run (and exported beside the model) so sampling never depends
//! on regenerating them.

use std::collections::{BTreeMap, HashMap};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::model::weights::WeightsError;

/// Recorded in the stored encoder, so a store written by another encoder layout is refused.
const FORMAT: &str = "skytrain-word-encoder/2";
const POSITION_SCALE: f32 = 0.5;
const FROM_END_SCALE: f32 = 0.5;
const CONTEXT_SCALE: f32 = 1.0;

#[derive(Debug)]
pub struct WordEncoder {
    pub vocab: Vec<String>,
    pub dim: usize,
    pub len: usize,
    /// [vocab, dim]: each word's own embedding.
    words: Vec<f32>,
    /// [vocab, dim]: what a word adds to the token after it.
    context: Vec<f32>,
    /// [len, dim]: sinusoidal, by position from the start.
    positions: Vec<f32>,
    /// [len, dim]: random, by position from the end.
    positions_from_end: Vec<f32>,
    /// [dim]: the token after the last word.
    pad: Vec<f32>,
}

impl WordEncoder {
    /// Seeded tables for a closed vocabulary (words in a caption outside it are refused).
    pub fn new(vocab: Vec<String>, dim: usize, len: usize, seed: u64) -> WordEncoder {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut draw = |n: usize, scale: f32| -> Vec<f32> {
            (0..n).map(|_| scale * Distribution::<f32>::sample(&StandardNormal, &mut rng)).collect()
        };
        let words = draw(vocab.len() * dim, 1.0);
        let pad = draw(dim, 0.1);
        let context = draw(vocab.len() * dim, CONTEXT_SCALE);
        let positions_from_end = draw(len * dim, FROM_END_SCALE);
        let positions = (0..len)
            .flat_map(|pos| {
                (0..dim).map(move |k| {
                    let angle = pos as f32 / 100f32.powf((k / 2 * 2) as f32 / dim as f32);
                    POSITION_SCALE * if k % 2 == 0 { angle.sin() } else { angle.cos() }
                })
            })
            .collect();
        WordEncoder { vocab, dim, len, words, context, positions, positions_from_end, pad }
    }

    fn row(table: &[f32], i: usize, dim: usize) -> &[f32] {
        &table[i * dim..(i + 1) * dim]
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
        let ids = words
            .iter()
            .map(|w| {
                self.vocab.iter().position(|v| v == w).ok_or_else(|| {
                    format!("word `{w}` in caption `{caption}` is not in the encoder's vocabulary {:?}", self.vocab)
                })
            })
            .collect::<Result<Vec<usize>, String>>()?;
        let d = self.dim;
        let mut tokens = Vec::with_capacity(self.len * d);
        let mut pooled = vec![0f32; d];
        for (pos, &id) in ids.iter().enumerate() {
            let start = tokens.len();
            tokens.extend_from_slice(Self::row(&self.words, id, d));
            let extra = [
                (pos > 0).then(|| Self::row(&self.context, ids[pos - 1], d)),
                Some(Self::row(&self.positions, pos, d)),
                Some(Self::row(&self.positions_from_end, ids.len() - 1 - pos, d)),
            ];
            for add in extra.into_iter().flatten() {
                for (t, a) in tokens[start..].iter_mut().zip(add) {
                    *t += a;
                }
            }
            for (p, t) in pooled.iter_mut().zip(&tokens[start..]) {
                *p += t / ids.len() as f32;
            }
        }
        for _ in ids.len()..self.len {
            tokens.extend_from_slice(&self.pad);
        }
        Ok((tokens, pooled))
    }

    /// The tables as safetensors (f32), the vocabulary and layout in the metadata.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let (v, l, d) = (self.vocab.len(), self.len, self.dim);
        let tables: [(&str, Vec<usize>, &[f32]); 5] = [
            ("words", vec![v, d], &self.words),
            ("context", vec![v, d], &self.context),
            ("positions", vec![l, d], &self.positions),
            ("positions_from_end", vec![l, d], &self.positions_from_end),
            ("pad", vec![d], &self.pad),
        ];
        let bytes: Vec<(&str, Vec<usize>, Vec<u8>)> = tables
            .into_iter()
            .map(|(name, shape, data)| (name, shape, data.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let views: BTreeMap<&str, TensorView<'_>> = bytes
            .iter()
            .map(|(name, shape, b)| (*name, TensorView::new(Dtype::F32, shape.clone(), b).expect("consistent view")))
            .collect();
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("vocab".to_string(), serde_json::to_string(&self.vocab).expect("strings serialise")),
        ]);
        crate::tensorfile::serialize(views, Some(meta)).expect("serialising in-memory tables cannot fail")
    }

    /// Reads what [`Self::to_safetensors`] wrote; `file` names the source in errors.
    pub fn from_safetensors(bytes: &[u8], file: &str) -> Result<WordEncoder, WeightsError> {
        let format_err = |reason: String| WeightsError::Format { file: file.into(), reason };
        let st = SafeTensors::deserialize(bytes).map_err(|e| format_err(e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format_err(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let format = meta.get("format").map(String::as_str).unwrap_or("none");
        if format != FORMAT {
            return Err(format_err(format!(
                "metadata `format` is `{format}`, expected `{FORMAT}` (written by another skytrain version)"
            )));
        }
        let vocab: Vec<String> = meta
            .get("vocab")
            .and_then(|v| serde_json::from_str(v).ok())
            .ok_or_else(|| format_err("metadata `vocab` is missing or not a JSON list of words".into()))?;
        let table = |name: &str| -> Result<(Vec<usize>, Vec<f32>), WeightsError> {
            let view = st.tensor(name).map_err(|_| WeightsError::Missing { file: file.into(), name: name.into() })?;
            if view.dtype() != Dtype::F32 {
                return Err(WeightsError::Dtype {
                    file: file.into(),
                    name: name.into(),
                    found: format!("{:?}", view.dtype()),
                });
            }
            let data = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Ok((view.shape().to_vec(), data))
        };
        let (pad_shape, pad) = table("pad")?;
        let dim = pad_shape.first().copied().unwrap_or(0);
        let (pos_shape, positions) = table("positions")?;
        let len = pos_shape.first().copied().unwrap_or(0);
        let check = |name: &str, (found, data): (Vec<usize>, Vec<f32>), shape: Vec<usize>| {
            if found != shape {
                let as_i64 = |s: &[usize]| s.iter().map(|&x| x as i64).collect();
                return Err(WeightsError::Shape {
                    file: file.into(),
                    name: name.into(),
                    found: as_i64(&found),
                    expected: as_i64(&shape),
                });
            }
            Ok(data)
        };
        let expect = |name: &str, shape: Vec<usize>| check(name, table(name)?, shape);
        let words = expect("words", vec![vocab.len(), dim])?;
        let context = expect("context", vec![vocab.len(), dim])?;
        let positions_from_end = expect("positions_from_end", vec![len, dim])?;
        let positions = check("positions", (pos_shape, positions), vec![len, dim])?;
        Ok(WordEncoder { vocab, dim, len, words, context, positions, positions_from_end, pad })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vec<String> {
        "a red blue green yellow white circle square triangle above below to the left right of"
            .split(' ')
            .map(String::from)
            .collect()
    }

    #[test]
    fn a_word_carries_its_predecessor_and_its_place_from_both_ends() {
        let enc = WordEncoder::new(vocab(), 16, 12, 3);
        let (a, _) = enc.encode("a red circle").unwrap();
        let (b, _) = enc.encode("a blue circle").unwrap();
        let (c, _) = enc.encode("a red circle above a blue square").unwrap();
        let token = |t: &[f32], i: usize| t[i * 16..(i + 1) * 16].to_vec();
        assert_ne!(token(&a, 2), token(&b, 2), "`circle` after `red` and after `blue` must differ");
        assert_eq!(token(&a, 0), token(&b, 0));
        assert_ne!(token(&a, 2), token(&c, 2), "same word and predecessor, different distance from the end");
        assert_eq!(token(&a, 5), enc.pad, "padding after the last word");
        assert!(enc.encode("a pink circle").unwrap_err().contains("pink"));
        assert!(enc.encode(&["a"; 13].join(" ")).unwrap_err().contains("13 words"));
    }

    #[test]
    fn tables_round_trip_through_safetensors_and_bad_files_are_named() {
        let enc = WordEncoder::new(vocab(), 8, 12, 5);
        let back = WordEncoder::from_safetensors(&enc.to_safetensors(), "t.safetensors").unwrap();
        let caption = "a green triangle to the left of a white square";
        assert_eq!(enc.encode(caption).unwrap(), back.encode(caption).unwrap());
        assert_eq!((back.dim, back.len), (8, 12));
        let err = WordEncoder::from_safetensors(b"not safetensors", "t.safetensors").unwrap_err().to_string();
        assert!(err.contains("t.safetensors"), "{err}");
        // A file without this layout's `format` is refused rather than misread.
        let other = crate::model::weights::to_safetensors(
            &[("pad".into(), tch::Tensor::zeros([8], tch::kind::FLOAT_CPU))],
            None,
        );
        let err = WordEncoder::from_safetensors(&other, "old.safetensors").unwrap_err().to_string();
        assert!(err.contains("old.safetensors") && err.contains("format"), "{err}");
    }
}
