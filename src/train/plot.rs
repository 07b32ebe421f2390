//! The loss curve as a line plot: axes with their range and titles, four horizontal grid lines, the
//! training loss in blue and the validation loss in orange with a legend, x from step 0 to the last
//! step, y from the smallest to the largest loss shown (5% padding). The exact numbers are in the
//! CSV next to the plot.

use super::CurvePoint;
use crate::error::Result;
use crate::render::{draw_text, text_pixels};
use crate::vision::RgbImage;

const W: usize = 640;
const H: usize = 400;
const MARGIN: usize = 56;
pub const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
pub const VAL_COLOR: [u8; 3] = [255, 127, 14];

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

    /// A line two pixels thick, sampled densely enough to leave no gaps.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1) * 2;
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            let (xi, yi) = (x.round() as i64, y.round() as i64);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                self.put(xi + dx, yi + dy, c);
            }
        }
    }
}

/// Draws the curve (points with a non-finite loss are skipped).
pub fn loss_plot(curve: &[CurvePoint]) -> Result<RgbImage> {
    let mut cv = Canvas {
        data: vec![255; W * H * 3],
    };
    let vals = curve
        .iter()
        .flat_map(|c| [Some(c.train_loss), c.val_loss])
        .flatten()
        .filter(|v| v.is_finite());
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        let pad = ((hi - lo) * 0.05).max(1e-6);
        (lo - pad, hi + pad)
    } else {
        (0.0, 1.0)
    };
    let max_step = curve.iter().map(|c| c.step).max().unwrap_or(1).max(1) as f64;
    let (x0, x1) = (MARGIN as f64, (W - MARGIN / 2) as f64);
    let (y0, y1) = ((H - MARGIN) as f64, (MARGIN / 2) as f64);
    let px = |step: usize| x0 + (x1 - x0) * step as f64 / max_step;
    let py = |v: f64| y0 + (y1 - y0) * (v - lo) / (hi - lo);
    for k in 1..=4 {
        let y = y0 + (y1 - y0) * k as f64 / 4.0;
        let yi = y.round() as i64;
        for x in x0 as i64..=x1 as i64 {
            cv.put(x, yi, [225, 225, 225]);
        }
    }
    cv.line((x0, y0), (x1, y0), [0, 0, 0]);
    cv.line((x0, y0), (x0, y1), [0, 0, 0]);
    for (sel, color) in [(0, TRAIN_COLOR), (1, VAL_COLOR)] {
        let pts: Vec<(f64, f64)> = curve
            .iter()
            .filter_map(|c| {
                let v = if sel == 0 {
                    Some(c.train_loss)
                } else {
                    c.val_loss
                };
                v.filter(|v| v.is_finite()).map(|v| (px(c.step), py(v)))
            })
            .collect();
        for w in pts.windows(2) {
            cv.line(w[0], w[1], color);
        }
        if let [p] = pts.as_slice() {
            cv.line(*p, (p.0 + 2.0, p.1), color);
        }
    }
    let mut img = RgbImage::new(W, H, cv.data)?;
    let ink = [40, 40, 40];
    let (left, bottom) = (x0 as usize, y0 as usize);
    let hi_label = crate::render::format_value(hi as f32);
    let lo_label = crate::render::format_value(lo as f32);
    for (label, y) in [(hi_label, y1 as usize), (lo_label, bottom - 8)] {
        let w = text_pixels(&label, 1);
        draw_text(&mut img, left.saturating_sub(w + 4), y, &label, 1, ink);
    }
    draw_text(&mut img, left, bottom + 4, "0", 1, ink);
    let last = max_step.to_string();
    draw_text(
        &mut img,
        (x1 as usize).saturating_sub(text_pixels(&last, 1)),
        bottom + 4,
        &last,
        1,
        ink,
    );
    let title = "step";
    draw_text(
        &mut img,
        (left + x1 as usize - text_pixels(title, 1)) / 2,
        bottom + 20,
        title,
        1,
        ink,
    );
    draw_text(&mut img, 4, (y1 as usize + bottom) / 2, "BCE", 1, ink);
    draw_text(&mut img, 4, (y1 as usize + bottom) / 2 + 10, "loss", 1, ink);
    let lx = x1 as usize - 90;
    for (i, (name, color)) in [("train", TRAIN_COLOR), ("validation", VAL_COLOR)]
        .into_iter()
        .enumerate()
    {
        let y = y1 as usize + 6 + i * 12;
        for dx in 0..14 {
            for dy in 3..5 {
                let p = ((y + dy) * W + lx + dx) * 3;
                img.data[p..p + 3].copy_from_slice(&color);
            }
        }
        draw_text(&mut img, lx + 18, y, name, 1, ink);
    }
    Ok(img)
}
