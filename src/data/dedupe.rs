//! Near-duplicate detection for curation: two independent views of an image's content, both taken
//! on the content's bounding box so that small or thin content on a flat background fills the
//! frame (a whole-image hash of Saturn and of a fly on white is mostly "white" and matches).
//!
//! 1. A 64-bit difference hash of the luminance (9×8) of the content, squared and centred: robust to
//!    rescaling, re-encoding and moving the content.
//! 2. Its shape at finer scale: a 16×16 silhouette (which cells of the same square hold content)
//!    and a 32×32 edge map of the luminance. Near duplicates share both; different drawings whose
//!    coarse luminance structure happens to agree do not.
//!
//! An image is a near duplicate of a kept one when the hashes are within the radius, the
//! silhouettes overlap (intersection over union) at least [`MIN_SILHOUETTE_IOU`] and the edges
//! agree at least [`MIN_EDGE_AGREEMENT`]. Recoloured variants (emoji skin tones) are near
//! duplicates by this test; `keep_colour_variants` also requires the mean colours to agree, which
//! keeps them. Thresholds calibrated with `examples/dedupe_calibration.rs` on the 3,786 Noto emoji
//! (skin-tone variants are true near duplicates) and 2,000 distinct generated thin-line icons
//! (`demo::icons`): at 3 bits 83% of skin-tone variants are caught and no icon is lost.

use std::collections::HashMap;

use image::imageops::FilterType;
use image::{DynamicImage, Rgb, RgbImage};

/// A pixel differing from the background by more than this (on any channel) is content.
const CONTENT_THRESHOLD: u8 = 32;

/// Silhouettes of near duplicates overlap at least this much (intersection over union).
pub const MIN_SILHOUETTE_IOU: f64 = 0.8;

/// Near duplicates have at least this share of each other's edges within a pixel.
pub const MIN_EDGE_AGREEMENT: f64 = 0.9;

/// Mean colours further apart than this (on any channel) differ, for `keep_colour_variants`.
const COLOUR_TOLERANCE: u8 = 6;

/// What near-duplicate detection keeps of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    pub dhash: u64,
    /// 16×16 bits, row-major, four rows per word.
    pub silhouette: [u64; 4],
    /// Where the content's luminance has edges, 32×32, one row per word.
    pub edges: [u32; 32],
    pub colour: [u8; 3],
}

impl Fingerprint {
    pub fn of(img: &RgbImage) -> Fingerprint {
        let square = content_square(img);
        // The content at one scale whatever its size: what the silhouette and the edges read.
        let small = image::imageops::resize(&square.0, 32, 32, FilterType::Triangle);
        Fingerprint {
            dhash: dhash(&DynamicImage::ImageRgb8(square.0.clone())),
            silhouette: silhouette(&small, square.1),
            edges: edges(&small),
            colour: mean_colour(img),
        }
    }

    /// Intersection over union of two silhouettes (1 for two empty ones).
    pub fn silhouette_iou(&self, other: &Fingerprint) -> f64 {
        let (mut inter, mut union) = (0u32, 0u32);
        for (a, b) in self.silhouette.iter().zip(&other.silhouette) {
            inter += (a & b).count_ones();
            union += (a | b).count_ones();
        }
        if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        }
    }

    /// The smaller of the shares of each one's edge pixels that the other has within one pixel
    /// (1 for two images without edges).
    pub fn edge_agreement(&self, other: &Fingerprint) -> f64 {
        let share = |a: &[u32; 32], b: &[u32; 32]| {
            let (mut hit, mut all) = (0u32, 0u32);
            for (y, row) in a.iter().enumerate() {
                let near =
                    [y.max(1) - 1, y, (y + 1).min(31)].iter().fold(0u32, |n, &r| n | b[r] | (b[r] << 1) | (b[r] >> 1));
                hit += (row & near).count_ones();
                all += row.count_ones();
            }
            if all == 0 {
                1.0
            } else {
                hit as f64 / all as f64
            }
        };
        share(&self.edges, &other.edges).min(share(&other.edges, &self.edges))
    }

    fn same_colour(&self, other: &Fingerprint) -> bool {
        self.colour.iter().zip(&other.colour).all(|(a, b)| a.abs_diff(*b) <= COLOUR_TOLERANCE)
    }
}

/// The background: the per-channel median of the border pixels.
fn background(img: &RgbImage) -> Rgb<u8> {
    let (w, h) = img.dimensions();
    let mut border: Vec<Rgb<u8>> = Vec::new();
    for x in 0..w {
        border.push(*img.get_pixel(x, 0));
        border.push(*img.get_pixel(x, h - 1));
    }
    for y in 0..h {
        border.push(*img.get_pixel(0, y));
        border.push(*img.get_pixel(w - 1, y));
    }
    let mut out = [0u8; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut v: Vec<u8> = border.iter().map(|p| p[c]).collect();
        v.sort_unstable();
        *o = v[v.len() / 2];
    }
    Rgb(out)
}

fn is_content(p: &Rgb<u8>, bg: &Rgb<u8>) -> bool {
    p.0.iter().zip(&bg.0).any(|(a, b)| a.abs_diff(*b) > CONTENT_THRESHOLD)
}

/// The content's bounding box, squared (the longer side) and centred on the background colour;
/// the whole image when nothing differs from the background. Returns it with the background.
fn content_square(img: &RgbImage) -> (RgbImage, Rgb<u8>) {
    let bg = background(img);
    let (w, h) = img.dimensions();
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if is_content(p, &bg) {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
        }
    }
    if x1 <= x0 {
        return (img.clone(), bg);
    }
    let (bw, bh) = (x1 - x0, y1 - y0);
    let side = bw.max(bh);
    let mut square = RgbImage::from_pixel(side, side, bg);
    image::imageops::replace(
        &mut square,
        &image::imageops::crop_imm(img, x0, y0, bw, bh).to_image(),
        ((side - bw) / 2).into(),
        ((side - bh) / 2).into(),
    );
    (square, bg)
}

/// Which of 16×16 cells of the content square (resampled to 32×32) hold content, a pixel counting
/// as content at half the usual contrast (a one-pixel line of a 256 px box keeps about an eighth of
/// its contrast), 2×2 max-pooled.
fn silhouette(small: &RgbImage, bg: Rgb<u8>) -> [u64; 4] {
    let mut bits = [0u64; 4];
    for (x, y, p) in small.enumerate_pixels() {
        if p.0.iter().zip(&bg.0).any(|(a, b)| a.abs_diff(*b) > CONTENT_THRESHOLD / 2) {
            let i = (y / 2 * 16 + x / 2) as usize;
            bits[i / 64] |= 1 << (i % 64);
        }
    }
    bits
}

/// Edges of the content square's luminance at 32×32: central differences above 24 of 255.
fn edges(small: &RgbImage) -> [u32; 32] {
    let g = image::imageops::grayscale(small);
    let at = |x: u32, y: u32| g.get_pixel(x.min(31), y.min(31))[0] as i32;
    let mut out = [0u32; 32];
    for y in 0..32u32 {
        for x in 0..32u32 {
            let dx = (at(x + 1, y) - at(x.saturating_sub(1), y)).abs();
            let dy = (at(x, y + 1) - at(x, y.saturating_sub(1))).abs();
            if dx.max(dy) > 24 {
                out[y as usize] |= 1 << x;
            }
        }
    }
    out
}

/// 64-bit difference hash of the luminance at 9×8: a bit is set where luminance rises to the
/// right by more than a resampling ripple (2 of 255), so flat regions hash to zeros, not noise.
pub fn dhash(img: &DynamicImage) -> u64 {
    let g = img.grayscale().resize_exact(9, 8, FilterType::Triangle).to_luma8();
    let mut h = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            h = (h << 1) | (g.get_pixel(x, y)[0] as i32 + 2 < g.get_pixel(x + 1, y)[0] as i32) as u64;
        }
    }
    h
}

/// Mean RGB of an image.
pub fn mean_colour(img: &RgbImage) -> [u8; 3] {
    let mut sum = [0u64; 3];
    for p in img.pixels() {
        for c in 0..3 {
            sum[c] += p[c] as u64;
        }
    }
    let n = (img.width() as u64 * img.height() as u64).max(1);
    sum.map(|s| (s / n) as u8)
}

/// Why a row is a near duplicate of a kept one.
#[derive(Debug, Clone, PartialEq)]
pub struct NearMatch {
    pub kept: String,
    pub bits: u32,
    pub iou: f64,
    pub edges: f64,
}

/// Exact and near duplicate lookup over everything kept so far.
#[derive(Default)]
pub struct Seen {
    /// Content hash → the kept row's id.
    pub content: HashMap<String, String>,
    /// Band tables: a hash within 3 bits of another agrees with it on one of 4 16-bit bands.
    bands: [HashMap<u16, Vec<(Fingerprint, String)>>; 4],
}

impl Seen {
    pub fn add(&mut self, content: &str, print: Fingerprint, id: &str) {
        self.content.insert(content.to_string(), id.to_string());
        for (b, table) in self.bands.iter_mut().enumerate() {
            table.entry((print.dhash >> (16 * b)) as u16).or_default().push((print, id.to_string()));
        }
    }

    /// The kept row this image nearly duplicates, if any: hash within `bits` and silhouettes
    /// overlapping (and, with `keep_colour_variants`, the same mean colour).
    pub fn near(&self, print: &Fingerprint, bits: u32, keep_colour_variants: bool) -> Option<NearMatch> {
        if bits == 0 {
            return None;
        }
        self.bands.iter().enumerate().find_map(|(b, table)| {
            table.get(&((print.dhash >> (16 * b)) as u16)).and_then(|v| {
                v.iter().find_map(|(kept, id)| {
                    let d = (kept.dhash ^ print.dhash).count_ones();
                    if d > bits || (keep_colour_variants && !kept.same_colour(print)) {
                        return None;
                    }
                    let iou = kept.silhouette_iou(print);
                    let edges = kept.edge_agreement(print);
                    (iou >= MIN_SILHOUETTE_IOU && edges >= MIN_EDGE_AGREEMENT).then(|| NearMatch {
                        kept: id.clone(),
                        bits: d,
                        iou,
                        edges,
                    })
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw_box(img: &mut RgbImage, x0: u32, y0: u32, w: u32, h: u32, c: [u8; 3]) {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                img.put_pixel(x, y, Rgb(c));
            }
        }
    }

    #[test]
    fn moved_copies_match_different_small_drawings_do_not() {
        let mut a = RgbImage::from_pixel(64, 64, Rgb([255, 255, 255]));
        draw_box(&mut a, 10, 10, 4, 12, [0, 0, 0]);
        draw_box(&mut a, 14, 18, 8, 4, [0, 0, 0]);
        // The same drawing moved: a near duplicate.
        let mut moved = RgbImage::from_pixel(64, 64, Rgb([255, 255, 255]));
        draw_box(&mut moved, 40, 30, 4, 12, [0, 0, 0]);
        draw_box(&mut moved, 44, 38, 8, 4, [0, 0, 0]);
        // A different small drawing on the same white page: not one.
        let mut other = RgbImage::from_pixel(64, 64, Rgb([255, 255, 255]));
        draw_box(&mut other, 30, 30, 12, 3, [0, 0, 0]);
        draw_box(&mut other, 30, 30, 3, 12, [0, 0, 0]);
        let mut seen = Seen::default();
        seen.add("a", Fingerprint::of(&a), "row-a");
        assert_eq!(seen.near(&Fingerprint::of(&moved), 2, false).map(|m| m.kept), Some("row-a".into()));
        assert_eq!(seen.near(&Fingerprint::of(&other), 3, false), None);
    }

    #[test]
    fn recoloured_variants_are_near_duplicates_unless_colour_variants_are_kept() {
        let mut a = RgbImage::from_pixel(64, 64, Rgb([255, 255, 255]));
        draw_box(&mut a, 16, 16, 32, 32, [250, 200, 150]);
        draw_box(&mut a, 24, 24, 4, 4, [0, 0, 0]);
        let mut b = a.clone();
        draw_box(&mut b, 16, 16, 32, 32, [150, 100, 60]);
        draw_box(&mut b, 24, 24, 4, 4, [0, 0, 0]);
        let mut seen = Seen::default();
        seen.add("a", Fingerprint::of(&a), "light");
        assert_eq!(seen.near(&Fingerprint::of(&b), 2, false).map(|m| m.kept), Some("light".into()));
        assert_eq!(seen.near(&Fingerprint::of(&b), 2, true), None);
    }
}
