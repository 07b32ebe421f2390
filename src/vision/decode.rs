//! PNG and JPEG decoding to 8-bit RGB, converting the way `PIL.Image.open(p).convert("RGB")` does.
//!
//! The reference pipeline (transformers' CLIP processor) starts from a PIL image converted to RGB,
//! so each PNG flavour is reduced exactly as Pillow reduces it (checked against Pillow 13.0 by the
//! fixtures in `tests/fixtures/vision/`):
//!
//! | PNG colour type, depth   | Pillow mode on open | `.convert("RGB")`                    |
//! |--------------------------|---------------------|--------------------------------------|
//! | grey 1/2/4/8             | `1` / `L`           | `v * 255 / (2^depth - 1)`, replicated |
//! | grey 16                  | `I;16`              | clamps to 255 (`min(v, 255)`): **rejected here**, see below |
//! | grey+alpha 8             | `LA`                | grey replicated, alpha dropped        |
//! | grey+alpha 16, RGB(A) 16 | `RGBA` / `RGB`      | high byte of each sample (truncation) |
//! | RGB 8, RGBA 8            | `RGB` / `RGBA`      | alpha dropped (not composited)        |
//! | palette 1/2/4/8          | `P`                 | palette lookup; indices past the palette are black; tRNS ignored |
//!
//! 16-bit greyscale is refused with an explanatory error: Pillow keeps it as 16-bit integers and
//! `convert("RGB")` then saturates every value above 255, turning a normal 16-bit photo almost
//! entirely white. Copying that would silently feed the model garbage; the user should convert the
//! file to 8 bits (or to RGB) first.
//!
//! No gamma, ICC profile or EXIF orientation is applied (Pillow's `open` + `convert` applies none).
//!
//! Two places where "the Python reference" itself is ambiguous (this module follows
//! `Image.open(p).convert("RGB")`, which is what LLaVA's own loader does):
//! - transformers' `convert_to_rgb` (run by `CLIPImageProcessor` when handed a PIL image with an
//!   alpha channel or a tRNS transparency) composites onto white instead of dropping alpha, so for
//!   such images `processor(images=Image.open(p))` differs from this loader;
//! - transformers' `load_image` (used when the processor is handed a path or URL) also applies
//!   `ImageOps.exif_transpose`, which this loader does not.
//!
//! A PNG whose image data is complete but whose tail (last IDAT checksum, IEND) is cut off still
//! decodes, as in Pillow; a cut inside the image data is an error.
//!
//! JPEG goes through our own port of libjpeg-turbo's decoding path ([`super::jpeg`]), so the
//! pixels equal Pillow's; only lossless JPEG goes through `jpeg-decoder`. CMYK/YCCK, 12-bit and
//! arithmetic-coded JPEGs are refused. A JPEG without its end-of-image marker is reported as
//! truncated (Pillow raises "image file is truncated" for those).
//!
//! Every decoder call runs under `catch_unwind`, so a decoder bug on hostile input becomes an
//! `Error::Image` instead of a panic escaping to the caller.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use super::RgbImage;
use crate::error::{Error, Result};

/// Largest accepted image side, in pixels (decoded or resized).
pub const MAX_SIDE: usize = 16384;
/// Largest accepted pixel count (2^28, ~768 MiB as RGB).
pub const MAX_PIXELS: usize = 1 << 28;
/// Most memory one image may take to decode: the RGB result and every buffer the decoder holds
/// at once (a JPEG's coefficients, 2 bytes a sample, most of all). Every PNG within
/// [`MAX_PIXELS`] fits; a JPEG at the pixel cap does not (a 4:4:4 one needs about 8 bytes a
/// pixel, so ~130 megapixels is its largest). Checked from the header before anything
/// image-sized is allocated. Encoded files larger than this are refused before they are read.
pub const MAX_DECODE_BYTES: usize = 1 << 30;

/// Container formats recognised by their magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
}

impl ImageFormat {
    /// Identifies PNG or JPEG from the first bytes of a file (extensions are not trusted).
    pub fn detect(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageFormat::Jpeg)
        } else {
            None
        }
    }
}

/// Reads and decodes a PNG or JPEG file to 8-bit RGB (see the module docs for the conversions).
///
/// Errors name `path`: `Error::Io` when the file cannot be read, `Error::Image` when it is empty,
/// not a PNG/JPEG, truncated, corrupt, too large, or of an unsupported flavour.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > MAX_DECODE_BYTES as u64 {
        return Err(Error::Image {
            path: path.to_path_buf(),
            msg: format!(
                "the file is {}, more than the {} an image may take to decode",
                fmt_bytes(len as usize),
                fmt_bytes(MAX_DECODE_BYTES)
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_image_bytes(&bytes, path)
}

/// Width and height of an in-memory PNG or JPEG from its header alone (PNG: `IHDR`; JPEG: the
/// first frame header), without decoding a pixel: a server checks its pixel limit with this
/// before spending memory on the image. Errors say what is wrong with the header.
pub fn image_dimensions(bytes: &[u8]) -> std::result::Result<(usize, usize), String> {
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]) as usize;
    match ImageFormat::detect(bytes) {
        Some(ImageFormat::Png) => {
            // Signature (8), IHDR length (4) and type (4), then width and height (4 each).
            match bytes.get(12..24) {
                Some(h) if &h[..4] == b"IHDR" => {
                    let w = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
                    let ht = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
                    Ok((w, ht))
                }
                _ => Err("PNG without its IHDR header (truncated or corrupt)".into()),
            }
        }
        Some(ImageFormat::Jpeg) => {
            // Segments after SOI: 0xFF, a marker, a big-endian length (that counts itself).
            let mut at = 2;
            while let Some(seg) = bytes.get(at..at + 4) {
                if seg[0] != 0xFF {
                    return Err(format!("JPEG: no marker at byte {at} (corrupt header)"));
                }
                let marker = seg[1];
                // Fill bytes before a marker.
                if marker == 0xFF {
                    at += 1;
                    continue;
                }
                let len = be16(&seg[2..4]);
                // SOF0–SOF15 but DHT (C4), JPG (C8) and DAC (CC): precision, height, width.
                if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
                    return match bytes.get(at + 5..at + 9) {
                        Some(f) => Ok((be16(&f[2..4]), be16(&f[0..2]))),
                        None => Err("JPEG frame header cut short".into()),
                    };
                }
                if marker == 0xDA || marker == 0xD9 {
                    break;
                }
                at += 2 + len;
            }
            Err("JPEG without a frame header before its data (truncated or corrupt)".into())
        }
        None => Err(unknown_format_message(bytes)),
    }
}

/// Decodes an in-memory PNG or JPEG; `name_for_errors` is only used in error messages.
pub fn load_image_bytes(bytes: &[u8], name_for_errors: &Path) -> Result<RgbImage> {
    let path = name_for_errors;
    let err = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    if bytes.is_empty() {
        return Err(err("empty file (0 bytes)".into()));
    }
    let format = ImageFormat::detect(bytes).ok_or_else(|| err(unknown_format_message(bytes)))?;
    // Last line of defence: neither decoder should panic on bad input, but if one does, the
    // caller gets an error naming the file rather than an unwinding panic.
    let decoded = catch_unwind(AssertUnwindSafe(|| match format {
        ImageFormat::Png => decode_png(bytes),
        ImageFormat::Jpeg => decode_jpeg(bytes),
    }));
    match decoded {
        Ok(Ok(img)) => Ok(img),
        Ok(Err(msg)) => Err(err(msg)),
        Err(panic) => {
            let what = crate::util::panic_message(&*panic);
            let kind = match format {
                ImageFormat::Png => "PNG",
                ImageFormat::Jpeg => "JPEG",
            };
            Err(err(format!(
                "{kind} decoder crashed on this file (corrupt data?): {what}"
            )))
        }
    }
}

/// A helpful message for files that are neither PNG nor JPEG: name the format when it is a
/// common one, otherwise show the first bytes.
fn unknown_format_message(bytes: &[u8]) -> String {
    let known: &[(&[u8], &str)] = &[
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"BM", "BMP"),
        (b"II*\0", "TIFF"),
        (b"MM\0*", "TIFF"),
        (b"\0\0\x01\0", "ICO"),
        (b"8BPS", "PSD"),
        (b"%PDF", "PDF"),
    ];
    for (magic, name) in known {
        if bytes.starts_with(magic) {
            return format!("{name} images are not supported (only PNG and JPEG)");
        }
    }
    if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return "WebP images are not supported (only PNG and JPEG)".into();
    }
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return "HEIF/AVIF images are not supported (only PNG and JPEG)".into();
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return "truncated JPEG (file ends inside its first marker)".into();
    }
    if b"\x89PNG\r\n\x1a\n".starts_with(&bytes[..bytes.len().min(8)]) {
        return "truncated PNG (file ends inside its signature)".into();
    }
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!(
        "not a PNG or JPEG file (no PNG/JPEG signature; {} bytes, starting {})",
        bytes.len(),
        head.join(" ")
    )
}

pub(crate) fn check_size(width: usize, height: usize) -> std::result::Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("image has a zero side ({width}x{height})"));
    }
    if width > MAX_SIDE || height > MAX_SIDE || width * height > MAX_PIXELS {
        return Err(format!(
            "image is {width}x{height} pixels, over the limit of {MAX_SIDE} px a side and \
             {MAX_PIXELS} pixels"
        ));
    }
    Ok(())
}

/// The error for an image whose decoding would need `need` bytes, over [`MAX_DECODE_BYTES`];
/// `kind` names its format ("progressive JPEG, 3 components").
pub(crate) fn over_budget(width: usize, height: usize, kind: &str, need: usize) -> String {
    format!(
        "{width}x{height} {kind} needs {} to decode, over the limit of {}; scale it down first",
        fmt_bytes(need),
        fmt_bytes(MAX_DECODE_BYTES)
    )
}

fn fmt_bytes(n: usize) -> String {
    format!("{:.2} GiB ({n} bytes)", n as f64 / (1u64 << 30) as f64)
}

// ---------------------------------------------------------------------------------------------
// PNG

fn decode_png(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    use png::{BitDepth, ColorType, InterlaceInfo, Transformations};

    // Chunk buffers (text, ICC profiles) count against this; the image itself is converted row
    // by row into our own buffer and never held in the file's sample format.
    let limits = png::Limits {
        bytes: PNG_CHUNK_BYTES,
    };
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), limits);
    // Raw samples: every conversion to RGB is done below, the way Pillow does it.
    decoder.set_transformations(Transformations::IDENTITY);
    let bad = |e: png::DecodingError| png_error_message(&e);
    let (width, height) = {
        let info = decoder.read_header_info().map_err(bad)?;
        (info.width as usize, info.height as usize)
    };
    check_size(width, height)?;
    let mut reader = decoder.read_info().map_err(bad)?;
    let (color, depth) = reader.output_color_type();
    if color == ColorType::Grayscale && depth == BitDepth::Sixteen {
        return Err(
            "16-bit greyscale PNG is not supported: Pillow's convert(\"RGB\") clips \
                    such images at 255 (mostly white), so convert the file to 8-bit first"
                .into(),
        );
    }
    let line = reader
        .output_line_size(width as u32)
        .ok_or_else(|| "PNG image too large for this platform".to_string())?;
    let need = png_decode_bytes(width, height, line);
    if need > MAX_DECODE_BYTES {
        let kind = format!("{}-bit {color:?} PNG", depth as u8);
        return Err(over_budget(width, height, &kind, need));
    }
    let palette = reader.info().palette.as_ref().map(|p| p.to_vec());
    let convert = RowConverter {
        color,
        bits: depth as usize, // BitDepth's discriminant is the bit count
        palette: palette.as_deref(),
    };
    let mut out = vec![0u8; width * height * 3];
    if reader.info().interlaced {
        // Each Adam7 pass row is converted to RGB, then spread over the image. A pass row of
        // sub-byte samples may end in padding bits that read as extra pixels; the spreading
        // takes only as many pixels as the pass row has.
        let mut rgb = vec![0u8; (width + 8) * 3];
        while let Some(row) = reader.next_interlaced_row().map_err(bad)? {
            let InterlaceInfo::Adam7(pass) = *row.interlace() else {
                return Err("corrupt PNG: interlaced image yields a non-interlaced row".into());
            };
            let n = (row.data().len() * 8 / (convert.bits * convert.samples())).min(width + 8);
            convert.row(row.data(), &mut rgb[..n * 3])?;
            png::expand_interlaced_row(&mut out, width * 3, &rgb[..n * 3], &pass, 24);
        }
    } else {
        // Row by row, stopping after the last one: Pillow accepts a file whose image data is
        // complete even if what follows it (IDAT checksum, IEND) is cut off, and so do we.
        // `next_frame` would insist on reading up to the next chunk.
        for dst in out.chunks_exact_mut(width * 3) {
            let row = reader
                .next_row()
                .map_err(bad)?
                .ok_or_else(|| "truncated PNG (image data ends early)".to_string())?;
            convert.row(row.data(), dst)?;
        }
    }
    Ok(RgbImage {
        width,
        height,
        data: out,
    })
}

/// Bytes the PNG decoder may allocate besides the image: ancillary chunks it keeps (text, ICC
/// profile), its limit.
const PNG_CHUNK_BYTES: usize = 16 << 20;

/// Peak bytes [`decode_png`] allocates for a `width x height` image whose raw rows are `line`
/// bytes: the RGB result, the chunk allowance, and the decoder's row buffers (the inflated data
/// stream it keeps grows to a few rows, at least 128 KiB; see `tests/decode_memory.rs`, which
/// measures it) plus the converted pass row of interlaced files and the inflater's state.
fn png_decode_bytes(width: usize, height: usize, line: usize) -> usize {
    let rgb = width * height * 3;
    let rows = 16 * (line + 1) + (width + 8) * 3;
    rgb + PNG_CHUNK_BYTES + rows + (1 << 20)
}

/// Converts raw PNG rows (any colour type and depth but 16-bit grey) to 8-bit RGB.
struct RowConverter<'a> {
    color: png::ColorType,
    bits: usize,
    palette: Option<&'a [u8]>,
}

impl RowConverter<'_> {
    fn samples(&self) -> usize {
        self.color.samples()
    }

    /// Converts the first `dst.len() / 3` pixels of `row`.
    fn row(&self, row: &[u8], dst: &mut [u8]) -> std::result::Result<(), String> {
        use png::ColorType;
        let (bits, width) = (self.bits, dst.len() / 3);
        if row.len() * 8 < width * bits * self.samples() {
            return Err("corrupt PNG: row shorter than the image width".into());
        }
        match self.color {
            ColorType::Grayscale => {
                // 1/2/4/8-bit: scale to 0..255 exactly (Pillow's "L;2" unpacker multiplies by
                // 0x55, "L;4" by 0x11, mode "1" maps 1 to 255).
                let scale = (255 / ((1u32 << bits) - 1)) as u8;
                for (x, px) in dst.chunks_exact_mut(3).enumerate() {
                    px.fill(unpack(row, x, bits) * scale);
                }
            }
            ColorType::GrayscaleAlpha => {
                // 8-bit: [L, A]; 16-bit: [L_hi, L_lo, A_hi, A_lo]. Keep the grey high byte.
                let step = if bits == 16 { 4 } else { 2 };
                for (x, px) in dst.chunks_exact_mut(3).enumerate() {
                    px.fill(row[x * step]);
                }
            }
            ColorType::Rgb | ColorType::Rgba => {
                let bytes_per_sample = bits / 8;
                let step = self.samples() * bytes_per_sample;
                for (x, px) in dst.chunks_exact_mut(3).enumerate() {
                    for (c, v) in px.iter_mut().enumerate() {
                        // Big-endian 16-bit: the first byte is the high byte Pillow keeps.
                        *v = row[x * step + c * bytes_per_sample];
                    }
                }
            }
            ColorType::Indexed => {
                let pal = self
                    .palette
                    .ok_or_else(|| "palette PNG without a PLTE chunk".to_string())?;
                for (x, px) in dst.chunks_exact_mut(3).enumerate() {
                    let i = unpack(row, x, bits) as usize;
                    // Pillow's palette has 256 entries; those the file does not define are black.
                    if i * 3 + 2 < pal.len() {
                        px.copy_from_slice(&pal[i * 3..i * 3 + 3]);
                    } else {
                        px.fill(0);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Sample `x` of a row packed at `bits` (1, 2, 4 or 8) bits per sample, most significant first.
#[inline]
fn unpack(row: &[u8], x: usize, bits: usize) -> u8 {
    match bits {
        8 => row[x],
        _ => {
            let per_byte = 8 / bits;
            let byte = row[x / per_byte];
            let shift = 8 - bits * (x % per_byte + 1);
            (byte >> shift) & ((1u8 << bits) - 1)
        }
    }
}

fn png_error_message(e: &png::DecodingError) -> String {
    match e {
        png::DecodingError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "truncated PNG (file ends before the image data is complete)".into()
        }
        png::DecodingError::IoError(io) => format!("PNG read error: {io}"),
        png::DecodingError::Format(f) => format!("corrupt PNG: {f}"),
        png::DecodingError::Parameter(p) => format!("PNG decoding failed: {p}"),
        png::DecodingError::LimitsExceeded => "PNG exceeds the decoder's memory limit".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// JPEG

fn decode_jpeg(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let img = match super::jpeg::decode(bytes) {
        Ok(img) => img,
        // Lossless JPEG has no IDCT or subsampling to get wrong, so any correct decoder matches
        // libjpeg-turbo: hand it to jpeg-decoder.
        Err(e) if e == super::jpeg::LOSSLESS => return decode_jpeg_lossless(bytes),
        Err(e) => return Err(e),
    };
    Ok(RgbImage {
        width: img.width,
        height: img.height,
        data: img.data,
    })
}

/// Lossless (SOF3) JPEG through `jpeg-decoder`.
fn decode_jpeg_lossless(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    use jpeg_decoder::{Decoder, PixelFormat};

    let mut decoder = Decoder::new(Cursor::new(bytes));
    decoder.read_info().map_err(|e| jpeg_error_message(&e))?;
    let info = decoder
        .info()
        .ok_or_else(|| "JPEG has no frame header".to_string())?;
    let (width, height) = (info.width as usize, info.height as usize);
    check_size(width, height)?;
    if !matches!(info.pixel_format, PixelFormat::L8 | PixelFormat::RGB24) {
        return Err("lossless JPEG with more than 8 bits or 4 components is not supported".into());
    }
    // jpeg-decoder holds a scan's differences (4 bytes a sample) and predicted values (2) at
    // once; interleaving and packing to 8 bits, and our widening to RGB, take less.
    let channels = info.pixel_format.pixel_bytes();
    let need = width * height * 6 * channels + (1 << 20);
    if need > MAX_DECODE_BYTES {
        let kind = format!("lossless JPEG ({channels} components)");
        return Err(over_budget(width, height, &kind, need));
    }
    // jpeg-decoder pads missing entropy data instead of failing; Pillow (libjpeg) reports such
    // files as truncated.
    if !jpeg_reaches_eoi(bytes) {
        return Err(
            "truncated JPEG (no end-of-image marker after the last scan; file cut short?)".into(),
        );
    }
    let pixels = decoder.decode().map_err(|e| jpeg_error_message(&e))?;
    let data: Vec<u8> = match info.pixel_format {
        PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        _ => pixels,
    };
    if data.len() != width * height * 3 {
        return Err("JPEG decoder returned a wrong-sized buffer".into());
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

fn jpeg_error_message(e: &jpeg_decoder::Error) -> String {
    match e {
        jpeg_decoder::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "truncated JPEG (file ends inside a header)".into()
        }
        jpeg_decoder::Error::Unsupported(u) => format!("unsupported JPEG: {u:?}"),
        other => format!("corrupt JPEG: {other}"),
    }
}

/// Walks the JPEG marker structure from SOI and reports whether an EOI marker is reached with
/// every segment complete. Entropy-coded data after each SOS is skipped the standard way: a 0xFF
/// followed by 0x00 (stuffing), by 0xD0..=0xD7 (restart markers) or by another 0xFF (fill) is
/// part of the scan; any other 0xFF xx ends it.
fn jpeg_reaches_eoi(b: &[u8]) -> bool {
    let n = b.len();
    let mut i = 2; // after SOI
    while i < n {
        if b[i] != 0xFF {
            // Garbage between segments: libjpeg skips it (with a warning); so do we.
            i += 1;
            continue;
        }
        while i < n && b[i] == 0xFF {
            i += 1; // fill bytes before a marker
        }
        if i >= n {
            return false;
        }
        let marker = b[i];
        i += 1;
        match marker {
            0xD9 => return true,
            0x00 | 0x01 | 0xD0..=0xD8 => continue, // no length field
            _ => {
                if i + 2 > n {
                    return false;
                }
                let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
                if len < 2 || i + len > n {
                    return false;
                }
                i += len;
                if marker == 0xDA {
                    // Skip the scan's entropy-coded data up to the next real marker.
                    while i < n {
                        if b[i] == 0xFF && i + 1 < n {
                            match b[i + 1] {
                                0x00 | 0xD0..=0xD7 => i += 2,
                                0xFF => i += 1,
                                _ => break,
                            }
                        } else {
                            i += 1;
                        }
                    }
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_packed_samples() {
        let row = [0b1011_0010u8, 0xF0];
        assert_eq!(
            (0..8).map(|x| unpack(&row, x, 1)).collect::<Vec<_>>(),
            [1, 0, 1, 1, 0, 0, 1, 0]
        );
        assert_eq!(
            (0..4).map(|x| unpack(&row, x, 2)).collect::<Vec<_>>(),
            [2, 3, 0, 2]
        );
        assert_eq!(
            (0..4).map(|x| unpack(&row, x, 4)).collect::<Vec<_>>(),
            [11, 2, 15, 0]
        );
    }

    #[test]
    fn eoi_walk() {
        // SOI, APP0 (len 4), SOS (len 3) + scan data with stuffing and RST, EOI.
        let ok = [
            0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 1, 2, 0xFF, 0xDA, 0, 3, 9, 0x12, 0xFF, 0x00, 0x34, 0xFF,
            0xD0, 0x56, 0xFF, 0xD9,
        ];
        assert!(jpeg_reaches_eoi(&ok));
        for cut in 2..ok.len() {
            assert!(!jpeg_reaches_eoi(&ok[..cut]), "cut at {cut}");
        }
    }
}

#[cfg(test)]
mod dimension_tests {
    use super::*;

    #[test]
    fn dimensions_come_from_the_header_alone() {
        let png = include_bytes!("../../assets/demo/image.png");
        let img = load_image_bytes(png, Path::new("demo.png")).unwrap();
        assert_eq!(image_dimensions(png), Ok((img.width, img.height)));
        // Only the signature and IHDR: enough for the size, far too little to decode.
        assert_eq!(image_dimensions(&png[..24]), Ok((img.width, img.height)));
        assert!(image_dimensions(&png[..20]).is_err());
        let jpeg = include_bytes!("../../tests/fixtures/clip336/image.jpg");
        let img = load_image_bytes(jpeg, Path::new("x.jpg")).unwrap();
        assert_eq!(image_dimensions(jpeg), Ok((img.width, img.height)));
        assert!(image_dimensions(&jpeg[..40]).is_err());
        assert!(image_dimensions(b"GIF89a").is_err());
        // Fill bytes between segments, as the standard allows.
        let mut padded = vec![0xFF, 0xD8, 0xFF, 0xFF, 0xC2, 0x00, 0x0B, 0x08, 0x00, 0x10];
        padded.extend_from_slice(&[0x00, 0x20, 0x01, 0x01, 0x11, 0x00]);
        assert_eq!(image_dimensions(&padded), Ok((32, 16)));
    }
}
