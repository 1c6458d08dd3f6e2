//! Webdataset shards: tar files whose members `<key>.<ext>` group into samples by key, as Python
//! `webdataset` reads them (the key is the member path up to the first dot of its file name).
//! Arrays inside samples are `.npy` files, so numpy reads them without skytrain.

use std::collections::BTreeMap;

use bytes::Bytes;

/// One sample: its key and its members by extension (`png`, `txt`, `json`, `latent.npy`, ...).
/// Members read from a shard are slices of the shard's bytes, not copies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub key: String,
    pub members: BTreeMap<String, Bytes>,
}

impl Sample {
    pub fn new(key: impl Into<String>) -> Sample {
        Sample { key: key.into(), members: BTreeMap::new() }
    }

    pub fn with(mut self, ext: &str, data: impl Into<Bytes>) -> Sample {
        self.members.insert(ext.to_string(), data.into());
        self
    }

    pub fn get(&self, ext: &str) -> Option<&[u8]> {
        self.members.get(ext).map(|v| &v[..])
    }
}

/// A sample of a shard that could not be read; the loader skips it and counts it.
#[derive(Debug, Clone, PartialEq)]
pub struct Damage {
    pub shard: String,
    pub key: String,
    pub reason: String,
}

/// A key is usable in a webdataset shard only without dots and slashes (both delimit the key).
pub fn sanitize_key(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Splits a member path into (key, extension) the way webdataset does.
pub fn split_member(path: &str) -> Option<(&str, &str)> {
    let name_start = path.rfind('/').map(|i| i + 1).unwrap_or(0);
    let dot = path[name_start..].find('.')? + name_start;
    Some((&path[..dot], &path[dot + 1..]))
}

/// Writes samples as one tar shard (members in key order, deterministic headers).
pub fn write_shard(samples: &[Sample]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for s in samples {
        for (ext, data) in &s.members {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, format!("{}.{}", s.key, ext), &data[..])
                .expect("writing a tar into memory cannot fail");
        }
    }
    builder.into_inner().expect("writing a tar into memory cannot fail")
}

/// Reads a shard, keeping every complete sample. A truncated or corrupt tail ends the shard: the
/// sample it was in is reported as damaged, the ones before it are kept.
pub fn read_shard(bytes: &Bytes, shard: &str) -> (Vec<Sample>, Vec<Damage>) {
    let mut samples: Vec<Sample> = Vec::new();
    let mut damage = Vec::new();
    // Seeking past member data instead of reading it: members become slices of `bytes`.
    let mut archive = tar::Archive::new(std::io::Cursor::new(&bytes[..]));
    let entries = match archive.entries_with_seek() {
        Ok(e) => e,
        Err(e) => {
            damage.push(Damage { shard: shard.into(), key: "*".into(), reason: format!("not a tar file: {e}") });
            return (samples, damage);
        }
    };
    let mut truncated = None;
    for entry in entries {
        let read = entry.and_then(|e| {
            let path = e.path()?.to_string_lossy().into_owned();
            let is_file = e.header().entry_type().is_file();
            let (start, len) = (e.raw_file_position() as usize, e.size() as usize);
            if start + len > bytes.len() {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "member data cut off"));
            }
            Ok((path, is_file, bytes.slice(start..start + len)))
        });
        let (path, is_file, data) = match read {
            Ok(x) => x,
            Err(e) => {
                truncated = Some(format!("truncated or corrupt tar: {e}"));
                break;
            }
        };
        if !is_file || path.starts_with("__") {
            continue;
        }
        let Some((key, ext)) = split_member(&path) else { continue };
        match samples.last_mut() {
            Some(s) if s.key == key => {
                s.members.insert(ext.to_string(), data);
            }
            _ => samples.push(Sample::new(key).with(ext, data)),
        }
    }
    // A sample cut short lacks members the shard's first sample has: drop it, naming its key.
    let incomplete = samples.len() > 1 && {
        let expected: Vec<&String> = samples[0].members.keys().collect();
        samples.last().unwrap().members.keys().collect::<Vec<_>>() != expected
    };
    let reason = truncated.clone().unwrap_or_else(|| "incomplete sample (members missing)".into());
    if incomplete {
        let last = samples.pop().unwrap();
        damage.push(Damage { shard: shard.into(), key: last.key, reason });
    } else if let Some(reason) = truncated {
        let after = samples.last().map(|s| s.key.as_str()).unwrap_or("start");
        damage.push(Damage { shard: shard.into(), key: format!("(the sample after {after})"), reason });
    }
    (samples, damage)
}

/// A float array read from or written to `.npy`.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Storage precision of cached arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F16,
    F32,
}

impl Dtype {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Dtype, String> {
        match s {
            "f16" | "float16" => Ok(Dtype::F16),
            "f32" | "float32" => Ok(Dtype::F32),
            other => Err(format!("unknown dtype `{other}` (expected f16 or f32)")),
        }
    }
}

/// Encodes an array as `.npy` (little-endian, C order).
pub fn npy_bytes(a: &Array, dtype: Dtype) -> Vec<u8> {
    use npyz::WriterBuilder;
    let shape: Vec<u64> = a.shape.iter().map(|&d| d as u64).collect();
    let mut out = Vec::new();
    match dtype {
        Dtype::F32 => {
            let mut w =
                npyz::WriteOptions::<f32>::new().default_dtype().shape(&shape).writer(&mut out).begin_nd().unwrap();
            w.extend(a.data.iter().copied()).unwrap();
            w.finish().unwrap();
        }
        Dtype::F16 => {
            let mut w = npyz::WriteOptions::<half::f16>::new()
                .default_dtype()
                .shape(&shape)
                .writer(&mut out)
                .begin_nd()
                .unwrap();
            w.extend(a.data.iter().map(|&x| half::f16::from_f32(x))).unwrap();
            w.finish().unwrap();
        }
    }
    out
}

/// A `.npy` array's header and its raw little-endian data, not decoded: the loader hands such
/// bytes to libtorch, which converts them to the compute dtype on the training device.
#[derive(Debug, Clone, PartialEq)]
pub struct RawArray {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub data: Bytes,
}

impl RawArray {
    /// Views a `.npy` member (f16 or f32, little-endian, C order) without copying its data.
    ///
    /// The header is parsed here rather than by npyz: its general grammar (pest) cost more than
    /// everything else the loader does per sample (perf, bench/p3.sh), and the three keys of a
    /// numpy-written header need none of it.
    pub fn parse(npy: &Bytes) -> Result<RawArray, String> {
        if npy.len() < 10 || &npy[..6] != b"\x93NUMPY" {
            return Err("not a .npy file (magic missing)".into());
        }
        // Header: magic (6), version (2), header length (u16 in v1, u32 in v2/3), header.
        let (start, len) = match npy[6] {
            1 => (10, u16::from_le_bytes([npy[8], npy[9]]) as usize),
            _ if npy.len() >= 12 => (12, u32::from_le_bytes([npy[8], npy[9], npy[10], npy[11]]) as usize),
            _ => return Err("not a .npy file (header cut off)".into()),
        };
        let header = npy.get(start..start + len).ok_or("not a .npy file (header cut off)")?;
        let header = std::str::from_utf8(header).map_err(|_| "not a .npy file (header is not text)")?;
        let field = |key: &str| -> Result<&str, String> {
            let at = header.find(&format!("'{key}':")).ok_or_else(|| format!(".npy header has no `{key}`"))?;
            Ok(header[at + key.len() + 3..].trim_start())
        };
        let dtype = match field("descr")? {
            d if d.starts_with("'<f2'") => Dtype::F16,
            d if d.starts_with("'<f4'") => Dtype::F32,
            d => return Err(format!("dtype {} is not little-endian f2/f4", d.split(',').next().unwrap_or(d))),
        };
        if !field("fortran_order")?.starts_with("False") {
            return Err("Fortran-order arrays are not supported".into());
        }
        let shape_text = field("shape")?;
        let shape_text =
            shape_text.strip_prefix('(').and_then(|t| t.split(')').next()).ok_or(".npy header: bad shape")?;
        let shape = shape_text
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| d.parse::<usize>().map_err(|_| format!(".npy header: bad shape ({shape_text})")))
            .collect::<Result<Vec<_>, _>>()?;
        let data_start = start + len;
        let want = shape.iter().product::<usize>() * dtype.size();
        if npy.len() != data_start + want {
            return Err(format!(
                "{} data bytes for shape {shape:?} {dtype:?}, expected {want}",
                npy.len().saturating_sub(data_start)
            ));
        }
        Ok(RawArray { shape, dtype, data: npy.slice(data_start..) })
    }

    /// Whether every value is finite (checks the exponent bits; no conversion). Branch-free per
    /// block so the compiler vectorises it: it runs over every byte the loader serves.
    pub fn all_finite(&self) -> bool {
        fn blocks<const N: usize>(data: &[u8], bad: impl Fn(&[u8; N]) -> bool) -> bool {
            data.chunks(N * 64)
                .all(|block| !block.chunks_exact(N).fold(false, |acc, b| acc | bad(b.try_into().unwrap())))
        }
        match self.dtype {
            Dtype::F16 => blocks::<2>(&self.data, |b| u16::from_le_bytes(*b) & 0x7C00 == 0x7C00),
            Dtype::F32 => blocks::<4>(&self.data, |b| u32::from_le_bytes(*b) & 0x7F80_0000 == 0x7F80_0000),
        }
    }

    /// The values as f32 (for inspection and tests; training converts on the device instead).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F16 => self.data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F32 => self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        }
    }
}

/// Decodes a `.npy` float array (f16, f32 or f64, C order).
pub fn parse_npy(bytes: &[u8]) -> Result<Array, String> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| format!("not a .npy file: {e}"))?;
    if npy.order() != npyz::Order::C {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = npy.dtype().descr();
    let data: Vec<f32> = match descr.as_str() {
        "'<f4'" => npy.into_vec::<f32>().map_err(|e| e.to_string())?,
        "'<f2'" => npy.into_vec::<half::f16>().map_err(|e| e.to_string())?.into_iter().map(f32::from).collect(),
        "'<f8'" => npy.into_vec::<f64>().map_err(|e| e.to_string())?.into_iter().map(|x| x as f32).collect(),
        other => return Err(format!("dtype {other} is not a little-endian float (f2/f4/f8)")),
    };
    if data.len() != shape.iter().product::<usize>() {
        return Err(format!("{} values for shape {shape:?}", data.len()));
    }
    Ok(Array { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_like_webdataset() {
        assert_eq!(split_member("a/b/000123.latent.npy"), Some(("a/b/000123", "latent.npy")));
        assert_eq!(split_member("x.png"), Some(("x", "png")));
        assert_eq!(split_member("dir.v1/x.png"), Some(("dir.v1/x", "png")));
        assert_eq!(split_member("noext"), None);
        assert_eq!(sanitize_key("1F600.png/x"), "1F600_png_x");
    }

    #[test]
    fn shard_round_trip_and_truncation() {
        let samples: Vec<Sample> = (0..5)
            .map(|i| Sample::new(format!("s{i:03}")).with("txt", format!("caption {i}")).with("json", &b"{}"[..]))
            .collect();
        let bytes = Bytes::from(write_shard(&samples));
        let (back, damage) = read_shard(&bytes, "t.tar");
        assert!(damage.is_empty());
        assert_eq!(back, samples);
        // Cut inside the fourth sample's data: three complete samples survive, one is reported.
        let cut = bytes.len() - 2 * 1024 - 512 * 3 - 100;
        let (back, damage) = read_shard(&bytes.slice(..cut), "t.tar");
        assert!(back.len() >= 3 && back.len() < 5, "{}", back.len());
        assert_eq!(back[..3], samples[..3]);
        assert_eq!(damage.len(), 1, "{damage:?}");
    }

    #[test]
    fn npy_round_trip() {
        let a = Array { shape: vec![2, 3], data: vec![0.5, -1.0, 2.0, 3.25, 1e-3, 7.0] };
        assert_eq!(parse_npy(&npy_bytes(&a, Dtype::F32)).unwrap(), a);
        let h = parse_npy(&npy_bytes(&a, Dtype::F16)).unwrap();
        assert_eq!(h.shape, a.shape);
        for (x, y) in h.data.iter().zip(&a.data) {
            assert!((x - y).abs() <= 1e-3 * y.abs().max(1.0));
        }
        assert!(parse_npy(b"garbage").unwrap_err().contains("not a .npy"));
        for dtype in [Dtype::F16, Dtype::F32] {
            let raw = RawArray::parse(&Bytes::from(npy_bytes(&a, dtype))).unwrap();
            assert_eq!((raw.shape.clone(), raw.dtype, raw.data.len()), (vec![2, 3], dtype, 6 * dtype.size()));
            assert!(raw.all_finite());
            assert_eq!(raw.to_f32(), parse_npy(&npy_bytes(&a, dtype)).unwrap().data);
        }
        let inf = Array { shape: vec![1], data: vec![f32::INFINITY] };
        assert!(!RawArray::parse(&Bytes::from(npy_bytes(&inf, Dtype::F16))).unwrap().all_finite());
    }
}
