//! Safetensors bytes that depend only on what they hold. The crate serialises a file's metadata
//! from a `HashMap`, so a file with two or more metadata entries comes out in a different byte
//! order from one process to the next, and so does its sha256 (encoders recorded by hash, exported
//! models, update payloads). Here the crate writes the tensors and the metadata is spliced into its
//! header with sorted keys: with at most one entry the bytes are the crate's own.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::View;

/// [`safetensors::serialize`] with the metadata's keys in sorted order.
pub fn serialize<S, V, I>(
    data: I,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, safetensors::SafeTensorError>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: View,
    I: IntoIterator<Item = (S, V)>,
{
    let plain = safetensors::serialize(data, None)?;
    let Some(metadata) = metadata else { return Ok(plain) };
    let header_len = u64::from_le_bytes(plain[..8].try_into().expect("8 bytes")) as usize;
    let tensors = std::str::from_utf8(&plain[8..8 + header_len]).expect("the crate writes JSON").trim_end();
    let sorted: BTreeMap<String, String> = metadata.into_iter().collect();
    let entry = format!("\"__metadata__\":{}", serde_json::to_string(&sorted).expect("strings serialise"));
    // `{"a":…}` → `{"__metadata__":{…},"a":…}`; a file with no tensors is `{}`.
    let rest = tensors.strip_prefix('{').expect("a JSON object");
    let mut header = format!("{{{entry}{}{rest}", if rest == "}" { "" } else { "," }).into_bytes();
    // The data starts 8-byte aligned, as the crate pads it.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + plain.len() - 8 - header_len);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&plain[8 + header_len..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Many metadata entries give the same bytes every time (a fresh `HashMap` iterates in another
    /// order), the crate reads them back whole, and one entry or none gives the crate's own bytes.
    #[test]
    fn metadata_is_written_in_one_order() {
        let bytes: Vec<u8> = (0..24u8).collect();
        let views = || {
            [("b", vec![2usize, 1]), ("a", vec![4])].map(|(n, shape)| {
                (n, TensorView::new(Dtype::F32, shape.clone(), &bytes[..4 * shape.iter().product::<usize>()]).unwrap())
            })
        };
        let pairs: Vec<(String, String)> = (0..12).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        let many = || pairs.iter().cloned().collect::<HashMap<_, _>>();
        let first = serialize(views(), Some(many())).unwrap();
        for _ in 0..20 {
            assert_eq!(serialize(views(), Some(many())).unwrap(), first);
        }
        let st = SafeTensors::deserialize(&first).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &bytes[..8]);
        let (header_len, header) = SafeTensors::read_metadata(&first).unwrap();
        assert_eq!(header.metadata().clone().unwrap(), many());
        assert_eq!(header_len % 8, 0);
        for m in [None, Some(meta(&[("format", "x")]))] {
            assert_eq!(serialize(views(), m.clone()).unwrap(), safetensors::serialize(views(), m).unwrap());
        }
        let empty = serialize(Vec::<(&str, TensorView)>::new(), Some(meta(&[("k", "v"), ("j", "w")]))).unwrap();
        let (_, header) = SafeTensors::read_metadata(&empty).unwrap();
        assert_eq!(header.metadata().clone().unwrap(), meta(&[("k", "v"), ("j", "w")]));
    }
}
