//! The viridis colormap (dark purple → blue → green → yellow; perceptually uniform, readable in
//! grey scale and by colour-blind viewers) as a 256-entry table.
//!
//! The table is built here by piecewise-linear interpolation between anchor colours: viridis
//! sampled at the evenly spaced points of 3-, 4-, 5-, 6-, 8-, 10- and 20-colour palettes (the
//! well-known published hex values). The anchors are ~0.03–0.06 apart along a smooth curve, so
//! the interpolated table stays within a few 8-bit steps of the reference colours, and its green
//! channel rises strictly from end to end (tests rely on that to read values back).

use std::sync::OnceLock;

/// `(position in [0, 1], 0xRRGGBB)`, positions increasing.
const ANCHORS: [(f32, u32); 24] = [
    (0.0, 0x440154),
    (1.0 / 9.0, 0x482878),
    (1.0 / 7.0, 0x46337e),
    (0.2, 0x414487),
    (2.0 / 9.0, 0x3e4a89),
    (0.25, 0x3b528b),
    (2.0 / 7.0, 0x365c8d),
    (1.0 / 3.0, 0x31688e),
    (0.4, 0x2a788e),
    (3.0 / 7.0, 0x277f8e),
    (4.0 / 9.0, 0x26828e),
    (0.5, 0x21908c),
    (5.0 / 9.0, 0x1f9e89),
    (4.0 / 7.0, 0x1fa187),
    (0.6, 0x22a884),
    (2.0 / 3.0, 0x35b779),
    (5.0 / 7.0, 0x4ac16d),
    (0.75, 0x5dc863),
    (7.0 / 9.0, 0x6dcd59),
    (0.8, 0x7ad151),
    (6.0 / 7.0, 0x9fda3a),
    (8.0 / 9.0, 0xb4de2c),
    (18.0 / 19.0, 0xdce318),
    (1.0, 0xfde725),
];

fn rgb(hex: u32) -> [f32; 3] {
    [
        ((hex >> 16) & 0xff) as f32,
        ((hex >> 8) & 0xff) as f32,
        (hex & 0xff) as f32,
    ]
}

fn build() -> [[u8; 3]; 256] {
    let anchors: Vec<(f32, [f32; 3])> = ANCHORS.iter().map(|&(t, c)| (t, rgb(c))).collect();

    let mut lut = [[0u8; 3]; 256];
    let mut seg = 0;
    for (i, entry) in lut.iter_mut().enumerate() {
        let t = i as f32 / 255.0;
        while seg + 2 < anchors.len() && t > anchors[seg + 1].0 {
            seg += 1;
        }
        let (t0, c0) = anchors[seg];
        let (t1, c1) = anchors[seg + 1];
        let f = ((t - t0) / (t1 - t0)).clamp(0.0, 1.0);
        for k in 0..3 {
            entry[k] = (c0[k] + (c1[k] - c0[k]) * f).round().clamp(0.0, 255.0) as u8;
        }
    }
    lut
}

/// The 256-entry viridis table: entry 0 is the colour of 0 (cold), entry 255 the colour of 1.
pub fn viridis() -> &'static [[u8; 3]; 256] {
    static LUT: OnceLock<[[u8; 3]; 256]> = OnceLock::new();
    LUT.get_or_init(build)
}
