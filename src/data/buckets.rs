//! Aspect-ratio buckets: a set of image sizes of about equal pixel count (the SDXL / PixArt
//! convention), each image resized into the bucket whose aspect ratio is closest to its own, so a
//! wide or tall picture keeps its subject instead of losing its sides to a square crop.
//!
//! A bucket is named `WxH` in pixels (`96x48`); the name is what shard indexes, manifests and
//! sample records carry. Batches are drawn within one bucket (see `stream`), so every batch is one
//! tensor shape.

use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use serde::{Deserialize, Serialize};

/// One bucket: an output size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Bucket {
    pub width: u32,
    pub height: u32,
}

impl Bucket {
    pub fn square(side: u32) -> Bucket {
        Bucket { width: side, height: side }
    }

    /// `96x48`.
    pub fn name(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }

    /// Parses `96x48` (width × height).
    pub fn parse(s: &str) -> Option<Bucket> {
        let (w, h) = s.trim().split_once(['x', 'X', '×'])?;
        let (width, height) = (w.trim().parse().ok()?, h.trim().parse().ok()?);
        (width > 0 && height > 0).then_some(Bucket { width, height })
    }

    fn log_aspect(&self) -> f64 {
        (self.width as f64 / self.height as f64).ln()
    }
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// How an image is made to fit its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Scale to cover the bucket, centre-crop the remainder (small: the bucket's aspect is the
    /// closest available).
    #[default]
    Crop,
    /// Scale to fit inside the bucket, pad the rest with white (nothing of the image is lost).
    Pad,
}

/// The bucket set a dataset is curated into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    /// Sorted by aspect ratio, widest last.
    pub sizes: Vec<Bucket>,
    pub fit: Fit,
}

impl Buckets {
    /// For each width `W ≥ resolution` in multiples of `step`, the height `H` (a multiple of
    /// `step`) that brings `W·H` nearest to `resolution²`, kept while `W/H ≤ max_aspect`, in both
    /// orientations (SDXL's list is this at 1024² with step 64 and aspect up to 4).
    pub fn auto(resolution: u32, step: u32, max_aspect: f64, fit: Fit) -> Result<Buckets, String> {
        if step == 0 || !resolution.is_multiple_of(step) {
            return Err(format!("bucket step {step} must divide the resolution {resolution}"));
        }
        if !(max_aspect >= 1.0 && max_aspect.is_finite()) {
            return Err(format!("bucket max aspect {max_aspect} must be at least 1"));
        }
        let area = resolution as f64 * resolution as f64;
        let mut sizes = Vec::new();
        let mut width = resolution;
        while width as f64 <= resolution as f64 * max_aspect + 0.5 {
            let height = ((area / width as f64 / step as f64).round() as u32).max(1) * step;
            if width as f64 / height as f64 <= max_aspect + 1e-9 {
                // Both orientations: a landscape bucket and its portrait transpose.
                sizes.push(Bucket { width, height });
                sizes.push(Bucket { width: height, height: width });
            }
            width += step;
        }
        Buckets::new(sizes, fit)
    }

    /// A given list, e.g. from `--buckets 64x64,96x48,48x96`.
    pub fn parse(list: &str, fit: Fit) -> Result<Buckets, String> {
        let sizes = list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| Bucket::parse(s).ok_or_else(|| format!("bucket `{s}` is not WIDTHxHEIGHT in pixels")))
            .collect::<Result<Vec<_>, _>>()?;
        Buckets::new(sizes, fit)
    }

    fn new(mut sizes: Vec<Bucket>, fit: Fit) -> Result<Buckets, String> {
        sizes.sort_by(|a, b| a.log_aspect().total_cmp(&b.log_aspect()).then(a.cmp(b)));
        sizes.dedup();
        if sizes.is_empty() {
            return Err("no bucket".into());
        }
        Ok(Buckets { sizes, fit })
    }

    /// The bucket whose aspect ratio is closest (in log ratio) to a `w × h` image's.
    pub fn nearest(&self, w: u32, h: u32) -> Bucket {
        let a = (w as f64 / h.max(1) as f64).ln();
        *self
            .sizes
            .iter()
            .min_by(|x, y| (x.log_aspect() - a).abs().total_cmp(&(y.log_aspect() - a).abs()))
            .expect("non-empty")
    }

    pub fn names(&self) -> Vec<String> {
        self.sizes.iter().map(Bucket::name).collect()
    }
}

/// Transparency composited over white.
pub fn flatten_alpha(img: &DynamicImage) -> RgbImage {
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut rgb = RgbImage::new(w, h);
    for (p, q) in rgba.pixels().zip(rgb.pixels_mut()) {
        let a = p[3] as u32;
        for c in 0..3 {
            q[c] = ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    rgb
}

/// Resizes `img` into `bucket` by `fit`; returns the image and the fraction of the source's area
/// that survives (1 for `Pad`; the uncropped share for `Crop`).
pub fn fit_into(img: &RgbImage, bucket: Bucket, fit: Fit) -> (RgbImage, f64) {
    let (w, h) = img.dimensions();
    let (bw, bh) = (bucket.width, bucket.height);
    let (sx, sy) = (bw as f64 / w as f64, bh as f64 / h as f64);
    let scale = match fit {
        Fit::Crop => sx.max(sy),
        Fit::Pad => sx.min(sy),
    };
    let resize = |nw: u32, nh: u32| {
        if (nw, nh) == (w, h) {
            img.clone()
        } else {
            image::imageops::resize(img, nw, nh, FilterType::CatmullRom)
        }
    };
    match fit {
        Fit::Crop => {
            let (nw, nh) = (((w as f64 * scale).round() as u32).max(bw), ((h as f64 * scale).round() as u32).max(bh));
            let resized = resize(nw, nh);
            let out = image::imageops::crop_imm(&resized, (nw - bw) / 2, (nh - bh) / 2, bw, bh).to_image();
            (out, (bw as f64 * bh as f64) / (nw as f64 * nh as f64))
        }
        Fit::Pad => {
            let (nw, nh) =
                (((w as f64 * scale).round() as u32).clamp(1, bw), ((h as f64 * scale).round() as u32).clamp(1, bh));
            let resized = resize(nw, nh);
            let mut out = RgbImage::from_pixel(bw, bh, image::Rgb([255, 255, 255]));
            image::imageops::replace(&mut out, &resized, ((bw - nw) / 2) as i64, ((bh - nh) / 2) as i64);
            (out, 1.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_buckets_have_equal_area_and_cover_both_orientations() {
        let b = Buckets::auto(64, 16, 2.0, Fit::Crop).unwrap();
        assert!(b.sizes.contains(&Bucket::square(64)));
        for s in &b.sizes {
            assert_eq!((s.width % 16, s.height % 16), (0, 0));
            let area = (s.width * s.height) as f64 / 4096.0;
            assert!((0.7..=1.3).contains(&area), "{s}: area ratio {area}");
            assert!(b.sizes.contains(&Bucket { width: s.height, height: s.width }), "{s} has no transpose");
        }
        assert_eq!(b.nearest(300, 100).name(), "96x48", "{:?}", b.names());
        assert_eq!(b.nearest(100, 300).name(), "48x96");
        assert_eq!(b.nearest(100, 100), Bucket::square(64));
        assert_eq!(Buckets::parse("64x64, 96x48", Fit::Pad).unwrap().sizes.len(), 2);
        assert!(Buckets::parse("64x", Fit::Crop).unwrap_err().contains("`64x`"));
        assert!(Buckets::auto(64, 24, 2.0, Fit::Crop).is_err());
    }

    #[test]
    fn a_wide_image_keeps_most_of_its_area_in_its_bucket() {
        let img = RgbImage::from_fn(300, 100, |x, _| image::Rgb([(x % 256) as u8, 0, 0]));
        let b = Buckets::auto(64, 16, 2.0, Fit::Crop).unwrap();
        let bucket = b.nearest(300, 100);
        let (out, kept) = fit_into(&img, bucket, Fit::Crop);
        assert_eq!(out.dimensions(), (bucket.width, bucket.height));
        // A square centre crop keeps a third of a 3:1 image; the 2:1 bucket two thirds.
        assert!((kept - 2.0 / 3.0).abs() < 0.02, "kept {kept}");
        let (padded, all) = fit_into(&img, bucket, Fit::Pad);
        assert_eq!((padded.dimensions(), all), ((96, 48), 1.0));
        assert_eq!(padded.get_pixel(0, 0).0, [255, 255, 255], "padding is white");
        let (_, square) = fit_into(&img, Bucket::square(64), Fit::Crop);
        assert!((square - 1.0 / 3.0).abs() < 0.02, "square crop kept {square}");
    }
}
