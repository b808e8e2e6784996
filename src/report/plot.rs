//! Figures for research reports: line plots (certified accuracy against radius, metrics against a
//! hyperparameter) and heatmaps (hyperparameter grids).
//!
//! Every figure is drawn twice from the same description, once as SVG (inlined into HTML reports,
//! scales without blur) and once as PNG (for papers, slides and viewers without SVG). Text goes
//! through a DejaVu Sans embedded in the binary, so a PNG rendered on a headless machine without
//! fonts looks the same as one rendered on a workstation, and text layout (legend boxes, label
//! areas) is measured with the same metrics in both formats.
//!
//! Nothing here panics on odd data: reports are assembled from whatever the store holds, and one
//! empty or degenerate figure must not take the whole report down. Non-finite points are skipped,
//! empty inputs render a figure that says "no data", and inconsistent shapes (a caller bug) come
//! back as [`PlotError`].

use std::sync::OnceLock;

use plotters::backend::{BitMapBackend, RGBPixel, SVGBackend};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// A rendered figure.
pub struct Figure {
    /// A standalone `<svg …>` document without an XML prolog, ready to inline into HTML.
    pub svg: String,
    /// The same figure as an 8-bit RGB PNG.
    pub png: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plotting {what}: {message}")]
    Render { what: String, message: String },
}

/// One line of a line plot.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend entry (arbitrary user text; may contain `<`, `&`, unicode σ). Empty: no legend entry.
    pub name: String,
    /// See [`method_color`].
    pub color: Rgb,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Optional vertical error bars per point: (y_low, y_high), same length as points when Some.
    pub error_bars: Option<Vec<(f64, f64)>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

#[derive(Clone, Debug)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Draw as a step function (value holds until the next x): certified accuracy vs radius.
    pub step: bool,
    /// None: from the data, with a little margin.
    pub x_range: Option<(f64, f64)>,
    /// None: from the data.
    pub y_range: Option<(f64, f64)>,
    /// Categorical x axis: tick labels for x = 0, 1, 2, … (used for hyperparameter values); None =
    /// numeric axis.
    pub x_categories: Option<Vec<String>>,
}

#[derive(Clone, Debug)]
pub struct Heatmap {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_ticks: Vec<String>,
    /// Listed top to bottom: row 0 is drawn as the top row, as in the report's tables.
    pub y_ticks: Vec<String>,
    /// values[row][col], row = y tick, col = x tick; None = no data (drawn hatched grey, labelled
    /// "–"). Non-finite values count as no data.
    pub values: Vec<Vec<Option<f64>>>,
    /// How each cell is annotated, e.g. 3 decimals.
    pub decimals: usize,
}

pub const DEFAULT_SIZE: (u32, u32) = (800, 500);

/// Renders a line plot; see [`LinePlot`].
pub fn render_line(plot: &LinePlot, size: (u32, u32)) -> Result<Figure, PlotError> {
    let scene = LineScene::new(plot).map_err(|message| fail("line plot", message))?;
    render(&scene, size)
}

/// Renders a heatmap; see [`Heatmap`].
pub fn render_heatmap(map: &Heatmap, size: (u32, u32)) -> Result<Figure, PlotError> {
    let scene = HeatScene::new(map).map_err(|message| fail("heatmap", message))?;
    render(&scene, size)
}

/// Okabe–Ito (colour-blind safe) first, in the order the known methods take them; the rest extends
/// the palette with dark, saturated colours that stay visible as thin lines on white (Okabe–Ito's
/// yellow does not, so it is left out).
const PALETTE: [Rgb; 12] = [
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

// ---------------------------------------------------------------------------------------------
// Rendering both formats from one scene.

const FONT: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Larger sizes would need gigabytes of RGB buffer; no report figure comes near this.
const MAX_SIDE: u32 = 8192;

/// plotters' ab_glyph text backend only knows fonts registered by family name, and measures text
/// for layout even when drawing SVG, so the font must be registered before either backend runs.
/// Only the normal style is registered: plotters falls back to it for bold and italic.
fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(fail(
            "font",
            "the bundled DejaVu Sans does not parse".into(),
        ))
    }
}

fn fail(what: &str, message: String) -> PlotError {
    PlotError::Render {
        what: what.to_string(),
        message,
    }
}

/// plotters' errors are generic over the backend; only their text is worth keeping.
fn msg<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A figure description ready to draw on any plotters backend, so SVG and PNG cannot drift apart.
trait Scene {
    fn what(&self) -> &'static str;
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

fn render<S: Scene>(scene: &S, size: (u32, u32)) -> Result<Figure, PlotError> {
    let what = scene.what();
    let (w, h) = size;
    if w < 64 || h < 64 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(fail(
            what,
            format!("figure size {w}×{h} is outside 64..={MAX_SIDE} pixels per side"),
        ));
    }
    ensure_font()?;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        scene.draw(&root).map_err(|m| fail(what, m))?;
        root.present().map_err(|e| fail(what, msg(e)))?;
    }
    let svg = strip_xml_prolog(svg);

    let mut rgb = vec![255u8; w as usize * h as usize * 3];
    {
        let backend = BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut rgb, size)
            .map_err(|e| fail(what, msg(e)))?;
        let root = backend.into_drawing_area();
        scene.draw(&root).map_err(|m| fail(what, m))?;
        root.present().map_err(|e| fail(what, msg(e)))?;
    }
    let png = encode_png(&rgb, size).map_err(|m| fail(what, m))?;
    Ok(Figure { svg, png })
}

/// An XML prolog is not allowed inside HTML; plotters 0.3 emits none, but a later version might.
fn strip_xml_prolog(svg: String) -> String {
    let trimmed = svg.trim_start();
    if trimmed.starts_with("<?xml") {
        if let Some(end) = trimmed.find("?>") {
            return trimmed[end + 2..].trim_start().to_string();
        }
    }
    svg
}

fn encode_png(rgb: &[u8], (w, h): (u32, u32)) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(msg)?;
    writer.write_image_data(rgb).map_err(msg)?;
    writer.finish().map_err(msg)?;
    Ok(out)
}

/// Pixel sizes chosen for 800×500 and scaled with the figure, so a figure rendered larger for print
/// keeps its proportions. plotters' SVG backend writes `font-size` as size / 1.24, so these give at
/// least 14 px text in the SVG at 800×500 as well.
struct Fonts {
    scale: f64,
    title: f64,
    desc: f64,
    tick: f64,
    legend: f64,
}

impl Fonts {
    fn for_area<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>) -> Self {
        let (w, h) = root.dim_in_pixel();
        let scale = (f64::from(w) / 800.0)
            .min(f64::from(h) / 500.0)
            .clamp(0.6, 4.0);
        Fonts {
            scale,
            title: 24.0 * scale,
            desc: 20.0 * scale,
            tick: 18.0 * scale,
            legend: 18.0 * scale,
        }
    }

    fn px(&self, base: f64) -> i32 {
        (base * self.scale).round() as i32
    }
}

fn rgb(c: Rgb) -> RGBColor {
    RGBColor(c.0, c.1, c.2)
}

const MESH: RGBColor = RGBColor(222, 222, 222);
const AXIS: RGBColor = RGBColor(90, 90, 90);

fn centered(px: f64) -> TextStyle<'static> {
    TextStyle::from((FONT, px).into_font()).pos(Pos::new(HPos::Center, VPos::Center))
}

/// What a figure without data shows: its title, so the reader knows which figure is missing, and
/// why it is empty.
fn draw_no_data<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    fonts: &Fonts,
) -> Result<(), String> {
    let (w, h) = root.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    if !title.is_empty() {
        root.draw(&Text::new(
            title.to_string(),
            (w / 2, fonts.px(30.0)),
            centered(fonts.title),
        ))
        .map_err(msg)?;
    }
    root.draw(&Rectangle::new(
        [
            (fonts.px(40.0), fonts.px(60.0)),
            (w - fonts.px(40.0), h - fonts.px(40.0)),
        ],
        ShapeStyle::from(&MESH).stroke_width(1),
    ))
    .map_err(msg)?;
    root.draw(&Text::new(
        "no data".to_string(),
        (w / 2, h / 2),
        centered(fonts.desc).color(&AXIS),
    ))
    .map_err(msg)?;
    Ok(())
}

/// Roughly seven round-numbered ticks (steps of 1, 2 or 5 × 10^k) and the decimals that print
/// them exactly, because plotters' default float labels can show `0.30000000000000004`.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return (vec![lo], 2);
    }
    let raw = span / target.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let decimals = (-step.log10().floor()).clamp(0.0, 12.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks = (first..=last)
        .take(200)
        .map(|k| {
            let v = k as f64 * step;
            if v.abs() < step * 1e-9 {
                0.0
            } else {
                v
            }
        })
        .collect();
    (ticks, decimals)
}

/// A usable axis range: finite, ordered, and never zero-width (plotters maps a zero-width range to
/// NaN pixel positions).
fn widen(lo: f64, hi: f64) -> Option<(f64, f64)> {
    if !(lo.is_finite() && hi.is_finite()) {
        return None;
    }
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    if hi - lo > f64::EPSILON * lo.abs().max(hi.abs()).max(1e-300) * 16.0 {
        if (hi - lo).is_finite() {
            return Some((lo, hi));
        }
        return None;
    }
    let pad = if lo == 0.0 { 0.5 } else { lo.abs() * 0.1 };
    Some((lo - pad, hi + pad))
}

fn padded(lo: f64, hi: f64, fraction: f64) -> Option<(f64, f64)> {
    let (lo, hi) = widen(lo, hi)?;
    let pad = (hi - lo) * fraction;
    let out = (lo - pad, hi + pad);
    (out.0.is_finite() && out.1.is_finite()).then_some(out)
}

/// A linear axis whose ticks are chosen here ([`nice_ticks`], or one per category or cell).
/// plotters' own f64 axis picks its ticks itself, and its key-point override (`WithKeyPoints`)
/// loses the label formatter that `configure_mesh` needs.
struct TickedAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl TickedAxis {
    fn new((lo, hi): (f64, f64), ticks: Vec<f64>) -> Self {
        TickedAxis { lo, hi, ticks }
    }
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let t = (value - self.lo) / (self.hi - self.lo);
        // Far-off values only need to land off the plotting area (plotters clamps them onto its
        // edge); the bound keeps the float-to-int conversion meaningful.
        let t = if t.is_nan() { 0.0 } else { t.clamp(-4.0, 5.0) };
        let span = f64::from(limit.1) - f64::from(limit.0);
        (f64::from(limit.0) + t * span).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Tick labels and legend entries come from user-chosen names and values; a pathological one
/// must not squeeze the plotting area to nothing.
fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    out.push('…');
    out
}

const MAX_TICK_CHARS: usize = 24;
const MAX_LEGEND_CHARS: usize = 60;

/// The width of the label area left of the plot: the widest tick label plus the rotated axis
/// description, but never more than a third of the figure.
fn y_label_area<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    ticks: impl Iterator<Item = String>,
    fonts: &Fonts,
) -> Result<f64, String> {
    let widest = estimate_width(root, ticks, fonts.tick)?;
    let area = f64::from(widest) + fonts.desc * 1.6 + 12.0 * fonts.scale;
    Ok(area.min(f64::from(root.dim_in_pixel().0) / 3.0))
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

fn estimate_width<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    texts: impl Iterator<Item = String>,
    px: f64,
) -> Result<u32, String> {
    let style = TextStyle::from((FONT, px).into_font());
    let mut widest = 0;
    for text in texts {
        widest = widest.max(root.estimate_text_size(&text, &style).map_err(msg)?.0);
    }
    Ok(widest)
}

// ---------------------------------------------------------------------------------------------
// Line plots.

struct PreparedSeries<'a> {
    source: &'a Series,
    /// Finite points, as polyline vertices (already expanded into steps for step plots).
    path: Vec<(f64, f64)>,
    /// Finite data points, for markers.
    points: Vec<(f64, f64)>,
    /// (x, low, high), finite.
    bars: Vec<(f64, f64, f64)>,
}

/// The x and y axis ranges.
type Ranges = ((f64, f64), (f64, f64));

struct LineScene<'a> {
    plot: &'a LinePlot,
    series: Vec<PreparedSeries<'a>>,
    /// None when no series has a finite point: the figure says "no data".
    ranges: Option<Ranges>,
}

impl<'a> LineScene<'a> {
    fn new(plot: &'a LinePlot) -> Result<Self, String> {
        let mut series = Vec::with_capacity(plot.series.len());
        for s in &plot.series {
            if let Some(bars) = &s.error_bars {
                if bars.len() != s.points.len() {
                    return Err(format!(
                        "series {:?} has {} points but {} error bars",
                        s.name,
                        s.points.len(),
                        bars.len()
                    ));
                }
            }
            let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
            let mut points: Vec<(f64, f64)> = s.points.iter().copied().filter(finite).collect();
            let bars: Vec<(f64, f64, f64)> = match &s.error_bars {
                None => Vec::new(),
                Some(bars) => s
                    .points
                    .iter()
                    .zip(bars)
                    .filter(|(p, (lo, hi))| finite(p) && lo.is_finite() && hi.is_finite())
                    .map(|(&(x, _), &(lo, hi))| (x, lo.min(hi), lo.max(hi)))
                    .collect(),
            };
            let path = if plot.step {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                step_path(&points)
            } else {
                points.clone()
            };
            series.push(PreparedSeries {
                source: s,
                path,
                points,
                bars,
            });
        }
        let ranges = Self::ranges(plot, &series)?;
        Ok(LineScene {
            plot,
            series,
            ranges,
        })
    }

    fn ranges(plot: &LinePlot, series: &[PreparedSeries]) -> Result<Option<Ranges>, String> {
        let xs = min_max(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
        let ys = min_max(series.iter().flat_map(|s| {
            s.points
                .iter()
                .map(|p| p.1)
                .chain(s.bars.iter().flat_map(|b| [b.1, b.2]))
        }));
        let (Some(xs), Some(ys)) = (xs, ys) else {
            return Ok(None);
        };
        let categories = plot.x_categories.as_ref().filter(|c| !c.is_empty());
        let x = match (plot.x_range, categories) {
            (Some((lo, hi)), _) => widen(lo, hi),
            (None, Some(c)) => Some((-0.5, c.len() as f64 - 0.5)),
            (None, None) => padded(xs.0, xs.1, 0.02),
        }
        .ok_or_else(|| format!("x range {:?} is not finite", plot.x_range.unwrap_or(xs)))?;
        let y = match plot.y_range {
            Some((lo, hi)) => widen(lo, hi),
            // A few percent so lines on the extremes are not hidden under the frame.
            None => padded(ys.0, ys.1, 0.04),
        }
        .ok_or_else(|| format!("y range {:?} is not finite", plot.y_range.unwrap_or(ys)))?;
        Ok(Some((x, y)))
    }
}

/// Certified accuracy at radius r is the value of the last point at or before r, so each value is
/// held horizontally until the next point's x, then drops vertically.
fn step_path(sorted: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut path = Vec::with_capacity(sorted.len() * 2);
    for (i, &(x, y)) in sorted.iter().enumerate() {
        if i > 0 {
            path.push((x, sorted[i - 1].1));
        }
        path.push((x, y));
    }
    path
}

/// The legend goes in the corner the curves cross least; ties prefer upper right, where curves that
/// decrease (certified accuracy against radius) leave room.
fn legend_corner(
    paths: &[&[(f64, f64)]],
    x: (f64, f64),
    y: (f64, f64),
    entries: usize,
) -> SeriesLabelPosition {
    let corner_w = 0.4;
    let corner_h = (0.1 + 0.08 * entries as f64).min(0.7);
    let mut counts = [0usize; 4]; // upper right, upper left, lower right, lower left
    let norm = |(px, py): (f64, f64)| ((px - x.0) / (x.1 - x.0), (py - y.0) / (y.1 - y.0));
    let mut count = |(u, v): (f64, f64)| {
        let right = u >= 1.0 - corner_w && u <= 1.0;
        let left = (0.0..=corner_w).contains(&u);
        let upper = v >= 1.0 - corner_h && v <= 1.0;
        let lower = (0.0..=corner_h).contains(&v);
        for (i, hit) in [right && upper, left && upper, right && lower, left && lower]
            .into_iter()
            .enumerate()
        {
            counts[i] += usize::from(hit);
        }
    };
    for path in paths {
        if let [only] = path {
            count(norm(*only));
        }
        for pair in path.windows(2) {
            let (a, b) = (norm(pair[0]), norm(pair[1]));
            // Sample segments so a long segment through a corner counts as much as its length.
            let steps = ((b.0 - a.0).abs() + (b.1 - a.1).abs())
                .mul_add(100.0, 1.0)
                .min(1000.0);
            let steps = steps as usize;
            for k in 0..=steps {
                let t = k as f64 / steps as f64;
                count((a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t));
            }
        }
    }
    let best = (0..4).min_by_key(|&i| (counts[i], i)).unwrap_or(0);
    [
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::LowerRight,
        SeriesLabelPosition::LowerLeft,
    ][best]
        .clone()
}

impl Scene for LineScene<'_> {
    fn what(&self) -> &'static str {
        "line plot"
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(msg)?;
        let fonts = Fonts::for_area(root);
        let Some((x_range, y_range)) = self.ranges else {
            return draw_no_data(root, &self.plot.title, &fonts);
        };
        let plot = self.plot;

        let (x_ticks, x_decimals) = match plot.x_categories.as_ref().filter(|c| !c.is_empty()) {
            Some(c) => (
                (0..c.len())
                    .map(|i| i as f64)
                    .filter(|v| *v >= x_range.0 && *v <= x_range.1)
                    .collect(),
                0,
            ),
            None => nice_ticks(x_range.0, x_range.1, 8),
        };
        let (y_ticks, y_decimals) = nice_ticks(y_range.0, y_range.1, 7);
        let x_fmt = |v: &f64| match &plot.x_categories {
            Some(c) if !c.is_empty() => {
                let i = v.round();
                if (v - i).abs() < 1e-9 && i >= 0.0 && (i as usize) < c.len() {
                    shorten(&c[i as usize], MAX_TICK_CHARS)
                } else {
                    String::new()
                }
            }
            _ => format!("{v:.x_decimals$}"),
        };
        let y_fmt = |v: &f64| format!("{v:.y_decimals$}");

        let y_area = y_label_area(root, y_ticks.iter().map(y_fmt), &fonts)?;
        let x_area = fonts.tick * 1.3 + fonts.desc * 1.6 + 8.0 * fonts.scale;

        let mut builder = ChartBuilder::on(root);
        builder
            .margin(fonts.px(14.0))
            .x_label_area_size(x_area)
            .y_label_area_size(y_area);
        if !plot.title.is_empty() {
            builder.caption(&plot.title, (FONT, fonts.title));
        }
        let mut chart = builder
            .build_cartesian_2d(
                TickedAxis::new(x_range, x_ticks),
                TickedAxis::new(y_range, y_ticks),
            )
            .map_err(msg)?;
        chart
            .configure_mesh()
            .x_desc(plot.x_label.as_str())
            .y_desc(plot.y_label.as_str())
            .axis_desc_style((FONT, fonts.desc))
            .label_style((FONT, fonts.tick))
            .bold_line_style(MESH)
            .light_line_style(TRANSPARENT)
            .axis_style(AXIS)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .draw()
            .map_err(msg)?;

        let line_w = (2.0 * fonts.scale).round().max(1.0) as u32;
        let dash = fonts.px(9.0);
        let gap = fonts.px(5.0);
        let cap = fonts.px(5.0);
        let mut entries = 0;
        for s in &self.series {
            let color = rgb(s.source.color);
            let style = ShapeStyle::from(&color).stroke_width(line_w);
            let thin = ShapeStyle::from(&color).stroke_width(line_w.div_ceil(2));

            chart
                .draw_series(
                    s.bars
                        .iter()
                        .map(|&(x, lo, hi)| PathElement::new(vec![(x, lo), (x, hi)], thin)),
                )
                .map_err(msg)?;
            chart
                .draw_series(s.bars.iter().flat_map(|&(x, lo, hi)| {
                    [lo, hi].map(|y| {
                        EmptyElement::at((x, y)) + PathElement::new(vec![(-cap, 0), (cap, 0)], thin)
                    })
                }))
                .map_err(msg)?;

            let path = if s.path.len() >= 2 {
                s.path.clone()
            } else {
                Vec::new()
            };
            let anno = if s.source.dashed {
                chart.draw_series(DashedLineSeries::new(path, dash, gap, style))
            } else {
                chart.draw_series(LineSeries::new(path, style))
            }
            .map_err(msg)?;
            if !s.source.name.is_empty() {
                entries += 1;
                let dashed = s.source.dashed;
                let len = fonts.px(26.0);
                anno.label(shorten(&s.source.name, MAX_LEGEND_CHARS))
                    .legend(move |(x, y)| {
                        if dashed {
                            DashedPathElement::new(vec![(x, y), (x + len, y)], dash, gap, style)
                                .into_dyn()
                        } else {
                            PathElement::new(vec![(x, y), (x + len, y)], style).into_dyn()
                        }
                    });
            }

            // Markers show where the measurements are on a curve that interpolates between them,
            // and are the only thing visible for a one-point series.
            let markers = (!plot.step && s.points.len() <= 40) || s.points.len() == 1;
            if markers {
                let radius = fonts.px(3.5);
                chart
                    .draw_series(
                        s.points
                            .iter()
                            .map(|&p| Circle::new(p, radius, style.filled())),
                    )
                    .map_err(msg)?;
            }
        }

        if entries > 0 {
            let paths: Vec<&[(f64, f64)]> = self.series.iter().map(|s| &s.path[..]).collect();
            chart
                .configure_series_labels()
                .position(legend_corner(&paths, x_range, y_range, entries))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(170, 170, 170))
                .label_font((FONT, fonts.legend))
                .legend_area_size(fonts.px(34.0))
                .margin(fonts.px(10.0))
                .draw()
                .map_err(msg)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Heatmaps.

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

fn viridis(t: f64) -> Rgb {
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
fn text_color(cell: Rgb) -> Rgb {
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

const MISSING: Rgb = Rgb(228, 228, 228);
const HATCH: RGBColor = RGBColor(190, 190, 190);
const MISSING_TEXT: RGBColor = RGBColor(80, 80, 80);

struct HeatScene<'a> {
    map: &'a Heatmap,
    /// Min and max of the finite values; None when there are none.
    extent: Option<(f64, f64)>,
}

impl<'a> HeatScene<'a> {
    fn new(map: &'a Heatmap) -> Result<Self, String> {
        if map.values.len() != map.y_ticks.len() {
            return Err(format!(
                "{} rows of values for {} y ticks",
                map.values.len(),
                map.y_ticks.len()
            ));
        }
        if let Some((r, row)) = map
            .values
            .iter()
            .enumerate()
            .find(|(_, row)| row.len() != map.x_ticks.len())
        {
            return Err(format!(
                "row {r} has {} values for {} x ticks",
                row.len(),
                map.x_ticks.len()
            ));
        }
        let extent = min_max(
            map.values
                .iter()
                .flatten()
                .flatten()
                .copied()
                .filter(|v| v.is_finite()),
        );
        Ok(HeatScene { map, extent })
    }

    fn cell(&self, row: usize, col: usize) -> Option<f64> {
        self.map.values[row][col].filter(|v| v.is_finite())
    }

    fn color_of(&self, v: f64) -> Rgb {
        match self.extent {
            Some((lo, hi)) if hi > lo => viridis((v - lo) / (hi - lo)),
            _ => viridis(0.5),
        }
    }
}

impl Scene for HeatScene<'_> {
    fn what(&self) -> &'static str {
        "heatmap"
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(msg)?;
        let fonts = Fonts::for_area(root);
        let map = self.map;
        let (rows, cols) = (map.y_ticks.len(), map.x_ticks.len());
        if rows == 0 || cols == 0 {
            return draw_no_data(root, &map.title, &fonts);
        }

        let (w, _) = root.dim_in_pixel();
        let bar_w = (f64::from(w) * 0.16).max(fonts.tick * 5.0) as u32;
        let (main, bar) = root.split_horizontally(w.saturating_sub(bar_w));

        let short = |t: &String| shorten(t, MAX_TICK_CHARS);
        let y_area = y_label_area(root, map.y_ticks.iter().map(short), &fonts)?;
        let x_area = fonts.tick * 1.3 + fonts.desc * 1.6 + 8.0 * fonts.scale;
        let margin = fonts.px(14.0);
        let caption_h = if map.title.is_empty() {
            0
        } else {
            (fonts.title * 1.25).round() as i32
        };

        let mut builder = ChartBuilder::on(&main);
        builder
            .margin(margin)
            .x_label_area_size(x_area)
            .y_label_area_size(y_area);
        if !map.title.is_empty() {
            builder.caption(&map.title, (FONT, fonts.title));
        }
        // Row r occupies y in [rows-1-r, rows-r] so that row 0 is on top.
        let centers = |n: usize| (0..n).map(|i| i as f64 + 0.5).collect::<Vec<_>>();
        let mut chart = builder
            .build_cartesian_2d(
                TickedAxis::new((0.0, cols as f64), centers(cols)),
                TickedAxis::new((0.0, rows as f64), centers(rows)),
            )
            .map_err(msg)?;
        let tick_label = |ticks: &[String], i: f64| {
            let i = i.floor();
            if i >= 0.0 && (i as usize) < ticks.len() {
                shorten(&ticks[i as usize], MAX_TICK_CHARS)
            } else {
                String::new()
            }
        };
        let x_fmt = |v: &f64| tick_label(&map.x_ticks, *v);
        let y_fmt = |v: &f64| tick_label(&map.y_ticks, rows as f64 - *v);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(map.x_label.as_str())
            .y_desc(map.y_label.as_str())
            .axis_desc_style((FONT, fonts.desc))
            .label_style((FONT, fonts.tick))
            .axis_style(AXIS)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .draw()
            .map_err(msg)?;

        let (area_w, area_h) = chart.plotting_area().dim_in_pixel();
        let cell_w = f64::from(area_w) / cols as f64;
        let cell_h = f64::from(area_h) / rows as f64;
        let widest = map
            .values
            .iter()
            .flatten()
            .map(|v| match v {
                Some(v) if v.is_finite() => format!("{v:.*}", map.decimals).chars().count(),
                _ => 1,
            })
            .max()
            .unwrap_or(1);
        // DejaVu Sans digits are 0.64 em wide; leave a little padding on either side.
        let annot_px = (fonts.tick)
            .min(cell_h * 0.5)
            .min(cell_w * 0.85 / (widest as f64 * 0.66));
        // Text smaller than this is unreadable at any zoom in a PNG: such a grid is read from the
        // colours and the report's table instead.
        let annotate = annot_px >= 7.0;

        let gap = ShapeStyle::from(&WHITE).stroke_width(1);
        for r in 0..rows {
            let (y0, y1) = ((rows - 1 - r) as f64, (rows - r) as f64);
            for c in 0..cols {
                let (x0, x1) = (c as f64, c as f64 + 1.0);
                let center = (x0 + 0.5, y0 + 0.5);
                match self.cell(r, c) {
                    Some(v) => {
                        let fill = self.color_of(v);
                        chart
                            .draw_series([Rectangle::new([(x0, y0), (x1, y1)], rgb(fill).filled())])
                            .map_err(msg)?;
                        if annotate {
                            let ink = rgb(text_color(fill));
                            let label = format!("{v:.*}", map.decimals);
                            chart
                                .draw_series([Text::new(
                                    label,
                                    center,
                                    centered(annot_px).color(&ink),
                                )])
                                .map_err(msg)?;
                        }
                    }
                    None => {
                        chart
                            .draw_series([Rectangle::new(
                                [(x0, y0), (x1, y1)],
                                rgb(MISSING).filled(),
                            )])
                            .map_err(msg)?;
                        let hatch = ShapeStyle::from(&HATCH).stroke_width(1);
                        let lines = [0.0, 0.25, 0.5, 0.75]
                            .into_iter()
                            .map(|a| vec![(x0 + a, y0), (x1, y1 - a)])
                            .chain(
                                [0.25, 0.5, 0.75]
                                    .into_iter()
                                    .map(|a| vec![(x0, y0 + a), (x1 - a, y1)]),
                            );
                        chart
                            .draw_series(lines.map(|l| PathElement::new(l, hatch)))
                            .map_err(msg)?;
                        if annotate {
                            chart
                                .draw_series([Text::new(
                                    "–".to_string(),
                                    center,
                                    centered(annot_px * 1.3).color(&MISSING_TEXT),
                                )])
                                .map_err(msg)?;
                        }
                    }
                }
                chart
                    .draw_series([Rectangle::new([(x0, y0), (x1, y1)], gap)])
                    .map_err(msg)?;
            }
        }

        self.draw_color_bar(&bar, &fonts, caption_h + margin, x_area as i32 + margin)
    }
}

impl HeatScene<'_> {
    /// The value scale beside the grid, aligned with the grid's top and bottom.
    fn draw_color_bar<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        fonts: &Fonts,
        top: i32,
        bottom: i32,
    ) -> Result<(), String> {
        let (w, h) = area.dim_in_pixel();
        let Some((lo, hi)) = self.extent else {
            return area
                .draw(&Text::new(
                    "no data".to_string(),
                    (w as i32 / 2, h as i32 / 2),
                    centered(fonts.tick).color(&AXIS),
                ))
                .map_err(msg);
        };
        let (lo_axis, hi_axis) = widen(lo, hi).unwrap_or((lo - 0.5, hi + 0.5));
        let (ticks, decimals) = nice_ticks(lo_axis, hi_axis, 5);
        let fmt = |v: &f64| format!("{v:.decimals$}");
        let label_w = estimate_width(area, ticks.iter().map(fmt), fonts.tick)?;
        let bar_w = fonts.px(18.0).max(6);
        let right = (label_w as i32 + fonts.px(12.0))
            .min(w as i32 - bar_w - 4)
            .max(0);
        let left = (w as i32 - bar_w - right - fonts.px(6.0)).max(0);

        let mut chart = ChartBuilder::on(area)
            .margin_top(top)
            .margin_bottom(bottom)
            .margin_left(left)
            .margin_right(fonts.px(6.0))
            .right_y_label_area_size(right)
            .build_cartesian_2d(
                TickedAxis::new((0.0, 1.0), Vec::new()),
                TickedAxis::new((lo_axis, hi_axis), ticks),
            )
            .map_err(msg)?;
        let steps = 96;
        let span = hi_axis - lo_axis;
        chart
            .draw_series((0..steps).map(|k| {
                let a = lo_axis + span * k as f64 / steps as f64;
                let b = lo_axis + span * (k + 1) as f64 / steps as f64;
                let mid = (a + b) / 2.0;
                let t = if hi > lo { (mid - lo) / (hi - lo) } else { 0.5 };
                Rectangle::new([(0.0, a), (1.0, b)], rgb(viridis(t)).filled())
            }))
            .map_err(msg)?;
        // After the gradient, so the axis and its tick marks are not painted over.
        chart
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .label_style((FONT, fonts.tick))
            .axis_style(AXIS)
            .set_tick_mark_size(LabelAreaPosition::Right, fonts.px(6.0))
            .y_label_formatter(&fmt)
            .draw()
            .map_err(msg)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        assert_eq!(&png_bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        let decoder = png::Decoder::new(png_bytes);
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("png frame");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn pixels_of(rgb: &[u8], color: Rgb) -> usize {
        rgb.chunks_exact(3)
            .filter(|p| p[0] == color.0 && p[1] == color.1 && p[2] == color.2)
            .count()
    }

    fn non_white(rgb: &[u8]) -> usize {
        rgb.chunks_exact(3)
            .filter(|p| p != &[255, 255, 255])
            .count()
    }

    fn series(name: &str, color: Rgb, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.to_string(),
            color,
            points,
            dashed: false,
            error_bars: None,
        }
    }

    fn line(series: Vec<Series>) -> LinePlot {
        LinePlot {
            title: "Certified accuracy".to_string(),
            x_label: "ℓ2 radius (pixel units, [0,1] scale)".to_string(),
            y_label: "certified accuracy".to_string(),
            series,
            step: false,
            x_range: None,
            y_range: None,
            x_categories: None,
        }
    }

    fn heatmap(values: Vec<Vec<Option<f64>>>) -> Heatmap {
        let rows = values.len();
        let cols = values.first().map_or(0, Vec::len);
        Heatmap {
            title: "Grid".to_string(),
            x_label: "λ".to_string(),
            y_label: "σ".to_string(),
            x_ticks: (0..cols).map(|c| format!("x{c}")).collect(),
            y_ticks: (0..rows).map(|r| format!("y{r}")).collect(),
            values,
            decimals: 3,
        }
    }

    /// Ok with a valid figure, or a PlotError; never a panic. Returns the figure when Ok.
    fn ok_or_error(result: Result<Figure, PlotError>, size: (u32, u32)) -> Option<Figure> {
        match result {
            Ok(fig) => {
                assert!(
                    fig.svg.starts_with("<svg"),
                    "{}",
                    &fig.svg[..fig.svg.len().min(80)]
                );
                let (w, h, _) = decode(&fig.png);
                assert_eq!((w, h), size);
                Some(fig)
            }
            Err(PlotError::Render { what, message }) => {
                assert!(!what.is_empty() && !message.is_empty());
                None
            }
        }
    }

    #[test]
    fn line_plot_png_has_requested_size_and_series_colour() {
        let caf = method_color("caf");
        let rs = method_color("rs");
        let plot = line(vec![
            series(
                "caf",
                caf,
                vec![(0.0, 0.8), (0.5, 0.6), (1.0, 0.3), (1.5, 0.1)],
            ),
            series(
                "rs",
                rs,
                vec![(0.0, 0.7), (0.5, 0.5), (1.0, 0.2), (1.5, 0.05)],
            ),
        ]);
        let fig = render_line(&plot, DEFAULT_SIZE).expect("render");
        let (w, h, rgb) = decode(&fig.png);
        assert_eq!((w, h), DEFAULT_SIZE);
        assert_eq!(rgb.len(), 800 * 500 * 3);
        assert!(
            pixels_of(&rgb, caf) > 300,
            "caf pixels: {}",
            pixels_of(&rgb, caf)
        );
        assert!(
            pixels_of(&rgb, rs) > 300,
            "rs pixels: {}",
            pixels_of(&rgb, rs)
        );
        assert!(fig.svg.contains("Certified accuracy"));
        assert!(fig.svg.contains("ℓ2 radius (pixel units, [0,1] scale)"));
    }

    #[test]
    fn png_size_follows_request() {
        let plot = line(vec![series(
            "caf",
            method_color("caf"),
            vec![(0.0, 1.0), (1.0, 0.0)],
        )]);
        for size in [(640, 400), (1600, 1000), (300, 700)] {
            let fig = render_line(&plot, size).expect("render");
            let (w, h, _) = decode(&fig.png);
            assert_eq!((w, h), size);
            assert!(fig
                .svg
                .contains(&format!("width=\"{}\" height=\"{}\"", size.0, size.1)));
        }
    }

    #[test]
    fn svg_is_standalone_and_escapes_text() {
        let nasty = "σ=0.25 <b>&\"";
        let mut plot = line(vec![series(
            nasty,
            method_color("caf"),
            vec![(0.0, 1.0), (1.0, 0.5)],
        )]);
        plot.title = "A & B <i>".to_string();
        let fig = render_line(&plot, DEFAULT_SIZE).expect("render");
        let svg = fig.svg.trim();
        assert!(svg.starts_with("<svg"), "no prolog, starts with <svg");
        assert!(svg.ends_with("</svg>"));
        assert!(svg.contains("xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(
            svg.contains("σ=0.25 &lt;b&gt;&amp;&quot;"),
            "escaped legend entry"
        );
        assert!(svg.contains("A &amp; B &lt;i&gt;"), "escaped title");
        assert!(!svg.contains("<b>") && !svg.contains("<i>"));
        assert!(!svg.contains("&\""));
    }

    #[test]
    fn strip_xml_prolog_removes_only_the_prolog() {
        let with = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg></svg>".to_string();
        assert_eq!(strip_xml_prolog(with), "<svg></svg>");
        assert_eq!(strip_xml_prolog("<svg></svg>".to_string()), "<svg></svg>");
    }

    #[test]
    fn method_colors_are_stable_and_distinct() {
        let known = [
            "smooth",
            "clean",
            "rs",
            "caf",
            "caf-ensemble",
            "denoised",
            "smoothadv",
            "imported",
        ];
        let colors: Vec<Rgb> = known.iter().map(|m| method_color(m)).collect();
        for (i, a) in colors.iter().enumerate() {
            for b in &colors[i + 1..] {
                assert_ne!(a, b, "known methods share a colour");
            }
            assert_ne!(*a, Rgb(255, 255, 255));
        }
        // Pinned: changing these changes every published figure.
        assert_eq!(method_color("caf"), Rgb(213, 94, 0));
        assert_eq!(method_color("rs"), Rgb(0, 114, 178));
        // Unknown names: stable, and never a known method's colour.
        for name in ["macer", "consistency", "", "σ-net", "caf2"] {
            let c = method_color(name);
            assert_eq!(c, method_color(name));
            assert!(!colors.contains(&c), "{name} took a known method's colour");
        }
        // FNV-1a is fixed, so the pick for a given name is too.
        assert_eq!(method_color("macer"), method_color(&String::from("macer")));
    }

    #[test]
    fn figure_colors_are_distinct_and_keep_single_methods_fixed() {
        // The head-to-head's σ = 0.25 panel: three caf adapters and two denoisers next to
        // methods drawn once; sky blue (smooth's colour) used to be reused for a caf series.
        let methods = [
            "smooth",
            "denoised",
            "denoised",
            "caf",
            "caf",
            "caf",
            "rs",
            "smoothadv",
        ];
        let colors = figure_colors(&methods);
        for (i, a) in colors.iter().enumerate() {
            for b in &colors[i + 1..] {
                assert_ne!(a, b, "{colors:?}");
            }
        }
        assert_eq!(colors[0], method_color("smooth"));
        assert_eq!(colors[6], method_color("rs"));
        assert_eq!(colors[7], method_color("smoothadv"));
    }

    #[test]
    fn palette_is_distinct_then_cycles() {
        let first: Vec<Rgb> = (0..PALETTE.len()).map(palette).collect();
        for (i, a) in first.iter().enumerate() {
            assert!(!first[i + 1..].contains(a));
        }
        assert_eq!(palette(PALETTE.len()), palette(0));
    }

    #[test]
    fn step_plot_holds_each_value_until_the_next_x() {
        let color = method_color("caf");
        let mut plot = line(vec![series(
            "",
            color,
            vec![(0.0, 1.0), (1.0, 0.5), (2.0, 0.25), (3.0, 0.25)],
        )]);
        plot.step = true;
        plot.x_range = Some((0.0, 3.0));
        plot.y_range = Some((0.0, 1.0));
        let fig = render_line(&plot, DEFAULT_SIZE).expect("render");
        let (w, h, rgb) = decode(&fig.png);
        let is_series = |x: u32, y: u32| {
            let i = ((y * w + x) * 3) as usize;
            rgb[i..i + 3] == [color.0, color.1, color.2]
        };
        let columns: Vec<u32> = (0..w)
            .filter(|&x| (0..h).any(|y| is_series(x, y)))
            .collect();
        let (left, right) = (columns[0], columns[columns.len() - 1]);
        assert!(
            right - left > 400,
            "the line spans the plot: {left}..{right}"
        );
        let third = f64::from(right - left) / 3.0;
        // The row of the line in the middle of each third: constant within a third (a step, not
        // an interpolation), and spaced as the values are (1 → 0.5 is twice 0.5 → 0.25).
        let mut levels = Vec::new();
        for k in 0..3 {
            let mut rows_seen = Vec::new();
            for f in [0.2, 0.35, 0.5, 0.65, 0.8] {
                let x = left + (third * (k as f64 + f)) as u32;
                let ys: Vec<u32> = (0..h).filter(|&y| is_series(x, y)).collect();
                assert!(!ys.is_empty(), "no series colour in column {x}");
                rows_seen.push(f64::from(ys[0] + ys[ys.len() - 1]) / 2.0);
            }
            let spread = rows_seen.iter().cloned().fold(f64::MIN, f64::max)
                - rows_seen.iter().cloned().fold(f64::MAX, f64::min);
            assert!(spread <= 1.0, "third {k} is not flat: {rows_seen:?}");
            levels.push(rows_seen[0]);
        }
        assert!(levels[0] < levels[1] && levels[1] < levels[2], "{levels:?}");
        let drop1 = levels[1] - levels[0];
        let drop2 = levels[2] - levels[1];
        assert!((drop1 / drop2 - 2.0).abs() < 0.1, "{levels:?}");
        // y = 1.0 is the top of the plot, y = 0.25 three quarters of the way down.
        let plot_h = (levels[2] - levels[0]) / 0.75;
        assert!(plot_h > 250.0 && plot_h < 480.0, "{plot_h}");
    }

    #[test]
    fn ranges_get_margins_and_round_ticks() {
        assert_eq!(widen(0.0, 1.0), Some((0.0, 1.0)));
        assert_eq!(widen(1.0, 0.0), Some((0.0, 1.0)));
        let (lo, hi) = widen(0.7, 0.7).expect("flat");
        assert!(lo < 0.7 && hi > 0.7 && (hi - lo - 0.14).abs() < 1e-9);
        assert_eq!(widen(0.0, 0.0), Some((-0.5, 0.5)));
        assert_eq!(widen(f64::NAN, 1.0), None);
        assert_eq!(widen(-f64::MAX, f64::MAX), None, "span overflows");
        let (ticks, decimals) = nice_ticks(0.0, 1.0, 7);
        let shown: Vec<String> = ticks.iter().map(|t| format!("{t:.decimals$}")).collect();
        assert_eq!(shown, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        let (ticks, decimals) = nice_ticks(-0.03, 0.17, 7);
        assert_eq!(decimals, 2);
        assert!(ticks.contains(&0.0) && ticks.len() >= 4 && ticks.len() <= 12);
        let (ticks, decimals) = nice_ticks(1.0, 90.0, 8);
        assert_eq!((ticks, decimals), (vec![20.0, 40.0, 60.0, 80.0], 0));
    }

    #[test]
    fn legend_goes_where_the_curves_are_not() {
        let decreasing: Vec<(f64, f64)> = vec![(0.0, 1.0), (1.0, 0.0)];
        let increasing: Vec<(f64, f64)> = vec![(0.0, 0.0), (1.0, 1.0)];
        let pos = |p: &[(f64, f64)]| legend_corner(&[p], (0.0, 1.0), (0.0, 1.0), 2);
        assert!(matches!(pos(&decreasing), SeriesLabelPosition::UpperRight));
        assert!(matches!(pos(&increasing), SeriesLabelPosition::UpperLeft));
        let high: Vec<(f64, f64)> = vec![(0.0, 0.95), (1.0, 0.95)];
        assert!(matches!(pos(&high), SeriesLabelPosition::LowerRight));
    }

    #[test]
    fn dashed_series_error_bars_and_categories_render() {
        let color = method_color("smoothadv");
        let mut s = series(
            "smoothadv",
            color,
            vec![(0.0, 0.5), (1.0, 0.6), (2.0, 0.55)],
        );
        s.dashed = true;
        s.error_bars = Some(vec![(0.45, 0.55), (0.5, 0.7), (f64::NAN, 0.6)]);
        let mut plot = line(vec![s]);
        plot.x_categories = Some(vec!["0.12".into(), "0.25".into(), "0.50".into()]);
        let fig = render_line(&plot, DEFAULT_SIZE).expect("render");
        let (_, _, rgb) = decode(&fig.png);
        assert!(pixels_of(&rgb, color) > 100);
        for tick in ["0.12", "0.25", "0.50"] {
            assert!(
                fig.svg.contains(&format!(">\n{tick}\n<")),
                "category tick {tick}"
            );
        }
    }

    #[test]
    fn error_bar_length_mismatch_is_an_error() {
        let mut s = series("a", palette(0), vec![(0.0, 1.0), (1.0, 2.0)]);
        s.error_bars = Some(vec![(0.0, 1.0)]);
        let err = render_line(&line(vec![s]), DEFAULT_SIZE)
            .err()
            .expect("error");
        assert!(err.to_string().contains("error bars"), "{err}");
    }

    #[test]
    fn degenerate_line_plots_do_not_panic() {
        let c = method_color("caf");
        let cases = vec![
            ("no series", line(vec![])),
            ("empty series", line(vec![series("caf", c, vec![])])),
            (
                "single point",
                line(vec![series("caf", c, vec![(0.5, 0.5)])]),
            ),
            (
                "flat",
                line(vec![series("caf", c, vec![(0.0, 0.7), (1.0, 0.7)])]),
            ),
            (
                "one x",
                line(vec![series("caf", c, vec![(1.0, 0.2), (1.0, 0.9)])]),
            ),
            (
                "non-finite",
                line(vec![series(
                    "caf",
                    c,
                    vec![
                        (f64::NAN, 1.0),
                        (0.0, f64::INFINITY),
                        (1.0, 0.5),
                        (2.0, f64::NEG_INFINITY),
                    ],
                )]),
            ),
            (
                "only non-finite",
                line(vec![series(
                    "caf",
                    c,
                    vec![(f64::NAN, f64::NAN), (f64::INFINITY, 0.0)],
                )]),
            ),
            (
                "huge range",
                line(vec![series(
                    "caf",
                    c,
                    vec![(-f64::MAX, -f64::MAX), (f64::MAX, f64::MAX)],
                )]),
            ),
            (
                "tiny",
                line(vec![series(
                    "caf",
                    c,
                    vec![(0.0, 1e-300), (1e-300, 2e-300)],
                )]),
            ),
        ];
        for (what, plot) in &cases {
            let fig = ok_or_error(render_line(plot, DEFAULT_SIZE), DEFAULT_SIZE);
            if ["no series", "empty series", "only non-finite"].contains(what) {
                let fig = fig
                    .as_ref()
                    .unwrap_or_else(|| panic!("{what}: expected a no-data figure"));
                assert!(fig.svg.contains("no data"), "{what}");
                assert!(
                    non_white(&decode(&fig.png).2) > 200,
                    "{what}: the PNG shows it too"
                );
            }
            if ["single point", "flat", "one x", "non-finite"].contains(what) {
                let fig = fig
                    .as_ref()
                    .unwrap_or_else(|| panic!("{what}: expected a figure"));
                let (_, _, rgb) = decode(&fig.png);
                assert!(pixels_of(&rgb, c) > 10, "{what}: series not drawn");
            }
        }

        let mut bad_ranges = line(vec![series("caf", c, vec![(0.0, 0.0), (1.0, 1.0)])]);
        bad_ranges.x_range = Some((1.0, 1.0));
        bad_ranges.y_range = Some((1.0, 0.0));
        ok_or_error(render_line(&bad_ranges, DEFAULT_SIZE), DEFAULT_SIZE).expect("widened");
        bad_ranges.x_range = Some((f64::NAN, 1.0));
        assert!(render_line(&bad_ranges, DEFAULT_SIZE).is_err());
        let mut empty_categories = line(vec![series("caf", c, vec![(0.0, 0.0), (1.0, 1.0)])]);
        empty_categories.x_categories = Some(vec![]);
        ok_or_error(render_line(&empty_categories, DEFAULT_SIZE), DEFAULT_SIZE).expect("numeric");
        for size in [(0, 0), (0, 500), (10, 10), (100_000, 500)] {
            assert!(render_line(&empty_categories, size).is_err(), "{size:?}");
        }
        // Labels wider than the figure leave no room for the plotting area.
        let long = "w".repeat(300);
        let mut crowded = line(vec![series(&long, c, vec![(0.0, 0.0), (1.0, 1.0)])]);
        crowded.title = long.clone();
        crowded.x_categories = Some(vec![long.clone(); 50]);
        for size in [(64, 64), (120, 64), DEFAULT_SIZE] {
            ok_or_error(render_line(&crowded, size), size);
            ok_or_error(render_line(&cases[2].1, size), size);
        }
    }

    #[test]
    fn heatmap_cells_are_coloured_and_annotated() {
        let map = heatmap(vec![
            vec![Some(0.1), Some(0.5), None],
            vec![Some(0.9), Some(0.123_456), Some(f64::NAN)],
        ]);
        let fig = render_heatmap(&map, DEFAULT_SIZE).expect("render");
        let (w, h, rgb) = decode(&fig.png);
        assert_eq!((w, h), DEFAULT_SIZE);
        // The extremes take the ends of the scale, large areas of exactly those colours.
        assert!(pixels_of(&rgb, viridis(0.0)) > 2000, "min cell");
        assert!(pixels_of(&rgb, viridis(1.0)) > 2000, "max cell");
        assert!(pixels_of(&rgb, MISSING) > 1000, "missing cells");
        for text in ["0.100", "0.500", "0.900", "0.123", "–", "x2", "y1", "Grid"] {
            assert!(
                fig.svg.contains(&format!(">\n{text}\n<")),
                "annotation {text}"
            );
        }
        // White on the dark end, black on the light end.
        let text_fill = |text: &str| {
            let at = fig.svg.find(&format!(">\n{text}\n<")).expect("annotation");
            let open = fig.svg[..at].rfind("<text").expect("text element");
            let tag = &fig.svg[open..at];
            let fill = tag.find("fill=\"").expect("fill") + 6;
            tag[fill..fill + 7].to_string()
        };
        assert_eq!(text_fill("0.100"), "#FFFFFF", "white on the dark end");
        assert_eq!(text_fill("0.900"), "#000000", "black on the light end");
        assert_eq!(text_color(viridis(0.0)), Rgb(255, 255, 255));
        assert_eq!(text_color(viridis(1.0)), Rgb(0, 0, 0));
        assert_eq!(text_color(Rgb(255, 255, 255)), Rgb(0, 0, 0));
    }

    #[test]
    fn heatmap_row_zero_is_on_top() {
        let map = heatmap(vec![vec![Some(0.0)], vec![Some(1.0)]]);
        let fig = render_heatmap(&map, DEFAULT_SIZE).expect("render");
        let (w, _, rgb) = decode(&fig.png);
        let rows_of = |c: Rgb| -> Vec<u32> {
            rgb.chunks_exact(3)
                .enumerate()
                .filter(|(i, p)| (*i as u32 % w) < w / 2 && p == &[c.0, c.1, c.2])
                .map(|(i, _)| i as u32 / w)
                .collect()
        };
        let (top, bottom) = (rows_of(viridis(0.0)), rows_of(viridis(1.0)));
        assert!(!top.is_empty() && !bottom.is_empty());
        assert!(top.iter().max() < bottom.iter().min(), "row 0 above row 1");
    }

    #[test]
    fn viridis_runs_dark_to_light() {
        assert_eq!(viridis(0.0), Rgb(68, 1, 84));
        assert_eq!(viridis(1.0), Rgb(253, 231, 37));
        assert_eq!(viridis(f64::NAN), viridis(0.0));
        assert_eq!(viridis(7.0), viridis(1.0));
        let lum = |c: Rgb| u32::from(c.0) * 2126 + u32::from(c.1) * 7152 + u32::from(c.2) * 722;
        let mut prev = 0;
        for k in 0..=20 {
            let l = lum(viridis(f64::from(k) / 20.0));
            assert!(l >= prev);
            prev = l;
        }
    }

    #[test]
    fn degenerate_heatmaps_do_not_panic() {
        let all_none = heatmap(vec![vec![None, None], vec![None, None]]);
        let fig = ok_or_error(render_heatmap(&all_none, DEFAULT_SIZE), DEFAULT_SIZE)
            .expect("all-None renders");
        assert!(fig.svg.contains("no data"));
        let one = heatmap(vec![vec![Some(0.42)]]);
        let fig = ok_or_error(render_heatmap(&one, DEFAULT_SIZE), DEFAULT_SIZE).expect("1×1");
        assert!(fig.svg.contains(">\n0.420\n<"));
        let empty = heatmap(vec![]);
        let fig = ok_or_error(render_heatmap(&empty, DEFAULT_SIZE), DEFAULT_SIZE).expect("empty");
        assert!(fig.svg.contains("no data"));
        let no_cols = heatmap(vec![vec![], vec![]]);
        ok_or_error(render_heatmap(&no_cols, DEFAULT_SIZE), DEFAULT_SIZE);
        let equal = heatmap(vec![vec![Some(0.5), Some(0.5)]]);
        ok_or_error(render_heatmap(&equal, DEFAULT_SIZE), DEFAULT_SIZE).expect("equal values");
        let inf = heatmap(vec![vec![
            Some(f64::INFINITY),
            Some(-f64::MAX),
            Some(f64::MAX),
        ]]);
        ok_or_error(render_heatmap(&inf, DEFAULT_SIZE), DEFAULT_SIZE);
        let big: Vec<Vec<Option<f64>>> = (0..60)
            .map(|r| (0..60).map(|c| Some(f64::from(r * c))).collect())
            .collect();
        ok_or_error(render_heatmap(&heatmap(big), DEFAULT_SIZE), DEFAULT_SIZE).expect("big grid");

        let mut crowded = heatmap(vec![vec![Some(1.0), None]]);
        crowded.y_ticks = vec!["w".repeat(300)];
        crowded.x_ticks = vec!["w".repeat(300), "x".into()];
        for size in [(64, 64), (120, 64), DEFAULT_SIZE] {
            ok_or_error(render_heatmap(&crowded, size), size);
            ok_or_error(render_heatmap(&one, size), size);
        }

        let mut ragged = heatmap(vec![vec![Some(1.0), Some(2.0)], vec![Some(3.0)]]);
        assert!(render_heatmap(&ragged, DEFAULT_SIZE).is_err());
        ragged.values = vec![vec![Some(1.0), Some(2.0)]];
        assert!(
            render_heatmap(&ragged, DEFAULT_SIZE).is_err(),
            "rows ≠ y ticks"
        );
    }
}
