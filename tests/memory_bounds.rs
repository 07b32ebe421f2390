//! Peak memory of loading untrusted files, measured by a counting global allocator: an image at
//! the pixel cap in a wide sample format decodes within its RGB result plus a small allowance, one
//! whose decode would exceed `MAX_DECODE_BYTES` is refused from its header, and a multi-GB head
//! file with a bad header is refused without being read. The tests take one lock, so no other
//! test allocates while one measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use fastrm::explain::fastrm::HeadWeights;
use fastrm::vision::{load_image_bytes, MAX_DECODE_BYTES, MAX_SIDE};

static LOCK: Mutex<()> = Mutex::new(());

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as old and new held at once, the worst a moving realloc does.
            let now = CURRENT.fetch_add(new_size, Relaxed) + new_size;
            PEAK.fetch_max(now, Relaxed);
            CURRENT.fetch_sub(layout.size(), Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated while `f` runs, above what was held when it started.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let out = f();
    (out, PEAK.load(Relaxed) - base)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// LSB-first bit writer for a deflate stream.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u64, n: u32) {
        self.acc |= value << self.n;
        self.n += n;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// A Huffman code, written most significant bit first.
    fn code(&mut self, code: u64, n: u32) {
        let rev = code.reverse_bits() >> (64 - n);
        self.put(rev, n);
    }
}

/// A zlib stream of `n` zero bytes: one fixed-Huffman block of a literal 0 and length-258,
/// distance-1 matches (13 bits per 258 bytes), so a 2 GiB image is a 13 MiB file.
fn zlib_zeros(n: usize) -> Vec<u8> {
    let mut b = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // BFINAL
    b.put(1, 2); // fixed Huffman
    b.code(0x30, 8); // literal 0
    let mut left = n - 1;
    while left > 0 {
        // Lengths 3..=258; avoid leaving 1 or 2 bytes that no match can cover.
        let len = if left >= 261 || left == 258 {
            258
        } else if left > 258 {
            left - 3
        } else {
            left
        };
        assert!(len >= 3, "zero run not coverable by matches");
        let (code, nbits, extra, extra_bits) = length_code(len);
        b.code(code, nbits);
        b.put(extra, extra_bits);
        b.code(0, 5); // distance code 0: distance 1
        left -= len;
    }
    b.code(0, 7); // end of block (256)
    if b.n > 0 {
        b.put(0, 8 - b.n);
    }
    let adler = ((n % 65521) as u32) << 16 | 1;
    b.out.extend_from_slice(&adler.to_be_bytes());
    b.out
}

/// The fixed-Huffman code of a match length: (code, its bits, extra value, extra bits).
fn length_code(len: usize) -> (u64, u32, u64, u32) {
    const BASE: [usize; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const EXTRA: [u32; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    let i = (0..29).rev().find(|&i| BASE[i] <= len).unwrap();
    let i = if len == 258 { 28 } else { i.min(27) };
    let sym = 257 + i as u64;
    // Symbols 256..=279 have 7-bit codes from 0; 280..=287 have 8-bit codes from 0xC0.
    let (code, bits) = if sym <= 279 {
        (sym - 256, 7)
    } else {
        (0xC0 + sym - 280, 8)
    };
    (code, bits, (len - BASE[i]) as u64, EXTRA[i])
}

/// An all-black `w x h` PNG of `depth` bits and colour type `color`, image data in one IDAT.
fn black_png(w: usize, h: usize, depth: u8, color: u8, samples: usize) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[depth, color, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    let raw = h * (1 + w * samples * depth as usize / 8);
    chunk(&mut png, b"IDAT", &zlib_zeros(raw));
    chunk(&mut png, b"IEND", &[]);
    png
}

/// Headers of a progressive 4:4:4 colour JPEG of `w x h`: SOI, one quantisation table, SOF2.
/// Nothing follows, so a decoder that allocated the coefficients would go on to fail on the
/// missing scans; one that checks the budget fails at SOF2.
fn progressive_jpeg_header(w: usize, h: usize) -> Vec<u8> {
    let mut j = vec![0xFF, 0xD8];
    j.extend_from_slice(&[0xFF, 0xDB, 0x00, 0x43, 0x00]);
    j.extend_from_slice(&[1u8; 64]);
    j.extend_from_slice(&[0xFF, 0xC2, 0x00, 0x11, 8]);
    j.extend_from_slice(&(h as u16).to_be_bytes());
    j.extend_from_slice(&(w as u16).to_be_bytes());
    j.push(3);
    for id in 1..=3u8 {
        j.extend_from_slice(&[id, 0x11, 0]);
    }
    j
}

#[test]
fn decoding_memory_is_bounded_by_bytes() {
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    const MIB: usize = 1 << 20;

    // 16-bit RGBA at 16384 x 8192 (half the pixel cap, to keep the test's own footprint small):
    // the raw samples alone are 8 bytes a pixel (1 GiB); decoding them whole, as a full-frame
    // decoder does, then converting, peaks at 11 bytes a pixel (1.4 GiB). Converting each row
    // as it is inflated holds the RGB result (3 bytes a pixel, 384 MiB) plus the decoder's
    // row buffers and chunk allowance, which the bound below grants with 32 MiB.
    let (w, h) = (MAX_SIDE, MAX_SIDE / 2);
    let png = black_png(w, h, 16, 6, 4);
    let (img, peak) = peak_of(|| load_image_bytes(&png, Path::new("wide.png")));
    let img = img.expect("16-bit RGBA PNG within the limits decodes");
    assert_eq!((img.width, img.height), (w, h));
    assert!(img.data.iter().all(|&v| v == 0));
    let bound = w * h * 3 + 32 * MIB;
    println!("16-bit RGBA {w}x{h}: peak {peak} bytes, bound {bound}");
    assert!(
        peak <= bound,
        "decoding a {w}x{h} 16-bit RGBA PNG peaked at {peak} bytes, over {bound} (RGB result + 32 MiB)"
    );
    drop(img);

    // A progressive JPEG at the side cap needs its coefficients (2 bytes a sample, 3 samples a
    // pixel) and the RGB result: ~2.3 GiB, over the limit. Refused from the frame header with
    // the size, format, need and limit named, having allocated next to nothing.
    let jpeg = progressive_jpeg_header(MAX_SIDE, MAX_SIDE);
    let (res, peak) = peak_of(|| load_image_bytes(&jpeg, Path::new("huge.jpg")));
    let Err(e) = res else {
        panic!("over-budget JPEG decoded")
    };
    let msg = e.to_string();
    println!("progressive JPEG {MAX_SIDE}x{MAX_SIDE}: peak {peak} bytes; {msg}");
    for part in [
        "huge.jpg",
        "16384x16384",
        "progressive JPEG",
        "over the limit",
        &MAX_DECODE_BYTES.to_string(),
    ] {
        assert!(msg.contains(part), "message lacks {part:?}: {msg}");
    }
    assert!(peak < MIB, "refusal allocated {peak} bytes");
}

/// A head file as `HeadWeights::save` lays it out: the header length, `header`, then `data_len`
/// bytes of data as a hole (the file is sparse, so a multi-GB one costs no disk).
fn head_file(dir: &Path, name: &str, header: &str, data_len: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(bytes.len() as u64 + data_len).unwrap();
    path
}

#[test]
fn head_file_header_is_checked_before_the_data_is_read() {
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    const GB4: u64 = 4 << 30;
    let meta = r#""__metadata__":{"format":"fastrm-head-1","hidden_size":"1024","head_dim":"64","label_threshold":"0.5","layer_norm_eps":"1e-5","hidden_state":"decoder_final_norm"}"#;
    let f32s = |n: u64| n * 4;
    // Six tensors laid end to end; `q.weight` as the metadata implies.
    let tensors = |q_shape: &str, q_end: u64| {
        let (dm, d) = (1024u64, 64u64);
        let mut o = 0;
        let mut t = Vec::new();
        for (name, shape, n) in [
            ("ln.weight", format!("[{dm}]"), dm),
            ("ln.bias", format!("[{dm}]"), dm),
            ("q.weight", q_shape.to_string(), d * dm),
            ("q.bias", format!("[{d}]"), d),
            ("k.weight", format!("[{d},{dm}]"), d * dm),
            ("k.bias", format!("[{d}]"), d),
        ] {
            let end = if name == "q.weight" {
                q_end
            } else {
                o + f32s(n)
            };
            t.push(format!(
                r#""{name}":{{"dtype":"F32","shape":{shape},"data_offsets":[{o},{end}]}}"#
            ));
            o = end;
        }
        t.join(",")
    };
    let cases = [
        // Not JSON, 4 GB of data behind it.
        (
            "garbage.safetensors",
            "{not json".to_string(),
            GB4,
            vec!["header is not a JSON object"],
        ),
        // A header length beyond the file.
        (
            "short.safetensors",
            "x".repeat(16),
            0,
            vec!["header claims"],
        ),
        // A tensor's shape that the metadata does not imply.
        (
            "shape.safetensors",
            format!(
                "{{{meta},{}}}",
                tensors("[64,1023]", 4096 + 4096 + f32s(64 * 1024))
            ),
            GB4,
            vec!["q.weight", "shape"],
        ),
        // Offsets past the end of the file: `k.weight` (bytes 270592..532736 of the data) in a
        // file holding 300000 bytes of data.
        (
            "lying.safetensors",
            format!(
                "{{{meta},{}}}",
                tensors("[64,1024]", 8192 + f32s(64 * 1024))
            ),
            300_000,
            vec!["k.weight", "the file holds only"],
        ),
    ];
    for (name, header, data, needles) in cases {
        let mut header = header;
        if name == "short.safetensors" {
            // The length field says 1 TB.
            let path = dir.path().join(name);
            let mut b = (1u64 << 40).to_le_bytes().to_vec();
            b.extend_from_slice(header.as_bytes());
            std::fs::write(&path, b).unwrap();
            header.clear();
        }
        let path = if header.is_empty() {
            dir.path().join(name)
        } else {
            head_file(dir.path(), name, &header, data)
        };
        let t = std::time::Instant::now();
        let (res, peak) = peak_of(|| HeadWeights::load(&path));
        let Err(e) = res else {
            panic!("{name}: bad head loaded")
        };
        let msg = e.to_string();
        println!("{name}: peak {peak} bytes in {:?}: {msg}", t.elapsed());
        assert!(msg.contains(name), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "{n:?} not in {msg}");
        }
        assert!(peak < 1 << 20, "{name}: refusing it allocated {peak} bytes");
    }
}
