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
//!
//! The shared backend lives here (font, the two encoders, [`Figure`]); colours, axes, line plots
//! and heatmaps each have a file of their own.

mod axis;
mod color;
mod heatmap;
mod line;
#[cfg(test)]
mod tests;

pub use color::{figure_colors, method_color, palette, Rgb};
pub use heatmap::{render_heatmap, Heatmap};
pub use line::{render_line, LinePlot, Series};

use std::sync::OnceLock;

use plotters::backend::{BitMapBackend, RGBPixel, SVGBackend};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use color::{AXIS, MESH};

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

pub const DEFAULT_SIZE: (u32, u32) = (800, 500);

// ---------------------------------------------------------------------------------------------
// Rendering both formats from one scene.

const FONT: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

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
