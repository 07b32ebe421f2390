//! What users look at for every generated token: heatmap overlays of a relevancy map on the image
//! the model saw, contact sheets of many overlays, and atomic PNG writing.
//!
//! # Overlay layout
//! [`heatmap_overlay`] returns an image as wide as `base` and taller than it by the strips below it,
//! top to bottom:
//! - the image region: `base` with the upsampled, colour-mapped map alpha-blended over it,
//!   `base.height` rows;
//! - a caption strip (only when [`OverlayOptions::caption`] is not empty): one line of text;
//! - a legend strip (only when [`OverlayOptions::show_legend`]): `0`, a horizontal colour bar, and
//!   the value of the top of the scale.
//!
//! Both strips are [`STRIP_ROWS`]` * s` pixels tall, where `s` = [`text_scale`]`(base.width)` is
//! the integer factor the 5x8 bitmap font is drawn at (2 for a 336-wide image: 28-pixel strips, so
//! a 336x336 base with caption and legend gives a 336x392 overlay). [`overlay_layout`] computes
//! these numbers. Text that does not fit is cut and ends in `..`; characters outside printable
//! ASCII are drawn as a box (`\n`, `\r`, `\t` as their escapes).
//!
//! # Colour scale
//! The map is divided by `vmax` when given, else by its own maximum, so the hottest patch is the
//! top colour of the scale and the legend's right label is that maximum: maps are compared by shape,
//! not scale, unless the caller fixes `vmax` (e.g. to the maximum over all tokens). Values are
//! clamped to `[0, 1]` after that (negative relevancy counts as 0). An all-zero map draws as a flat
//! map of the coldest colour. The colormap is viridis ([`colormap`]).

mod colormap;
mod font;
pub mod plot;

use std::path::Path;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::vision::RgbImage;

use font::{ADVANCE, GLYPH_H, GLYPH_W};

/// Height of a caption, legend or title strip in font pixels (glyph rows plus padding); multiply
/// by the text scale for image pixels.
pub const STRIP_ROWS: usize = 14;
/// Contact sheets are at most this wide: tiles are scaled down to fit.
pub const MAX_SHEET_WIDTH: usize = 4096;
/// Contact sheets are at most this tall: tiles are scaled down to fit.
pub const MAX_SHEET_HEIGHT: usize = 16384;
/// Gap between contact-sheet tiles and around them, in pixels.
pub const SHEET_GAP: usize = 6;

/// Characters of room the legend keeps for its max label (see [`draw_legend`]).
const LEGEND_LABEL_CHARS: usize = 7;

const STRIP_BG: [u8; 3] = [24, 24, 28];
const TEXT_FG: [u8; 3] = [238, 238, 238];
const FRAME: [u8; 3] = [110, 110, 118];

/// How [`heatmap_overlay`] draws.
#[derive(Clone, Debug, PartialEq)]
pub struct OverlayOptions {
    /// Opacity of the colour map over the image, in `[0, 1]`: 0 leaves the image as it is, 1 shows
    /// only the colour map. Default 0.5.
    pub alpha: f32,
    /// The value drawn as the top of the scale; `None` (default) uses the map's own maximum.
    /// Must be finite and positive when given.
    pub vmax: Option<f32>,
    /// Text of the caption strip (e.g. from [`token_caption`]); empty (default) omits the strip.
    pub caption: String,
    /// Whether to add the legend strip (colour bar with its `0` and max labels). Default true.
    pub show_legend: bool,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        OverlayOptions {
            alpha: 0.5,
            vmax: None,
            caption: String::new(),
            show_legend: true,
        }
    }
}

/// Sizes of the parts of an overlay (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayLayout {
    /// Font scale factor, [`text_scale`] of the width.
    pub text_scale: usize,
    /// Rows of the image region (the base image's height), at the top.
    pub image_height: usize,
    /// Rows of the caption strip below the image (0 when there is no caption).
    pub caption_height: usize,
    /// Rows of the legend strip below the caption (0 when the legend is off).
    pub legend_height: usize,
    /// Width of the whole overlay (the base image's width).
    pub width: usize,
    /// Height of the whole overlay: the sum of the three parts.
    pub height: usize,
}

/// The integer factor text is drawn at on an image `width` pixels wide: `round(width / 168)`
/// clamped to `1..=4` (2 for 336, 1 for 224).
pub fn text_scale(width: usize) -> usize {
    ((width + 84) / 168).clamp(1, 4)
}

/// The layout [`heatmap_overlay`] produces for a `width x height` base image with `opts`.
pub fn overlay_layout(width: usize, height: usize, opts: &OverlayOptions) -> OverlayLayout {
    let s = text_scale(width);
    let caption_height = if opts.caption.is_empty() {
        0
    } else {
        STRIP_ROWS * s
    };
    let legend_height = if opts.show_legend { STRIP_ROWS * s } else { 0 };
    OverlayLayout {
        text_scale: s,
        image_height: height,
        caption_height,
        legend_height,
        width,
        height: height + caption_height + legend_height,
    }
}

/// The usual caption of a token's overlay: `#index "text"`, plus `  H=entropy` when given, e.g.
/// `#3 " cat"  H=0.812`. The text is quoted so leading spaces stay visible.
pub fn token_caption(index: usize, text: &str, entropy: Option<f32>) -> String {
    match entropy {
        Some(h) => format!("#{index} \"{text}\"  H={h:.3}"),
        None => format!("#{index} \"{text}\""),
    }
}

/// The colour of `t` in `[0, 1]` on the overlay's colormap (viridis); `t` is clamped, NaN is 0.
pub fn colormap(t: f32) -> [u8; 3] {
    colormap::viridis()[lut_index(t)]
}

/// The 256 colours of the colormap, coldest first.
pub fn colormap_table() -> &'static [[u8; 3]; 256] {
    colormap::viridis()
}

fn lut_index(t: f32) -> usize {
    // `as` saturates and maps NaN to 0.
    ((t * 255.0 + 0.5) as usize).min(255)
}

/// Formats a legend value: `0`, up to three significant digits for `1e-3 <= v < 1e4`
/// (`0.734`, `12.5`, `1`), scientific notation otherwise (`1.25e-5`, `3e7`).
pub fn format_value(v: f32) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if (1e-3..1e4).contains(&a) {
        let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        let s = format!("{v:.2e}");
        match s.split_once('e') {
            Some((m, e)) if m.contains('.') => {
                format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.'))
            }
            _ => s,
        }
    }
}

/// Draws the relevancy `map` over `base` (see the module docs for the layout and the colour
/// scale).
///
/// - `base`: the preprocessed image the model saw (e.g. 336x336 after resize and center crop).
/// - `map`: raw relevancy per patch, row-major, `grid.0 * grid.1` values; `grid` is
///   `(rows, columns)` of patches (24x24 for LLaVA-1.5). Patch `(r, c)` covers the image's
///   `r`-th of `rows` horizontal bands and `c`-th of `columns` vertical bands; its value sits at
///   the band's centre and is interpolated bilinearly in between (constant beyond the outer
///   centres), so the heatmap is smooth, not blocky.
///
/// Errors: a grid with a zero side, a map of another length, a non-finite value (the error names
/// its index), `alpha` outside `[0, 1]`, a `vmax` that is not finite and positive, an invalid
/// `base`.
pub fn heatmap_overlay(
    base: &RgbImage,
    map: &[f32],
    grid: (usize, usize),
    opts: &OverlayOptions,
) -> Result<RgbImage> {
    base.validate()?;
    let (rows, cols) = grid;
    if rows == 0 || cols == 0 {
        return Err(Error::input(format!(
            "relevancy grid {rows}x{cols} has a zero side"
        )));
    }
    let expected = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::input(format!("relevancy grid {rows}x{cols} overflows")))?;
    if map.len() != expected {
        return Err(Error::input(format!(
            "relevancy map has {} values, a {rows}x{cols} grid needs {expected}",
            map.len()
        )));
    }
    if let Some((i, v)) = map.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::input(format!(
            "relevancy map value {i} (patch row {}, column {}) is {v}; values must be finite",
            i / cols,
            i % cols
        )));
    }
    if !(0.0..=1.0).contains(&opts.alpha) {
        return Err(Error::input(format!(
            "overlay alpha {} is not in [0, 1]",
            opts.alpha
        )));
    }
    let top = match opts.vmax {
        Some(v) if v.is_finite() && v > 0.0 => v,
        Some(v) => {
            return Err(Error::input(format!(
                "overlay vmax {v} must be finite and positive"
            )))
        }
        None => map.iter().copied().fold(0.0f32, f32::max),
    };
    let inv = if top > 0.0 { 1.0 / top } else { 0.0 };
    let norm: Vec<f32> = map.iter().map(|&v| (v * inv).clamp(0.0, 1.0)).collect();

    let layout = overlay_layout(base.width, base.height, opts);
    let (w, h) = (base.width, base.height);
    let mut out = vec![0u8; layout.width * layout.height * 3];
    blend_heatmap(
        &mut out[..w * h * 3],
        &base.data,
        w,
        h,
        &norm,
        rows,
        cols,
        opts.alpha,
    );

    let s = layout.text_scale;
    let mut canvas = Canvas {
        data: &mut out,
        width: w,
    };
    let mut y = h;
    if layout.caption_height > 0 {
        canvas.fill(0, y, w, layout.caption_height, STRIP_BG);
        let pad = 3 * s;
        canvas.text(
            pad,
            y + pad,
            &opts.caption,
            s,
            w.saturating_sub(2 * pad),
            TEXT_FG,
        );
        y += layout.caption_height;
    }
    if layout.legend_height > 0 {
        canvas.fill(0, y, w, layout.legend_height, STRIP_BG);
        draw_legend(&mut canvas, y, s, &format_value(top));
    }
    RgbImage::new(layout.width, layout.height, out)
}

/// Per output coordinate: the two source cells to blend and the weight of the second, for
/// bilinear interpolation between cell centres (half-pixel centres, clamped at the borders).
fn bilinear_taps(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let ratio = src as f32 / dst as f32;
    (0..dst)
        .map(|x| {
            let u = ((x as f32 + 0.5) * ratio - 0.5).clamp(0.0, (src - 1) as f32);
            let i0 = (u.floor() as usize).min(src - 1);
            let i1 = (i0 + 1).min(src - 1);
            (i0, i1, u - i0 as f32)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn blend_heatmap(
    out: &mut [u8],
    base: &[u8],
    w: usize,
    h: usize,
    norm: &[f32],
    rows: usize,
    cols: usize,
    alpha: f32,
) {
    let lut = colormap::viridis();
    // Fixed-point alpha in 0..=256: 0 copies the image exactly, 256 the colours exactly.
    let a = (alpha * 256.0).round() as u32;
    let na = 256 - a;
    let xt = bilinear_taps(cols, w);
    let yt = bilinear_taps(rows, h);
    // Each map row interpolated along x to the image width, then rows blended along y.
    let mut hrows = vec![0f32; rows * w];
    for r in 0..rows {
        let src = &norm[r * cols..(r + 1) * cols];
        for (dst, &(j0, j1, f)) in hrows[r * w..(r + 1) * w].iter_mut().zip(&xt) {
            *dst = src[j0] + (src[j1] - src[j0]) * f;
        }
    }
    // Colours premultiplied by alpha, plus the rounding term.
    let mut pre = [[0u32; 3]; 256];
    for (p, c) in pre.iter_mut().zip(lut) {
        for k in 0..3 {
            p[k] = c[k] as u32 * a + 128;
        }
    }
    let rows_out = out.chunks_exact_mut(w * 3);
    let rows_in = base.chunks_exact(w * 3);
    for ((row_out, row_in), &(i0, i1, f)) in rows_out.zip(rows_in).zip(&yt).take(h) {
        let r0 = &hrows[i0 * w..(i0 + 1) * w];
        let r1 = &hrows[i1 * w..(i1 + 1) * w];
        let px = row_out.chunks_exact_mut(3).zip(row_in.chunks_exact(3));
        for ((o, b), (&v0, &v1)) in px.zip(r0.iter().zip(r1)) {
            let c = &pre[lut_index(v0 + (v1 - v0) * f)];
            o[0] = ((b[0] as u32 * na + c[0]) >> 8) as u8;
            o[1] = ((b[1] as u32 * na + c[1]) >> 8) as u8;
            o[2] = ((b[2] as u32 * na + c[2]) >> 8) as u8;
        }
    }
}

/// Legend strip at row `y`: `0`, the colour bar framed in grey, the max label.
fn draw_legend(canvas: &mut Canvas, y: usize, s: usize, max_label: &str) {
    let w = canvas.width;
    let pad = 3 * s;
    let text_y = y + pad;
    let lo = "0";
    let lo_w = text_width(lo.chars().count(), s);
    let hi_w = text_width(max_label.chars().count(), s);
    // Room for a 7-character label (`3.13e-4`) whatever the label, so that bars line up across
    // the tiles of a contact sheet; only when the bar keeps half the width.
    let hi_room = if w / 2 > 2 * pad + lo_w + 2 * (2 * s) + text_width(LEGEND_LABEL_CHARS, s) {
        hi_w.max(text_width(LEGEND_LABEL_CHARS, s))
    } else {
        hi_w
    };
    let gap = 2 * s;
    let bar_x0 = pad + lo_w + gap;
    let bar_x1 = w.saturating_sub(pad + hi_room + gap);
    // Too narrow for labels (tiny images): the bar alone across the strip.
    let (bar_x0, bar_x1, labels) = if bar_x1 >= bar_x0 + 16 {
        (bar_x0, bar_x1, true)
    } else {
        (pad.min(w / 4), w - pad.min(w / 4), false)
    };
    // The bar spans the body rows of the glyphs (cap height), framed by one pixel.
    let bar_y0 = text_y;
    let bar_h = (GLYPH_H - 1) * s;
    if bar_x1 > bar_x0 + 2 {
        let lut = colormap::viridis();
        canvas.fill(bar_x0, bar_y0, bar_x1 - bar_x0, bar_h, FRAME);
        let inner = bar_x1 - bar_x0 - 2;
        for i in 0..inner {
            let t = if inner > 1 {
                i as f32 / (inner - 1) as f32
            } else {
                0.0
            };
            canvas.fill(bar_x0 + 1 + i, bar_y0 + 1, 1, bar_h - 2, lut[lut_index(t)]);
        }
    }
    if labels {
        canvas.text(pad, text_y, lo, s, lo_w, TEXT_FG);
        canvas.text(bar_x1 + gap, text_y, max_label, s, hi_w, TEXT_FG);
    }
}

/// Draws one line of text (the overlays' bitmap font, non-ASCII shown as a marked box) with its
/// top-left corner at (`x`, `y`), glyph pixels `scale` image pixels wide, clipped to the image.
pub fn draw_text(img: &mut RgbImage, x: usize, y: usize, text: &str, scale: usize, color: [u8; 3]) {
    let width = img.width;
    let max_w = width.saturating_sub(x);
    let mut canvas = Canvas {
        data: &mut img.data,
        width,
    };
    canvas.text(x, y, text, scale.max(1), max_w, color);
}

/// Width in pixels of `text` drawn by [`draw_text`] at `scale`.
pub fn text_pixels(text: &str, scale: usize) -> usize {
    text_width(font::displayable(text).len(), scale.max(1))
}

/// Width in pixels of `n` characters at scale `s` (no trailing spacing column).
fn text_width(n: usize, s: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * ADVANCE - 1) * s
    }
}

/// A mutable view of an RGB buffer `width` pixels wide with clipped drawing.
struct Canvas<'a> {
    data: &'a mut [u8],
    width: usize,
}

impl Canvas<'_> {
    fn height(&self) -> usize {
        self.data.len() / (self.width * 3)
    }

    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, color: [u8; 3]) {
        let x1 = (x + w).min(self.width);
        let y1 = (y + h).min(self.height());
        let x0 = x.min(x1);
        for yy in y.min(y1)..y1 {
            let row = &mut self.data[(yy * self.width + x0) * 3..(yy * self.width + x1) * 3];
            for px in row.chunks_exact_mut(3) {
                px.copy_from_slice(&color);
            }
        }
    }

    /// Draws one line of `text` with its top-left at (`x`, `y`), glyph pixels `s` image pixels
    /// wide, cut to `max_w` pixels (ending in `..` when cut).
    fn text(&mut self, x: usize, y: usize, text: &str, s: usize, max_w: usize, color: [u8; 3]) {
        let mut chars = font::displayable(text);
        if text_width(chars.len(), s) > max_w {
            let fit = (max_w / s + 1) / ADVANCE; // characters that fit
            let keep = fit.saturating_sub(2);
            chars.truncate(keep);
            if fit >= 2 {
                chars.extend(['.', '.']);
            }
        }
        for (n, &c) in chars.iter().enumerate() {
            let gx = x + n * ADVANCE * s;
            for (row, bits) in font::glyph(c).iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                        self.fill(gx + col * s, y + row * s, s, s, color);
                    }
                }
            }
        }
    }
}

/// Lays `tiles` out in a grid, `columns` per row (0: a near-square grid, `ceil(sqrt(n))`; more
/// columns than tiles: one row), left to right then top to bottom, under a title strip (omitted
/// when `title` is empty; [`STRIP_ROWS`]` * ` [`text_scale`]`(sheet width)` tall, at most scale 3).
///
/// Every cell is as large as the largest tile; smaller tiles are centred in their cell. Cells are
/// separated by, and framed with, [`SHEET_GAP`] pixels of dark background. When the sheet would be
/// wider than [`MAX_SHEET_WIDTH`] or taller than [`MAX_SHEET_HEIGHT`], all tiles are scaled down by
/// one common factor (area averaging) so that it fits. Errors: no tiles, an invalid tile, a grid
/// that cannot fit even with 1-pixel tiles.
pub fn contact_sheet(tiles: &[RgbImage], columns: usize, title: &str) -> Result<RgbImage> {
    if tiles.is_empty() {
        return Err(Error::input("contact sheet needs at least one tile"));
    }
    for (i, t) in tiles.iter().enumerate() {
        t.validate()
            .map_err(|e| Error::input(format!("contact sheet tile {i}: {e}")))?;
    }
    let n = tiles.len();
    let cols = if columns == 0 {
        (1..=n).find(|c| c * c >= n).unwrap_or(n)
    } else {
        columns.min(n)
    };
    let rows = n.div_ceil(cols);
    let cell_w = tiles.iter().map(|t| t.width).max().unwrap_or(1);
    let cell_h = tiles.iter().map(|t| t.height).max().unwrap_or(1);
    let gap = SHEET_GAP;

    let too_big = || {
        Error::input(format!(
            "a contact sheet of {n} tiles in {cols} columns cannot fit in \
             {MAX_SHEET_WIDTH}x{MAX_SHEET_HEIGHT} pixels; use a different column count"
        ))
    };
    let gaps_w = (cols + 1) * gap;
    if gaps_w + cols > MAX_SHEET_WIDTH {
        return Err(too_big());
    }
    let mut scale = 1f64.min((MAX_SHEET_WIDTH - gaps_w) as f64 / (cols * cell_w) as f64);
    let sheet_w_est = gaps_w + cols * ((cell_w as f64 * scale).floor() as usize).max(1);
    let ts = text_scale(sheet_w_est).min(3);
    let title_h = if title.is_empty() { 0 } else { STRIP_ROWS * ts };
    let gaps_h = (rows + 1) * gap + title_h;
    if gaps_h + rows > MAX_SHEET_HEIGHT {
        return Err(too_big());
    }
    scale = scale.min((MAX_SHEET_HEIGHT - gaps_h) as f64 / (rows * cell_h) as f64);

    let scaled = |v: usize| -> usize {
        if scale >= 1.0 {
            v
        } else {
            ((v as f64 * scale).floor() as usize).max(1)
        }
    };
    let (cw, ch) = (scaled(cell_w), scaled(cell_h));
    let sheet_w = gaps_w + cols * cw;
    let sheet_h = gaps_h + rows * ch;

    let mut data = vec![0u8; sheet_w * sheet_h * 3];
    let mut canvas = Canvas {
        data: &mut data,
        width: sheet_w,
    };
    canvas.fill(0, 0, sheet_w, sheet_h, STRIP_BG);
    if title_h > 0 {
        let pad = 3 * ts;
        canvas.text(
            gap.max(pad),
            pad,
            title,
            ts,
            sheet_w.saturating_sub(2 * gap.max(pad)),
            TEXT_FG,
        );
    }
    // Scaling is the expensive part (hundreds of tiles): in parallel.
    let resized: Vec<Option<RgbImage>> = if scale < 1.0 {
        tiles
            .par_iter()
            .map(|t| Some(resize_area(t, scaled(t.width), scaled(t.height))))
            .collect()
    } else {
        vec![None; n]
    };
    for (i, (tile, small)) in tiles.iter().zip(&resized).enumerate() {
        let tile = small.as_ref().unwrap_or(tile);
        let (r, c) = (i / cols, i % cols);
        let (w, h) = (tile.width.min(cw), tile.height.min(ch));
        let x0 = gap + c * (cw + gap) + (cw - w) / 2;
        let y0 = title_h + gap + r * (ch + gap) + (ch - h) / 2;
        for y in 0..h {
            let src = &tile.data[y * tile.width * 3..(y * tile.width + w) * 3];
            let d = ((y0 + y) * sheet_w + x0) * 3;
            canvas.data[d..d + w * 3].copy_from_slice(src);
        }
    }
    RgbImage::new(sheet_w, sheet_h, data)
}

/// Area-averaging taps for downscaling `src` cells to `dst`: output `o` is the weighted sum of
/// source cells `first[o]..first[o] + len[o]` with weights `weights[start[o]..]` (summing to 1).
struct AreaTaps {
    first: Vec<usize>,
    len: Vec<usize>,
    start: Vec<usize>,
    weights: Vec<f32>,
}

impl AreaTaps {
    fn new(src: usize, dst: usize) -> Self {
        let ratio = src as f64 / dst as f64;
        let mut taps = AreaTaps {
            first: Vec::with_capacity(dst),
            len: Vec::with_capacity(dst),
            start: Vec::with_capacity(dst),
            weights: Vec::new(),
        };
        for o in 0..dst {
            let a = o as f64 * ratio;
            let b = ((o + 1) as f64 * ratio).min(src as f64);
            let first = (a.floor() as usize).min(src - 1);
            let last = (b.ceil() as usize).clamp(first + 1, src);
            taps.first.push(first);
            taps.len.push(last - first);
            taps.start.push(taps.weights.len());
            for i in first..last {
                let overlap = b.min((i + 1) as f64) - a.max(i as f64);
                taps.weights.push((overlap.max(0.0) / (b - a)) as f32);
            }
        }
        taps
    }

    fn get(&self, o: usize) -> (usize, &[f32]) {
        let st = self.start[o];
        (self.first[o], &self.weights[st..st + self.len[o]])
    }
}

/// Area-averaging resize to `nw x nh` (for downscaling: each output pixel is the mean of the
/// source area it covers).
fn resize_area(img: &RgbImage, nw: usize, nh: usize) -> RgbImage {
    if nw == img.width && nh == img.height {
        return img.clone();
    }
    let xt = AreaTaps::new(img.width, nw);
    let yt = AreaTaps::new(img.height, nh);
    // Horizontal pass to f32, then vertical.
    let mut tmp = vec![0f32; img.height * nw * 3];
    for (row, out) in img
        .data
        .chunks_exact(img.width * 3)
        .zip(tmp.chunks_exact_mut(nw * 3))
    {
        for (x, o) in out.chunks_exact_mut(3).enumerate() {
            let (first, ws) = xt.get(x);
            let mut acc = [0f32; 3];
            for (p, &wt) in row[first * 3..].chunks_exact(3).zip(ws) {
                acc[0] += p[0] as f32 * wt;
                acc[1] += p[1] as f32 * wt;
                acc[2] += p[2] as f32 * wt;
            }
            o.copy_from_slice(&acc);
        }
    }
    let mut data = vec![0u8; nw * nh * 3];
    let mut acc = vec![0f32; nw * 3];
    for (y, out) in data.chunks_exact_mut(nw * 3).enumerate() {
        let (first, ws) = yt.get(y);
        acc.fill(0.0);
        for (k, &wt) in ws.iter().enumerate() {
            let src = &tmp[(first + k) * nw * 3..(first + k + 1) * nw * 3];
            for (a, &v) in acc.iter_mut().zip(src) {
                *a += v * wt;
            }
        }
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = (a + 0.5).clamp(0.0, 255.0) as u8;
        }
    }
    RgbImage {
        width: nw,
        height: nh,
        data,
    }
}

/// Encodes `img` as an 8-bit RGB PNG in memory (fast deflate: a 336x392 overlay takes about a
/// millisecond).
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    img.validate()?;
    let (w, h) = (
        u32::try_from(img.width)
            .map_err(|_| Error::input(format!("image width {} too large for PNG", img.width)))?,
        u32::try_from(img.height)
            .map_err(|_| Error::input(format!("image height {} too large for PNG", img.height)))?,
    );
    let mut bytes = Vec::with_capacity(img.data.len() / 2 + 1024);
    let result = (|| -> std::result::Result<(), png::EncodingError> {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&img.data)?;
        writer.finish()
    })();
    result.map_err(|e| Error::input(format!("PNG encoding failed: {e}")))?;
    Ok(bytes)
}

/// Writes `img` to `path` as a PNG, atomically ([`crate::util::write_atomic`]): an interrupted
/// run leaves either the old file or the complete new one under `path`, never a truncated PNG.
/// Errors name `path` (missing or unwritable directory, a parent that is a file, `path` being a
/// directory).
pub fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    if path.file_name().is_none() {
        return Err(Error::input(format!(
            "{}: PNG output path does not name a file",
            path.display()
        )));
    }
    crate::util::write_atomic(path, &encode_png(img)?)
}
