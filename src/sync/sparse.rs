//! The sparse low-bit codec (SparseLoCo's recipe): each tensor of the pseudo-gradient is cut into
//! chunks of `chunk` values; each chunk sends its `k` largest-magnitude entries (a tensor's shorter
//! last chunk, or a small tensor, in proportion: the same density) with 2 bits of value each: a
//! sign and which of the chunk's two magnitude levels (the means of the smaller and the larger half
//! of the kept magnitudes, f16). Everything not sent stays in the worker's error feedback. Chunks
//! never span two tensors: a small tensor whose values are far smaller than its neighbour's (a bias
//! beside a weight matrix) would otherwise never win a place in a shared chunk.
//!
//! Indices are sent as Rice-coded gaps (the distance from the previous kept entry: a unary
//! quotient and `rice_bits` low bits), ~7 bits at 2% density where a fixed-width index takes
//! ⌈log2 chunk⌉ = 12: at chunk 4096, k 88 costs 0.025 bytes per parameter (160× below f32), as
//! many bytes as k 56 with fixed-width indices.
//!
//! The bitstream is packed by hand (LSB first): a few lines, no dependency.

/// Low bits of a Rice-coded gap in a chunk of `len` values keeping `n`: ⌊log2⌋ of the mean gap,
/// close to the best parameter for the geometric gaps of entries spread over the chunk.
fn rice_bits(len: usize, n: usize) -> u32 {
    ((len - n) / n.max(1)).max(1).ilog2()
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

    /// `gap` as a Rice code: ⌊gap / 2^r⌋ one-bits, a zero, then the low `r` bits.
    fn push_rice(&mut self, gap: u32, r: u32) {
        for _ in 0..gap >> r {
            self.push(1, 1);
        }
        self.push(0, 1);
        self.push(gap, r);
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

    /// A Rice-coded gap of at most `max`; None if the stream ends first, Err if it is larger.
    fn take_rice(&mut self, r: u32, max: usize) -> Option<Result<usize, ()>> {
        let mut q = 0usize;
        while self.take(1)? == 1 {
            q += 1;
            if q << r > max {
                return Some(Err(()));
            }
        }
        let gap = (q << r) | self.take(r)? as usize;
        Some(if gap > max { Err(()) } else { Ok(gap) })
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
    let entries: usize = picked.iter().map(|(_, e)| e.len()).sum();
    let mut w = BitWriter { out: Vec::with_capacity(entries * 10 / 8), used: 0 };
    let mut levels = Vec::with_capacity(picked.len());
    for ((chunk_levels, entries), (_, len)) in picked.into_iter().zip(chunks(lengths, chunk)) {
        levels.push(chunk_levels);
        let r = rice_bits(len, entries.len());
        let mut next = 0;
        for (i, code) in entries {
            w.push_rice(i - next, r);
            w.push(code, 2);
            next = i + 1;
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
/// malformed stream (ending early or running past its last entry, an index beyond its chunk, a
/// level not finite or negative) is an error saying which chunk and what.
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
    let entries: usize = layout.iter().map(|&(_, len)| kept(len, chunk, k)).sum();
    let mut r = BitReader { bytes: bits, at: 0 };
    let mut out = Vec::with_capacity(entries);
    for (c, ([lo, hi], &(start, len))) in levels.iter().zip(&layout).enumerate() {
        if !(lo.is_finite() && hi.is_finite() && *lo >= 0.0 && *hi >= 0.0) {
            return Err(format!("chunk {c}: magnitude levels {lo}, {hi} are not finite and ≥ 0"));
        }
        let n = kept(len, chunk, k);
        let rice = rice_bits(len, n);
        let mut next = 0;
        for e in 0..n {
            let ends = || format!("bitstream of {} bytes ends in chunk {c}", bits.len());
            // Entry e of n needs n − e − 1 more places after it in the chunk.
            let room = len - next - (n - e);
            let gap = r.take_rice(rice, room).ok_or_else(ends)?;
            let gap = gap.map_err(|()| format!("chunk {c}: entry {e} lies beyond the chunk of {len} values"))?;
            let code = r.take(2).ok_or_else(ends)?;
            let q = if code & 2 != 0 { *hi } else { *lo };
            out.push((start + next + gap, if code & 1 != 0 { -q } else { q }));
            next += gap + 1;
        }
    }
    if r.at.div_ceil(8) != bits.len() {
        return Err(format!("bitstream of {} bytes, its {entries} entries end after {}", bits.len(), r.at.div_ceil(8)));
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
        let y = decode(&s.bits, &s.levels, &lengths, 4096, 56).unwrap();
        assert_eq!(y[4096..].iter().filter(|v| **v != 0.0).count(), 5);
        assert_eq!(y[..4096].iter().filter(|v| **v != 0.0).count(), 56);
    }

    #[test]
    fn indices_cost_less_than_a_fixed_width_index() {
        // Kept entries spread over the chunk: the gaps are close to geometric.
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
        let x: Vec<f32> = (0..4096 * 64).map(|_| rand::RngExt::random::<f32>(&mut rng) - 0.5).collect();
        for k in [56, 88] {
            let s = encode(&mut x.clone(), &[x.len()], 4096, k);
            let bits_per_entry = s.bits.len() as f64 * 8.0 / (64 * k) as f64;
            assert!(bits_per_entry < 10.0, "k {k}: {bits_per_entry} bits per entry (fixed width: 14)");
        }
    }

    /// A stream of `gaps` per chunk (Rice parameters as the encoder's), every value code 0.
    fn stream(lengths: &[usize], gaps: &[Vec<u32>]) -> Vec<u8> {
        let mut w = BitWriter { out: Vec::new(), used: 0 };
        for ((_, len), gaps) in chunks(lengths, 4096).into_iter().zip(gaps) {
            for &g in gaps {
                w.push_rice(g, rice_bits(len, gaps.len()));
                w.push(0, 2);
            }
        }
        w.out
    }

    #[test]
    fn malformed_streams_are_refused_with_a_reason() {
        let x = signal(5000);
        let s = encode(&mut x.clone(), &[5000], 4096, 56);
        let err = |bits: &[u8], levels: &[[f32; 2]]| decode(bits, levels, &[5000], 4096, 56).unwrap_err();
        assert!(err(&s.bits[..s.bits.len() - 1], &s.levels).contains("ends in chunk 1"));
        assert!(err(&[s.bits.clone(), vec![0]].concat(), &s.levels).contains("entries end after"));
        assert!(err(&s.bits, &s.levels[..1]).contains("level pairs"));
        let mut nan = s.levels.clone();
        nan[1][0] = f32::NAN;
        assert!(err(&s.bits, &nan).contains("chunk 1"));
        // The second chunk holds 904 values and keeps 13: a first gap of 892 leaves too little
        // room for the other 12, one of 891 (they follow one another to the end) is valid.
        let (first, second) = (vec![0; 56], |g: u32| [vec![g], vec![0; 12]].concat());
        assert!(decode(&stream(&[5000], &[first.clone(), second(891)]), &s.levels, &[5000], 4096, 56).is_ok());
        let far = stream(&[5000], &[first.clone(), second(892)]);
        assert!(err(&far, &s.levels).contains("chunk 1: entry 0 lies beyond"), "{}", err(&far, &s.levels));
        // A unary run far past any index (a stream of ones) is refused, not followed.
        let ones = vec![0xff; s.bits.len()];
        assert!(err(&ones, &s.levels).contains("chunk 0: entry 0 lies beyond"));
    }
}
