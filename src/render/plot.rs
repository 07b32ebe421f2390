//! Small line plots for tools: named series of (x, y) points on linear or logarithmic axes, with
//! tick labels, axis titles, light grid lines and a legend, drawn with the overlays' bitmap font.
//! Used by `train` (the loss curve) and `profile` (latency and memory against output length).
//!
//! Layout of a `width × height` plot: a title line at the top, the legend (one row of entries, more
//! when they do not fit) under it, the y axis' title above the plot area's top-left corner, tick
//! labels left of the y axis and under the x axis, the x axis' title centred below them. Nothing is
//! drawn over the data. Points that cannot be drawn (non-finite, or ≤ 0 on a log axis) are skipped
//! and break the series' line there.

use super::{draw_text, format_value, text_pixels};
use crate::error::{Error, Result};
use crate::vision::RgbImage;

/// The matplotlib "tab10" colours, for series that have no colour of their own.
pub const PALETTE: [[u8; 3]; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

const INK: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [228, 228, 228];
const LEFT: usize = 64;
const RIGHT: usize = 20;
/// Title line, then the legend rows, then the y axis' title, then the plot area.
const TITLE_ROWS: usize = 20;
const LEGEND_ROW: usize = 12;
const Y_TITLE_ROWS: usize = 18;
const BOTTOM: usize = 44;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Base 10; ticks at the powers of ten inside the range (the range's ends when there are none).
    Log,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub title: String,
    pub scale: Scale,
    /// Fixed ends; `None`: the data's range, padded by 5% (linear) or a quarter of a decade (log).
    pub range: Option<(f64, f64)>,
    /// Where to put tick labels; `None`: chosen from the range.
    pub ticks: Option<Vec<f64>>,
}

impl Axis {
    pub fn linear(title: &str) -> Self {
        Axis {
            title: title.into(),
            scale: Scale::Linear,
            range: None,
            ticks: None,
        }
    }

    /// The axis with fixed ends.
    pub fn within(self, lo: f64, hi: f64) -> Self {
        Axis {
            range: Some((lo, hi)),
            ..self
        }
    }

    pub fn log(title: &str) -> Self {
        Axis {
            scale: Scale::Log,
            ..Axis::linear(title)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub color: [u8; 3],
    pub points: Vec<(f64, f64)>,
    /// Draw a small square at every point (for sparse measurements).
    pub markers: bool,
}

/// A dashed vertical line at `x` with a label at its top (a threshold).
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub x: f64,
    pub label: String,
    pub color: [u8; 3],
}

#[derive(Debug, Clone, PartialEq)]
pub struct LinePlot {
    pub width: usize,
    pub height: usize,
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
}

impl LinePlot {
    /// A 640×400 plot.
    pub fn new(title: &str, x: Axis, y: Axis) -> Self {
        LinePlot {
            width: 640,
            height: 400,
            title: title.into(),
            x,
            y,
            series: Vec::new(),
            markers: Vec::new(),
        }
    }
}

/// One axis mapped onto pixels: `lo..hi` in data units (log10 of them on a log axis).
struct Mapped {
    scale: Scale,
    lo: f64,
    hi: f64,
    p0: f64,
    p1: f64,
}

impl Mapped {
    fn unit(&self, v: f64) -> Option<f64> {
        match self.scale {
            Scale::Linear if v.is_finite() => Some(v),
            Scale::Log if v.is_finite() && v > 0.0 => Some(v.log10()),
            _ => None,
        }
    }

    fn px(&self, v: f64) -> Option<f64> {
        let u = self.unit(v)?;
        Some(self.p0 + (self.p1 - self.p0) * (u - self.lo) / (self.hi - self.lo))
    }
}

/// The axis' ends in its own units (log10 for log axes), never empty.
fn axis_range(axis: &Axis, values: impl Iterator<Item = f64>) -> Result<(f64, f64)> {
    let unit = |v: f64| match axis.scale {
        Scale::Linear if v.is_finite() => Some(v),
        Scale::Log if v.is_finite() && v > 0.0 => Some(v.log10()),
        _ => None,
    };
    if let Some((a, b)) = axis.range {
        return match (unit(a), unit(b)) {
            (Some(a), Some(b)) if a < b => Ok((a, b)),
            _ => Err(Error::input(format!(
                "plot axis `{}`: range {a}..{b} is empty or not drawable on this scale",
                axis.title
            ))),
        };
    }
    let (lo, hi) = values
        .filter_map(unit)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return Ok(match axis.scale {
            Scale::Linear => (0.0, 1.0),
            Scale::Log => (0.0, 1.0),
        });
    }
    Ok(match axis.scale {
        Scale::Linear => {
            let pad = ((hi - lo) * 0.05).max(lo.abs() * 0.05).max(1e-6);
            (lo - pad, hi + pad)
        }
        Scale::Log => {
            let pad = ((hi - lo) * 0.05).max(0.25);
            (lo - pad, hi + pad)
        }
    })
}

/// "Nice" tick values (1, 2 or 5 × 10^k apart) inside `lo..hi` for a linear axis; powers of ten
/// for a log one (the ends' values when no power of ten falls inside). In data units.
fn auto_ticks(scale: Scale, lo: f64, hi: f64) -> Vec<f64> {
    match scale {
        Scale::Linear => {
            let raw = (hi - lo) / 5.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 5.0, 10.0]
                .iter()
                .map(|m| m * mag)
                .find(|s| *s >= raw)
                .unwrap_or(10.0 * mag);
            let first = (lo / step).ceil() as i64;
            let last = (hi / step).floor() as i64;
            (first..=last).map(|k| k as f64 * step).collect()
        }
        Scale::Log => {
            let decades = lo.floor() as i64..=hi.floor() as i64;
            let inside = |v: &f64| (lo..=hi).contains(&v.log10());
            let tens: Vec<f64> = decades
                .clone()
                .map(|k| 10f64.powi(k as i32))
                .filter(inside)
                .collect();
            if tens.len() >= 3 {
                return tens;
            }
            // Few decades: 1, 2 and 5 times each power of ten.
            let ticks: Vec<f64> = decades
                .flat_map(|k| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(k as i32)))
                .filter(inside)
                .collect();
            if ticks.len() >= 2 {
                ticks
            } else {
                vec![10f64.powf(lo), 10f64.powf(hi)]
            }
        }
    }
}

fn tick_label(v: f64) -> String {
    // Three significant digits: float noise such as 0.30000000000000004 prints as 0.3.
    format_value(v as f32)
}

struct Canvas {
    w: usize,
    h: usize,
    data: Vec<u8>,
}

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.data[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line two pixels thick, sampled densely enough to leave no gaps.
    fn line(&mut self, p: (f64, f64), q: (f64, f64), c: [u8; 3]) {
        self.pen_line(p, q, 2, c);
    }

    /// A line drawn with a square pen `pen` pixels wide, centred on the path.
    fn pen_line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), pen: i64, c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1) * 2;
        let lo = -(pen - 1) / 2;
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            let (xi, yi) = (x.round() as i64, y.round() as i64);
            for dy in lo..lo + pen {
                for dx in lo..lo + pen {
                    self.put(xi + dx, yi + dy, c);
                }
            }
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.put(xx, yy, c);
            }
        }
    }
}

/// Legend entries' top-left corners, laid out in rows from `x0` within `width`, and the rows used.
fn legend_layout(series: &[Series], x0: usize, width: usize) -> (Vec<(usize, usize)>, usize) {
    let mut pos = Vec::with_capacity(series.len());
    let (mut x, mut row) = (x0, 0);
    for s in series {
        let w = 18 + text_pixels(&s.name, 1) + 16;
        if x > x0 && x + w > width {
            x = x0;
            row += 1;
        }
        pos.push((x, row * LEGEND_ROW));
        x += w;
    }
    (pos, if series.is_empty() { 0 } else { row + 1 })
}

/// Draws `plot`. Errors: a plot too small for its margins, a fixed range that is empty or not
/// drawable on its scale.
pub fn line_plot(plot: &LinePlot) -> Result<RgbImage> {
    let (w, h) = (plot.width, plot.height);
    let (legend, legend_rows) = legend_layout(&plot.series, LEFT, w.saturating_sub(RIGHT));
    let top = TITLE_ROWS + legend_rows * LEGEND_ROW + Y_TITLE_ROWS;
    if w < LEFT + RIGHT + 40 || h < top + BOTTOM + 40 {
        return Err(Error::input(format!(
            "plot size {w}x{h} is too small (at least {}x{})",
            LEFT + RIGHT + 40,
            top + BOTTOM + 40
        )));
    }
    let x = map_axis(&plot.x, &plot.series, |p| p.0, LEFT, w - RIGHT)?;
    let y = map_axis(&plot.y, &plot.series, |p| p.1, h - BOTTOM, top)?;
    let (xticks, yticks) = (ticks(&plot.x, &x), ticks(&plot.y, &y));
    let mut cv = Canvas {
        w,
        h,
        data: vec![255; w * h * 3],
    };
    // Grid lines under everything else.
    draw_grid(&mut cv, &x, &y, &xticks, &yticks);
    cv.line((x.p0, y.p0), (x.p1, y.p0), [0, 0, 0]);
    cv.line((x.p0, y.p0), (x.p0, y.p1), [0, 0, 0]);
    // Each series is drawn with a narrower pen than the one before, so a series that coincides
    // with a later one (equal peak memory, say) still shows as a border around it.
    let n = plot.series.len() as i64;
    for (i, s) in plot.series.iter().enumerate() {
        draw_series(&mut cv, &x, &y, s, 2 + 2 * (n - 1 - i as i64));
    }
    let marker_px = draw_markers(&mut cv, &x, &y, &plot.markers);
    let mut img = RgbImage::new(w, h, cv.data)?;
    for (px, m) in marker_px {
        let lw = text_pixels(&m.label, 1);
        let tx = (px.round() as usize + 4).min(w.saturating_sub(lw + 2));
        draw_text(&mut img, tx, y.p1 as usize + 2, &m.label, 1, m.color);
    }
    draw_tick_labels(&mut img, &x, &y, &xticks, &yticks);
    draw_titles(&mut img, plot, &x, &y, top);
    draw_legend(&mut img, &plot.series, &legend);
    Ok(img)
}

/// `axis` over the points' coordinate `coord`, mapped onto the pixels from `p0` to `p1`.
fn map_axis(
    axis: &Axis,
    series: &[Series],
    coord: fn(&(f64, f64)) -> f64,
    p0: usize,
    p1: usize,
) -> Result<Mapped> {
    let values = series.iter().flat_map(|s| s.points.iter().map(coord));
    let (lo, hi) = axis_range(axis, values)?;
    Ok(Mapped {
        scale: axis.scale,
        lo,
        hi,
        p0: p0 as f64,
        p1: p1 as f64,
    })
}

/// The axis's ticks (given, or chosen for its range) that fall within the drawn range.
fn ticks(axis: &Axis, m: &Mapped) -> Vec<f64> {
    let in_range = |v: f64| {
        m.unit(v)
            .is_some_and(|u| u >= m.lo - 1e-9 * (m.hi - m.lo).abs() && u <= m.hi + 1e-9)
    };
    axis.ticks
        .clone()
        .unwrap_or_else(|| auto_ticks(axis.scale, m.lo, m.hi))
        .into_iter()
        .filter(|&v| in_range(v))
        .collect()
}

fn draw_grid(cv: &mut Canvas, x: &Mapped, y: &Mapped, xticks: &[f64], yticks: &[f64]) {
    for py in yticks.iter().filter_map(|&v| y.px(v)) {
        let yi = py.round() as i64;
        for xi in x.p0 as i64..=x.p1 as i64 {
            cv.put(xi, yi, GRID);
        }
    }
    for px in xticks.iter().filter_map(|&v| x.px(v)) {
        let xi = px.round() as i64;
        for yi in y.p1 as i64..=y.p0 as i64 {
            cv.put(xi, yi, GRID);
        }
    }
}

/// A series' line through its drawable points, with markers, or a dot where it has one point.
fn draw_series(cv: &mut Canvas, x: &Mapped, y: &Mapped, s: &Series, pen: i64) {
    let pts: Vec<Option<(f64, f64)>> = s
        .points
        .iter()
        .map(|&(a, b)| Some((x.px(a)?, y.px(b)?)))
        .collect();
    for pair in pts.windows(2) {
        if let [Some(p), Some(q)] = pair {
            cv.pen_line(*p, *q, pen, s.color);
        }
    }
    let side = pen + 4;
    for p in pts.iter().flatten() {
        if s.markers {
            let (px, py) = (p.0.round() as i64, p.1.round() as i64);
            cv.rect(px - side / 2, py - side / 2, side, side, s.color);
        } else if s.points.len() == 1 {
            cv.pen_line(*p, (p.0 + 2.0, p.1), pen, s.color);
        }
    }
}

/// Dashed vertical lines at the markers within the x range; returns those drawn, with their
/// pixel column, for their labels.
fn draw_markers<'m>(
    cv: &mut Canvas,
    x: &Mapped,
    y: &Mapped,
    markers: &'m [Marker],
) -> Vec<(f64, &'m Marker)> {
    let mut drawn = Vec::new();
    for m in markers {
        if let Some(px) = x.px(m.x) {
            // Dashed: every other 6-pixel run.
            let (y0, y1) = (y.p1 as i64, y.p0 as i64);
            for yi in y0..=y1 {
                if (yi - y0) / 6 % 2 == 0 {
                    cv.put(px.round() as i64, yi, m.color);
                    cv.put(px.round() as i64 + 1, yi, m.color);
                }
            }
            drawn.push((px, m));
        }
    }
    drawn
}

fn draw_tick_labels(img: &mut RgbImage, x: &Mapped, y: &Mapped, xticks: &[f64], yticks: &[f64]) {
    let w = img.width;
    for &v in yticks {
        if let Some(py) = y.px(v) {
            let label = tick_label(v);
            let lw = text_pixels(&label, 1);
            let ty = (py.round() as usize).saturating_sub(4);
            draw_text(img, (LEFT - 4).saturating_sub(lw), ty, &label, 1, INK);
        }
    }
    let mut last_end = 0usize;
    for &v in xticks {
        if let Some(px) = x.px(v) {
            let label = tick_label(v);
            let lw = text_pixels(&label, 1);
            let tx = (px.round() as usize)
                .saturating_sub(lw / 2)
                .min(w - lw.min(w));
            // Skip labels that would overlap the previous one.
            if tx < last_end + 4 && last_end > 0 {
                continue;
            }
            draw_text(img, tx, y.p0 as usize + 6, &label, 1, INK);
            last_end = tx + lw;
        }
    }
}

/// The x title under the tick labels, the y title above the plot area, the plot's title on top.
fn draw_titles(img: &mut RgbImage, plot: &LinePlot, x: &Mapped, y: &Mapped, top: usize) {
    let xt = &plot.x.title;
    let xtw = text_pixels(xt, 1);
    let mid = (x.p0 + x.p1) as usize / 2;
    let bottom = y.p0 as usize;
    draw_text(img, mid.saturating_sub(xtw / 2), bottom + 24, xt, 1, INK);
    draw_text(img, 4, top - 14, &plot.y.title, 1, INK);
    if !plot.title.is_empty() {
        let tw = text_pixels(&plot.title, 1);
        let w = img.width;
        draw_text(img, (w.saturating_sub(tw)) / 2, 8, &plot.title, 1, INK);
    }
}

/// The legend above the plot area: a colour bar and the name per series, at `legend`'s places.
fn draw_legend(img: &mut RgbImage, series: &[Series], legend: &[(usize, usize)]) {
    let w = img.width;
    for (s, &(lx, dy)) in series.iter().zip(legend) {
        let ly = TITLE_ROWS + dy;
        for yy in ly + 3..ly + 5 {
            for xx in lx..(lx + 14).min(w) {
                let p = (yy * w + xx) * 3;
                img.data[p..p + 3].copy_from_slice(&s.color);
            }
        }
        draw_text(img, lx + 18, ly, &s.name, 1, INK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_linear_ticks() {
        assert_eq!(
            auto_ticks(Scale::Linear, 0.0, 10.0),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        assert_eq!(auto_ticks(Scale::Log, -0.5, 2.2), vec![1.0, 10.0, 100.0]);
        assert_eq!(auto_ticks(Scale::Log, -0.5, 0.5), vec![0.5, 1.0, 2.0]);
        assert_eq!(auto_ticks(Scale::Log, 0.1, 0.2).len(), 2);
    }

    #[test]
    fn draws_series_colours_and_skips_undrawable_points() {
        let mut p = LinePlot::new("t", Axis::linear("x"), Axis::log("y"));
        p.series.push(Series {
            name: "a".into(),
            color: PALETTE[3],
            points: vec![(1.0, 1.0), (2.0, 0.0), (3.0, 100.0), (4.0, f64::NAN)],
            markers: true,
        });
        let img = line_plot(&p).unwrap();
        assert_eq!((img.width, img.height), (640, 400));
        let n = img
            .data
            .chunks_exact(3)
            .filter(|c| *c == PALETTE[3])
            .count();
        assert!(n > 20, "{n} series pixels");
        p.width = 50;
        assert!(line_plot(&p).is_err());
    }

    #[test]
    fn coincident_series_stay_visible() {
        let mut p = LinePlot::new("t", Axis::linear("x"), Axis::linear("y"));
        for (name, color) in [("first", PALETTE[1]), ("second", PALETTE[2])] {
            p.series.push(Series {
                name: name.into(),
                color,
                points: vec![(1.0, 5.0), (2.0, 5.0), (4.0, 5.0)],
                markers: true,
            });
        }
        let img = line_plot(&p).unwrap();
        for c in [PALETTE[1], PALETTE[2]] {
            let n = img.data.chunks_exact(3).filter(|px| *px == c).count();
            // The legend swatch alone is a few dozen pixels; the line is hundreds long.
            assert!(n > 500, "{c:?}: {n} pixels");
        }
    }
}
