//! LLaVA-NeXT's any-resolution images, as transformers' `LlavaNextImageProcessor` (PIL backend)
//! and `LlavaNextModel.pack_image_features` do them: the image is resized into the best of a list
//! of resolutions ("pinpoints", multiples of the tower's side), letterboxed with zeros, and cut
//! into tiles of the tower's side; the whole image squashed to one tile comes first. The tower
//! sees every view; the tiles' patch features form one grid, the rows and columns that only saw
//! the letterbox are dropped, and each remaining row ends in a learned newline token.
//!
//! Arithmetic follows transformers' (Python floats, truncation and `ceil` where it uses them), so
//! the pixel values and the token counts agree exactly.

use super::{preprocess, resize_bicubic, PreprocessConfig, RgbImage};
use crate::error::{Error, Result};

/// How an image becomes image tokens: the views the vision tower runs and which token comes from
/// which patch of which view.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageLayout {
    /// One view of the whole image: `grid × grid` patch tokens, row-major (LLaVA-1.5).
    Square { grid: usize },
    /// LLaVA-NeXT: the squashed whole image's `grid × grid` tokens, then the tiles' patches as one
    /// `rows × cols` grid (rows and columns from `offset` on, of the `tiles` grid of tiles'
    /// `grid × grid` patches), each row followed by a newline token.
    AnyRes {
        grid: usize,
        /// The picture's `(height, width)` before preprocessing.
        size: (usize, usize),
        /// Tiles down and across.
        tiles: (usize, usize),
        rows: usize,
        cols: usize,
        /// Patch rows above and columns left of the kept grid (the letterbox).
        offset: (usize, usize),
    },
}

impl ImageLayout {
    /// Image tokens in the prompt.
    pub fn tokens(&self) -> usize {
        match *self {
            ImageLayout::Square { grid } => grid * grid,
            ImageLayout::AnyRes {
                grid, rows, cols, ..
            } => grid * grid + rows * (cols + 1),
        }
    }

    /// Views (tower inputs of one side each) the image is preprocessed into.
    pub fn views(&self) -> usize {
        match *self {
            ImageLayout::Square { .. } => 1,
            ImageLayout::AnyRes { tiles, .. } => 1 + tiles.0 * tiles.1,
        }
    }

    /// For each image token in order, the row of the views' stacked patch features `[views ·
    /// grid², D]` it takes; `None` for a newline token.
    pub fn token_sources(&self) -> Vec<Option<usize>> {
        match *self {
            ImageLayout::Square { grid } => (0..grid * grid).map(Some).collect(),
            ImageLayout::AnyRes {
                grid,
                tiles,
                rows,
                cols,
                offset,
                ..
            } => {
                let per_view = grid * grid;
                let mut out: Vec<Option<usize>> = (0..per_view).map(Some).collect();
                for r in offset.0..offset.0 + rows {
                    let (tile_row, y) = (r / grid, r % grid);
                    for c in offset.1..offset.1 + cols {
                        let (tile_col, x) = (c / grid, c % grid);
                        let view = 1 + tile_row * tiles.1 + tile_col;
                        out.push(Some(view * per_view + y * grid + x));
                    }
                    out.push(None);
                }
                out
            }
        }
    }
}

/// A map placed on its picture: `(rows, cols)` and the values, row-major.
pub type Placed = ((usize, usize), Vec<f32>);

impl ImageLayout {
    /// `(rows, cols)` of the grid [`Self::place`] puts this image's map on.
    pub fn placed_grid(&self) -> (usize, usize) {
        match *self {
            ImageLayout::Square { grid } => (grid, grid),
            ImageLayout::AnyRes { rows, cols, .. } => (rows, cols),
        }
    }

    /// This image's token map (its tokens' values, in order) placed on the picture: `(rows,
    /// cols)` and the values, row-major. A square view's grid is the map as it is. A tiled
    /// image's is the tiles' kept grid (which covers the picture, the letterbox cut away), each
    /// cell plus its share of the base view's cells over it — a base cell's value spread over the
    /// cells it overlaps in proportion to the overlap, so each view's total is kept. Newline
    /// tokens have no place and are left out.
    pub fn place(&self, map: &[f32]) -> Result<Placed> {
        if map.len() != self.tokens() {
            return Err(Error::input(format!(
                "a map of {} values for an image of {} tokens",
                map.len(),
                self.tokens()
            )));
        }
        let (grid, rows, cols) = match *self {
            ImageLayout::Square { grid } => return Ok(((grid, grid), map.to_vec())),
            ImageLayout::AnyRes {
                grid, rows, cols, ..
            } => (grid, rows, cols),
        };
        let (base, tiles) = map.split_at(grid * grid);
        // Fraction of base band i that fine band r covers, for n fine bands over the same length.
        let spread = |n: usize| -> Vec<f32> {
            let mut w = vec![0f32; n * grid];
            for r in 0..n {
                let (lo, hi) = (r as f64 / n as f64, (r + 1) as f64 / n as f64);
                for i in 0..grid {
                    let (blo, bhi) = (i as f64 / grid as f64, (i + 1) as f64 / grid as f64);
                    let overlap = (hi.min(bhi) - lo.max(blo)).max(0.0);
                    w[r * grid + i] = (overlap * grid as f64) as f32;
                }
            }
            w
        };
        let (wy, wx) = (spread(rows), spread(cols));
        // Base rows spread down first ([rows, grid]), then across.
        let mut down = vec![0f32; rows * grid];
        for r in 0..rows {
            for i in 0..grid {
                let w = wy[r * grid + i];
                if w > 0.0 {
                    for j in 0..grid {
                        down[r * grid + j] += w * base[i * grid + j];
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            // The row's tile tokens, its newline (the last of cols + 1) left out.
            let row = &tiles[r * (cols + 1)..r * (cols + 1) + cols];
            for (c, &t) in row.iter().enumerate() {
                let b: f32 = (0..grid)
                    .map(|j| wx[c * grid + j] * down[r * grid + j])
                    .sum();
                out.push(t + b);
            }
        }
        Ok(((rows, cols), out))
    }
}

/// transformers' `select_best_resolution`: the pinpoint `(height, width)` that keeps the most of
/// the image's resolution when it is scaled to fit, and among those wastes the least.
pub fn best_resolution(size: (usize, usize), pinpoints: &[(usize, usize)]) -> (usize, usize) {
    let (oh, ow) = (size.0 as f64, size.1 as f64);
    let mut best = pinpoints[0];
    let (mut max_effective, mut min_wasted) = (0usize, usize::MAX);
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow).min(h as f64 / oh);
        let (dw, dh) = ((ow * scale) as usize, (oh * scale) as usize);
        let effective = (dw * dh).min(size.0 * size.1);
        let wasted = h * w - effective;
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            (max_effective, min_wasted, best) = (effective, wasted, (h, w));
        }
    }
    best
}

/// transformers' `get_patch_output_size`: `(height, width)` of the image resized to fit `target`
/// with its aspect ratio kept.
pub fn fitted_size(size: (usize, usize), target: (usize, usize)) -> (usize, usize) {
    let (oh, ow) = (size.0 as f64, size.1 as f64);
    let (scale_w, scale_h) = (target.1 as f64 / ow, target.0 as f64 / oh);
    if scale_w < scale_h {
        (((oh * scale_w).ceil() as usize).min(target.0), target.1)
    } else {
        (target.0, ((ow * scale_h).ceil() as usize).min(target.1))
    }
}

/// Python's `int(round(x, 7))` for x ≥ 0: the integer part, unless x is within 5e-8 below the
/// next integer (transformers rounds away the float error of a ratio that should be whole).
fn int_round7(x: f64) -> usize {
    ((x * 1e7).round() / 1e7) as usize
}

/// The layout of a `size = (height, width)` picture on a tower of side `side` and patch grid
/// `grid` (transformers' `get_anyres_image_grid_shape` and `unpad_image`).
pub fn layout(
    size: (usize, usize),
    side: usize,
    grid: usize,
    pinpoints: &[(usize, usize)],
) -> ImageLayout {
    let (bh, bw) = best_resolution(size, pinpoints);
    let tiles = (bh / side, bw / side);
    let (cur_h, cur_w) = (grid * tiles.0, grid * tiles.1);
    let (oh, ow) = (size.0 as f64, size.1 as f64);
    let (mut rows, mut cols, mut offset) = (cur_h, cur_w, (0, 0));
    if ow / oh > cur_w as f64 / cur_h as f64 {
        let new_h = int_round7(oh * (cur_w as f64 / ow));
        let pad = cur_h.saturating_sub(new_h) / 2;
        (rows, offset.0) = (cur_h - 2 * pad, pad);
    } else {
        let new_w = int_round7(ow * (cur_h as f64 / oh));
        let pad = cur_w.saturating_sub(new_w) / 2;
        (cols, offset.1) = (cur_w - 2 * pad, pad);
    }
    ImageLayout::AnyRes {
        grid,
        size,
        tiles,
        rows,
        cols,
        offset,
    }
}

/// The views of an any-resolution image, each through `cfg`'s per-view pipeline: the whole image
/// squashed to `side × side`, then the tiles of the letterboxed best-fit resize, row by row. CHW
/// values, one view after another.
pub fn preprocess_views(
    img: &RgbImage,
    cfg: &PreprocessConfig,
    side: usize,
    pinpoints: &[(usize, usize)],
) -> Result<Vec<f32>> {
    img.validate()?;
    let size = (img.height, img.width);
    let best = best_resolution(size, pinpoints);
    let (nh, nw) = fitted_size(size, best);
    let resized = resize_bicubic(img, nw, nh)?;
    // Letterbox: the resized image pasted at the centre (the odd pixel after it), zeros around.
    let (top, left) = ((best.0 - nh) / 2, (best.1 - nw) / 2);
    let mut padded = vec![0u8; best.0 * best.1 * 3];
    for y in 0..nh {
        let src = &resized.data[y * nw * 3..(y + 1) * nw * 3];
        let at = ((top + y) * best.1 + left) * 3;
        padded[at..at + nw * 3].copy_from_slice(src);
    }
    let mut views = vec![resize_bicubic(img, side, side)?];
    for ty in 0..best.0 / side {
        for tx in 0..best.1 / side {
            let mut tile = Vec::with_capacity(side * side * 3);
            for y in 0..side {
                let at = ((ty * side + y) * best.1 + tx * side) * 3;
                tile.extend_from_slice(&padded[at..at + side * 3]);
            }
            views.push(RgbImage::new(side, side, tile)?);
        }
    }
    let mut out = Vec::with_capacity(views.len() * 3 * side * side);
    for v in &views {
        let values = preprocess(v, cfg)?;
        if values.len() != 3 * side * side {
            return Err(Error::input(format!(
                "a {side}x{side} tile preprocessed into {} values, not 3x{side}x{side} (does \
                 preprocessor_config.json resize or crop tiles to another size?)",
                values.len()
            )));
        }
        out.extend(values);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: [(usize, usize); 5] = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

    #[test]
    fn best_resolution_matches_transformers() {
        // select_best_resolution on llava-hf's pinpoints, (height, width).
        assert_eq!(best_resolution((480, 640), &PIN), (672, 672));
        assert_eq!(best_resolution((300, 600), &PIN), (336, 672));
        assert_eq!(best_resolution((1000, 200), &PIN), (1008, 336));
        assert_eq!(best_resolution((100, 100), &PIN), (336, 672));
    }

    #[test]
    fn token_counts_match_the_processor() {
        // LlavaNextProcessor._get_number_of_features less the CLS ("default" strategy), 336 px
        // tiles, 24x24 patches: 640x480 -> 2x2 tiles, 48x48 grid, width-bound: new height
        // round(480 * 48 / 640) = 36, 6 rows padded each side.
        let l = layout((480, 640), 336, 24, &PIN);
        assert_eq!(
            l,
            ImageLayout::AnyRes {
                grid: 24,
                size: (480, 640),
                tiles: (2, 2),
                rows: 36,
                cols: 48,
                offset: (6, 0)
            }
        );
        assert_eq!(l.tokens(), 576 + 36 * 49);
        assert_eq!(l.views(), 5);
        let src = l.token_sources();
        assert_eq!(src.len(), l.tokens());
        // First kept row is grid row 6 of the top tiles; its first token is view 1's patch (6, 0),
        // then 24 columns on, view 2's patch (6, 0); the row ends in a newline.
        assert_eq!(src[576], Some(576 + 6 * 24));
        assert_eq!(src[576 + 24], Some(2 * 576 + 6 * 24));
        assert_eq!(src[576 + 48], None);
        // Grid row 24, the 18th kept, is the bottom tiles' first (views 3 and 4).
        assert_eq!(src[576 + 18 * 49], Some(3 * 576));
    }

    #[test]
    fn placing_keeps_each_views_total() {
        // 2x2 base grid; 3 rows x 3 cols of tiles kept, each row with its newline.
        let l = ImageLayout::AnyRes {
            grid: 2,
            size: (60, 60),
            tiles: (2, 2),
            rows: 3,
            cols: 3,
            offset: (0, 0),
        };
        let base = [1.0, 2.0, 3.0, 4.0];
        let mut map = base.to_vec();
        for r in 0..3 {
            map.extend([10.0 * r as f32, 0.0, 1.0, 100.0]); // the 100s are newlines
        }
        let ((rows, cols), placed) = l.place(&map).unwrap();
        assert_eq!((rows, cols), (3, 3));
        let total: f32 = placed.iter().sum();
        let tiles: f32 = (0..3).map(|r| 10.0 * r as f32 + 1.0).sum();
        assert!((total - (tiles + 10.0)).abs() < 1e-5, "total {total}");
        // The top-left fine cell lies wholly in base cell 0 (4/9 of it): 1 * 4/9 on top of 0.
        assert!((placed[0] - 4.0 / 9.0).abs() < 1e-6, "{}", placed[0]);
        // A square layout is its own grid.
        let sq = ImageLayout::Square { grid: 2 };
        assert_eq!(sq.place(&base).unwrap(), ((2, 2), base.to_vec()));
        assert!(sq.place(&map).is_err());
    }

    #[test]
    fn fitted_size_keeps_the_aspect() {
        assert_eq!(fitted_size((480, 640), (672, 672)), (504, 672));
        assert_eq!(fitted_size((1000, 200), (1008, 336)), (1008, 202));
    }
}
