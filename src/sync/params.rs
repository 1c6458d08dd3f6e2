//! Model parameters as plain buffers (named f32 vectors with shapes), the form the round protocol
//! moves and averages: no tensor engine needed on the coordinator's side of the math.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("{file}: not a valid safetensors file: {reason}")]
    Format { file: String, reason: String },
    #[error("{file}: {reason}")]
    Mismatch { file: String, reason: String },
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

    /// self += a·x, elementwise (same layout).
    pub fn add_scaled(&mut self, a: f32, x: &ParamSet) {
        for (d, s) in self.data.iter_mut().zip(&x.data) {
            for (y, v) in d.iter_mut().zip(s) {
                *y += a * v;
            }
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

    pub fn to_safetensors(&self) -> Vec<u8> {
        let bytes: Vec<Vec<u8>> = self.data.iter().map(|d| d.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
        let views: BTreeMap<&str, TensorView<'_>> = self
            .names
            .iter()
            .zip(&self.shapes)
            .zip(&bytes)
            .map(|((n, s), b)| (n.as_str(), TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view")))
            .collect();
        safetensors::serialize(views, None).expect("in-memory serialisation")
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
