//! A JPEG decoder that reproduces libjpeg-turbo's default decompression bit for bit, because
//! Pillow (and so the transformers reference pipeline) decodes JPEGs with libjpeg-turbo.
//!
//! Why not `jpeg-decoder`: its IDCT (stb_image's), chroma upsampling and YCbCr conversion round
//! differently; on real photos 5-13% of the decoded values differ from Pillow's by 1-4 levels,
//! and ~10% of the CLIP-resized values still differ afterwards. That is far above the resize
//! parity bar, so the decoding steps that shape the pixels are ported from libjpeg-turbo 3.2
//! (the version bundled with Pillow 13.0 wheels), with its defaults as Pillow uses them
//! (`dct_method = JDCT_ISLOW`, `do_fancy_upsampling = TRUE`, no scaling):
//! - `jidctint.c` `jpeg_idct_islow`: 13-bit fixed-point constants, `PASS1_BITS = 2`, and the
//!   output range limiting through the `RANGE_MASK` table (`jdmaster.c`).
//! - `jdsample.c`: "fancy" triangle-filter upsampling for h2v1, h1v2 and h2v2 chroma (with its
//!   alternating rounding biases), replication for other integer ratios and for components at
//!   most 2 samples wide; the first/last real sample row is duplicated as context (`jdmainct.c`).
//! - `jdcolor.c`: YCbCr->RGB through the same 16-bit fixed-point tables.
//! - `jdapimin.c`: the colour-space guess (JFIF -> YCbCr, Adobe transform, component ids).
//! - `jdhuff.c` / `jdphuff.c`: baseline/extended sequential and progressive Huffman decoding,
//!   including the standard tables substituted for missing ones in sequential files (Motion-JPEG)
//!   and how corrupt data degrades (zeros after an unexpected marker, the natural-order guard
//!   entries), so damaged files fail soft the way libjpeg does.
//!
//! Only the pixel arithmetic has to match; the structure is simpler than libjpeg's streaming one:
//! all scans' coefficients are gathered first, then each component is inverse-transformed into
//! a full plane, upsampled and colour-converted (same numbers, more memory: about 2 bytes per
//! sample of coefficients).
//!
//! Not reproduced: block smoothing of progressive files whose scans leave some of the first AC
//! coefficients unrefined (libjpeg smooths those; files from normal encoders refine fully),
//! arithmetic coding, 12/16-bit and lossless JPEG (the caller routes lossless files to
//! `jpeg-decoder`, which is exact for them), CMYK/YCCK.

use super::decode::check_size;

/// Decoded JPEG: `channels` is 1 (greyscale) or 3 (RGB), rows interleaved.
pub(crate) struct JpegImage {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

type Res<T> = std::result::Result<T, String>;

/// Zigzag index -> natural (row-major) index, with libjpeg's 16 guard entries so that corrupt
/// run lengths past 63 land on coefficient 63 instead of outside the block.
const NATURAL_ORDER: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
    63, 63, 63, 63, 63, 63,
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Frame {
    Sequential,
    Progressive,
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Quantization table latched at the first scan using this component (libjpeg semantics:
    /// a later DQT does not affect already-started components). Stored as libjpeg-turbo's
    /// 16-bit `ISLOW_MULT_TYPE`.
    quant: Option<[i16; 64]>,
    /// Blocks actually covering the component (`ceil(ceil(W * h / hmax) / 8)`): the extent of a
    /// non-interleaved scan.
    width_in_blocks: usize,
    height_in_blocks: usize,
    /// Storage extent, padded to whole MCUs (the extent of an interleaved scan).
    bw: usize,
    bh: usize,
    /// `bw * bh` blocks of 64 coefficients, natural order.
    coefs: Vec<i16>,
}

#[derive(Clone)]
struct Huffman {
    /// For code length l (1..=16): largest code of that length, or -1 (libjpeg's `maxcode`).
    maxcode: [i32; 18],
    /// `huffval` index offset per length (libjpeg's `valoffset`).
    valoffset: [i32; 17],
    huffval: Vec<u8>,
    /// 8-bit lookahead: (length, symbol) or length 0 when the code is longer.
    look: Vec<(u8, u8)>,
}

impl Huffman {
    /// libjpeg's `jpeg_make_d_derived_tbl`, with its validity checks.
    fn new(counts: &[u8; 16], values: &[u8], is_dc: bool) -> Res<Self> {
        let mut huffsize = Vec::with_capacity(256);
        for (l, &n) in counts.iter().enumerate() {
            for _ in 0..n {
                huffsize.push(l as u8 + 1);
            }
        }
        if huffsize.len() > 256 || huffsize.len() > values.len() {
            return Err("corrupt JPEG: bad Huffman table".into());
        }
        let mut huffcode = Vec::with_capacity(huffsize.len());
        let mut code: u32 = 0;
        let mut si = 1u8;
        let mut p = 0;
        while p < huffsize.len() {
            while p < huffsize.len() && huffsize[p] == si {
                huffcode.push(code);
                code += 1;
                p += 1;
            }
            if code >= 1u32 << si {
                return Err("corrupt JPEG: bad Huffman table".into());
            }
            code <<= 1;
            si += 1;
        }
        let mut maxcode = [-1i32; 18];
        let mut valoffset = [0i32; 17];
        let mut p = 0usize;
        for l in 1..=16 {
            let n = counts[l - 1] as usize;
            if n > 0 {
                valoffset[l] = p as i32 - huffcode[p] as i32;
                p += n;
                maxcode[l] = huffcode[p - 1] as i32;
            }
        }
        maxcode[17] = i32::MAX; // sentinel: ends the slow decode loop
        let huffval = values[..huffsize.len()].to_vec();
        if is_dc && huffval.iter().any(|&v| v > 15) {
            return Err("corrupt JPEG: bad DC Huffman table".into());
        }
        let mut look = vec![(0u8, 0u8); 256];
        for (i, (&len, &c)) in huffsize.iter().zip(&huffcode).enumerate() {
            if len <= 8 {
                let shift = 8 - len;
                let base = (c as usize) << shift;
                for entry in look.iter_mut().skip(base).take(1 << shift) {
                    *entry = (len, huffval[i]);
                }
            }
        }
        Ok(Huffman {
            maxcode,
            valoffset,
            huffval,
            look,
        })
    }
}

/// Entropy-coded segment reader with libjpeg's marker semantics: `FF 00` is a stuffed `FF`,
/// `FF FF ...` are fill bytes, any other `FF xx` is a marker, after which only zero bits are
/// delivered (libjpeg warns "premature end of data segment" and does the same).
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    nbits: u32,
    /// Offset of the `FF` of a marker met inside entropy data.
    marker_at: Option<usize>,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            acc: 0,
            nbits: 0,
            marker_at: None,
        }
    }

    fn fill(&mut self) {
        while self.nbits <= 56 {
            let mut byte = 0u8;
            if self.marker_at.is_none() {
                if self.pos >= self.data.len() {
                    self.marker_at = Some(self.data.len());
                } else {
                    let b = self.data[self.pos];
                    if b != 0xFF {
                        byte = b;
                        self.pos += 1;
                    } else {
                        let mut q = self.pos + 1;
                        while q < self.data.len() && self.data[q] == 0xFF {
                            q += 1;
                        }
                        if q < self.data.len() && self.data[q] == 0x00 {
                            byte = 0xFF;
                            self.pos = q + 1;
                        } else {
                            self.marker_at = Some(q - 1);
                        }
                    }
                }
            }
            self.acc |= (byte as u64) << (56 - self.nbits);
            self.nbits += 8;
        }
    }

    #[inline]
    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        if self.nbits < n {
            self.fill();
        }
        let v = (self.acc >> (64 - n)) as u32;
        self.acc <<= n;
        self.nbits -= n;
        v
    }

    #[inline]
    fn bit(&mut self) -> u32 {
        self.bits(1)
    }

    /// One Huffman symbol. An invalid code (longer than 16 bits) yields symbol 0, as libjpeg
    /// does after warning `JWRN_HUFF_BAD_CODE`.
    fn decode(&mut self, t: &Huffman) -> u8 {
        if self.nbits < 16 {
            self.fill();
        }
        let (len, sym) = t.look[(self.acc >> 56) as usize];
        if len > 0 {
            self.acc <<= len;
            self.nbits -= len as u32;
            return sym;
        }
        let mut code = self.bits(1) as i32;
        let mut l = 1usize;
        while code > t.maxcode[l] {
            code = (code << 1) | self.bits(1) as i32;
            l += 1;
            if l > 16 {
                return 0;
            }
        }
        let idx = t.valoffset[l] + code;
        t.huffval.get(idx as usize).copied().unwrap_or(0)
    }

    /// Byte offset where parsing of markers should resume after this scan.
    fn resume_pos(&self) -> usize {
        self.marker_at.unwrap_or(self.pos)
    }
}

/// JPEG's sign extension of an `s`-bit magnitude category value (`HUFF_EXTEND`).
#[inline]
fn extend(v: u32, s: u32) -> i32 {
    if s == 0 {
        0
    } else if v < (1 << (s - 1)) {
        v as i32 - (1 << s) + 1
    } else {
        v as i32
    }
}

fn be16(b: &[u8], i: usize) -> Res<usize> {
    if i + 2 > b.len() {
        return Err("truncated JPEG (file ends inside a marker segment)".into());
    }
    Ok(u16::from_be_bytes([b[i], b[i + 1]]) as usize)
}

/// Scan parameters for one SOS.
struct Scan {
    comps: Vec<usize>,
    td: Vec<usize>,
    ta: Vec<usize>,
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}

struct Decoder<'a> {
    data: &'a [u8],
    frame: Option<Frame>,
    width: usize,
    height: usize,
    comps: Vec<Component>,
    hmax: usize,
    vmax: usize,
    mcus_x: usize,
    mcus_y: usize,
    qt: [Option<[u16; 64]>; 4],
    dc_tables: [Option<Huffman>; 4],
    ac_tables: [Option<Huffman>; 4],
    restart_interval: usize,
    saw_jfif: bool,
    adobe_transform: Option<u8>,
    eob_run: u32,
}

/// What [`decode`] found when the file is lossless JPEG (SOF3), which the caller hands to
/// `jpeg-decoder` instead.
pub(crate) const LOSSLESS: &str = "lossless JPEG";

/// Decodes a JPEG the way libjpeg-turbo 3.2 does with Pillow's settings.
pub(crate) fn decode(data: &[u8]) -> Res<JpegImage> {
    let mut d = Decoder {
        data,
        frame: None,
        width: 0,
        height: 0,
        comps: Vec::new(),
        hmax: 1,
        vmax: 1,
        mcus_x: 0,
        mcus_y: 0,
        qt: [None; 4],
        dc_tables: [None, None, None, None],
        ac_tables: [None, None, None, None],
        restart_interval: 0,
        saw_jfif: false,
        adobe_transform: None,
        eob_run: 0,
    };
    d.run()?;
    d.output()
}

impl<'a> Decoder<'a> {
    /// Marker loop from SOI to EOI.
    fn run(&mut self) -> Res<()> {
        let b = self.data;
        if b.len() < 2 || b[0] != 0xFF || b[1] != 0xD8 {
            return Err("not a JPEG file (no SOI marker)".into());
        }
        let mut i = 2;
        let mut saw_scan = false;
        loop {
            // next_marker: skip garbage up to an FF, then fill FFs.
            while i < b.len() && b[i] != 0xFF {
                i += 1;
            }
            while i < b.len() && b[i] == 0xFF {
                i += 1;
            }
            if i >= b.len() {
                return Err("truncated JPEG (no end-of-image marker; file cut short?)".into());
            }
            let marker = b[i];
            i += 1;
            match marker {
                0xD9 => {
                    if !saw_scan {
                        return Err("corrupt JPEG: end of image before any scan".into());
                    }
                    return Ok(());
                }
                0x00 | 0x01 | 0xD0..=0xD8 => continue, // no length (stray RST, TEM, SOI)
                _ => {}
            }
            let len = be16(b, i)?;
            if len < 2 || i + len > b.len() {
                return Err("truncated JPEG (file ends inside a marker segment)".into());
            }
            let seg = &b[i + 2..i + len];
            i += len;
            match marker {
                0xC0..=0xC2 => self.sof(seg, marker == 0xC2)?,
                0xC3 => return Err(LOSSLESS.into()),
                0xC5..=0xC7 | 0xCD..=0xCF => {
                    return Err("hierarchical JPEG is not supported".into())
                }
                0xC9..=0xCB => return Err("arithmetic-coded JPEG is not supported".into()),
                0xC4 => self.dht(seg)?,
                0xCC => return Err("arithmetic-coded JPEG is not supported".into()),
                0xDB => self.dqt(seg)?,
                0xDD => {
                    if seg.len() < 2 {
                        return Err("corrupt JPEG: bad DRI segment".into());
                    }
                    self.restart_interval = u16::from_be_bytes([seg[0], seg[1]]) as usize;
                }
                0xDA => {
                    if !saw_scan && self.frame == Some(Frame::Sequential) {
                        self.default_huffman_tables()?;
                    }
                    let scan = self.sos(seg)?;
                    i = self.decode_scan(&scan, i)?;
                    saw_scan = true;
                }
                // JFIF: APP0 with at least 14 data bytes starting "JFIF\0" (jdmarker.c).
                0xE0 if seg.len() >= 14 && seg.starts_with(b"JFIF\0") => self.saw_jfif = true,
                0xEE if seg.len() >= 12 && seg.starts_with(b"Adobe") => {
                    self.adobe_transform = Some(seg[11])
                }
                0xDC => return Err("JPEG with a DNL marker is not supported".into()),
                _ => {} // APPn, COM, others: skipped
            }
        }
    }

    fn sof(&mut self, s: &[u8], progressive: bool) -> Res<()> {
        if self.frame.is_some() {
            return Err("corrupt JPEG: more than one frame header".into());
        }
        if s.len() < 6 {
            return Err("corrupt JPEG: short frame header".into());
        }
        if s[0] != 8 {
            return Err(format!(
                "{}-bit JPEG is not supported (only 8-bit samples)",
                s[0]
            ));
        }
        let height = u16::from_be_bytes([s[1], s[2]]) as usize;
        let width = u16::from_be_bytes([s[3], s[4]]) as usize;
        let n = s[5] as usize;
        if height == 0 {
            return Err("JPEG with height defined by a DNL marker is not supported".into());
        }
        check_size(width, height)?;
        if n != 1 && n != 3 {
            return Err(if n == 4 {
                "CMYK/YCCK JPEG is not supported (convert it to RGB first)".into()
            } else {
                format!("JPEG with {n} components is not supported")
            });
        }
        if s.len() < 6 + 3 * n {
            return Err("corrupt JPEG: short frame header".into());
        }
        let mut comps = Vec::with_capacity(n);
        for c in 0..n {
            let p = &s[6 + 3 * c..9 + 3 * c];
            let (h, v, tq) = ((p[1] >> 4) as usize, (p[1] & 15) as usize, p[2] as usize);
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) || tq > 3 {
                return Err("corrupt JPEG: bad sampling factors or table index".into());
            }
            comps.push(Component {
                id: p[0],
                h,
                v,
                tq,
                quant: None,
                width_in_blocks: 0,
                height_in_blocks: 0,
                bw: 0,
                bh: 0,
                coefs: Vec::new(),
            });
        }
        let hmax = comps.iter().map(|c| c.h).max().unwrap();
        let vmax = comps.iter().map(|c| c.v).max().unwrap();
        let mcus_x = width.div_ceil(8 * hmax);
        let mcus_y = height.div_ceil(8 * vmax);
        for c in &mut comps {
            c.width_in_blocks = (width * c.h).div_ceil(hmax * 8);
            c.height_in_blocks = (height * c.v).div_ceil(vmax * 8);
            c.bw = mcus_x * c.h;
            c.bh = mcus_y * c.v;
            c.coefs = vec![0i16; c.bw * c.bh * 64];
        }
        self.frame = Some(if progressive {
            Frame::Progressive
        } else {
            Frame::Sequential
        });
        (self.width, self.height, self.comps) = (width, height, comps);
        (self.hmax, self.vmax, self.mcus_x, self.mcus_y) = (hmax, vmax, mcus_x, mcus_y);
        Ok(())
    }

    /// jdhuff.c `jinit_huff_decoder` -> `std_huff_tables`: Motion-JPEG frames omit the standard
    /// Huffman tables, so sequential decoding fills table slots 0 and 1 that are still empty when
    /// decoding starts with the tables of JPEG Annex K.3 (progressive decoding does not).
    fn default_huffman_tables(&mut self) -> Res<()> {
        const DC_LUM: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
        const DC_CHROM: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
        const DC_VALS: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
        const AC_LUM: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d];
        const AC_LUM_VALS: [u8; 162] = [
            0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51,
            0x61, 0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1,
            0x15, 0x52, 0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18,
            0x19, 0x1a, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39,
            0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57,
            0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75,
            0x76, 0x77, 0x78, 0x79, 0x7a, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92,
            0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
            0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3,
            0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8,
            0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf1, 0xf2,
            0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
        ];
        const AC_CHROM: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
        const AC_CHROM_VALS: [u8; 162] = [
            0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07,
            0x61, 0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09,
            0x23, 0x33, 0x52, 0xf0, 0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25,
            0xf1, 0x17, 0x18, 0x19, 0x1a, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38,
            0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56,
            0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74,
            0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
            0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5,
            0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba,
            0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6,
            0xd7, 0xd8, 0xd9, 0xda, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf2,
            0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
        ];
        if self.dc_tables[0].is_none() {
            self.dc_tables[0] = Some(Huffman::new(&DC_LUM, &DC_VALS, true)?);
        }
        if self.ac_tables[0].is_none() {
            self.ac_tables[0] = Some(Huffman::new(&AC_LUM, &AC_LUM_VALS, false)?);
        }
        if self.dc_tables[1].is_none() {
            self.dc_tables[1] = Some(Huffman::new(&DC_CHROM, &DC_VALS, true)?);
        }
        if self.ac_tables[1].is_none() {
            self.ac_tables[1] = Some(Huffman::new(&AC_CHROM, &AC_CHROM_VALS, false)?);
        }
        Ok(())
    }

    fn dht(&mut self, mut s: &[u8]) -> Res<()> {
        while !s.is_empty() {
            if s.len() < 17 {
                return Err("corrupt JPEG: short Huffman table".into());
            }
            let (class, id) = (s[0] >> 4, (s[0] & 15) as usize);
            if class > 1 || id > 3 {
                return Err("corrupt JPEG: bad Huffman table id".into());
            }
            let counts: [u8; 16] = s[1..17].try_into().unwrap();
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            if total > 256 || s.len() < 17 + total {
                return Err("corrupt JPEG: bad Huffman table".into());
            }
            let t = Huffman::new(&counts, &s[17..17 + total], class == 0)?;
            if class == 0 {
                self.dc_tables[id] = Some(t);
            } else {
                self.ac_tables[id] = Some(t);
            }
            s = &s[17 + total..];
        }
        Ok(())
    }

    fn dqt(&mut self, mut s: &[u8]) -> Res<()> {
        while !s.is_empty() {
            let (prec, id) = (s[0] >> 4, (s[0] & 15) as usize);
            if id > 3 || prec > 1 {
                return Err("corrupt JPEG: bad quantization table".into());
            }
            let n = if prec == 0 { 64 } else { 128 };
            if s.len() < 1 + n {
                return Err("corrupt JPEG: short quantization table".into());
            }
            let mut t = [0u16; 64];
            for (k, &nat) in NATURAL_ORDER[..64].iter().enumerate() {
                t[nat] = if prec == 0 {
                    s[1 + k] as u16
                } else {
                    u16::from_be_bytes([s[1 + 2 * k], s[2 + 2 * k]])
                };
            }
            self.qt[id] = Some(t);
            s = &s[1 + n..];
        }
        Ok(())
    }

    fn sos(&mut self, s: &[u8]) -> Res<Scan> {
        let frame = self
            .frame
            .ok_or_else(|| "corrupt JPEG: scan before frame header".to_string())?;
        if s.is_empty() {
            return Err("corrupt JPEG: short scan header".into());
        }
        let n = s[0] as usize;
        if n == 0 || n > 4 || s.len() < 1 + 2 * n + 3 {
            return Err("corrupt JPEG: bad scan header".into());
        }
        let mut scan = Scan {
            comps: vec![],
            td: vec![],
            ta: vec![],
            ss: s[1 + 2 * n] as usize,
            se: s[2 + 2 * n] as usize,
            ah: (s[3 + 2 * n] >> 4) as u32,
            al: (s[3 + 2 * n] & 15) as u32,
        };
        for k in 0..n {
            let id = s[1 + 2 * k];
            let ci = self
                .comps
                .iter()
                .position(|c| c.id == id)
                .ok_or_else(|| "corrupt JPEG: scan names an unknown component".to_string())?;
            if scan.comps.contains(&ci) {
                return Err("corrupt JPEG: component repeated in a scan".into());
            }
            scan.comps.push(ci);
            scan.td.push((s[2 + 2 * k] >> 4) as usize);
            scan.ta.push((s[2 + 2 * k] & 15) as usize);
        }
        if n > 1 {
            let blocks: usize = scan
                .comps
                .iter()
                .map(|&c| self.comps[c].h * self.comps[c].v)
                .sum();
            if blocks > 10 {
                return Err("corrupt JPEG: too many blocks in an MCU".into());
            }
        }
        match frame {
            Frame::Sequential => {
                // libjpeg ignores Ss/Se/Ah/Al of sequential scans (only warns).
                (scan.ss, scan.se, scan.ah, scan.al) = (0, 63, 0, 0);
            }
            Frame::Progressive => {
                // jdphuff.c start_pass_phuff_decoder's validity checks.
                let bad = if scan.ss == 0 {
                    scan.se != 0
                } else {
                    scan.se < scan.ss || scan.se > 63 || n != 1
                };
                if bad || scan.al > 13 || (scan.ah != 0 && scan.al != scan.ah - 1) {
                    return Err("corrupt JPEG: bad progressive scan parameters".into());
                }
            }
        }
        // Tables must exist for what this scan will decode.
        for k in 0..n {
            let needs_dc = scan.ss == 0 && scan.ah == 0;
            let needs_ac = scan.se > 0;
            if (needs_dc && self.dc_tables.get(scan.td[k]).is_none_or(|t| t.is_none()))
                || (needs_ac && self.ac_tables.get(scan.ta[k]).is_none_or(|t| t.is_none()))
            {
                return Err("corrupt JPEG: scan uses an undefined Huffman table".into());
            }
            // Latch the quantization table on first use (jdinput.c latch_quant_tables).
            let c = &mut self.comps[scan.comps[k]];
            if c.quant.is_none() {
                let q = self.qt[c.tq]
                    .ok_or_else(|| "corrupt JPEG: missing quantization table".to_string())?;
                c.quant = Some(q.map(|v| v as i16));
            }
        }
        Ok(scan)
    }

    /// Decodes one scan's entropy-coded data starting at `start`; returns where marker parsing
    /// resumes.
    fn decode_scan(&mut self, scan: &Scan, start: usize) -> Res<usize> {
        let frame = self.frame.unwrap();
        let mut br = BitReader::new(self.data, start);
        let mut dc_pred = [0i32; 4];
        self.eob_run = 0;

        // MCU geometry: a single-component scan walks that component's own blocks.
        let single = scan.comps.len() == 1;
        let (mcus_x, mcus_y) = if single {
            let c = &self.comps[scan.comps[0]];
            (c.width_in_blocks, c.height_in_blocks)
        } else {
            (self.mcus_x, self.mcus_y)
        };
        let total = mcus_x * mcus_y;
        let mut restarts_to_go = self.restart_interval;
        for mcu in 0..total {
            if self.restart_interval > 0 {
                if restarts_to_go == 0 {
                    self.process_restart(&mut br);
                    dc_pred = [0; 4];
                    self.eob_run = 0;
                    restarts_to_go = self.restart_interval;
                }
                restarts_to_go -= 1;
            }
            let (mx, my) = (mcu % mcus_x, mcu / mcus_x);
            for (k, &ci) in scan.comps.iter().enumerate() {
                let (h, v) = if single {
                    (1, 1)
                } else {
                    (self.comps[ci].h, self.comps[ci].v)
                };
                for by in 0..v {
                    for bx in 0..h {
                        let (x, y) = (mx * h + bx, my * v + by);
                        let bw = self.comps[ci].bw;
                        let off = (y * bw + x) * 64;
                        // The tables a scan needs were checked in `sos`; others (e.g. the DC
                        // table of a refinement scan) may be absent or out of range.
                        let missing = || "corrupt JPEG: undefined Huffman table".to_string();
                        let dc = self.dc_tables.get(scan.td[k]).and_then(Option::as_ref);
                        let ac = self.ac_tables.get(scan.ta[k]).and_then(Option::as_ref);
                        let block: &mut [i16; 64] = (&mut self.comps[ci].coefs[off..off + 64])
                            .try_into()
                            .unwrap();
                        match frame {
                            Frame::Sequential => decode_block_sequential(
                                &mut br,
                                dc.ok_or_else(missing)?,
                                ac.ok_or_else(missing)?,
                                &mut dc_pred[k],
                                block,
                            ),
                            Frame::Progressive => {
                                if scan.ss == 0 {
                                    if scan.ah == 0 {
                                        let v = decode_dc_diff(&mut br, dc.ok_or_else(missing)?);
                                        dc_pred[k] = dc_pred[k].wrapping_add(v);
                                        block[0] = (dc_pred[k] << scan.al) as i16;
                                    } else if br.bit() != 0 {
                                        block[0] |= (1i32 << scan.al) as i16;
                                    }
                                } else if scan.ah == 0 {
                                    self.eob_run = decode_ac_first(
                                        &mut br,
                                        ac.ok_or_else(missing)?,
                                        scan,
                                        self.eob_run,
                                        block,
                                    );
                                } else {
                                    self.eob_run = decode_ac_refine(
                                        &mut br,
                                        ac.ok_or_else(missing)?,
                                        scan,
                                        self.eob_run,
                                        block,
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(br.resume_pos())
    }

    /// jdhuff.c `process_restart`: drop buffered bits, consume the RSTn marker (skipping any
    /// garbage before it), and start delivering real data again.
    fn process_restart(&self, br: &mut BitReader) {
        let b = self.data;
        let mut i = br.resume_pos();
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        let mut j = i;
        while j < b.len() && b[j] == 0xFF {
            j += 1;
        }
        br.acc = 0;
        br.nbits = 0;
        if j < b.len() && (0xD0..=0xD7).contains(&b[j]) {
            br.pos = j + 1;
            br.marker_at = None;
        } else {
            // Not a restart marker: leave it for the marker parser, keep feeding zeros.
            br.pos = i;
            br.marker_at = Some(i.min(b.len()));
        }
    }

    /// IDCT, upsampling and colour conversion of the coefficients gathered from all scans.
    fn output(mut self) -> Res<JpegImage> {
        let (w, h) = (self.width, self.height);
        if self.frame.is_none() {
            return Err("corrupt JPEG: no frame header".into());
        }
        let n = self.comps.len();
        let mut planes = Vec::with_capacity(n);
        for c in &mut self.comps {
            // A component no scan mentioned has all-zero coefficients (libjpeg pre-zeroes).
            let quant = c
                .quant
                .or_else(|| self.qt[c.tq].map(|q| q.map(|v| v as i16)));
            let quant =
                quant.ok_or_else(|| "corrupt JPEG: missing quantization table".to_string())?;
            let pw = c.bw * 8;
            let mut plane = vec![0u8; pw * c.bh * 8];
            for by in 0..c.bh {
                for bx in 0..c.bw {
                    let off = (by * c.bw + bx) * 64;
                    let block: &[i16; 64] = c.coefs[off..off + 64].try_into().unwrap();
                    idct_islow(block, &quant, &mut plane[by * 8 * pw + bx * 8..], pw);
                }
            }
            c.coefs = Vec::new(); // free as we go: the coefficients are the largest buffers
            let dw = (w * c.h).div_ceil(self.hmax);
            let dh = (h * c.v).div_ceil(self.vmax);
            planes.push(upsample(
                &plane, pw, dw, dh, c.h, c.v, self.hmax, self.vmax, w, h,
            )?);
        }
        if n == 1 {
            return Ok(JpegImage {
                width: w,
                height: h,
                channels: 1,
                data: planes.pop().unwrap(),
            });
        }
        // jdapimin.c default_decompress_parms: which 3-component files are RGB.
        let ids = (self.comps[0].id, self.comps[1].id, self.comps[2].id);
        let is_rgb = if self.saw_jfif {
            false
        } else if let Some(t) = self.adobe_transform {
            t == 0
        } else {
            ids == (b'R', b'G', b'B')
        };
        let mut data = vec![0u8; w * h * 3];
        if is_rgb {
            for (i, px) in data.chunks_exact_mut(3).enumerate() {
                px.copy_from_slice(&[planes[0][i], planes[1][i], planes[2][i]]);
            }
        } else {
            ycc_to_rgb(&planes[0], &planes[1], &planes[2], &mut data);
        }
        Ok(JpegImage {
            width: w,
            height: h,
            channels: 3,
            data,
        })
    }
}

fn decode_dc_diff(br: &mut BitReader, dc: &Huffman) -> i32 {
    let s = dc.decode_sym(br) as u32;
    extend(br.bits(s), s)
}

impl Huffman {
    #[inline]
    fn decode_sym(&self, br: &mut BitReader) -> u8 {
        br.decode(self)
    }
}

/// jdhuff.c `decode_mcu` for one block of a sequential scan.
fn decode_block_sequential(
    br: &mut BitReader,
    dc: &Huffman,
    ac: &Huffman,
    pred: &mut i32,
    block: &mut [i16; 64],
) {
    *pred = pred.wrapping_add(decode_dc_diff(br, dc));
    block[0] = *pred as i16;
    let mut k = 1usize;
    while k < 64 {
        let rs = ac.decode_sym(br);
        let (r, s) = ((rs >> 4) as usize, (rs & 15) as u32);
        if s != 0 {
            k += r;
            let v = extend(br.bits(s), s);
            block[NATURAL_ORDER[k.min(79)]] = v as i16;
        } else if r != 15 {
            break;
        } else {
            k += 15;
        }
        k += 1;
    }
}

/// jdphuff.c `decode_mcu_AC_first`. Returns the updated EOB run.
fn decode_ac_first(
    br: &mut BitReader,
    ac: &Huffman,
    scan: &Scan,
    mut eob_run: u32,
    block: &mut [i16; 64],
) -> u32 {
    if eob_run > 0 {
        return eob_run - 1;
    }
    let mut k = scan.ss;
    while k <= scan.se {
        let rs = ac.decode_sym(br);
        let (r, s) = ((rs >> 4) as usize, (rs & 15) as u32);
        if s != 0 {
            k += r;
            let v = extend(br.bits(s), s);
            block[NATURAL_ORDER[k.min(79)]] = (v << scan.al) as i16;
        } else if r == 15 {
            k += 15;
        } else {
            eob_run = 1 << r;
            if r > 0 {
                eob_run += br.bits(r as u32);
            }
            return eob_run - 1;
        }
        k += 1;
    }
    0
}

/// jdphuff.c `decode_mcu_AC_refine`. Returns the updated EOB run.
fn decode_ac_refine(
    br: &mut BitReader,
    ac: &Huffman,
    scan: &Scan,
    mut eob_run: u32,
    block: &mut [i16; 64],
) -> u32 {
    let p1 = 1i32 << scan.al;
    let m1 = -1i32 << scan.al;
    let refine = |br: &mut BitReader, coef: &mut i16| {
        if br.bit() != 0 && (*coef as i32 & p1) == 0 {
            *coef = if *coef >= 0 {
                (*coef as i32 + p1) as i16
            } else {
                (*coef as i32 + m1) as i16
            };
        }
    };
    let mut k = scan.ss;
    if eob_run == 0 {
        while k <= scan.se {
            let rs = ac.decode_sym(br);
            let mut r = (rs >> 4) as i32;
            let s = (rs & 15) as u32;
            let mut newval = 0i32;
            if s != 0 {
                // s should be 1; libjpeg warns otherwise and carries on.
                newval = if br.bit() != 0 { p1 } else { m1 };
            } else if r != 15 {
                eob_run = 1 << r;
                if r > 0 {
                    eob_run += br.bits(r as u32);
                }
                break;
            }
            // Skip over already-nonzero coefficients (refining them) and r zero ones.
            loop {
                let pos = NATURAL_ORDER[k];
                if block[pos] != 0 {
                    refine(br, &mut block[pos]);
                } else {
                    r -= 1;
                    if r < 0 {
                        break;
                    }
                }
                k += 1;
                if k > scan.se {
                    break;
                }
            }
            if newval != 0 {
                block[NATURAL_ORDER[k.min(79)]] = newval as i16;
            }
            k += 1;
        }
    }
    if eob_run > 0 {
        // Refine the remaining nonzero coefficients of this block; the run covers it.
        while k <= scan.se {
            let pos = NATURAL_ORDER[k];
            if block[pos] != 0 {
                refine(br, &mut block[pos]);
            }
            k += 1;
        }
        eob_run -= 1;
    }
    eob_run
}

/// jidctint.c `jpeg_idct_islow` (8x8, `CONST_BITS = 13`, `PASS1_BITS = 2`), writing 8 rows of 8
/// samples at `out[row * stride + col]`.
fn idct_islow(coef: &[i16; 64], quant: &[i16; 64], out: &mut [u8], stride: usize) {
    const CONST_BITS: i64 = 13;
    const PASS1_BITS: i64 = 2;
    const FIX_0_298631336: i64 = 2446;
    const FIX_0_390180644: i64 = 3196;
    const FIX_0_541196100: i64 = 4433;
    const FIX_0_765366865: i64 = 6270;
    const FIX_0_899976223: i64 = 7373;
    const FIX_1_175875602: i64 = 9633;
    const FIX_1_501321110: i64 = 12299;
    const FIX_1_847759065: i64 = 15137;
    const FIX_1_961570560: i64 = 16069;
    const FIX_2_053119869: i64 = 16819;
    const FIX_2_562915447: i64 = 20995;
    const FIX_3_072711026: i64 = 25172;
    #[inline]
    fn descale(x: i64, n: i64) -> i64 {
        (x + (1 << (n - 1))) >> n
    }
    let deq = |i: usize| coef[i] as i64 * quant[i] as i64;

    let mut ws = [0i32; 64];
    for col in 0..8 {
        if (1..8).all(|r| coef[r * 8 + col] == 0) {
            let dc = (deq(col) << PASS1_BITS) as i32;
            for r in 0..8 {
                ws[r * 8 + col] = dc;
            }
            continue;
        }
        let z2 = deq(2 * 8 + col);
        let z3 = deq(6 * 8 + col);
        let z1 = (z2 + z3) * FIX_0_541196100;
        let tmp2 = z1 + z3 * -FIX_1_847759065;
        let tmp3 = z1 + z2 * FIX_0_765366865;
        let z2 = deq(col);
        let z3 = deq(4 * 8 + col);
        let tmp0 = (z2 + z3) << CONST_BITS;
        let tmp1 = (z2 - z3) << CONST_BITS;
        let (tmp10, tmp13, tmp11, tmp12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);

        let (t0, t1, t2, t3) = (
            deq(7 * 8 + col),
            deq(5 * 8 + col),
            deq(3 * 8 + col),
            deq(8 + col),
        );
        let (o0, o1, o2, o3) = odd_part(t0, t1, t2, t3);
        let sh = CONST_BITS - PASS1_BITS;
        ws[col] = descale(tmp10 + o3, sh) as i32;
        ws[7 * 8 + col] = descale(tmp10 - o3, sh) as i32;
        ws[8 + col] = descale(tmp11 + o2, sh) as i32;
        ws[6 * 8 + col] = descale(tmp11 - o2, sh) as i32;
        ws[2 * 8 + col] = descale(tmp12 + o1, sh) as i32;
        ws[5 * 8 + col] = descale(tmp12 - o1, sh) as i32;
        ws[3 * 8 + col] = descale(tmp13 + o0, sh) as i32;
        ws[4 * 8 + col] = descale(tmp13 - o0, sh) as i32;
    }

    // The odd part shared by both passes ("figure 8" of the IJG comments).
    #[inline]
    fn odd_part(tmp0: i64, tmp1: i64, tmp2: i64, tmp3: i64) -> (i64, i64, i64, i64) {
        let z1 = tmp0 + tmp3;
        let z2 = tmp1 + tmp2;
        let z3 = tmp0 + tmp2;
        let z4 = tmp1 + tmp3;
        let z5 = (z3 + z4) * FIX_1_175875602;
        let tmp0 = tmp0 * FIX_0_298631336;
        let tmp1 = tmp1 * FIX_2_053119869;
        let tmp2 = tmp2 * FIX_3_072711026;
        let tmp3 = tmp3 * FIX_1_501321110;
        let z1 = z1 * -FIX_0_899976223;
        let z2 = z2 * -FIX_2_562915447;
        let z3 = z3 * -FIX_1_961570560 + z5;
        let z4 = z4 * -FIX_0_390180644 + z5;
        (
            tmp0 + z1 + z3,
            tmp1 + z2 + z4,
            tmp2 + z2 + z3,
            tmp3 + z1 + z4,
        )
    }

    let sh = CONST_BITS + PASS1_BITS + 3;
    for row in 0..8 {
        let w = &ws[row * 8..row * 8 + 8];
        let o = &mut out[row * stride..row * stride + 8];
        if w[1..].iter().all(|&v| v == 0) {
            let v = range_limit(descale(w[0] as i64, PASS1_BITS + 3));
            o.fill(v);
            continue;
        }
        let z2 = w[2] as i64;
        let z3 = w[6] as i64;
        let z1 = (z2 + z3) * FIX_0_541196100;
        let tmp2 = z1 + z3 * -FIX_1_847759065;
        let tmp3 = z1 + z2 * FIX_0_765366865;
        let tmp0 = (w[0] as i64 + w[4] as i64) << CONST_BITS;
        let tmp1 = (w[0] as i64 - w[4] as i64) << CONST_BITS;
        let (tmp10, tmp13, tmp11, tmp12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
        let (o0, o1, o2, o3) = odd_part(w[7] as i64, w[5] as i64, w[3] as i64, w[1] as i64);
        o[0] = range_limit(descale(tmp10 + o3, sh));
        o[7] = range_limit(descale(tmp10 - o3, sh));
        o[1] = range_limit(descale(tmp11 + o2, sh));
        o[6] = range_limit(descale(tmp11 - o2, sh));
        o[2] = range_limit(descale(tmp12 + o1, sh));
        o[5] = range_limit(descale(tmp12 - o1, sh));
        o[3] = range_limit(descale(tmp13 + o0, sh));
        o[4] = range_limit(descale(tmp13 - o0, sh));
    }
}

/// libjpeg's post-IDCT `range_limit[x & RANGE_MASK]` (jdmaster.c `prepare_range_limit_table`):
/// `x + 128` clamped to 0..=255 for |x| < 512, wrapping beyond (only reachable with corrupt
/// coefficients).
#[inline]
fn range_limit(x: i64) -> u8 {
    let i = (x as i32 & 1023) as usize;
    match i {
        0..=127 => (i + 128) as u8,
        128..=511 => 255,
        512..=895 => 0,
        _ => (i - 896) as u8,
    }
}

/// jdsample.c, choosing the method as `jinit_upsampler` does. `plane` is the component's
/// decoded samples (row stride `pw`), of which `dw x dh` are real; returns a `w x h` plane.
#[allow(clippy::too_many_arguments)]
fn upsample(
    plane: &[u8],
    pw: usize,
    dw: usize,
    dh: usize,
    h_in: usize,
    v_in: usize,
    h_out: usize,
    v_out: usize,
    w: usize,
    h: usize,
) -> Res<Vec<u8>> {
    let mut out = vec![0u8; w * h];
    // Context rows: the row above the first and below the last real row are copies of them.
    let row = |y: isize| -> &[u8] {
        let y = y.clamp(0, dh as isize - 1) as usize;
        &plane[y * pw..y * pw + dw]
    };
    if h_in == h_out && v_in == v_out {
        for y in 0..h {
            out[y * w..(y + 1) * w].copy_from_slice(&row(y as isize)[..w]);
        }
    } else if h_in * 2 == h_out && v_in == v_out && dw > 2 {
        // h2v1_fancy_upsample
        let mut buf = vec![0u8; 2 * dw];
        for y in 0..h {
            h2v1_fancy(row(y as isize), &mut buf);
            out[y * w..(y + 1) * w].copy_from_slice(&buf[..w]);
        }
    } else if h_in == h_out && v_in * 2 == v_out {
        // h1v2_fancy_upsample: bias 1 toward the row above, 2 toward the row below.
        for y in 0..h {
            let (i, far, bias) = if y % 2 == 0 {
                ((y / 2) as isize, (y / 2) as isize - 1, 1u16)
            } else {
                ((y / 2) as isize, (y / 2) as isize + 1, 2u16)
            };
            let (near, far) = (row(i), row(far));
            for x in 0..w {
                out[y * w + x] = ((near[x] as u16 * 3 + far[x] as u16 + bias) >> 2) as u8;
            }
        }
    } else if h_in * 2 == h_out && v_in * 2 == v_out && dw > 2 {
        // h2v2_fancy_upsample
        let mut buf = vec![0u8; 2 * dw];
        for y in 0..h {
            let i = (y / 2) as isize;
            let far = if y % 2 == 0 { i - 1 } else { i + 1 };
            h2v2_fancy(row(i), row(far), &mut buf);
            out[y * w..(y + 1) * w].copy_from_slice(&buf[..w]);
        }
    } else if h_out.is_multiple_of(h_in) && v_out.is_multiple_of(v_in) {
        // int_upsample (also h2v1_upsample/h2v2_upsample for components <= 2 samples wide):
        // plain replication.
        let (hx, vx) = (h_out / h_in, v_out / v_in);
        for y in 0..h {
            let src = row((y / vx) as isize);
            for x in 0..w {
                out[y * w + x] = src[x / hx];
            }
        }
    } else {
        return Err("JPEG with fractional sampling ratios is not supported".into());
    }
    Ok(out)
}

fn h2v1_fancy(inp: &[u8], out: &mut [u8]) {
    let n = inp.len();
    let v = inp[0] as u16;
    out[0] = v as u8;
    out[1] = ((v * 3 + inp[1] as u16 + 2) >> 2) as u8;
    for i in 1..n - 1 {
        let v = inp[i] as u16 * 3;
        out[2 * i] = ((v + inp[i - 1] as u16 + 1) >> 2) as u8;
        out[2 * i + 1] = ((v + inp[i + 1] as u16 + 2) >> 2) as u8;
    }
    let v = inp[n - 1] as u16;
    out[2 * n - 2] = ((v * 3 + inp[n - 2] as u16 + 1) >> 2) as u8;
    out[2 * n - 1] = v as u8;
}

fn h2v2_fancy(near: &[u8], far: &[u8], out: &mut [u8]) {
    let n = near.len();
    let colsum = |i: usize| near[i] as i32 * 3 + far[i] as i32;
    let mut this = colsum(0);
    let mut next = colsum(1);
    out[0] = ((this * 4 + 8) >> 4) as u8;
    out[1] = ((this * 3 + next + 7) >> 4) as u8;
    let mut last = this;
    this = next;
    for i in 1..n - 1 {
        next = colsum(i + 1);
        out[2 * i] = ((this * 3 + last + 8) >> 4) as u8;
        out[2 * i + 1] = ((this * 3 + next + 7) >> 4) as u8;
        last = this;
        this = next;
    }
    out[2 * n - 2] = ((this * 3 + last + 8) >> 4) as u8;
    out[2 * n - 1] = ((this * 4 + 7) >> 4) as u8;
}

/// jdcolor.c `ycc_rgb_convert` with the tables of `build_ycc_rgb_table` (16-bit fixed point).
fn ycc_to_rgb(y: &[u8], cb: &[u8], cr: &[u8], out: &mut [u8]) {
    const SCALEBITS: i64 = 16;
    const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
    let fix = |x: f64| (x * (1i64 << SCALEBITS) as f64 + 0.5) as i64;
    let mut cr_r = [0i32; 256];
    let mut cb_b = [0i32; 256];
    let mut cr_g = [0i64; 256];
    let mut cb_g = [0i64; 256];
    for i in 0..256 {
        let x = i as i64 - 128;
        cr_r[i] = ((fix(1.40200) * x + ONE_HALF) >> SCALEBITS) as i32;
        cb_b[i] = ((fix(1.77200) * x + ONE_HALF) >> SCALEBITS) as i32;
        cr_g[i] = -fix(0.71414) * x;
        cb_g[i] = -fix(0.34414) * x + ONE_HALF;
    }
    let clamp = |v: i32| v.clamp(0, 255) as u8;
    for (i, px) in out.chunks_exact_mut(3).enumerate() {
        let (yy, b, r) = (y[i] as i32, cb[i] as usize, cr[i] as usize);
        px[0] = clamp(yy + cr_r[r]);
        px[1] = clamp(yy + ((cb_g[b] + cr_g[r]) >> SCALEBITS) as i32);
        px[2] = clamp(yy + cb_b[b]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_limit_table() {
        assert_eq!(range_limit(0), 128);
        assert_eq!(range_limit(-128), 0);
        assert_eq!(range_limit(127), 255);
        assert_eq!(range_limit(300), 255);
        assert_eq!(range_limit(-300), 0);
    }

    #[test]
    fn fancy_upsampling_of_a_ramp() {
        let mut out = [0u8; 8];
        h2v1_fancy(&[0, 40, 80, 120], &mut out);
        assert_eq!(out, [0, 10, 30, 50, 70, 90, 110, 120]);
    }
}
