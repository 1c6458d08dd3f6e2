//! Distinct thin-line icons: a calibration set for near-duplicate detection (`data::dedupe`),
//! made to break whole-image hashes. Each icon is 1–2 px strokes (segments, circles, boxes) drawn in
//! a random box from 12 px to the whole 64 px page, on white: small or thin content on a flat
//! background, like clip art. Icons from different seeds are different drawings.

use image::{Rgb, RgbImage};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Side of an icon, pixels.
pub const SIDE: u32 = 64;

/// The icon of `seed`.
pub fn icon(seed: u64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut img = RgbImage::from_pixel(SIDE, SIDE, Rgb([255, 255, 255]));
    let size = rng.random_range(12.0..SIDE as f32);
    let (ox, oy) = (rng.random_range(0.0..=SIDE as f32 - size), rng.random_range(0.0..=SIDE as f32 - size));
    let ink = Rgb([rng.random_range(0..80), rng.random_range(0..80), rng.random_range(0..80)]);
    let width = if rng.random_bool(0.5) { 1.0 } else { 2.0 };
    // Points in the unit box, mapped into the icon's box.
    let at = |u: f32, v: f32| (ox + u * (size - 1.0), oy + v * (size - 1.0));
    for _ in 0..rng.random_range(2..6) {
        match rng.random_range(0..3) {
            0 => {
                let (a, b) = (at(rng.random(), rng.random()), at(rng.random(), rng.random()));
                stroke(&mut img, a, b, width, ink);
            }
            1 => {
                let (c, r) =
                    (at(rng.random_range(0.3..0.7), rng.random_range(0.3..0.7)), rng.random_range(0.1..0.5) * size);
                let n = 48;
                for k in 0..n {
                    let (t0, t1) = (
                        k as f32 / n as f32 * std::f32::consts::TAU,
                        (k + 1) as f32 / n as f32 * std::f32::consts::TAU,
                    );
                    stroke(
                        &mut img,
                        (c.0 + r * t0.cos(), c.1 + r * t0.sin()),
                        (c.0 + r * t1.cos(), c.1 + r * t1.sin()),
                        width,
                        ink,
                    );
                }
            }
            _ => {
                let (a, b) = (
                    at(rng.random_range(0.0..0.5), rng.random_range(0.0..0.5)),
                    at(rng.random_range(0.5..1.0), rng.random_range(0.5..1.0)),
                );
                for (p, q) in [
                    ((a.0, a.1), (b.0, a.1)),
                    ((b.0, a.1), (b.0, b.1)),
                    ((b.0, b.1), (a.0, b.1)),
                    ((a.0, b.1), (a.0, a.1)),
                ] {
                    stroke(&mut img, p, q, width, ink);
                }
            }
        }
    }
    img
}

/// A straight stroke of `width` px from `a` to `b`, clipped to the page.
fn stroke(img: &mut RgbImage, a: (f32, f32), b: (f32, f32), width: f32, ink: Rgb<u8>) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) * 2.0).ceil().max(1.0) as usize;
    for i in 0..=steps {
        let t = i as f32 / steps as f32;
        let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
        for dy in 0..width as i32 {
            for dx in 0..width as i32 {
                let (px, py) = (x.round() as i32 + dx, y.round() as i32 + dy);
                if (0..SIDE as i32).contains(&px) && (0..SIDE as i32).contains(&py) {
                    img.put_pixel(px as u32, py as u32, ink);
                }
            }
        }
    }
}
