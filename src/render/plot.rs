//! A small line plot on a white 640×400 canvas, shared by `train`'s loss curve and `eval`'s
//! metric, perturbation and entropy plots: two axes with their ranges and titles, four horizontal
//! grid lines, one polyline per series in its colour with a legend, optional dashed vertical
//! markers (a threshold) and an optional title. Points with a non-finite coordinate are skipped.
//! The exact numbers always sit next to the plot (CSV or JSON); the plot is for the eye.

use super::{draw_text, format_value, text_pixels};
use crate::error::Result;
use crate::vision::RgbImage;

pub const W: usize = 640;
pub const H: usize = 400;
const MARGIN: usize = 56;

/// The matplotlib "tab10" colours, in order: a distinct colour per series.
pub const PALETTE: [[u8; 3]; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

/// One named polyline.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: [u8; 3],
    pub points: Vec<(f64, f64)>,
}

/// A dashed vertical line at `x` with a label at its top.
#[derive(Debug, Clone)]
pub struct Marker {
    pub x: f64,
    pub label: String,
    pub color: [u8; 3],
}

#[derive(Debug, Clone, Default)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    /// Up to two short lines, drawn at the left of the plot area.
    pub y_label: Vec<String>,
    /// Fixed axis ranges; `None`: from the data (y padded by 5%).
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
}

struct Canvas {
    data: Vec<u8>,
}

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.data[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line two pixels thick, sampled densely enough to leave no gaps; `dash` > 0 leaves every
    /// other run of `dash` samples out.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], dash: usize) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1) * 2;
        for i in 0..=n {
            if dash > 0 && (i / dash) % 2 == 1 {
                continue;
            }
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            let (xi, yi) = (x.round() as i64, y.round() as i64);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                self.put(xi + dx, yi + dy, c);
            }
        }
    }
}

fn data_range(vals: impl Iterator<Item = f64>, pad: bool) -> (f64, f64) {
    let (lo, hi) = vals
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if pad {
        let p = ((hi - lo) * 0.05).max(1e-6);
        (lo - p, hi + p)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

/// Renders the plot.
pub fn line_plot(p: &LinePlot) -> Result<RgbImage> {
    let mut cv = Canvas {
        data: vec![255; W * H * 3],
    };
    let pts = || p.series.iter().flat_map(|s| s.points.iter());
    let (xlo, xhi) = p.x_range.unwrap_or_else(|| {
        data_range(
            pts().map(|q| q.0).chain(p.markers.iter().map(|m| m.x)),
            false,
        )
    });
    let (ylo, yhi) = p
        .y_range
        .unwrap_or_else(|| data_range(pts().map(|q| q.1), true));
    let (xspan, yspan) = ((xhi - xlo).max(1e-12), (yhi - ylo).max(1e-12));
    let (x0, x1) = (MARGIN as f64, (W - MARGIN / 2) as f64);
    let (y0, y1) = ((H - MARGIN) as f64, (MARGIN / 2) as f64);
    let px = |x: f64| x0 + (x1 - x0) * (x - xlo) / xspan;
    let py = |v: f64| y0 + (y1 - y0) * (v - ylo) / yspan;
    for k in 1..=4 {
        let y = y0 + (y1 - y0) * k as f64 / 4.0;
        let yi = y.round() as i64;
        for x in x0 as i64..=x1 as i64 {
            cv.put(x, yi, [225, 225, 225]);
        }
    }
    cv.line((x0, y0), (x1, y0), [0, 0, 0], 0);
    cv.line((x0, y0), (x0, y1), [0, 0, 0], 0);
    for m in &p.markers {
        if m.x.is_finite() {
            let x = px(m.x).clamp(x0, x1);
            cv.line((x, y0), (x, y1), m.color, 6);
        }
    }
    for s in &p.series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        for w in pts.windows(2) {
            cv.line(w[0], w[1], s.color, 0);
        }
        if let [q] = pts.as_slice() {
            cv.line(*q, (q.0 + 2.0, q.1), s.color, 0);
        }
    }
    let mut img = RgbImage::new(W, H, cv.data)?;
    let ink = [40, 40, 40];
    let (left, bottom) = (x0 as usize, y0 as usize);
    for (label, y) in [
        (format_value(yhi as f32), y1 as usize),
        (format_value(ylo as f32), bottom - 8),
    ] {
        let w = text_pixels(&label, 1);
        draw_text(&mut img, left.saturating_sub(w + 4), y, &label, 1, ink);
    }
    draw_text(
        &mut img,
        left,
        bottom + 4,
        &format_value(xlo as f32),
        1,
        ink,
    );
    let last = format_value(xhi as f32);
    draw_text(
        &mut img,
        (x1 as usize).saturating_sub(text_pixels(&last, 1)),
        bottom + 4,
        &last,
        1,
        ink,
    );
    draw_text(
        &mut img,
        (left + x1 as usize).saturating_sub(text_pixels(&p.x_label, 1)) / 2,
        bottom + 20,
        &p.x_label,
        1,
        ink,
    );
    for (i, l) in p.y_label.iter().take(2).enumerate() {
        draw_text(&mut img, 4, (y1 as usize + bottom) / 2 + 10 * i, l, 1, ink);
    }
    if !p.title.is_empty() {
        draw_text(
            &mut img,
            (W.saturating_sub(text_pixels(&p.title, 1))) / 2,
            6,
            &p.title,
            1,
            ink,
        );
    }
    for m in &p.markers {
        if m.x.is_finite() && !m.label.is_empty() {
            let x = px(m.x).clamp(x0, x1) as usize;
            let w = text_pixels(&m.label, 1);
            // Right of the line, or left of it when it would run off the plot.
            let tx = if x + 4 + w > x1 as usize {
                x.saturating_sub(w + 4)
            } else {
                x + 4
            };
            draw_text(
                &mut img,
                tx,
                bottom.saturating_sub(20),
                &m.label,
                1,
                m.color,
            );
        }
    }
    let widest = p
        .series
        .iter()
        .map(|s| text_pixels(&s.name, 1))
        .max()
        .unwrap_or(0);
    let lx = (x1 as usize).saturating_sub(widest + 22);
    for (i, s) in p.series.iter().enumerate() {
        let y = y1 as usize + 6 + i * 12;
        for dx in 0..14 {
            for dy in 3..5 {
                let q = ((y + dy) * W + lx + dx) * 3;
                img.data[q..q + 3].copy_from_slice(&s.color);
            }
        }
        draw_text(&mut img, lx + 18, y, &s.name, 1, ink);
    }
    Ok(img)
}
