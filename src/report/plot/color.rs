//! Colours: the fixed palette, which method gets which colour (the one place that knows method
//! names), the heatmap scale, and the greys every figure shares; fixed here so the same method
//! looks the same in every figure of every report.

use plotters::style::RGBColor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

/// Okabe–Ito (colour-blind safe) first, in the order the known methods take them; the rest extends
/// the palette with dark, saturated colours that stay visible as thin lines on white (Okabe–Ito's
/// yellow does not, so it is left out).
pub(super) const PALETTE: [Rgb; 12] = [
    Rgb(213, 94, 0),    // vermillion
    Rgb(0, 114, 178),   // blue
    Rgb(230, 159, 0),   // orange
    Rgb(0, 158, 115),   // bluish green
    Rgb(204, 121, 167), // reddish purple
    Rgb(86, 180, 233),  // sky blue
    Rgb(0, 0, 0),       // black
    Rgb(120, 120, 120), // grey
    Rgb(51, 34, 136),   // indigo (Tol)
    Rgb(136, 34, 85),   // wine (Tol)
    Rgb(153, 153, 51),  // olive (Tol)
    Rgb(140, 86, 75),   // brown (Tableau)
];

/// Known methods and their palette slots. The proposed method gets the most salient colour, its
/// ensemble a related warm one, the plain baselines cool ones, and the reference lines black and
/// grey.
const KNOWN_METHODS: [(&str, usize); 8] = [
    ("caf", 0),
    ("rs", 1),
    ("smoothadv", 2),
    ("denoised", 3),
    ("caf-ensemble", 4),
    ("smooth", 5),
    ("clean", 6),
    ("imported", 7),
];

/// The same colour for the same method in every figure of every report: fixed colours for the
/// known methods, and for any other name a pick from the rest of the palette by a hash that does
/// not change between Rust versions or runs (std's hasher promises neither).
pub fn method_color(method: &str) -> Rgb {
    if let Some(&(_, slot)) = KNOWN_METHODS.iter().find(|(name, _)| *name == method) {
        return PALETTE[slot];
    }
    let rest = KNOWN_METHODS.len();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    for byte in method.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    PALETTE[rest + (hash % (PALETTE.len() - rest) as u64) as usize]
}

/// Colours for the series of one figure, given each series' method: a method drawn once keeps
/// its fixed colour ([`method_color`]); the series of a method drawn several times (a sweep)
/// take palette colours in order, skipping the fixed colours of this figure, so no two series
/// share a colour while the palette lasts.
pub fn figure_colors(methods: &[&str]) -> Vec<Rgb> {
    let count = |m: &str| methods.iter().filter(|x| **x == m).count();
    let fixed: Vec<Rgb> = methods
        .iter()
        .filter(|m| count(m) == 1)
        .map(|m| method_color(m))
        .collect();
    let mut free: Vec<Rgb> = PALETTE
        .iter()
        .copied()
        .filter(|c| !fixed.contains(c))
        .collect();
    if free.is_empty() {
        free = PALETTE.to_vec();
    }
    let mut next = free.iter().copied().cycle();
    methods
        .iter()
        .map(|m| match count(m) {
            1 => method_color(m),
            _ => next.next().unwrap_or(PALETTE[0]),
        })
        .collect()
}

/// A sequence of distinct colours for series that are not methods (e.g. one line per radius);
/// cycles after the palette's length.
pub fn palette(i: usize) -> Rgb {
    PALETTE[i % PALETTE.len()]
}

pub(super) fn rgb(c: Rgb) -> RGBColor {
    RGBColor(c.0, c.1, c.2)
}

pub(super) const MESH: RGBColor = RGBColor(222, 222, 222);
pub(super) const AXIS: RGBColor = RGBColor(90, 90, 90);

/// Viridis sampled at nine evenly spaced points: perceptually uniform and readable in greyscale and
/// by colour-blind readers, interpolated linearly in between.
const VIRIDIS: [(u8, u8, u8); 9] = [
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
];

pub(super) fn viridis(t: f64) -> Rgb {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = t * (VIRIDIS.len() - 1) as f64;
    let i = (pos.floor() as usize).min(VIRIDIS.len() - 2);
    let f = pos - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * f).round() as u8;
    Rgb(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Black or white, whichever contrasts more with the cell (WCAG relative luminance).
pub(super) fn text_color(cell: Rgb) -> Rgb {
    let linear = |c: u8| {
        let c = f64::from(c) / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let l = 0.2126 * linear(cell.0) + 0.7152 * linear(cell.1) + 0.0722 * linear(cell.2);
    if 1.05 / (l + 0.05) > (l + 0.05) / 0.05 {
        Rgb(255, 255, 255)
    } else {
        Rgb(0, 0, 0)
    }
}
