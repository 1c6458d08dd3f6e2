//! Frozen weights in Hugging Face folder layouts (`config.json` + safetensors), looked up by name
//! with errors that name the file, the tensor and the shape expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::EncodeError;
use crate::model::weights;

/// A safetensors file's tensors (f32, CPU) and the path they came from.
pub struct HfWeights {
    pub file: String,
    tensors: BTreeMap<String, Tensor>,
}

impl HfWeights {
    pub fn load(path: &Path) -> Result<HfWeights, EncodeError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| EncodeError::Io { file: file.clone(), reason: e.to_string() })?;
        let tensors = weights::from_safetensors(&bytes, &file)
            .map_err(|e| EncodeError::Weights { file: file.clone(), reason: e.to_string() })?;
        Ok(HfWeights { file, tensors })
    }

    /// The tensor `name` with exactly `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, EncodeError> {
        let t = self.try_get(name).ok_or_else(|| EncodeError::Weights {
            file: self.file.clone(),
            reason: format!("tensor `{name}` missing (expected shape {shape:?})"),
        })?;
        if t.size() != shape {
            return Err(EncodeError::Weights {
                file: self.file.clone(),
                reason: format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.size()),
            });
        }
        Ok(t)
    }

    pub fn try_get(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).map(|t| t.to_kind(Kind::Float))
    }

    /// The first of `names` present (checkpoints from different library versions name tensors
    /// differently).
    pub fn get_any(&self, names: &[String], shape: &[i64]) -> Result<Tensor, EncodeError> {
        let found = names.iter().find(|n| self.tensors.contains_key(n.as_str())).unwrap_or(&names[0]);
        self.get(found, shape)
    }

    /// A linear layer `prefix.weight [out, in]`, `prefix.bias [out]`.
    pub fn linear(&self, prefix: &str, fan_in: i64, fan_out: i64) -> Result<Linear, EncodeError> {
        Ok(Linear {
            weight: self.get(&format!("{prefix}.weight"), &[fan_out, fan_in])?,
            bias: self.get(&format!("{prefix}.bias"), &[fan_out])?,
        })
    }

    /// A norm layer's `weight` and `bias` of width `dim`.
    pub fn norm(&self, prefix: &str, dim: i64) -> Result<(Tensor, Tensor), EncodeError> {
        Ok((self.get(&format!("{prefix}.weight"), &[dim])?, self.get(&format!("{prefix}.bias"), &[dim])?))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
}

pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// Reads `config.json` of a model folder.
pub fn read_config(dir: &Path) -> Result<(PathBuf, serde_json::Value), EncodeError> {
    let path = dir.join("config.json");
    let file = path.display().to_string();
    let text =
        std::fs::read_to_string(&path).map_err(|e| EncodeError::Io { file: file.clone(), reason: e.to_string() })?;
    let v =
        serde_json::from_str(&text).map_err(|e| EncodeError::Config { file: file.clone(), reason: e.to_string() })?;
    Ok((path, v))
}

/// Typed access to config fields, naming the file and field when one is missing or mistyped.
pub struct Config<'a> {
    pub file: String,
    pub v: &'a serde_json::Value,
}

impl Config<'_> {
    pub fn int(&self, field: &str) -> Result<i64, EncodeError> {
        self.v.get(field).and_then(|x| x.as_i64()).ok_or_else(|| self.bad(field, "an integer"))
    }

    pub fn int_or(&self, field: &str, default: i64) -> Result<i64, EncodeError> {
        match self.v.get(field) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(x) => x.as_i64().ok_or_else(|| self.bad(field, "an integer")),
        }
    }

    pub fn float_or(&self, field: &str, default: f64) -> Result<f64, EncodeError> {
        match self.v.get(field) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(x) => x.as_f64().ok_or_else(|| self.bad(field, "a number")),
        }
    }

    pub fn str_or(&self, field: &str, default: &str) -> Result<String, EncodeError> {
        match self.v.get(field) {
            None | Some(serde_json::Value::Null) => Ok(default.into()),
            Some(x) => x.as_str().map(String::from).ok_or_else(|| self.bad(field, "a string")),
        }
    }

    pub fn ints(&self, field: &str) -> Result<Vec<i64>, EncodeError> {
        self.v
            .get(field)
            .and_then(|x| x.as_array())
            .and_then(|a| a.iter().map(|x| x.as_i64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.bad(field, "a list of integers"))
    }

    pub fn bad(&self, field: &str, expected: &str) -> EncodeError {
        EncodeError::Config { file: self.file.clone(), reason: format!("field `{field}`: expected {expected}") }
    }
}

/// Activation functions named in Hugging Face configs.
pub fn activation(name: &str, x: &Tensor) -> Tensor {
    match name {
        "quick_gelu" => x * (x * 1.702).sigmoid(),
        "gelu_new" | "gelu_pytorch_tanh" => x.gelu("tanh"),
        "silu" | "swish" => x.silu(),
        "relu" => x.relu(),
        _ => x.gelu("none"),
    }
}

pub fn known_activation(name: &str) -> bool {
    matches!(name, "quick_gelu" | "gelu_new" | "gelu_pytorch_tanh" | "silu" | "swish" | "relu" | "gelu")
}
