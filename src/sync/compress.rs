//! Pseudo-gradient compression: f32, f16, int8 with one f32 scale per block of values
//! (absmax/127), or sparse (top-k per chunk at 2 bits, `sparse`). What an encoding loses is kept
//! by the worker and added to its next round's pseudo-gradient (error feedback), so nothing is
//! lost, only delayed.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::params::{ParamSet, ParamsError};
use super::sparse;

pub use crate::config::Codec;

/// Encodes `delta + error_decay · error` with the codec `cfg` names into safetensors bytes; `error`
/// becomes what the encoding lost.
pub fn encode(delta: &ParamSet, error: &mut ParamSet, cfg: &crate::config::SyncConfig) -> Vec<u8> {
    let (codec, block, decay) = (cfg.codec, cfg.block_size, cfg.error_decay as f32);
    if codec == Codec::Sparse {
        return encode_sparse(delta, error, cfg.topk_chunk, cfg.topk, decay);
    }
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, name) in delta.names.iter().enumerate() {
        let x: Vec<f32> = delta.data[i].iter().zip(&error.data[i]).map(|(d, e)| d + decay * e).collect();
        let shape = delta.shapes[i].clone();
        match codec {
            Codec::F32 => {
                error.data[i].iter_mut().for_each(|e| *e = 0.0);
                owned.push((name.clone(), Dtype::F32, shape, x.iter().flat_map(|v| v.to_le_bytes()).collect()));
            }
            Codec::F16 => {
                let mut bytes = Vec::with_capacity(x.len() * 2);
                for (v, e) in x.iter().zip(error.data[i].iter_mut()) {
                    let h = half::f16::from_f32(*v);
                    *e = v - h.to_f32();
                    bytes.extend(h.to_le_bytes());
                }
                owned.push((name.clone(), Dtype::F16, shape, bytes));
            }
            Codec::Int8 => {
                let mut q = Vec::with_capacity(x.len());
                let mut scales = Vec::with_capacity(x.len().div_ceil(block));
                for (xs, es) in x.chunks(block).zip(error.data[i].chunks_mut(block)) {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                    for (v, e) in xs.iter().zip(es.iter_mut()) {
                        let qi = (v / scale).round().clamp(-127.0, 127.0) as i8;
                        *e = v - qi as f32 * scale;
                        q.push(qi as u8);
                    }
                    scales.extend(scale.to_le_bytes());
                }
                let nblocks = scales.len() / 4;
                owned.push((format!("{name}::q"), Dtype::I8, shape, q));
                owned.push((format!("{name}::scale"), Dtype::F32, vec![nblocks], scales));
            }
            Codec::Sparse => unreachable!("encoded above"),
        }
    }
    let views: BTreeMap<&str, TensorView<'_>> = owned
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), TensorView::new(*d, s.clone(), b).expect("consistent view")))
        .collect();
    let meta = std::collections::HashMap::from([
        ("codec".to_string(), serde_json::to_string(&codec).unwrap()),
        ("block".to_string(), block.to_string()),
    ]);
    crate::tensorfile::serialize(views, Some(meta)).expect("in-memory serialisation")
}

/// The whole flattened pseudo-gradient through `sparse`: one bitstream, one pair of levels per
/// chunk, each tensor cut into its own chunks.
fn encode_sparse(delta: &ParamSet, error: &mut ParamSet, chunk: usize, k: usize, decay: f32) -> Vec<u8> {
    let mut x: Vec<f32> =
        delta.data.iter().flatten().zip(error.data.iter().flatten()).map(|(d, e)| d + decay * e).collect();
    let numel = x.len();
    let lengths: Vec<usize> = delta.data.iter().map(Vec::len).collect();
    let s = sparse::encode(&mut x, &lengths, chunk, k);
    let mut rest = x.as_slice();
    for e in error.data.iter_mut() {
        let (mine, tail) = rest.split_at(e.len());
        e.copy_from_slice(mine);
        rest = tail;
    }
    let levels: Vec<u8> = s.levels.iter().flatten().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
    let views = BTreeMap::from([
        ("sparse::bits", TensorView::new(Dtype::U8, vec![s.bits.len()], &s.bits).expect("consistent view")),
        ("sparse::levels", TensorView::new(Dtype::F16, vec![s.levels.len(), 2], &levels).expect("consistent view")),
    ]);
    let meta = std::collections::HashMap::from([
        ("codec".to_string(), serde_json::to_string(&Codec::Sparse).unwrap()),
        ("chunk".to_string(), chunk.to_string()),
        ("k".to_string(), k.to_string()),
        ("numel".to_string(), numel.to_string()),
        ("chunks".to_string(), "per-tensor".to_string()),
        ("indices".to_string(), "rice-gaps".to_string()),
    ]);
    crate::tensorfile::serialize(views, Some(meta)).expect("in-memory serialisation")
}

fn decode_sparse(
    st: &SafeTensors,
    meta: &std::collections::HashMap<String, String>,
    layout: &ParamSet,
    file: &str,
) -> Result<Vec<(usize, f32)>, ParamsError> {
    let bad = |reason: String| ParamsError::Mismatch { file: file.into(), reason };
    let number = |key: &str, max: usize| -> Result<usize, ParamsError> {
        meta.get(key)
            .and_then(|v| v.parse().ok())
            .filter(|&v| (1..=max).contains(&v))
            .ok_or_else(|| bad(format!("metadata `{key}` missing or not in 1..={max}")))
    };
    let (chunk, numel) = (number("chunk", 65_536)?, number("numel", usize::MAX)?);
    let k = number("k", chunk)?;
    // Both tags name the layout of the bitstream: a payload of another layout is refused, not misread.
    for (key, layout) in [("chunks", "per-tensor"), ("indices", "rice-gaps")] {
        if meta.get(key).map(String::as_str) != Some(layout) {
            return Err(bad(format!("metadata `{key}` missing or not `{layout}`")));
        }
    }
    if numel != layout.numel() || st.len() != 2 {
        return Err(bad(format!(
            "{numel} values in {} tensors, expected {} values in `sparse::bits` and `sparse::levels`",
            st.len(),
            layout.numel()
        )));
    }
    let get = |key: &str, dtype: Dtype| match st.tensor(key) {
        Ok(v) if v.dtype() == dtype => Ok(v),
        _ => Err(bad(format!("tensor `{key}` missing or not {dtype:?}"))),
    };
    let bits = get("sparse::bits", Dtype::U8)?;
    let levels = get("sparse::levels", Dtype::F16)?;
    let levels: Vec<[f32; 2]> = levels
        .data()
        .chunks_exact(4)
        .map(|c| [half::f16::from_le_bytes([c[0], c[1]]).to_f32(), half::f16::from_le_bytes([c[2], c[3]]).to_f32()])
        .collect();
    let lengths: Vec<usize> = layout.data.iter().map(Vec::len).collect();
    sparse::decode_entries(bits.data(), &levels, &lengths, chunk, k).map_err(|e| bad(format!("sparse payload: {e}")))
}

/// A decoded update: dense, or the entries a sparse one sent, by index into the flattened
/// parameters (increasing).
pub enum Update {
    Dense(ParamSet),
    Sparse(Vec<(usize, f32)>),
}

/// Decodes an update against the expected layout; any deviation (names, shapes, dtypes, block
/// count, a malformed sparse stream) is an error naming the tensor or chunk.
pub fn decode(bytes: &[u8], layout: &ParamSet, file: &str) -> Result<ParamSet, ParamsError> {
    match decode_update(bytes, layout, file)? {
        Update::Dense(p) => Ok(p),
        Update::Sparse(entries) => {
            let mut out = ParamSet::zeros_like(layout);
            let mut tensors = out.data.iter_mut();
            let (mut t, mut start) = (tensors.next(), 0);
            for (i, v) in entries {
                while let Some(d) = t.as_deref_mut().filter(|d| i >= start + d.len()) {
                    start += d.len();
                    t = tensors.next();
                }
                t.as_deref_mut().expect("index checked against numel")[i - start] = v;
            }
            Ok(out)
        }
    }
}

/// [`decode`], keeping a sparse update as its entries.
pub fn decode_update(bytes: &[u8], layout: &ParamSet, file: &str) -> Result<Update, ParamsError> {
    let bad = |reason: String| ParamsError::Mismatch { file: file.into(), reason };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| ParamsError::Format { file: file.into(), reason: e.to_string() })?;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| ParamsError::Format { file: file.into(), reason: e.to_string() })?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let codec: Codec = meta
        .get("codec")
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or_else(|| bad("metadata `codec` missing or unknown".into()))?;
    if codec == Codec::Sparse {
        return decode_sparse(&st, &meta, layout, file).map(Update::Sparse);
    }
    let block: usize = meta
        .get("block")
        .and_then(|b| b.parse().ok())
        .filter(|&b| b > 0)
        .ok_or_else(|| bad("metadata `block` missing".into()))?;
    let expected_count = match codec {
        Codec::Int8 => 2 * layout.names.len(),
        _ => layout.names.len(),
    };
    if st.len() != expected_count {
        return Err(bad(format!("{} tensors, expected {expected_count}", st.len())));
    }
    let mut out = ParamSet::zeros_like(layout);
    for (i, name) in layout.names.iter().enumerate() {
        let n: usize = layout.data[i].len();
        let shape = &layout.shapes[i];
        let get = |key: &str| st.tensor(key).map_err(|_| bad(format!("tensor `{key}` missing")));
        let check = |key: &str, v: &TensorView, dtype: Dtype, shape: &[usize]| {
            if v.dtype() != dtype || v.shape() != shape {
                Err(bad(format!(
                    "tensor `{key}` has dtype and shape {:?}{:?}, expected {dtype:?}{shape:?}",
                    v.dtype(),
                    v.shape()
                )))
            } else {
                Ok(())
            }
        };
        match codec {
            Codec::F32 => {
                let v = get(name)?;
                check(name, &v, Dtype::F32, shape)?;
                for (o, c) in out.data[i].iter_mut().zip(v.data().chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Codec::F16 => {
                let v = get(name)?;
                check(name, &v, Dtype::F16, shape)?;
                for (o, c) in out.data[i].iter_mut().zip(v.data().chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Codec::Int8 => {
                let (qk, sk) = (format!("{name}::q"), format!("{name}::scale"));
                let q = get(&qk)?;
                check(&qk, &q, Dtype::I8, shape)?;
                let s = get(&sk)?;
                check(&sk, &s, Dtype::F32, &[n.div_ceil(block)])?;
                let scales: Vec<f32> =
                    s.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                for (j, (o, &b)) in out.data[i].iter_mut().zip(q.data()).enumerate() {
                    *o = (b as i8) as f32 * scales[j / block];
                }
            }
            Codec::Sparse => unreachable!("decoded above"),
        }
    }
    Ok(Update::Dense(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: Vec<f32>) -> ParamSet {
        ParamSet { names: vec!["w".into()], shapes: vec![vec![v.len()]], data: vec![v] }
    }

    #[test]
    fn int8_round_trip_with_error_feedback() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let delta = set(x.clone());
        let mut err = ParamSet::zeros_like(&delta);
        let int8 = crate::config::SyncConfig { codec: Codec::Int8, block_size: 64, ..Default::default() };
        let bytes = encode(&delta, &mut err, &int8);
        assert!(bytes.len() < 1000 + 16 * 4 + 400, "int8 payload too large: {}", bytes.len());
        let y = decode(&bytes, &delta, "u").unwrap();
        for ((a, b), e) in x.iter().zip(&y.data[0]).zip(&err.data[0]) {
            assert!((a - b - e).abs() < 1e-6, "error feedback must hold exactly what was lost");
            assert!(e.abs() <= 0.65 / 127.0 * 0.5 + 1e-6);
        }
        // Sent + residual over two rounds equals the true sum.
        let bytes2 = encode(&delta, &mut err, &int8);
        let y2 = decode(&bytes2, &delta, "u").unwrap();
        for (i, xi) in x.iter().enumerate() {
            let total = y.data[0][i] + y2.data[0][i] + err.data[0][i];
            assert!((total - 2.0 * xi).abs() < 1e-5);
        }
    }

    #[test]
    fn decode_rejects_wrong_layout() {
        let delta = set(vec![1.0; 10]);
        let mut err = ParamSet::zeros_like(&delta);
        for codec in [Codec::F32, Codec::F16, Codec::Int8, Codec::Sparse] {
            let cfg = crate::config::SyncConfig { codec, block_size: 4, topk_chunk: 4, topk: 4, ..Default::default() };
            let bytes = encode(&delta, &mut err, &cfg);
            assert_eq!(decode(&bytes, &delta, "u").unwrap().data[0], vec![1.0; 10]);
            assert!(decode(&bytes, &set(vec![1.0; 11]), "u").is_err());
        }
        assert!(decode(b"junk", &delta, "u").is_err());
    }

    #[test]
    fn a_sparse_payload_of_another_bit_layout_is_refused_by_name() {
        let delta = set((0..5000).map(|i| (i as f32 * 0.37).sin()).collect());
        let cfg = crate::config::SyncConfig { codec: Codec::Sparse, ..Default::default() };
        let bytes = encode(&delta, &mut ParamSet::zeros_like(&delta), &cfg);
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        // The same tensors, their positions labelled as fixed-width (the codec's earlier layout).
        let mut meta = header.metadata().clone().unwrap();
        meta.insert("indices".into(), "fixed-width".into());
        let relabelled = safetensors::serialize(st.tensors(), Some(meta)).unwrap();
        let err = decode(&relabelled, &delta, "rounds/3/updates/w1.bin").unwrap_err().to_string();
        assert!(err.contains("rounds/3/updates/w1.bin") && err.contains("`indices`"), "{err}");
    }
}
