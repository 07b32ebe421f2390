//! Heatmap overlays, contact sheets and atomic PNG writing (`fastrm::render`).

mod common;
use common::decode_png;

use std::path::{Path, PathBuf};
use std::time::Instant;

use fastrm::render::{
    colormap, colormap_table, contact_sheet, encode_png, format_value, heatmap_overlay,
    overlay_layout, text_scale, token_caption, write_png, OverlayOptions, MAX_SHEET_WIDTH,
    SHEET_GAP, STRIP_ROWS,
};
use fastrm::vision::{center_crop, load_image, resize_bicubic, resize_output_size, RgbImage};
use fastrm::Error;

/// A deterministic textured image (not constant, so blending is visible).
fn textured(w: usize, h: usize) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            data.push((x * 255 / w.max(1)) as u8);
            data.push((y * 255 / h.max(1)) as u8);
            data.push(((x * 7 + y * 13) % 256) as u8);
        }
    }
    RgbImage::new(w, h, data).unwrap()
}

fn solid(w: usize, h: usize, c: [u8; 3]) -> RgbImage {
    RgbImage::new(w, h, c.repeat(w * h)).unwrap()
}

fn one_hot(rows: usize, cols: usize, r: usize, c: usize, v: f32) -> Vec<f32> {
    let mut m = vec![0.0; rows * cols];
    m[r * cols + c] = v;
    m
}

fn dist(a: [u8; 3], b: [u8; 3]) -> i32 {
    (0..3)
        .map(|k| (a[k] as i32 - b[k] as i32).abs())
        .max()
        .unwrap()
}

/// Position of `p` on the colormap: the index of the nearest table entry.
fn lut_pos(p: [u8; 3]) -> usize {
    let lut = colormap_table();
    (0..256)
        .min_by_key(|&i| {
            (0..3)
                .map(|k| (lut[i][k] as i32 - p[k] as i32).pow(2))
                .sum::<i32>()
        })
        .unwrap()
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn input_msg(e: Error) -> String {
    match e {
        Error::Input(m) => m,
        other => panic!("expected Error::Input, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Layout

#[test]
fn overlay_dims_follow_the_documented_layout() {
    let base = textured(336, 336);
    let map = vec![0.5; 576];
    let s = text_scale(336);
    assert_eq!(s, 2);
    let full = OverlayOptions {
        caption: token_caption(3, " cat", Some(0.8123)),
        ..Default::default()
    };
    let out = heatmap_overlay(&base, &map, (24, 24), &full).unwrap();
    assert_eq!((out.width, out.height), (336, 336 + 2 * STRIP_ROWS * s));
    assert_eq!((out.width, out.height), (336, 392));
    let l = overlay_layout(336, 336, &full);
    assert_eq!(
        (l.image_height, l.caption_height, l.legend_height, l.height),
        (336, 28, 28, 392)
    );

    // No caption, legend on (the default): one strip.
    let out = heatmap_overlay(&base, &map, (24, 24), &OverlayOptions::default()).unwrap();
    assert_eq!((out.width, out.height), (336, 364));
    // Caption only.
    let cap_only = OverlayOptions {
        caption: "x".into(),
        show_legend: false,
        ..Default::default()
    };
    let out = heatmap_overlay(&base, &map, (24, 24), &cap_only).unwrap();
    assert_eq!((out.width, out.height), (336, 364));
    // Neither: the image region alone.
    let bare = OverlayOptions {
        show_legend: false,
        ..Default::default()
    };
    let out = heatmap_overlay(&base, &map, (24, 24), &bare).unwrap();
    assert_eq!((out.width, out.height), (336, 336));

    // Non-square base and grid, and a tiny base: no panic, documented dims.
    let out = heatmap_overlay(&textured(500, 200), &[1.0; 6], (2, 3), &full).unwrap();
    let s = text_scale(500);
    assert_eq!((out.width, out.height), (500, 200 + 2 * STRIP_ROWS * s));
    let out = heatmap_overlay(&textured(3, 2), &[1.0; 4], (2, 2), &full).unwrap();
    assert_eq!((out.width, out.height), (3, 2 + 2 * STRIP_ROWS));
    let out = heatmap_overlay(&textured(1, 1), &[1.0], (1, 1), &full).unwrap();
    assert_eq!((out.width, out.height), (1, 1 + 2 * STRIP_ROWS));
}

#[test]
fn strips_carry_ink_and_the_legend_bar_spans_the_colormap() {
    let base = solid(336, 336, [128, 128, 128]);
    let opts = OverlayOptions {
        caption: token_caption(12, "hello", Some(0.5)),
        ..Default::default()
    };
    let out = heatmap_overlay(&base, &vec![1.0; 576], (24, 24), &opts).unwrap();
    let bg = out.pixel(out.width - 1, 336 + 1);
    // Caption strip: light text pixels on a dark background.
    let light = (336..364)
        .flat_map(|y| (0..336).map(move |x| (x, y)))
        .filter(|&(x, y)| out.pixel(x, y).iter().all(|&c| c > 200))
        .count();
    assert!(light > 100, "caption strip has {light} text pixels");
    assert!(
        bg.iter().all(|&c| c < 60),
        "strip background {bg:?} is dark"
    );
    // Legend: along the strip's middle row, the colormap's two ends both appear, cold left of hot.
    let lut = colormap_table();
    let y = 364 + 14 - 2;
    let xs_cold: Vec<usize> = (0..336)
        .filter(|&x| dist(out.pixel(x, y), lut[0]) <= 2)
        .collect();
    let xs_hot: Vec<usize> = (0..336)
        .filter(|&x| dist(out.pixel(x, y), lut[255]) <= 2)
        .collect();
    assert!(!xs_cold.is_empty() && !xs_hot.is_empty());
    assert!(xs_cold.iter().max() < xs_hot.iter().min());
    // The bar covers most of the width.
    assert!(xs_hot.iter().min().unwrap() - xs_cold.iter().min().unwrap() > 200);

    // Bars line up whatever the max label ("1" or "3.13e-4"), so contact sheets read evenly.
    let bar_extent = |img: &RgbImage| {
        let xs: Vec<usize> = (0..img.width)
            .filter(|&x| lut.iter().any(|&c| c == img.pixel(x, img.height - 14)))
            .collect();
        (xs[0], *xs.last().unwrap())
    };
    let small = heatmap_overlay(&base, &vec![3.13e-4; 576], (24, 24), &opts).unwrap();
    assert_eq!(bar_extent(&out), bar_extent(&small));
}

// ---------------------------------------------------------------------------------------------
// Colour mapping

#[test]
fn colormap_is_matplotlibs_viridis_with_a_non_decreasing_green_channel() {
    let lut = colormap_table();
    // matplotlib's `_viridis_data` (lib/matplotlib/_cm_listed.py) at these entries, as
    // round(x * 255): e.g. entry 64 is [0.229739, 0.322361, 0.545706] -> #3b528b.
    let pins: [(usize, u32); 9] = [
        (0, 0x440154),
        (32, 0x472d7b),
        (64, 0x3b528b),
        (96, 0x2c728e),
        (128, 0x21918c),
        (160, 0x28ae80),
        (192, 0x5ec962),
        (224, 0xaddc30),
        (255, 0xfde725),
    ];
    for (i, hex) in pins {
        let want = [(hex >> 16) as u8, (hex >> 8) as u8, hex as u8];
        assert_eq!(lut[i], want, "entry {i}");
    }
    // All 256 entries: FNV-1a (64-bit) over the 768 bytes r, g, b of each entry in order, computed
    // from matplotlib 3.11.2's `_viridis_data` rounded as above.
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in lut.iter().flatten() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    assert_eq!(
        h, 0x1b8e5490518c939b,
        "table differs from matplotlib's viridis"
    );
    for i in 1..256 {
        // Non-decreasing, not strictly: rounded to 8 bits, green repeats in places.
        assert!(lut[i][1] >= lut[i - 1][1], "green falls at {i}");
        assert!(dist(lut[i], lut[i - 1]) <= 3, "jump at {i}");
        // Reading a colour back lands within one entry (112/113 and 129/130 are equal colours).
        assert!(lut_pos(lut[i]).abs_diff(i) <= 1, "entry {i}");
    }
    assert_eq!(colormap(-1.0), lut[0]);
    assert_eq!(colormap(f32::NAN), lut[0]);
    assert_eq!(colormap(2.0), lut[255]);
}

#[test]
fn single_hot_patch_is_hottest_inside_its_area_and_cold_far_away() {
    // 312 = 24 * 13: odd 13-pixel patches, so each patch centre falls on a pixel centre.
    let base = textured(312, 312);
    let (r, c) = (5, 17);
    let map = one_hot(24, 24, r, c, 3.7);
    let opts = OverlayOptions {
        alpha: 1.0,
        show_legend: false,
        ..Default::default()
    };
    let out = heatmap_overlay(&base, &map, (24, 24), &opts).unwrap();
    let lut = colormap_table();
    // The hottest pixel of the image region lies in patch (5, 17) = x 221..234, y 65..78, and its
    // colour is the top of the colormap.
    let mut best = (0, 0, 0);
    for y in 0..312 {
        for x in 0..312 {
            let v = lut_pos(out.pixel(x, y));
            if v > best.0 {
                best = (v, x, y);
            }
        }
    }
    let (_, bx, by) = best;
    assert!(
        (221..234).contains(&bx) && (65..78).contains(&by),
        "{best:?}"
    );
    assert_eq!((bx, by), (227, 71), "the patch centre");
    assert_eq!(out.pixel(bx, by), lut[255]);
    // Everywhere inside the patch the map is at least (1 - 6/13)^2 = 0.29 of the top (corners);
    // half-way to the edges at least 0.5.
    for y in 65..78 {
        for x in 221..234 {
            assert!(lut_pos(out.pixel(x, y)) >= 70, "({x}, {y})");
        }
    }
    assert!(lut_pos(out.pixel(224, 71)) >= 150);
    // A patch or more from the centre: the coldest colour.
    for &(x, y) in &[
        (0, 0),
        (311, 311),
        (0, 311),
        (227, 100),
        (190, 71),
        (240, 84),
    ] {
        assert_eq!(out.pixel(x, y), lut[0], "pixel ({x}, {y})");
    }
}

#[test]
fn bilinear_upsampling_is_smooth_and_monotone_between_centres() {
    let base = solid(100, 10, [0, 0, 0]);
    let opts = OverlayOptions {
        alpha: 1.0,
        show_legend: false,
        ..Default::default()
    };
    // Two patches side by side, centres at x = 25 and x = 75.
    let out = heatmap_overlay(&base, &[0.0, 1.0], (1, 2), &opts).unwrap();
    let pos: Vec<usize> = (0..100).map(|x| lut_pos(out.pixel(x, 5))).collect();
    let lut = colormap_table();
    for x in 0..=24 {
        assert_eq!(out.pixel(x, 5), lut[0], "constant before the first centre");
    }
    for x in 75..100 {
        assert_eq!(out.pixel(x, 5), lut[255], "constant after the last centre");
    }
    for x in 25..75 {
        assert!(pos[x + 1] > pos[x], "not rising at x={x}: {pos:?}");
    }
    // Not blocky: many distinct colours in between, the middle one near the colormap's middle.
    let distinct: std::collections::BTreeSet<usize> = pos[25..75].iter().copied().collect();
    assert_eq!(distinct.len(), 50);
    assert!(dist(out.pixel(50, 5), lut[128]) <= 6);
    // Same along y.
    let base = solid(10, 100, [0, 0, 0]);
    let out = heatmap_overlay(&base, &[1.0, 0.0], (2, 1), &opts).unwrap();
    for y in 25..75 {
        assert!(lut_pos(out.pixel(5, y + 1)) < lut_pos(out.pixel(5, y)));
    }
}

#[test]
fn alpha_zero_keeps_the_image_and_alpha_one_shows_pure_colours() {
    let base = textured(336, 336);
    let map: Vec<f32> = (0..576).map(|i| ((i * 37) % 101) as f32 * 0.01).collect();
    let zero = OverlayOptions {
        alpha: 0.0,
        caption: "t".into(),
        ..Default::default()
    };
    let out = heatmap_overlay(&base, &map, (24, 24), &zero).unwrap();
    assert_eq!(&out.data[..336 * 336 * 3], &base.data[..]);

    let one = OverlayOptions {
        alpha: 1.0,
        ..Default::default()
    };
    let out = heatmap_overlay(&base, &map, (24, 24), &one).unwrap();
    let lut = colormap_table();
    for y in (0..336).step_by(7) {
        for x in (0..336).step_by(5) {
            let p = out.pixel(x, y);
            assert!(
                lut.contains(&p),
                "({x}, {y}) = {p:?} is not a colormap colour"
            );
        }
    }
    // At patch centres (on pixel centres for 13-pixel patches) the colour is that of the
    // normalised value.
    let max = map.iter().copied().fold(0.0, f32::max);
    let odd = heatmap_overlay(&textured(312, 312), &map, (24, 24), &one).unwrap();
    for &(r, c) in &[(0usize, 0usize), (3, 11), (23, 23), (12, 5)] {
        let want = colormap(map[r * 24 + c] / max);
        assert!(dist(odd.pixel(c * 13 + 6, r * 13 + 6), want) <= 3);
    }

    // alpha 0.5 lies between the two.
    let half = heatmap_overlay(&base, &map, (24, 24), &OverlayOptions::default()).unwrap();
    for i in (0..336 * 336 * 3).step_by(97) {
        let (a, b, h) = (base.data[i] as i32, out.data[i] as i32, half.data[i] as i32);
        assert!((h - (a + b) / 2).abs() <= 1, "index {i}: {a} {b} -> {h}");
    }
}

#[test]
fn vmax_fixes_the_scale_and_clips() {
    let base = solid(20, 20, [0, 0, 0]);
    let opts = |vmax| OverlayOptions {
        alpha: 1.0,
        vmax,
        show_legend: false,
        ..Default::default()
    };
    let flat = |v: f32| vec![v; 4];
    // Own max: a flat 0.2 map is all hot.
    let out = heatmap_overlay(&base, &flat(0.2), (2, 2), &opts(None)).unwrap();
    assert_eq!(out.pixel(10, 10), colormap(1.0));
    // vmax 0.4: the same map is half-way.
    let out = heatmap_overlay(&base, &flat(0.2), (2, 2), &opts(Some(0.4))).unwrap();
    assert_eq!(out.pixel(10, 10), colormap(0.5));
    // Above vmax clips to the top.
    let out = heatmap_overlay(&base, &flat(9.0), (2, 2), &opts(Some(0.4))).unwrap();
    assert_eq!(out.pixel(10, 10), colormap(1.0));
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = heatmap_overlay(&base, &flat(0.2), (2, 2), &opts(Some(bad))).unwrap_err();
        assert!(input_msg(e).contains("vmax"));
    }
    for bad in [-0.1, 1.5, f32::NAN] {
        let o = OverlayOptions {
            alpha: bad,
            ..Default::default()
        };
        let e = heatmap_overlay(&base, &flat(0.2), (2, 2), &o).unwrap_err();
        assert!(input_msg(e).contains("alpha"));
    }
}

// ---------------------------------------------------------------------------------------------
// Degenerate maps

#[test]
fn all_zero_map_is_flat_and_cold() {
    let base = textured(48, 48);
    let opts = OverlayOptions {
        alpha: 1.0,
        caption: "zero".into(),
        ..Default::default()
    };
    let out = heatmap_overlay(&base, &[0.0; 16], (4, 4), &opts).unwrap();
    let lut = colormap_table();
    for y in 0..48 {
        for x in 0..48 {
            assert_eq!(out.pixel(x, y), lut[0]);
        }
    }
    // Negative values count as 0 too.
    let out = heatmap_overlay(&base, &[-1.0; 16], (4, 4), &opts).unwrap();
    assert_eq!(out.pixel(20, 20), lut[0]);
}

#[test]
fn nan_or_infinite_map_is_an_error_naming_the_index() {
    let base = textured(48, 48);
    let mut map = vec![0.5; 16];
    map[9] = f32::NAN;
    let e = heatmap_overlay(&base, &map, (4, 4), &OverlayOptions::default()).unwrap_err();
    let msg = input_msg(e);
    assert!(
        msg.contains("value 9") && msg.contains("row 2, column 1"),
        "{msg}"
    );
    assert!(msg.contains("NaN"), "{msg}");
    map[9] = 0.0;
    map[15] = f32::INFINITY;
    let msg =
        input_msg(heatmap_overlay(&base, &map, (4, 4), &OverlayOptions::default()).unwrap_err());
    assert!(msg.contains("value 15"), "{msg}");
}

#[test]
fn wrong_map_length_or_grid_is_an_error() {
    let base = textured(48, 48);
    let msg = input_msg(
        heatmap_overlay(&base, &[0.5; 575], (24, 24), &OverlayOptions::default()).unwrap_err(),
    );
    assert!(msg.contains("575") && msg.contains("576"), "{msg}");
    assert!(heatmap_overlay(&base, &[0.5; 577], (24, 24), &OverlayOptions::default()).is_err());
    assert!(heatmap_overlay(&base, &[], (0, 24), &OverlayOptions::default()).is_err());
    assert!(heatmap_overlay(&base, &[], (0, 0), &OverlayOptions::default()).is_err());
    // A base whose buffer breaks its invariant.
    let broken = RgbImage {
        width: 10,
        height: 10,
        data: vec![0; 5],
    };
    assert!(heatmap_overlay(&broken, &[1.0], (1, 1), &OverlayOptions::default()).is_err());
}

#[test]
fn any_unicode_caption_renders_without_panicking() {
    let base = textured(336, 336);
    let captions = [
        token_caption(0, "\u{fffd}", None),
        token_caption(1, "\u{2581}the", Some(0.25)),
        token_caption(2, "🐈‍⬛ cat 😺", Some(f32::NAN)),
        token_caption(3, "\n", None),
        "\u{0}\u{7f}\u{1b}[31m".to_string(),
        "é".repeat(500),
        "x".repeat(10_000),
    ];
    for caption in captions {
        let opts = OverlayOptions {
            caption,
            ..Default::default()
        };
        let out = heatmap_overlay(&base, &[1.0; 576], (24, 24), &opts).unwrap();
        assert_eq!(out.height, 392);
    }
}

#[test]
fn legend_labels_are_formatted() {
    assert_eq!(format_value(0.0), "0");
    assert_eq!(format_value(1.0), "1");
    assert_eq!(format_value(0.734_2), "0.734");
    assert_eq!(format_value(12.34), "12.3");
    assert_eq!(format_value(250.0), "250");
    assert_eq!(format_value(0.001_5), "0.0015");
    assert_eq!(format_value(1.25e-5), "1.25e-5");
    assert_eq!(format_value(3.0e7), "3e7");
    assert_eq!(format_value(12_345.0), "1.23e4");
    assert_eq!(token_caption(7, "ok", Some(0.5)), "#7 \"ok\"  H=0.500");
    assert_eq!(token_caption(7, "ok", None), "#7 \"ok\"");
}

// ---------------------------------------------------------------------------------------------
// Contact sheets

#[test]
fn contact_sheet_dims() {
    let g = SHEET_GAP;
    let tile = textured(336, 392);
    let title_h = |w: usize| STRIP_ROWS * text_scale(w).min(3);

    let one = contact_sheet(std::slice::from_ref(&tile), 4, "one").unwrap();
    let w = 336 + 2 * g;
    assert_eq!((one.width, one.height), (w, title_h(w) + 392 + 2 * g));
    // The tile is copied unscaled.
    assert_eq!(one.pixel(g + 10, title_h(w) + g + 20), tile.pixel(10, 20));

    let seven = vec![tile.clone(); 7];
    let s7 = contact_sheet(&seven, 3, "seven").unwrap();
    let w = 3 * 336 + 4 * g;
    assert_eq!((s7.width, s7.height), (w, title_h(w) + 3 * 392 + 4 * g));
    // Auto columns: ceil(sqrt(7)) = 3.
    let auto = contact_sheet(&seven, 0, "").unwrap();
    assert_eq!((auto.width, auto.height), (w, 3 * 392 + 4 * g));

    // 100 tiles in 10 columns would be 3426 wide: fits as is. In 20 columns: scaled down.
    let hundred = vec![tile.clone(); 100];
    let s100 = contact_sheet(&hundred, 10, "hundred").unwrap();
    let w = 10 * 336 + 11 * g;
    assert_eq!(
        (s100.width, s100.height),
        (w, title_h(w) + 10 * 392 + 11 * g)
    );
    let wide = contact_sheet(&hundred, 20, "hundred").unwrap();
    assert!(wide.width <= MAX_SHEET_WIDTH, "{}", wide.width);
    let cw = (MAX_SHEET_WIDTH - 21 * g) * 336 / (20 * 336); // floor of the common scale
    assert_eq!(wide.width, 21 * g + 20 * cw);
    let ch = (392.0 * (MAX_SHEET_WIDTH - 21 * g) as f64 / (20.0 * 336.0)).floor() as usize;
    assert_eq!(wide.height, title_h(wide.width) + 5 * ch + 6 * g);
    // Scaled tiles are area averages: a solid tile stays that colour.
    let red = vec![solid(336, 392, [200, 10, 10]); 100];
    let wide = contact_sheet(&red, 20, "").unwrap();
    assert_eq!(wide.pixel(g + 5, g + 5), [200, 10, 10]);
    // One column of 100: capped in height instead.
    let tall = contact_sheet(&hundred, 1, "t").unwrap();
    assert!(tall.height <= fastrm::render::MAX_SHEET_HEIGHT);
}

#[test]
fn contact_sheet_pads_mixed_sizes_and_rejects_nothing() {
    let tiles = vec![solid(10, 20, [255, 0, 0]), solid(30, 8, [0, 255, 0])];
    let sheet = contact_sheet(&tiles, 2, "").unwrap();
    let g = SHEET_GAP;
    assert_eq!((sheet.width, sheet.height), (2 * 30 + 3 * g, 20 + 2 * g));
    // First tile centred in its 30x20 cell.
    assert_eq!(sheet.pixel(g + 10 + 5, g + 10), [255, 0, 0]);
    assert_ne!(sheet.pixel(g + 2, g + 10), [255, 0, 0]);
    // Second tile centred vertically.
    assert_eq!(sheet.pixel(2 * g + 30 + 15, g + 10), [0, 255, 0]);
    assert_ne!(sheet.pixel(2 * g + 30 + 15, g + 1), [0, 255, 0]);

    let msg = input_msg(contact_sheet(&[], 3, "none").unwrap_err());
    assert!(msg.contains("at least one tile"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// PNG writing

#[test]
fn write_png_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("overlay.png");
    let img = heatmap_overlay(
        &textured(64, 48),
        &one_hot(3, 4, 1, 2, 1.0),
        (3, 4),
        &OverlayOptions {
            caption: "round trip".into(),
            ..Default::default()
        },
    )
    .unwrap();
    write_png(&path, &img).unwrap();
    assert_eq!(decode_png(&path), img);
    // Overwriting replaces the file completely, and nothing else is left in the directory.
    let small = textured(5, 3);
    write_png(&path, &small).unwrap();
    assert_eq!(decode_png(&path), small);
    assert_eq!(files_in(dir.path()), vec![path.clone()]);
    assert_eq!(std::fs::read(&path).unwrap(), encode_png(&small).unwrap());

    // A relative path (no parent component) works too.
    let cwd_file = format!("fastrm-render-test-{}.png", std::process::id());
    let rel = Path::new(&cwd_file);
    write_png(rel, &small).unwrap();
    assert_eq!(decode_png(rel), small);
    std::fs::remove_file(rel).unwrap();
}

#[test]
fn write_png_errors_name_the_path_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let img = textured(8, 8);

    // Inside a directory that does not exist.
    let missing = dir.path().join("no-such-dir").join("x.png");
    let e = write_png(&missing, &img).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );

    // Under a parent that is a regular file.
    let file = dir.path().join("plain.txt");
    std::fs::write(&file, b"not a directory").unwrap();
    let under_file = file.join("x.png");
    let e = write_png(&under_file, &img).unwrap_err();
    assert!(
        e.to_string().contains(&under_file.display().to_string()),
        "{e}"
    );

    // The target is an existing directory: the rename fails, the temp file is cleaned up.
    let subdir = dir.path().join("taken.png");
    std::fs::create_dir(&subdir).unwrap();
    let e = write_png(&subdir, &img).unwrap_err();
    assert!(e.to_string().contains(&subdir.display().to_string()), "{e}");
    assert!(subdir.is_dir());

    // A read-only directory (skipped when running as root, which ignores permissions).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let target = ro.join("x.png");
        if std::fs::write(ro.join("probe"), b"").is_err() {
            let e = write_png(&target, &img).unwrap_err();
            assert!(e.to_string().contains(&target.display().to_string()), "{e}");
            assert!(files_in(&ro).is_empty());
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _ = std::fs::remove_file(ro.join("probe"));
        std::fs::remove_dir(&ro).unwrap();
    }

    // No stray temporary files anywhere.
    assert_eq!(files_in(dir.path()), vec![file, subdir]);
}

// ---------------------------------------------------------------------------------------------
// Samples and timing

/// A photo scaled as a LLaVA-1.5 model sees it: shortest edge to 336, center crop 336x336.
fn demo_base() -> RgbImage {
    let img =
        load_image(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip336/image.jpg"))
            .unwrap();
    let (w, h) = resize_output_size(img.width, img.height, 336);
    center_crop(&resize_bicubic(&img, w, h).unwrap(), 336, 336).unwrap()
}

/// A smooth blob (plus faint noise) centred on patch (`r`, `c`).
fn blob(r: f32, c: f32, sigma: f32, scale: f32) -> Vec<f32> {
    (0..576)
        .map(|i| {
            let (y, x) = ((i / 24) as f32, (i % 24) as f32);
            let d2 = (y - r).powi(2) + (x - c).powi(2);
            scale * ((-d2 / (2.0 * sigma * sigma)).exp() + 0.03 * ((i * 7919 % 97) as f32 / 97.0))
        })
        .collect()
}

/// Writes sample renders to `$FASTRM_RENDER_SAMPLES` (a directory) when set, else to a temp dir;
/// checks they decode.
#[test]
fn sample_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = std::env::var_os("FASTRM_RENDER_SAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&out_dir).unwrap();
    let base = demo_base();
    let tokens = [
        ("\u{2581}The", 0.91, blob(12.0, 12.0, 8.0, 0.02)),
        ("\u{2581}cup", 0.42, blob(9.0, 13.0, 2.5, 3.1e-4)),
        ("\u{2581}is", 0.88, blob(15.0, 6.0, 6.0, 0.5)),
        ("\u{2581}full", 0.55, blob(10.0, 11.0, 2.0, 12.5)),
        ("\u{fffd}", 0.97, vec![0.0; 576]),
        ("\n", 0.70, blob(20.0, 20.0, 3.0, 1.0)),
    ];
    let mut tiles = Vec::new();
    for (i, (text, entropy, map)) in tokens.iter().enumerate() {
        let opts = OverlayOptions {
            caption: token_caption(i, text, Some(*entropy)),
            ..Default::default()
        };
        let img = heatmap_overlay(&base, map, (24, 24), &opts).unwrap();
        write_png(&out_dir.join(format!("token_{i:02}.png")), &img).unwrap();
        tiles.push(img);
    }
    let sheet = contact_sheet(&tiles, 3, "What is in the cup? -> The cup is full").unwrap();
    write_png(&out_dir.join("sheet.png"), &sheet).unwrap();
    assert_eq!(decode_png(&out_dir.join("sheet.png")), sheet);
}

/// Release-mode timings (`cargo test --release --test render -- --ignored --nocapture`).
#[test]
#[ignore]
fn timing() {
    let base = demo_base();
    let map = blob(9.0, 13.0, 2.5, 1.0);
    let opts = OverlayOptions {
        caption: token_caption(17, "\u{2581}looking", Some(0.5)),
        ..Default::default()
    };
    let n = 300;
    let t = Instant::now();
    let mut tiles = Vec::new();
    for _ in 0..n {
        tiles.push(heatmap_overlay(&base, &map, (24, 24), &opts).unwrap());
    }
    let overlay = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    for img in &tiles[..50] {
        std::hint::black_box(encode_png(img).unwrap());
    }
    let encode = t.elapsed().as_secs_f64() / 50.0;
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    for (i, img) in tiles[..50].iter().enumerate() {
        write_png(&dir.path().join(format!("{i}.png")), img).unwrap();
    }
    let write = t.elapsed().as_secs_f64() / 50.0;
    let t = Instant::now();
    let sheet = contact_sheet(&tiles, 0, "timing").unwrap();
    let sheet_t = t.elapsed().as_secs_f64();
    println!(
        "overlay 336x336: {:.3} ms; encode_png: {:.3} ms; write_png: {:.3} ms; \
         contact_sheet of {n} ({}x{}): {:.1} ms",
        overlay * 1e3,
        encode * 1e3,
        write * 1e3,
        sheet.width,
        sheet.height,
        sheet_t * 1e3
    );
    assert!(overlay < 0.010);
}
