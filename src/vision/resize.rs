//! Bit-exact port of Pillow's 8-bit resampling (`src/libImaging/Resample.c` of the pillow 13.0.0
//! release) for the BICUBIC filter, plus the Python-level shortcut of `Image.resize`.
//!
//! Why copy it exactly: CLIP was trained on, and transformers feeds LLaVA, images resized by PIL.
//! Any other bicubic (different kernel support when downscaling, float instead of fixed point,
//! different rounding) changes pixel values by a few levels, which moves the model's logits more
//! than our f32-vs-reference tolerance allows.
//!
//! What Pillow does, step by step (each step mirrored below):
//! 1. For each axis, `precompute_coeffs`: the filter (Keys cubic, a = -0.5, support 2) is stretched
//!    by the downscale factor (`filterscale = max(in/out, 1)`), so downscaling is a true low-pass
//!    (antialiased) resample. Weights are computed in `f64`, normalised to sum 1, then converted to
//!    fixed point with 22 fractional bits (`PRECISION_BITS = 32 - 8 - 2`), rounding half away from
//!    zero.
//! 2. Pass order (new in Pillow 13): horizontal first, unless the height shrinks by more than
//!    twice as many pixels as the width (`in_h - out_h > 2 * (in_w - out_w)` with `in_h > out_h`),
//!    then vertical first. Horizontal-first only resamples the source rows the vertical pass will
//!    read.
//! 3. Each output value is `clip8((1 << 21) + sum(in * k))`: add one half, arithmetic shift right
//!    by 22, clamp to 0..=255. The intermediate image is 8-bit (rounded and clamped too).
//! 4. A pass is skipped when its axis keeps its size, and `Image.resize` returns a copy when the
//!    size is unchanged. (Earlier Pillow releases always went horizontal first, apart from a
//!    Python-level swap for images over 100 times taller than wide; 13.0 replaced both with rule 2.)
//!
//! `reducing_gap` is `None` in `Image.resize` and in transformers, so no `reduce()` pre-step.

use super::{RgbImage, MAX_PIXELS, MAX_SIDE};
use crate::error::{Error, Result};

/// Fixed-point fraction bits of the coefficients: 32 bits minus 8 for the sample value minus 2 for
/// the overshoot of negative lobes (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Keys' cubic convolution kernel with a = -0.5 and support 2 (Pillow's `bicubic_filter`). The
/// expression order is Pillow's so the f64 results are identical.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}
const BICUBIC_SUPPORT: f64 = 2.0;

/// Fixed-point weights for resampling one axis.
struct Coeffs {
    /// Stride of `k` (Pillow's `ksize`): the largest possible window length.
    ksize: usize,
    /// For each output index, the first input index and the number of inputs used.
    bounds: Vec<(usize, usize)>,
    /// `out_size * ksize` weights, 22-bit fixed point.
    k: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`. `in0`/`in1` are the source box edges on
/// this axis; Pillow keeps the box as C `float`, so they are `f32` here and the span `in1 - in0` is
/// computed in `f32` before widening, as in C.
fn precompute_coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize) -> Coeffs {
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;

    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero; negative values are clamped to 0 right after, so
        // truncation vs floor does not matter here.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = (xmax - xmin).max(0) as usize;
        let xmin = xmin as usize;

        let mut ww = 0.0f64;
        for (x, wx) in w.iter_mut().enumerate().take(count) {
            // `(x + xmin - center + 0.5) * ss` with `x + xmin` an int, as in C.
            let v = bicubic_filter(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *wx = v;
            ww += v;
        }
        let row = &mut k[xx * ksize..(xx + 1) * ksize];
        for x in 0..count {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            // normalize_coeffs_8bpc: round half away from zero into 22-bit fixed point.
            let scaled = v * (1i64 << PRECISION_BITS) as f64;
            row[x] = if v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Coeffs { ksize, bounds, k }
}

/// Pillow's `clip8`: the accumulator already holds the rounding half; shift out the fraction
/// (arithmetic shift, so negatives floor) and clamp to a byte.
#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass over source rows `row0..row0 + out_h` of an interleaved RGB image `src` of
/// width `in_w`, producing `out_w x out_h`.
fn resample_horizontal(
    src: &[u8],
    in_w: usize,
    row0: usize,
    out_h: usize,
    out_w: usize,
    c: &Coeffs,
) -> Vec<u8> {
    let mut out = vec![0u8; out_w * out_h * 3];
    for yy in 0..out_h {
        let line_in = &src[(yy + row0) * in_w * 3..(yy + row0 + 1) * in_w * 3];
        let line_out = &mut out[yy * out_w * 3..(yy + 1) * out_w * 3];
        for xx in 0..out_w {
            let (xmin, count) = c.bounds[xx];
            let k = &c.k[xx * c.ksize..xx * c.ksize + count];
            let half = 1i32 << (PRECISION_BITS - 1);
            let (mut s0, mut s1, mut s2) = (half, half, half);
            for (x, &kx) in k.iter().enumerate() {
                let p = &line_in[(x + xmin) * 3..(x + xmin) * 3 + 3];
                s0 += p[0] as i32 * kx;
                s1 += p[1] as i32 * kx;
                s2 += p[2] as i32 * kx;
            }
            line_out[xx * 3] = clip8(s0);
            line_out[xx * 3 + 1] = clip8(s1);
            line_out[xx * 3 + 2] = clip8(s2);
        }
    }
    out
}

/// Vertical pass: `src` is `width` wide; output row `yy` reads source rows
/// `bounds[yy].0 - row_shift ..` (the horizontal pass only produced the rows the vertical pass
/// needs, so its bounds are shifted by the first of them).
fn resample_vertical(
    src: &[u8],
    width: usize,
    out_h: usize,
    row_shift: usize,
    c: &Coeffs,
) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; stride * out_h];
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; stride];
    for yy in 0..out_h {
        let (ymin, count) = c.bounds[yy];
        let ymin = ymin - row_shift;
        let k = &c.k[yy * c.ksize..yy * c.ksize + count];
        // Same sums as Pillow's per-pixel loop, accumulated row by row (integer addition is
        // associative, so the order does not change the result).
        acc.fill(half);
        for (y, &ky) in k.iter().enumerate() {
            let line = &src[(ymin + y) * stride..(ymin + y + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(line) {
                *a += p as i32 * ky;
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Pillow's `ImagingResampleInner`. `bbox` is the source box `(x0, y0, x1, y1)`; `Image.resize`
/// passes the whole image (transformers never sets `box`).
fn resample_inner(
    src: &[u8],
    in_w: usize,
    in_h: usize,
    out_w: usize,
    out_h: usize,
    bbox: [f32; 4],
) -> Vec<u8> {
    // Note Pillow compares the box's far edge with the OUTPUT size here; for a whole-image box
    // this is equivalent to "this axis changes size".
    let need_horizontal = out_w != in_w || bbox[0] != 0.0 || bbox[2] != out_w as f32;
    let need_vertical = out_h != in_h || bbox[1] != 0.0 || bbox[3] != out_h as f32;

    // Pillow 13: "If height is being scaled down more than twice the amount the width is, run
    // the vertical pass first, to make the horizontal pass faster". C `int` arithmetic; the width
    // difference may be negative (upscaling).
    let (dh, dw) = (in_h as i64 - out_h as i64, in_w as i64 - out_w as i64);
    let horizontal_first = !(dh > 0 && dh > dw * 2);

    if horizontal_first {
        if need_horizontal {
            let horiz = precompute_coeffs(in_w, bbox[0], bbox[2], out_w);
            // Rows of the source the vertical pass will read; only these are resampled
            // horizontally, and the vertical bounds are shifted by the first of them.
            let vert = precompute_coeffs(in_h, bbox[1], bbox[3], out_h);
            let ybox_first = vert.bounds[0].0;
            let (last_min, last_count) = vert.bounds[out_h - 1];
            let ybox_last = last_min + last_count;
            let tmp =
                resample_horizontal(src, in_w, ybox_first, ybox_last - ybox_first, out_w, &horiz);
            if !need_vertical {
                return tmp;
            }
            resample_vertical(&tmp, out_w, out_h, ybox_first, &vert)
        } else if need_vertical {
            let vert = precompute_coeffs(in_h, bbox[1], bbox[3], out_h);
            resample_vertical(src, in_w, out_h, 0, &vert)
        } else {
            src.to_vec()
        }
    } else {
        // Vertical first over the whole source (no row cropping on this path), then horizontal
        // over the `out_h` resulting rows.
        let vert = precompute_coeffs(in_h, bbox[1], bbox[3], out_h);
        let tmp = resample_vertical(src, in_w, out_h, 0, &vert);
        if !need_horizontal {
            return tmp;
        }
        let horiz = precompute_coeffs(in_w, bbox[0], bbox[2], out_w);
        resample_horizontal(&tmp, in_w, 0, out_h, out_w, &horiz)
    }
}

/// `pil_image.resize((width, height), Image.BICUBIC)` on an RGB image, bit for bit (Pillow 13.0).
///
/// An unchanged size returns a copy (as `Image.resize` does). Which pass runs first follows
/// Pillow 13's rule (vertical first when the height shrinks by more than twice what the width
/// shrinks); earlier Pillow releases ran the horizontal pass first there, so results differ from
/// them by a few levels for such images (e.g. portraits taller than 2:1 being downscaled).
///
/// Errors (`Error::Input`) when `img` breaks its length invariant or the target size is zero or
/// beyond [`MAX_SIDE`] / [`MAX_PIXELS`].
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> Result<RgbImage> {
    img.validate()?;
    if width == 0
        || height == 0
        || width > MAX_SIDE
        || height > MAX_SIDE
        || width * height > MAX_PIXELS
    {
        return Err(Error::input(format!(
            "cannot resize to {width}x{height}: sides must be 1..={MAX_SIDE} and at most {MAX_PIXELS} pixels"
        )));
    }
    let (in_w, in_h) = (img.width, img.height);
    if (in_w, in_h) == (width, height) {
        return Ok(img.clone());
    }
    let bbox = [0.0, 0.0, in_w as f32, in_h as f32];
    let data = resample_inner(&img.data, in_w, in_h, width, height, bbox);
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for &(i, o) in &[(10usize, 3usize), (3, 10), (640, 336), (17, 17), (5, 1)] {
            let c = precompute_coeffs(i, 0.0, i as f32, o);
            for xx in 0..o {
                let (_, n) = c.bounds[xx];
                let s: i64 = c.k[xx * c.ksize..xx * c.ksize + n]
                    .iter()
                    .map(|&v| v as i64)
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= n as i64,
                    "{i}->{o} row {xx}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::new(13, 7, [10u8, 200, 255].repeat(13 * 7)).unwrap();
        for &(w, h) in &[(5, 3), (40, 21), (13, 2), (1, 1)] {
            let r = resize_bicubic(&img, w, h).unwrap();
            assert!(r.data.chunks(3).all(|p| p == [10, 200, 255]), "{w}x{h}");
        }
    }
}
