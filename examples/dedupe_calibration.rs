//! Calibrates near-duplicate detection (`skytrain::data::dedupe`) on two sets and prints, for each
//! hash radius and silhouette overlap, the share of emoji skin-tone variants caught (true near
//! duplicates of their base emoji) and the share of other images wrongly matched: other emoji, and
//! distinct thin-line icons (`skytrain::demo::icons`). The whole-image hash with the mean-colour
//! test, used before, is printed beside it.
//!
//!   cargo run --release --example dedupe_calibration -- "$(scripts/emoji_dataset.sh)" [icons=2000]

use std::path::Path;

use skytrain::data::curate::{read_table, resize_crop};
use skytrain::data::dedupe::{dhash, Fingerprint};

/// Skin-tone modifiers, and the variation selector that base sequences carry and toned ones drop.
const TONES: [&str; 6] = ["1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff", "fe0f"];

struct Item {
    group: String,
    variant: bool,
    print: Fingerprint,
    whole: u64,
}

/// For each item, whether it matches an earlier one of its own group (a catch) or of another (a
/// false match), under `matches`.
fn rates(items: &[Item], matches: impl Fn(&Item, &Item) -> bool) -> (f64, f64) {
    let (mut variants, mut caught, mut false_matches) = (0, 0, 0);
    for (i, it) in items.iter().enumerate() {
        let earlier = &items[..i];
        if it.variant {
            variants += 1;
            if earlier.iter().any(|e| e.group == it.group && matches(e, it)) {
                caught += 1;
            }
        }
        if earlier.iter().any(|e| e.group != it.group && matches(e, it)) {
            false_matches += 1;
        }
    }
    (caught as f64 / variants.max(1) as f64, false_matches as f64 / items.len().max(1) as f64)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let table = Path::new(args.get(1).expect("usage: dedupe_calibration EMOJI_TABLE [ICONS]"));
    let n_icons: u64 = args.get(2).map_or(2000, |n| n.parse().expect("icons: a number"));
    let rows = read_table(table).expect("emoji table");
    let base = table.parent().unwrap();
    let emoji: Vec<Item> = rows
        .iter()
        .map(|r| {
            let img = image::open(base.join(&r.image)).expect("emoji image");
            let out = resize_crop(&img, 64);
            let parts: Vec<&str> = r.id.split('-').filter(|p| !TONES.contains(p)).collect();
            Item {
                group: parts.join("-"),
                variant: r.id.split('-').any(|p| p != "fe0f" && TONES.contains(&p)),
                print: Fingerprint::of(&out),
                whole: dhash(&image::DynamicImage::ImageRgb8(out)),
            }
        })
        .collect();
    let icons: Vec<Item> = (0..n_icons)
        .map(|seed| {
            let img = skytrain::demo::icons::icon(seed);
            Item {
                group: format!("icon-{seed}"),
                variant: false,
                print: Fingerprint::of(&img),
                whole: dhash(&image::DynamicImage::ImageRgb8(img)),
            }
        })
        .collect();
    let old = |a: &Item, b: &Item| {
        (a.whole ^ b.whole).count_ones() <= 2
            && a.print.colour.iter().zip(&b.print.colour).all(|(x, y)| x.abs_diff(*y) <= 6)
    };
    println!(
        "{} emoji ({} skin-tone variants), {} icons",
        emoji.len(),
        emoji.iter().filter(|e| e.variant).count(),
        icons.len()
    );
    let (c, f) = rates(&emoji, old);
    let (_, fi) = rates(&icons, old);
    println!(
        "whole-image dhash ≤ 2 + mean colour: variants caught {:.1}%, emoji false {:.2}%, icons false {:.2}%",
        100.0 * c,
        100.0 * f,
        100.0 * fi
    );
    println!("bits  silh  edges  variants caught  other emoji  icons");
    for bits in [2, 3, 4, 6] {
        for (iou, edges) in [(0.0, 0.0), (0.8, 0.0), (0.0, 0.9), (0.8, 0.9), (0.8, 0.95)] {
            let new = |a: &Item, b: &Item| {
                (a.print.dhash ^ b.print.dhash).count_ones() <= bits
                    && a.print.silhouette_iou(&b.print) >= iou
                    && a.print.edge_agreement(&b.print) >= edges
            };
            let (c, f) = rates(&emoji, new);
            let (_, fi) = rates(&icons, new);
            println!(
                "{bits:>4}  {iou:.2}  {edges:.2}  {:>14.1}%  {:>10.2}%  {:>10.2}%",
                100.0 * c,
                100.0 * f,
                100.0 * fi
            );
        }
    }
}
