//! Model parameters as plain buffers (named f32 vectors with shapes), the form the round protocol
//! moves and averages: no tensor engine needed on the coordinator's side of the math.

use std::borrow::Cow;
use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors, View};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("{file}: not a valid safetensors file: {reason}")]
    Format { file: String, reason: String },
    #[error("{file}: {reason}")]
    Mismatch { file: String, reason: String },
}

/// One tensor of a [`ParamSet`] as safetensors sees it: its bytes are made when asked for (or,
/// without data, none: for the header alone).
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
    with_data: bool,
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if self.with_data {
            Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        } else {
            Cow::Borrowed(&[])
        }
    }
    fn data_len(&self) -> usize {
        4 * self.data.len()
    }
}

/// Named parameters in name order, each a flat f32 vector with its shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamSet {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub data: Vec<Vec<f32>>,
}

impl ParamSet {
    pub fn zeros_like(other: &ParamSet) -> ParamSet {
        ParamSet {
            names: other.names.clone(),
            shapes: other.shapes.clone(),
            data: other.data.iter().map(|d| vec![0.0; d.len()]).collect(),
        }
    }

    pub fn numel(&self) -> usize {
        self.data.iter().map(Vec::len).sum()
    }

    /// Reads an f32 safetensors file (as `model::weights` writes), names sorted.
    pub fn from_safetensors(bytes: &[u8], file: &str) -> Result<ParamSet, ParamsError> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| ParamsError::Format { file: file.into(), reason: e.to_string() })?;
        let mut entries: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(ParamsError::Mismatch {
                    file: file.into(),
                    reason: format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
                });
            }
            let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            entries.insert(name, (view.shape().to_vec(), data));
        }
        let mut set = ParamSet { names: vec![], shapes: vec![], data: vec![] };
        for (name, (shape, data)) in entries {
            set.names.push(name);
            set.shapes.push(shape);
            set.data.push(data);
        }
        Ok(set)
    }

    /// The parameters as an f32 safetensors file (one tensor's bytes at a time besides the output).
    pub fn to_safetensors(&self) -> Vec<u8> {
        safetensors::serialize(self.views(true), None).expect("in-memory serialisation")
    }

    /// sha256 of [`Self::to_safetensors`]'s bytes without making them (at dit-b size, 636 MB each
    /// time a model or momentum is hashed): the crate writes the header from views that report
    /// their length and yield no bytes, and the data is hashed in the order it lays tensors out
    /// (all f32, so by name).
    pub fn sha256(&self) -> String {
        let header = safetensors::serialize(self.views(false), None).expect("in-memory serialisation");
        let mut hasher = Sha256::new();
        hasher.update(&header);
        let mut order: Vec<usize> = (0..self.names.len()).collect();
        order.sort_by(|&a, &b| self.names[a].cmp(&self.names[b]));
        let mut buf = Vec::with_capacity(4 * 16_384);
        for i in order {
            for block in self.data[i].chunks(16_384) {
                buf.clear();
                buf.extend(block.iter().flat_map(|v| v.to_le_bytes()));
                hasher.update(&buf);
            }
        }
        hex::encode(hasher.finalize())
    }

    fn views(&self, with_data: bool) -> Vec<(&str, F32View<'_>)> {
        let tensors = self.names.iter().zip(&self.shapes).zip(&self.data);
        tensors.map(|((n, shape), data)| (n.as_str(), F32View { shape, data, with_data })).collect()
    }

    /// Checks that `other` has the same names and shapes, naming the first difference.
    pub fn check_layout(&self, other: &ParamSet) -> Result<(), String> {
        if self.names != other.names {
            let missing = self.names.iter().find(|n| !other.names.contains(n));
            let extra = other.names.iter().find(|n| !self.names.contains(n));
            return Err(format!("tensor names differ (missing {missing:?}, unexpected {extra:?})"));
        }
        for ((n, a), b) in self.names.iter().zip(&self.shapes).zip(&other.shapes) {
            if a != b {
                return Err(format!("tensor `{n}` has shape {b:?}, expected {a:?}"));
            }
        }
        Ok(())
    }

    pub fn l2_norm(&self) -> f64 {
        self.data.iter().flatten().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
    }

    pub fn all_finite(&self) -> bool {
        self.data.iter().flatten().all(|v| v.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_without_serialising_equals_the_files_hash() {
        let set = ParamSet {
            names: vec!["a.bias".into(), "a.weight".into(), "b".into(), "empty".into()],
            shapes: vec![vec![3], vec![2, 3], vec![], vec![0]],
            data: vec![vec![1.0, -2.5, 3.0], (0..6).map(|i| i as f32 * 0.1).collect(), vec![7.0], vec![]],
        };
        let bytes = set.to_safetensors();
        assert_eq!(set.sha256(), crate::store::sha256_hex(&bytes));
        assert_eq!(ParamSet::from_safetensors(&bytes, "t").unwrap(), set);
        let big = ParamSet { names: vec!["w".into()], shapes: vec![vec![40_000]], data: vec![vec![0.5; 40_000]] };
        assert_eq!(big.sha256(), crate::store::sha256_hex(&big.to_safetensors()));
    }
}
