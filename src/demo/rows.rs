//! A wide/tall image set: rows and columns of 2–5 like objects (each its own size and place in
//! its cell) on white, in images of aspect
//! ratio 1:3 to 3:1, with captions that count them ("four red circles in a row"). The objects
//! reach both ends of the long side, so a square centre crop cuts some of them off (and makes the
//! caption wrong) while an aspect-ratio bucket keeps them. Used to measure and test buckets.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const COLOURS: [(&str, [u8; 3]); 4] =
    [("red", [220, 40, 40]), ("green", [40, 170, 60]), ("blue", [40, 80, 220]), ("orange", [240, 150, 30])];
const SHAPES: [&str; 2] = ["circle", "square"];
const COUNTS: [&str; 4] = ["two", "three", "four", "five"];
/// Width : height of the images, 1:3 to 3:1.
const ASPECTS: [(u32, u32); 7] = [(1, 3), (1, 2), (2, 3), (1, 1), (3, 2), (2, 1), (3, 1)];

/// The image of `seed` and its caption.
pub fn image(seed: u64) -> (RgbImage, String) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (aw, ah) = ASPECTS[rng.random_range(0..ASPECTS.len())];
    let unit = rng.random_range(40..80);
    let (w, h) = (aw * unit, ah * unit);
    let (cname, ink) = COLOURS[rng.random_range(0..COLOURS.len())];
    let shape = rng.random_range(0..SHAPES.len());
    let n = rng.random_range(2..=5usize);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let row = w >= h;
    let (long, short) = if row { (w, h) } else { (h, w) };
    // n cells along the long side, one object in each, filling most of its cell.
    let cell = long as f32 / n as f32;
    let r_max = (cell.min(short as f32) * 0.45).max(2.0);
    for k in 0..n {
        // Each object its own size and place in its cell: no two images are scaled copies.
        let r = r_max * rng.random_range(0.5..1.0);
        let c_long = (k as f32 + 0.5) * cell + rng.random_range(-0.5..=0.5) * (cell / 2.0 - r);
        let c_short = short as f32 / 2.0 + rng.random_range(-0.5..=0.5) * (short as f32 - 2.0 * r);
        let (cx, cy) = if row { (c_long, c_short) } else { (c_short, c_long) };
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                let inside = match shape {
                    0 => dx * dx + dy * dy <= r * r,
                    _ => dx.abs() <= r && dy.abs() <= r,
                };
                if inside {
                    img.put_pixel(x, y, Rgb(ink));
                }
            }
        }
    }
    let caption = format!("{} {cname} {}s in a {}", COUNTS[n - 2], SHAPES[shape], if row { "row" } else { "column" });
    (img, caption)
}

/// Writes `n` images (seeds `0..n`) as PNG files under `dir` and a metadata table for `curate`
/// (CC0, with the ids `rows-000000`, …); returns the table's path.
pub fn write_set(dir: &Path, n: u64) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("images"))?;
    let mut table = String::new();
    for seed in 0..n {
        let (img, caption) = image(seed);
        let file = format!("images/rows-{seed:06}.png");
        img.save(dir.join(&file)).map_err(std::io::Error::other)?;
        let row = serde_json::json!({
            "id": format!("rows-{seed:06}"), "image": file, "caption": caption, "licence": "cc0",
            "author": "skytrain", "source": "skytrain::demo::rows",
        });
        table.push_str(&(row.to_string() + "\n"));
    }
    let path = dir.join("rows.jsonl");
    std::fs::write(&path, table)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn images_span_their_long_side_and_captions_count_them() {
        let (img, caption) = super::image(3);
        assert!(caption.ends_with(if img.width() >= img.height() { "in a row" } else { "in a column" }), "{caption}");
        let wide = (0..200).map(super::image).filter(|(i, _)| i.width() >= 2 * i.height()).count();
        let tall = (0..200).map(super::image).filter(|(i, _)| i.height() >= 2 * i.width()).count();
        assert!(wide > 30 && tall > 30, "{wide} wide, {tall} tall of 200");
    }
}
