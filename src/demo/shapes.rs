//! The embedded dataset: coloured shapes with compositional captions, drawn procedurally (CC0 by
//! construction), and the programmatic check of whether a generated image shows what its prompt
//! names. Plain buffers only: images are `[H, W, 3]` f32 in [0, 1].

use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub const SIZE: usize = 32;
pub const BACKGROUND: [f32; 3] = [0.0, 0.0, 0.0];
pub const COLORS: &[(&str, [f32; 3])] = &[
    ("red", [0.90, 0.15, 0.15]),
    ("green", [0.15, 0.75, 0.20]),
    ("blue", [0.20, 0.35, 0.95]),
    ("yellow", [0.95, 0.85, 0.15]),
    ("white", [0.95, 0.95, 0.95]),
];
pub const SHAPES: &[&str] = &["circle", "square", "triangle"];
pub const RELATIONS: &[&str] = &["above", "below", "to the left of", "to the right of"];

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub color: usize,
    pub shape: usize,
    /// Centre and half-size in pixels.
    pub cx: f32,
    pub cy: f32,
    pub r: f32,
}

/// What a caption asks for: one object, or two with a relation of the first to the second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub objects: Vec<Object>,
    pub relation: Option<usize>,
}

fn describe(o: &Object) -> String {
    format!("a {} {}", COLORS[o.color].0, SHAPES[o.shape])
}

impl Scene {
    pub fn caption(&self) -> String {
        match (self.objects.as_slice(), self.relation) {
            ([a, b], Some(rel)) => format!("{} {} {}", describe(a), RELATIONS[rel], describe(b)),
            ([a], _) => describe(a),
            _ => String::new(),
        }
    }

    /// A random scene: 25% one object, else two of different colours in a clear relation.
    pub fn random(rng: &mut impl Rng) -> Scene {
        let obj = |rng: &mut dyn rand::Rng, color| Object {
            color,
            shape: rng.random_range(0..SHAPES.len()),
            cx: 0.0,
            cy: 0.0,
            r: rng.random_range(4.5..6.5),
        };
        let c1 = rng.random_range(0..COLORS.len());
        if rng.random_bool(0.25) {
            let mut a = obj(rng, c1);
            a.cx = rng.random_range(8.0..24.0);
            a.cy = rng.random_range(8.0..24.0);
            return Scene { objects: vec![a], relation: None };
        }
        let c2 = (c1 + rng.random_range(1..COLORS.len())) % COLORS.len();
        let (mut a, mut b) = (obj(rng, c1), obj(rng, c2));
        let rel = rng.random_range(0..RELATIONS.len());
        // Along the relation's axis the objects are 13–17 px apart; across it they jitter ±3 px.
        let along = rng.random_range(13.0..17.0f32);
        let mid = rng.random_range(14.0..18.0f32);
        let across_a = rng.random_range(12.0..20.0f32);
        let across_b = across_a + rng.random_range(-3.0..3.0f32);
        let (lo, hi) = (mid - along / 2.0, mid + along / 2.0);
        match rel {
            0 => ((a.cx, a.cy), (b.cx, b.cy)) = ((across_a, lo), (across_b, hi)),
            1 => ((a.cx, a.cy), (b.cx, b.cy)) = ((across_a, hi), (across_b, lo)),
            2 => ((a.cx, a.cy), (b.cx, b.cy)) = ((lo, across_a), (hi, across_b)),
            _ => ((a.cx, a.cy), (b.cx, b.cy)) = ((hi, across_a), (lo, across_b)),
        }
        Scene { objects: vec![a, b], relation: Some(rel) }
    }

    /// Renders at 4× and box-filters down, for smooth edges.
    pub fn render(&self) -> Vec<f32> {
        const SS: usize = 4;
        let mut img = vec![0f32; SIZE * SIZE * 3];
        for y in 0..SIZE {
            for x in 0..SIZE {
                let mut acc = [0f32; 3];
                for sy in 0..SS {
                    for sx in 0..SS {
                        let px = x as f32 + (sx as f32 + 0.5) / SS as f32;
                        let py = y as f32 + (sy as f32 + 0.5) / SS as f32;
                        let mut c = BACKGROUND;
                        for o in &self.objects {
                            if inside(o, px, py) {
                                c = COLORS[o.color].1;
                            }
                        }
                        for k in 0..3 {
                            acc[k] += c[k];
                        }
                    }
                }
                for k in 0..3 {
                    img[(y * SIZE + x) * 3 + k] = acc[k] / (SS * SS) as f32;
                }
            }
        }
        img
    }
}

fn inside(o: &Object, px: f32, py: f32) -> bool {
    let (dx, dy) = (px - o.cx, py - o.cy);
    match SHAPES[o.shape] {
        "circle" => dx * dx + dy * dy <= o.r * o.r,
        "square" => dx.abs() <= o.r * 0.9 && dy.abs() <= o.r * 0.9,
        // Upward isosceles triangle inscribed in the r-box.
        _ => dy >= -o.r && dy <= o.r && dx.abs() <= (dy + o.r) / 2.0,
    }
}

/// A dataset of `n` scenes drawn from `seed`.
pub fn dataset(n: usize, seed: u64) -> Vec<Scene> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| Scene::random(&mut rng)).collect()
}

/// Parses a caption of the grammar back into what it asks for (positions left unset).
pub fn parse_caption(caption: &str) -> Option<Scene> {
    let words: Vec<&str> = caption.split_whitespace().collect();
    let object = |w: &[&str]| -> Option<Object> {
        if w.len() != 3 || w[0] != "a" {
            return None;
        }
        let color = COLORS.iter().position(|c| c.0 == w[1])?;
        let shape = SHAPES.iter().position(|s| *s == w[2])?;
        Some(Object { color, shape, cx: 0.0, cy: 0.0, r: 0.0 })
    };
    if words.len() == 3 {
        return Some(Scene { objects: vec![object(&words)?], relation: None });
    }
    let rel_text = words.get(3..words.len().checked_sub(3)?)?.join(" ");
    let rel = RELATIONS.iter().position(|r| *r == rel_text)?;
    let a = object(&words[..3])?;
    let b = object(&words[words.len() - 3..])?;
    Some(Scene { objects: vec![a, b], relation: Some(rel) })
}

/// What the fidelity check found in one image.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Fidelity {
    pub colors_ok: bool,
    pub shapes_ok: bool,
    pub relation_ok: bool,
}

impl Fidelity {
    pub fn all(&self) -> bool {
        self.colors_ok && self.shapes_ok && self.relation_ok
    }
}

struct Blob {
    area: usize,
    cx: f32,
    cy: f32,
    fill: f32,
}

/// Largest 4-connected region of pixels labelled `color` (nearest palette entry).
fn largest_blob(labels: &[Option<usize>], color: usize) -> Option<Blob> {
    let mut seen = vec![false; labels.len()];
    let mut best: Option<Blob> = None;
    for start in 0..labels.len() {
        if seen[start] || labels[start] != Some(color) {
            continue;
        }
        let mut stack = vec![start];
        seen[start] = true;
        let (mut area, mut sx, mut sy) = (0usize, 0f32, 0f32);
        let (mut x0, mut x1, mut y0, mut y1) = (SIZE, 0, SIZE, 0);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % SIZE, i / SIZE);
            area += 1;
            sx += x as f32;
            sy += y as f32;
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            let mut push = |j: usize| {
                if !seen[j] && labels[j] == Some(color) {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                push(i - 1)
            }
            if x + 1 < SIZE {
                push(i + 1)
            }
            if y > 0 {
                push(i - SIZE)
            }
            if y + 1 < SIZE {
                push(i + SIZE)
            }
        }
        let bbox = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
        if best.as_ref().is_none_or(|b| area > b.area) {
            best = Some(Blob { area, cx: sx / area as f32, cy: sy / area as f32, fill: area as f32 / bbox });
        }
    }
    best
}

/// Shape from how much of its bounding box a blob fills: square ≈ 1, circle ≈ π/4, triangle ≈ ½.
fn classify(fill: f32) -> usize {
    if fill > 0.88 {
        1
    } else if fill > 0.64 {
        0
    } else {
        2
    }
}

/// Checks an `[H, W, 3]` image against what `scene` names: each colour present as a blob of at
/// least 12 px, of the named shape, and the first object on the named side of the second.
pub fn check(image: &[f32], scene: &Scene) -> Fidelity {
    let labels: Vec<Option<usize>> = image
        .chunks(3)
        .map(|p| {
            let dist = |c: [f32; 3]| (0..3).map(|k| (p[k] - c[k]).powi(2)).sum::<f32>();
            let (best, d) =
                COLORS.iter().enumerate().map(|(i, c)| (i, dist(c.1))).min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
            (d < dist(BACKGROUND) && d < 0.12).then_some(best)
        })
        .collect();
    let blobs: Vec<Option<Blob>> =
        scene.objects.iter().map(|o| largest_blob(&labels, o.color).filter(|b| b.area >= 12)).collect();
    let colors_ok = blobs.iter().all(|b| b.is_some());
    let shapes_ok =
        colors_ok && scene.objects.iter().zip(&blobs).all(|(o, b)| classify(b.as_ref().unwrap().fill) == o.shape);
    let relation_ok = match (scene.relation, blobs.as_slice()) {
        (None, _) => colors_ok,
        (Some(rel), [Some(a), Some(b)]) => {
            let (dx, dy) = (a.cx - b.cx, a.cy - b.cy);
            match rel {
                0 => dy < -3.0,
                1 => dy > 3.0,
                2 => dx < -3.0,
                _ => dx > 3.0,
            }
        }
        _ => false,
    };
    Fidelity { colors_ok, shapes_ok, relation_ok }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_parse_back() {
        for s in dataset(200, 1) {
            let parsed = parse_caption(&s.caption()).unwrap();
            assert_eq!(parsed.relation, s.relation);
            assert_eq!(parsed.objects.len(), s.objects.len());
        }
        assert!(parse_caption("a pink circle").is_none());
    }

    #[test]
    fn fidelity_check_accepts_renders_and_rejects_mismatches() {
        let scenes = dataset(500, 2);
        let ok = scenes.iter().filter(|s| check(&s.render(), s).all()).count();
        assert!(ok >= 490, "checker accepts only {ok}/500 ground-truth renders");
        // The same image against a caption with the relation flipped must fail.
        let mut wrong = 0;
        let mut total = 0;
        for s in scenes.iter().filter(|s| s.relation.is_some()) {
            let mut flipped = s.clone();
            flipped.relation = Some(s.relation.unwrap() ^ 1);
            total += 1;
            wrong += usize::from(!check(&s.render(), &flipped).all());
        }
        assert_eq!(wrong, total);
        // A blank image shows nothing.
        assert!(!check(&vec![0.0; SIZE * SIZE * 3], &scenes[0]).colors_ok);
    }
}
