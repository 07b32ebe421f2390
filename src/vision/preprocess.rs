//! CLIP preprocessing, as transformers' `CLIPImageProcessor` (PIL backend) does it:
//! resize (shortest edge) → center crop → rescale → normalize → CHW.
//!
//! Numerics copied from transformers (`image_transforms.py`), so the floats agree bit for bit when
//! the resized bytes do:
//! - `rescale`: `image.astype(float64) * rescale_factor`, then cast to `float32`. The factor is a
//!   Python float (f64), typically `1/255`.
//! - `normalize`: `(image - mean) / std` in `float32`, with `mean`/`std` cast to `float32`.
//! - `center_crop`: offsets `(h - crop_h) // 2`, `(w - crop_w) // 2` (floor); where the image is
//!   smaller than the crop it is zero-padded (pixel value 0 *before* rescale/normalize), placed
//!   at `ceil((crop - size) / 2)`.

use std::path::Path;

use serde_json::Value;

use super::{load_image, resize_bicubic, RgbImage};
use crate::error::{Error, Result};

/// OpenAI CLIP's per-channel mean (transformers' `OPENAI_CLIP_MEAN`).
pub const CLIP_IMAGE_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's per-channel std (transformers' `OPENAI_CLIP_STD`). The literals are
/// transformers' (Python floats); Rust rounds them to f32 exactly as `np.array(.., float32)` does.
#[allow(clippy::excessive_precision)]
pub const CLIP_IMAGE_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The settings of a `CLIPImageProcessor` (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessConfig {
    /// `size = {"shortest_edge": N}`: the shorter side becomes N, the longer `int(N * long /
    /// short)`. Ignored when `resize_to` is set.
    pub shortest_edge: usize,
    /// `size = {"height": H, "width": W}`: resize to exactly `(H, W)` instead (aspect ratio not
    /// kept). `None` for the usual shortest-edge resize.
    pub resize_to: Option<(usize, usize)>,
    pub crop_height: usize,
    pub crop_width: usize,
    pub do_resize: bool,
    pub do_center_crop: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// Usually `1/255`. transformers multiplies in f64 by the Python float; see
    /// [`PreprocessConfig::rescale_factor_f64`] for how the f64 value is recovered from this f32.
    pub rescale_factor: f32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// `image_grid_pinpoints` of a `LlavaNextImageProcessor`: the `(height, width)` resolutions
    /// an image is tiled at. Must equal the model's (its `config.json` is what the engine uses).
    pub grid_pinpoints: Option<Vec<(usize, usize)>>,
}

impl PreprocessConfig {
    /// The LLaVA-1.5 / OpenAI CLIP settings: shortest edge `size`, center crop `size x size`,
    /// rescale by 1/255, CLIP mean/std, bicubic. `clip(336)` is `llava-hf/llava-1.5-*-hf`'s.
    pub fn clip(size: usize) -> Self {
        PreprocessConfig {
            shortest_edge: size,
            resize_to: None,
            crop_height: size,
            crop_width: size,
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            do_normalize: true,
            rescale_factor: 1.0 / 255.0,
            image_mean: CLIP_IMAGE_MEAN,
            image_std: CLIP_IMAGE_STD,
            grid_pinpoints: None,
        }
    }

    /// Reads a Hugging Face `preprocessor_config.json`. Missing keys take `CLIPImageProcessor`'s
    /// defaults (shortest edge 224, crop 224, all steps on, 1/255, CLIP mean/std, bicubic).
    /// `size` may be `{"shortest_edge": N}`, `{"height": H, "width": W}`, `[H, W]` or an int
    /// (= shortest edge); `crop_size` may be `{"height", "width"}`, `[H, W]` or an int (square).
    /// Only `resample = 3` (bicubic) is supported. Unknown keys are ignored.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// [`PreprocessConfig::from_file`] on a string; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let root: Value =
            serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let obj = root
            .as_object()
            .ok_or_else(|| err("expected a JSON object at the top level".into()))?;
        let mut cfg = PreprocessConfig::clip(224);

        let flag = |key: &str, default: bool| -> Result<bool> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(err(format!("`{key}` must be true or false, got {v}"))),
            }
        };
        cfg.do_resize = flag("do_resize", true)?;
        cfg.do_center_crop = flag("do_center_crop", true)?;
        cfg.do_rescale = flag("do_rescale", true)?;
        cfg.do_normalize = flag("do_normalize", true)?;

        match obj.get("size") {
            None | Some(Value::Null) => {}
            Some(v) => match parse_size(v, false).map_err(|m| err(format!("`size`: {m}")))? {
                Size::ShortestEdge(n) => cfg.shortest_edge = n,
                Size::HeightWidth(h, w) => cfg.resize_to = Some((h, w)),
            },
        }
        match obj.get("crop_size") {
            None | Some(Value::Null) => {}
            Some(v) => match parse_size(v, true).map_err(|m| err(format!("`crop_size`: {m}")))? {
                Size::HeightWidth(h, w) => (cfg.crop_height, cfg.crop_width) = (h, w),
                Size::ShortestEdge(_) => {
                    return Err(err("`crop_size` needs `height` and `width`".into()))
                }
            },
        }
        match obj.get("resample") {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(3) => {}
                Some(r) => {
                    let name = match r {
                        0 => "nearest",
                        1 => "lanczos",
                        2 => "bilinear",
                        4 => "box",
                        5 => "hamming",
                        _ => "unknown",
                    };
                    return Err(err(format!(
                        "`resample` = {r} ({name}) is not supported; only 3 (bicubic) is"
                    )));
                }
                None => return Err(err(format!("`resample` must be an integer, got {v}"))),
            },
        }
        match obj.get("rescale_factor") {
            None | Some(Value::Null) => {}
            Some(v) => {
                let f = v
                    .as_f64()
                    .ok_or_else(|| err(format!("`rescale_factor` must be a number, got {v}")))?;
                cfg.rescale_factor = f as f32;
            }
        }
        for (key, slot) in [
            ("image_mean", &mut cfg.image_mean),
            ("image_std", &mut cfg.image_std),
        ] {
            match obj.get(key) {
                None | Some(Value::Null) => {}
                Some(v) => *slot = parse_triplet(v).map_err(|m| err(format!("`{key}`: {m}")))?,
            }
        }
        match obj.get("image_grid_pinpoints") {
            None | Some(Value::Null) => {}
            Some(v) => {
                let pins =
                    serde_json::from_value::<Vec<(usize, usize)>>(v.clone()).map_err(|_| {
                        err(format!(
                        "`image_grid_pinpoints` must be a list of [height, width] pairs, got {v}"
                    ))
                    })?;
                cfg.grid_pinpoints = Some(pins);
            }
        }
        cfg.validate().map_err(|e| match e {
            Error::Input(m) => err(m),
            other => other,
        })?;
        Ok(cfg)
    }

    /// The rescale factor as transformers uses it: a Python float (f64). Our field is f32, which
    /// cannot hold `1/255` exactly, and `x * f64(f32(1/255))` rounds to a different f32 than
    /// `x * (1/255)` for some `x`. Real configs always use `1/N`, so when the f32 is the rounding
    /// of `1/N` for an integer N we use the f64 `1/N`; otherwise the f32 widened.
    pub fn rescale_factor_f64(&self) -> f64 {
        let r = self.rescale_factor;
        if r > 0.0 && r.is_finite() {
            let n = (1.0 / r as f64).round();
            if (1.0..=1e9).contains(&n) && ((1.0 / n) as f32) == r {
                return 1.0 / n;
            }
        }
        r as f64
    }

    /// `(height, width)` of [`preprocess`]'s output for a `width x height` input image.
    pub fn output_size(&self, width: usize, height: usize) -> (usize, usize) {
        if self.do_center_crop {
            return (self.crop_height, self.crop_width);
        }
        if !self.do_resize {
            return (height, width);
        }
        match self.resize_to {
            Some(hw) => hw,
            None => {
                let (w, h) = resize_output_size(width, height, self.shortest_edge);
                (h, w)
            }
        }
    }

    fn validate(&self) -> Result<()> {
        if self.do_resize {
            match self.resize_to {
                Some((h, w)) if h == 0 || w == 0 => {
                    return Err(Error::input(format!("resize size {h}x{w} has a zero side")))
                }
                None if self.shortest_edge == 0 => {
                    return Err(Error::input("shortest_edge must be positive"))
                }
                _ => {}
            }
        }
        if self.do_center_crop && (self.crop_height == 0 || self.crop_width == 0) {
            return Err(Error::input(format!(
                "crop size {}x{} has a zero side",
                self.crop_height, self.crop_width
            )));
        }
        if self.do_rescale && !self.rescale_factor.is_finite() {
            return Err(Error::input("rescale_factor must be finite"));
        }
        if self.do_normalize
            && (self.image_std.iter().any(|&s| s == 0.0 || !s.is_finite())
                || self.image_mean.iter().any(|m| !m.is_finite()))
        {
            return Err(Error::input(format!(
                "image_std must be finite and non-zero and image_mean finite, got mean {:?} std {:?}",
                self.image_mean, self.image_std
            )));
        }
        Ok(())
    }
}

enum Size {
    ShortestEdge(usize),
    HeightWidth(usize, usize),
}

/// transformers' `get_size_dict`: an int means a square (`default_to_square`, used for
/// `crop_size`) or a shortest edge (for `size`); a 2-list is `[height, width]`.
fn parse_size(v: &Value, default_to_square: bool) -> std::result::Result<Size, String> {
    let positive = |v: &Value| -> std::result::Result<usize, String> {
        match v.as_u64() {
            Some(n) if n > 0 && n <= super::MAX_SIDE as u64 => Ok(n as usize),
            _ => Err(format!(
                "expected an integer in 1..={}, got {v}",
                super::MAX_SIDE
            )),
        }
    };
    match v {
        Value::Number(_) => {
            let n = positive(v)?;
            Ok(if default_to_square {
                Size::HeightWidth(n, n)
            } else {
                Size::ShortestEdge(n)
            })
        }
        Value::Array(a) if a.len() == 2 => {
            Ok(Size::HeightWidth(positive(&a[0])?, positive(&a[1])?))
        }
        Value::Object(o) => {
            let keys: Vec<&str> = o.keys().map(|k| k.as_str()).collect();
            let mut sorted = keys.clone();
            sorted.sort_unstable();
            match sorted.as_slice() {
                ["shortest_edge"] => Ok(Size::ShortestEdge(positive(&o["shortest_edge"])?)),
                ["height", "width"] => Ok(Size::HeightWidth(
                    positive(&o["height"])?,
                    positive(&o["width"])?,
                )),
                _ => Err(format!(
                    "unsupported keys {keys:?}; expected {{\"shortest_edge\"}} or {{\"height\", \"width\"}}"
                )),
            }
        }
        _ => Err(format!(
            "expected an int, [height, width] or an object, got {v}"
        )),
    }
}

/// A per-channel list of 3 numbers, or one number for all channels (as transformers accepts).
fn parse_triplet(v: &Value) -> std::result::Result<[f32; 3], String> {
    // serde_json's f64 -> f32 cast matches `np.array(list, dtype=np.float32)` (round to nearest).
    match v {
        Value::Number(n) => {
            let x = n.as_f64().ok_or("not a number")? as f32;
            Ok([x; 3])
        }
        Value::Array(a) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x.as_f64().ok_or_else(|| format!("not a number: {x}"))? as f32;
            }
            Ok(out)
        }
        _ => Err(format!("expected 3 numbers (one per RGB channel), got {v}")),
    }
}

/// transformers' `get_resize_output_image_size(..., default_to_square=False)` for a
/// `width x height` image: the shorter side becomes `shortest_edge` and the longer one
/// `int(shortest_edge * long / short)` (float division, truncated). Returns `(width, height)`.
/// Ties (square images) count as "width is the short side", as in transformers.
pub fn resize_output_size(width: usize, height: usize, shortest_edge: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python: `int(requested_new_short * long / short)`; the product is an exact integer and
    // `/` is correctly rounded true division, which f64 division reproduces for these sizes.
    let new_long = ((shortest_edge as f64 * long as f64) / short.max(1) as f64) as usize;
    if width <= height {
        (shortest_edge, new_long)
    } else {
        (new_long, shortest_edge)
    }
}

/// transformers' `center_crop` to `crop_height x crop_width`: top/left offsets
/// `(size - crop) // 2` (floor division), and zero padding where the image is smaller than the
/// crop (the image then sits at `ceil((crop - size) / 2)` in the output). Both cases reduce to
/// `out[y][x] = in[y + floor((h - crop_h) / 2)][x + floor((w - crop_w) / 2)]`, or 0 off the image.
pub fn center_crop(img: &RgbImage, crop_height: usize, crop_width: usize) -> Result<RgbImage> {
    img.validate()?;
    if crop_height == 0 || crop_width == 0 {
        return Err(Error::input(format!(
            "crop size {crop_height}x{crop_width} has a zero side"
        )));
    }
    let top = (img.height as i64 - crop_height as i64).div_euclid(2);
    let left = (img.width as i64 - crop_width as i64).div_euclid(2);
    let mut data = vec![0u8; crop_height * crop_width * 3];
    // Columns of the output that land on the image.
    let x0 = (-left).max(0) as usize;
    let x1 = (img.width as i64 - left).min(crop_width as i64).max(0) as usize;
    for y in 0..crop_height {
        let sy = y as i64 + top;
        if sy < 0 || sy >= img.height as i64 || x0 >= x1 {
            continue;
        }
        let src_row = sy as usize * img.width * 3;
        let sx0 = (x0 as i64 + left) as usize;
        let n = (x1 - x0) * 3;
        data[(y * crop_width + x0) * 3..(y * crop_width + x0) * 3 + n]
            .copy_from_slice(&img.data[src_row + sx0 * 3..src_row + sx0 * 3 + n]);
    }
    Ok(RgbImage {
        width: crop_width,
        height: crop_height,
        data,
    })
}

/// The geometric part of the pipeline: resize (if `do_resize`) then center crop (if
/// `do_center_crop`), on 8-bit RGB. This is the image the model sees before rescale/normalize,
/// e.g. the base to draw relevancy heatmaps on.
pub fn resize_and_crop(img: &RgbImage, cfg: &PreprocessConfig) -> Result<RgbImage> {
    img.validate()?;
    cfg.validate()?;
    let mut cur = std::borrow::Cow::Borrowed(img);
    if cfg.do_resize {
        let (w, h) = match cfg.resize_to {
            Some((h, w)) => (w, h),
            None => resize_output_size(img.width, img.height, cfg.shortest_edge),
        };
        if w.max(h) > super::MAX_SIDE {
            return Err(Error::input(format!(
                "its aspect ratio is too extreme: {}x{} scaled to a short side of {} would be \
                 {w}x{h}, more than {} pixels on a side; crop it nearer to square",
                img.width,
                img.height,
                w.min(h),
                super::MAX_SIDE
            )));
        }
        cur = std::borrow::Cow::Owned(resize_bicubic(&cur, w, h)?);
    }
    if cfg.do_center_crop {
        cur = std::borrow::Cow::Owned(center_crop(&cur, cfg.crop_height, cfg.crop_width)?);
    }
    Ok(cur.into_owned())
}

/// Runs the full `CLIPImageProcessor` pipeline on an RGB image and returns the pixel values as a
/// CHW `f32` buffer of shape `[3, H, W]` (`H, W` = the crop size, or see
/// [`PreprocessConfig::output_size`] when cropping is off), i.e. `pixel_values[0]`.
pub fn preprocess(img: &RgbImage, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    let cur = resize_and_crop(img, cfg)?;

    // Per channel, the output is a function of the byte value only: tabulate all 256, exactly as
    // numpy computes them (f64 multiply, cast to f32; then f32 subtract and divide).
    let r64 = cfg.rescale_factor_f64();
    let mut table = [[0f32; 256]; 3];
    for (c, t) in table.iter_mut().enumerate() {
        for (v, out) in t.iter_mut().enumerate() {
            let mut x = if cfg.do_rescale {
                (v as f64 * r64) as f32
            } else {
                v as f32
            };
            if cfg.do_normalize {
                x = (x - cfg.image_mean[c]) / cfg.image_std[c];
            }
            *out = x;
        }
    }

    let (w, h) = (cur.width, cur.height);
    let plane = w * h;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in cur.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = table[c][px[c] as usize];
        }
    }
    Ok(out)
}

/// [`load_image`] then [`preprocess`].
pub fn load_and_preprocess(path: &Path, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    preprocess(&load_image(path)?, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_sizes_match_transformers() {
        // get_resize_output_image_size(default_to_square=False) examples, (w, h) in and out.
        assert_eq!(resize_output_size(640, 480, 336), (448, 336));
        assert_eq!(resize_output_size(480, 640, 336), (336, 448));
        assert_eq!(resize_output_size(500, 500, 336), (336, 336));
        assert_eq!(resize_output_size(301, 97, 336), (1042, 336)); // 336*301/97 = 1042.6
        assert_eq!(resize_output_size(1000, 3, 7), (2333, 7));
    }

    #[test]
    fn rescale_factor_recovers_one_over_255() {
        let cfg = PreprocessConfig::clip(336);
        assert_eq!(cfg.rescale_factor_f64(), 1.0 / 255.0);
        let mut other = cfg.clone();
        other.rescale_factor = 0.3;
        assert_eq!(other.rescale_factor_f64(), 0.3f32 as f64);
    }

    #[test]
    fn center_crop_pads_like_transformers() {
        // 2x3 image (w=2, h=3) cropped to 5x4 (h=5, w=4): padded with top 1 (ceil(2/2)), left 1.
        let img = RgbImage::new(2, 3, (1..=18).collect()).unwrap();
        let c = center_crop(&img, 5, 4).unwrap();
        assert_eq!(c.pixel(0, 0), [0, 0, 0]);
        assert_eq!(c.pixel(1, 1), [1, 2, 3]);
        assert_eq!(c.pixel(2, 3), [16, 17, 18]);
        assert_eq!(c.pixel(3, 4), [0, 0, 0]);
        // Odd padding: h=3 -> crop 6 pads ceil(3/2)=2 on top.
        let c = center_crop(&img, 6, 2).unwrap();
        assert_eq!(c.pixel(0, 1), [0, 0, 0]);
        assert_eq!(c.pixel(0, 2), [1, 2, 3]);
    }
}
