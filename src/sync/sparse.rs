//! The sparse low-bit codec (SparseLoCo's recipe): each tensor of the pseudo-gradient is cut into
//! chunks of `chunk` values; each chunk sends its `k` largest-magnitude entries (a tensor's shorter
//! last chunk, or a small tensor, in proportion: the same density), each as its index
//! in the chunk (⌈log2 chunk⌉ bits) and 2 bits of value: a sign and which of the chunk's two
//! magnitude levels (the means of the smaller and the larger half of the kept magnitudes, f16).
//! Everything not sent stays in the worker's error feedback. At chunk 4096, k 56: 14 bits per kept
//! entry plus 4 bytes per chunk, 0.0249 bytes per parameter (161× below f32). Chunks never span
//! two tensors: a small tensor whose values are far smaller than its neighbour's (a bias beside a
//! weight matrix) would otherwise never win a place in a shared chunk.
//!
//! The bitstream is packed by hand (LSB first, fixed widths): a few lines, no dependency.

/// Bits of an index into a chunk of `chunk` values.
pub fn index_bits(chunk: usize) -> u32 {
    usize::BITS - (chunk.max(2) - 1).leading_zeros()
}

/// Entries kept in a chunk of `len` values: `k` in a whole chunk, in proportion (at least one) in
/// a shorter one, so small tensors are sent at the same density as large ones.
fn kept(len: usize, chunk: usize, k: usize) -> usize {
    (k * len).div_ceil(chunk).min(len)
}

/// The chunks of values laid out as `lengths` (each tensor's, in order) as (start, len) into the
/// flattened values: every tensor cut into chunks of `chunk`, its last one shorter.
pub fn chunks(lengths: &[usize], chunk: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for &n in lengths {
        out.extend((0..n.div_ceil(chunk)).map(|c| (start + c * chunk, chunk.min(n - c * chunk))));
        start += n;
    }
    out
}

/// Bytes of the bitstream for values laid out as `lengths`.
pub fn stream_bytes(lengths: &[usize], chunk: usize, k: usize) -> usize {
    let per_entry = index_bits(chunk) as usize + 2;
    let entries: usize = chunks(lengths, chunk).iter().map(|&(_, len)| kept(len, chunk, k)).sum();
    (entries * per_entry).div_ceil(8)
}

/// The encoded form: the bitstream and two magnitude levels per chunk.
pub struct Sparse {
    pub bits: Vec<u8>,
    pub levels: Vec<[f32; 2]>,
}

struct BitWriter {
    out: Vec<u8>,
    used: u32,
}

impl BitWriter {
    fn push(&mut self, mut value: u32, mut width: u32) {
        while width > 0 {
            if self.used == 0 {
                self.out.push(0);
            }
            let take = width.min(8 - self.used);
            let last = self.out.last_mut().expect("pushed");
            *last |= ((value & ((1 << take) - 1)) as u8) << self.used;
            value >>= take;
            width -= take;
            self.used = (self.used + take) % 8;
        }
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl BitReader<'_> {
    fn take(&mut self, width: u32) -> Option<u32> {
        let mut v = 0u32;
        for i in 0..width {
            let byte = *self.bytes.get(self.at / 8)?;
            v |= (((byte >> (self.at % 8)) & 1) as u32) << i;
            self.at += 1;
        }
        Some(v)
    }
}

/// Encodes `x` (the pseudo-gradient plus the error carried over, its tensors' `lengths` in order)
/// and leaves in it what was not sent (the unsent entries, and the kept ones' quantisation error):
/// in place, as at a large model's size a second buffer is a model's worth of memory. Chunks are
/// independent: they are selected on every core, then written in order, so the result does not
/// depend on the threads.
pub fn encode(x: &mut [f32], lengths: &[usize], chunk: usize, k: usize) -> Sparse {
    use rayon::prelude::*;
    assert_eq!(lengths.iter().sum::<usize>(), x.len(), "lengths cover the values");
    let mut slices = Vec::new();
    let mut rest = x;
    for (_, len) in chunks(lengths, chunk) {
        let (this, tail) = rest.split_at_mut(len);
        slices.push(this);
        rest = tail;
    }
    let picked: Vec<_> = slices.into_par_iter().map(|xs| encode_chunk(xs, chunk, k)).collect();
    let ib = index_bits(chunk);
    let mut w = BitWriter { out: Vec::with_capacity(stream_bytes(lengths, chunk, k)), used: 0 };
    let mut levels = Vec::with_capacity(picked.len());
    for (chunk_levels, entries) in picked {
        levels.push(chunk_levels);
        for (i, code) in entries {
            w.push(i, ib);
            w.push(code, 2);
        }
    }
    Sparse { bits: w.out, levels }
}

/// One chunk: its two magnitude levels and its kept entries as (index, 2-bit code), indices
/// increasing; what is sent is subtracted from `xs`.
fn encode_chunk(xs: &mut [f32], chunk: usize, k: usize) -> ([f32; 2], Vec<(u32, u32)>) {
    let n = kept(xs.len(), chunk, k);
    let mut order: Vec<u32> = (0..xs.len() as u32).collect();
    // The n largest magnitudes (ties by index: the same input always keeps the same entries).
    let by_magnitude = |a: &u32, b: &u32| xs[*b as usize].abs().total_cmp(&xs[*a as usize].abs()).then(a.cmp(b));
    if n < xs.len() {
        order.select_nth_unstable_by(n, by_magnitude);
    }
    let top = &mut order[..n];
    top.sort_unstable_by(by_magnitude);
    // Two levels: the means of the larger and the smaller half of the kept magnitudes (f16).
    let half = n.div_ceil(2);
    let mean = |s: &[u32]| s.iter().map(|&i| xs[i as usize].abs()).sum::<f32>() / s.len().max(1) as f32;
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    let (hi, lo) = (f16(mean(&top[..half])), f16(if n > half { mean(&top[half..]) } else { mean(&top[..half]) }));
    top.sort_unstable();
    let mut entries = Vec::with_capacity(n);
    for &i in top.iter() {
        let v = xs[i as usize];
        let big = (v.abs() - lo).abs() > (v.abs() - hi).abs();
        let q = if big { hi } else { lo };
        let sent = if v < 0.0 { -q } else { q };
        xs[i as usize] = v - sent;
        entries.push((i, (v < 0.0) as u32 | (big as u32) << 1));
    }
    ([lo, hi], entries)
}

/// Decodes the sent entries of `numel` values as (flat index, value), indices increasing; a
/// malformed stream (wrong length, an index out of its chunk or not increasing, a level not finite
/// or negative) is an error saying which chunk and what.
pub fn decode_entries(
    bits: &[u8],
    levels: &[[f32; 2]],
    lengths: &[usize],
    chunk: usize,
    k: usize,
) -> Result<Vec<(usize, f32)>, String> {
    let layout = chunks(lengths, chunk);
    if levels.len() != layout.len() {
        return Err(format!("{} level pairs for {} chunks", levels.len(), layout.len()));
    }
    let expected = stream_bytes(lengths, chunk, k);
    if bits.len() != expected {
        let numel: usize = lengths.iter().sum();
        return Err(format!("bitstream of {} bytes, expected {expected} for {numel} values", bits.len()));
    }
    let ib = index_bits(chunk);
    let mut r = BitReader { bytes: bits, at: 0 };
    let mut out = Vec::with_capacity(expected * 8 / (ib as usize + 2));
    for (c, ([lo, hi], &(start, len))) in levels.iter().zip(&layout).enumerate() {
        if !(lo.is_finite() && hi.is_finite() && *lo >= 0.0 && *hi >= 0.0) {
            return Err(format!("chunk {c}: magnitude levels {lo}, {hi} are not finite and ≥ 0"));
        }
        let mut previous: Option<u32> = None;
        for _ in 0..kept(len, chunk, k) {
            let (i, code) = (r.take(ib).ok_or("bitstream ends early")?, r.take(2).ok_or("bitstream ends early")?);
            if i as usize >= len || previous.is_some_and(|p| i <= p) {
                return Err(format!("chunk {c}: index {i} out of range or not increasing (chunk of {len} values)"));
            }
            previous = Some(i);
            let q = if code & 2 != 0 { *hi } else { *lo };
            out.push((start + i as usize, if code & 1 != 0 { -q } else { q }));
        }
    }
    Ok(out)
}

/// Decodes the values laid out as `lengths` (zero where nothing was sent); errors as
/// [`decode_entries`].
pub fn decode(bits: &[u8], levels: &[[f32; 2]], lengths: &[usize], chunk: usize, k: usize) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; lengths.iter().sum()];
    for (i, v) in decode_entries(bits, levels, lengths, chunk, k)? {
        out[i] = v;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(n: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919) % 1009) as f32 - 504.0) * 1e-3 * (1.0 + (i % 13) as f32)).collect()
    }

    #[test]
    fn keeps_the_largest_entries_and_feeds_back_the_rest() {
        let x = signal(10_000);
        let mut err = x.clone();
        let s = encode(&mut err, &[x.len()], 4096, 56);
        assert_eq!(s.bits.len(), stream_bytes(&[x.len()], 4096, 56));
        assert_eq!(stream_bytes(&[4096], 4096, 56), 98, "56 × 14 bits");
        let y = decode(&s.bits, &s.levels, &[x.len()], 4096, 56).unwrap();
        for ((a, b), e) in x.iter().zip(&y).zip(&err) {
            assert!((a - b - e).abs() < 1e-6, "sent + residual = input");
        }
        // Each chunk sends exactly its k largest magnitudes, with their signs.
        let chunk = &x[..4096];
        let mut mags: Vec<f32> = chunk.iter().map(|v| v.abs()).collect();
        mags.sort_by(|a, b| b.total_cmp(a));
        let sent: Vec<usize> = (0..4096).filter(|&i| y[i] != 0.0).collect();
        assert_eq!(sent.len(), 56);
        assert!(sent.iter().all(|&i| chunk[i].abs() >= mags[55] && y[i].signum() == chunk[i].signum()));
        // Over rounds the residual is sent too: it stays bounded, so the running sum's relative
        // error falls as 1/rounds.
        let (mut total, mut err) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        let mut rel = Vec::new();
        for round in 1..=400 {
            err.iter_mut().zip(&x).for_each(|(e, a)| *e += a);
            let s = encode(&mut err, &[x.len()], 4096, 56);
            for (t, v) in total.iter_mut().zip(decode(&s.bits, &s.levels, &[x.len()], 4096, 56).unwrap()) {
                *t += v;
            }
            if round % 100 == 0 {
                let r = round as f32;
                rel.push(
                    x.iter().zip(&total).map(|(a, t)| (r * a - t).abs()).sum::<f32>()
                        / x.iter().map(|a| r * a.abs()).sum::<f32>(),
                );
            }
        }
        assert!(rel[3] < 0.1 && rel[3] < 0.4 * rel[0], "relative error of the sum after 100..400 rounds: {rel:?}");
    }

    #[test]
    fn chunks_never_span_two_tensors() {
        assert_eq!(chunks(&[5000, 300, 4096], 4096), vec![(0, 4096), (4096, 904), (5000, 300), (5300, 4096)]);
        // A small tensor of values 1000× smaller than its neighbour's still sends its share:
        // ⌈56 · 300 / 4096⌉ = 5 entries.
        let mut x: Vec<f32> = signal(4096 + 300);
        x[4096..].iter_mut().for_each(|v| *v *= 1e-3);
        let lengths = [4096, 300];
        let s = encode(&mut x.clone(), &lengths, 4096, 56);
        assert_eq!(s.bits.len(), stream_bytes(&lengths, 4096, 56));
        let y = decode(&s.bits, &s.levels, &lengths, 4096, 56).unwrap();
        assert_eq!(y[4096..].iter().filter(|v| **v != 0.0).count(), 5);
        assert_eq!(y[..4096].iter().filter(|v| **v != 0.0).count(), 56);
    }

    #[test]
    fn malformed_streams_are_refused_with_a_reason() {
        let x = signal(5000);
        let s = encode(&mut x.clone(), &[5000], 4096, 56);
        let err = |bits: &[u8], levels: &[[f32; 2]]| decode(bits, levels, &[5000], 4096, 56).unwrap_err();
        assert!(err(&s.bits[1..], &s.levels).contains("bytes"));
        assert!(err(&s.bits, &s.levels[..1]).contains("level pairs"));
        let mut nan = s.levels.clone();
        nan[1][0] = f32::NAN;
        assert!(err(&s.bits, &nan).contains("chunk 1"));
        // The second chunk holds 904 values: an index of 4000 there is out of range.
        let mut bits = s.bits.clone();
        let at = 56 * 14; // first entry of chunk 1, LSB first
        for b in 0..12 {
            let bit = (4000u32 >> b) & 1;
            let (byte, off) = ((at + b) / 8, (at + b) % 8);
            bits[byte] = (bits[byte] & !(1 << off)) | ((bit as u8) << off);
        }
        assert!(err(&bits, &s.levels).contains("chunk 1: index 4000"));
        // Indices repeated (the first entry copied over the second) are refused, not summed.
        let mut bits = s.bits.clone();
        for b in 0..14 {
            let bit = (bits[b / 8] >> (b % 8)) & 1;
            let (byte, off) = ((14 + b) / 8, (14 + b) % 8);
            bits[byte] = (bits[byte] & !(1 << off)) | (bit << off);
        }
        assert!(err(&bits, &s.levels).contains("not increasing"));
    }
}
