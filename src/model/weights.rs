//! The boundary between libtorch tensors and plain safetensors bytes: everything outside the
//! model/train code (store, export, sync) sees only the bytes.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{file}: not a valid safetensors file: {reason}")]
    Format { file: String, reason: String },
    #[error("{file}: tensor `{name}` is missing")]
    Missing { file: String, name: String },
    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape { file: String, name: String, found: Vec<i64>, expected: Vec<i64> },
    #[error("{file}: tensor `{name}` has dtype {found}, expected one of F32, F16, BF16")]
    Dtype { file: String, name: String, found: String },
    #[error("{file}: unexpected tensor `{name}` (not part of this model)")]
    Unexpected { file: String, name: String },
}

/// Serialises named tensors (any device/kind) as f32 safetensors bytes, names sorted.
pub fn to_safetensors(tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Vec<u8> {
    let host: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let t = t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            let n = t.numel();
            let mut data = vec![0f32; n];
            t.copy_data(&mut data, n);
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), shape, bytes)
        })
        .collect();
    let views: BTreeMap<&str, TensorView<'_>> = host
        .iter()
        .map(|(name, shape, bytes)| {
            (name.as_str(), TensorView::new(Dtype::F32, shape.clone(), bytes).expect("consistent tensor view"))
        })
        .collect();
    crate::tensorfile::serialize(views, metadata).expect("serialising in-memory tensors cannot fail")
}

/// Parses safetensors bytes into f32 CPU tensors by name; `file` names the source in errors.
pub fn from_safetensors(bytes: &[u8], file: &str) -> Result<BTreeMap<String, Tensor>, WeightsError> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| WeightsError::Format { file: file.into(), reason: e.to_string() })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::I64 => Kind::Int64,
            other => return Err(WeightsError::Dtype { file: file.into(), name, found: format!("{other:?}") }),
        };
        let t = Tensor::from_data_size(view.data(), &shape, kind);
        let t = if kind == Kind::Int64 { t } else { t.to_kind(Kind::Float) };
        out.insert(name, t);
    }
    Ok(out)
}

/// Metadata stored in a safetensors header.
pub fn metadata(bytes: &[u8], file: &str) -> Result<HashMap<String, String>, WeightsError> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| WeightsError::Format { file: file.into(), reason: e.to_string() })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Copies `loaded` into `params` in place, checking every name and shape; `ignore` lists extra
/// names that may appear (buffers whose values follow from the config).
pub fn load_into(
    params: &[(String, Tensor)],
    loaded: &BTreeMap<String, Tensor>,
    file: &str,
    ignore: &[&str],
) -> Result<(), WeightsError> {
    for (name, p) in params {
        let src = loaded.get(name).ok_or_else(|| WeightsError::Missing { file: file.into(), name: name.clone() })?;
        if src.size() != p.size() {
            return Err(WeightsError::Shape {
                file: file.into(),
                name: name.clone(),
                found: src.size(),
                expected: p.size(),
            });
        }
    }
    let known: std::collections::HashSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(extra) = loaded.keys().find(|n| !known.contains(n.as_str()) && !ignore.contains(&n.as_str())) {
        return Err(WeightsError::Unexpected { file: file.into(), name: extra.clone() });
    }
    tch::no_grad(|| {
        for (name, p) in params {
            let mut p = p.shallow_clone();
            p.copy_(&loaded[name].to_kind(p.kind()).to_device(p.device()));
        }
    });
    Ok(())
}
