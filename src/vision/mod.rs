//! Image decoding and CLIP preprocessing, matching what the Python reference does:
//! `PIL.Image.open(path).convert("RGB")` followed by transformers' `CLIPImageProcessor` with the PIL
//! backend (the "slow" processor).
//!
//! - [`load_image`] / [`load_image_bytes`]: PNG and JPEG (format found by magic bytes) to 8-bit RGB,
//!   converting the way PIL's `.convert("RGB")` does (alpha dropped, palette looked up, grey
//!   replicated, 16-bit samples reduced to their high byte). JPEGs are decoded by a port of
//!   libjpeg-turbo's pipeline (islow IDCT, fancy upsampling, its YCbCr tables), as Pillow does.
//! - [`resize_bicubic`]: a bit-exact port of Pillow 13's `Image.resize(size, Image.BICUBIC)` on
//!   8-bit images (fixed-point separable convolution, with its choice of pass order).
//! - [`preprocess`]: resize (shortest edge), center crop (zero padding when the image is smaller),
//!   rescale and normalize, producing the CHW `f32` tensor the vision tower eats.
//! - [`anyres`]: LLaVA-NeXT's tiling of an image of any size into several such views, and the
//!   [`ImageLayout`] that says which image token comes from which view's patch.
//!
//! Parity with PIL/transformers is checked by `tests/vision.rs` against fixtures written by
//! `tools/make_vision_fixtures.py`.

pub mod anyres;
mod decode;
mod jpeg;
mod preprocess;
mod resize;

pub use anyres::{ImageLayout, Placed};
pub use decode::{
    image_dimensions, load_image, load_image_bytes, ImageFormat, MAX_DECODE_BYTES, MAX_PIXELS,
    MAX_SIDE,
};
pub use preprocess::{
    center_crop, load_and_preprocess, preprocess, resize_and_crop, resize_output_size,
    PreprocessConfig, CLIP_IMAGE_MEAN, CLIP_IMAGE_STD,
};
pub use resize::resize_bicubic;

use crate::error::{Error, Result};

/// An 8-bit RGB image, rows top to bottom, pixels interleaved: `data[(y * width + x) * 3 + c]`
/// (HWC, the layout of `np.array(pil_image)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps an HWC RGB buffer, checking that its length is `width * height * 3` and that the image
    /// is not empty.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::input(format!(
                "image size {width}x{height} has a zero side"
            )));
        }
        let expected = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(3))
            .ok_or_else(|| Error::input(format!("image size {width}x{height} overflows")))?;
        if data.len() != expected {
            return Err(Error::input(format!(
                "RGB buffer for a {width}x{height} image must hold {expected} bytes, got {}",
                data.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }

    /// The `[r, g, b]` value at column `x`, row `y` (panics when out of range, like slice indexing).
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        assert!(
            x < self.width && y < self.height,
            "pixel ({x}, {y}) out of range"
        );
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// Checks the invariant `data.len() == width * height * 3` (the fields are public, so a caller
    /// can break it); every function here that takes an image calls this first.
    pub(crate) fn validate(&self) -> Result<()> {
        let expected = self
            .width
            .checked_mul(self.height)
            .and_then(|n| n.checked_mul(3));
        match expected {
            Some(n) if n == self.data.len() && n > 0 => Ok(()),
            _ => Err(Error::input(format!(
                "RgbImage {}x{} has {} data bytes, expected width*height*3 (and a non-empty image)",
                self.width,
                self.height,
                self.data.len()
            ))),
        }
    }
}
