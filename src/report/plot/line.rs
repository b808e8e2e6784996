//! Line plots: certified accuracy against radius (step functions) and metrics against a
//! hyperparameter (categorical x axis, error bars), with the legend placed off the curves.

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::axis::{min_max, nice_ticks, padded, widen, y_label_area, TickedAxis, MAX_TICK_CHARS};
use super::color::{rgb, Rgb, AXIS, MESH};
use super::{draw_no_data, fail, msg, render, shorten, Figure, Fonts, PlotError, Scene, FONT};

/// One line of a line plot.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend entry (arbitrary user text; may contain `<`, `&`, unicode σ). Empty: no legend entry.
    pub name: String,
    /// See [`method_color`](super::method_color).
    pub color: Rgb,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Optional vertical error bars per point: (y_low, y_high), same length as points when Some.
    pub error_bars: Option<Vec<(f64, f64)>>,
    /// Only the measured points, as markers with no line through them: a result known at a
    /// few x only (a sequential certification decides its requested radii, nothing between).
    pub points_only: bool,
}

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

impl LinePlot {
    /// Whether any series has a finite point: without one the figure can only say "no data".
    pub fn has_data(&self) -> bool {
        self.series
            .iter()
            .flat_map(|s| &s.points)
            .any(|(x, y)| x.is_finite() && y.is_finite())
    }
}

/// Renders a line plot; see [`LinePlot`].
pub fn render_line(plot: &LinePlot, size: (u32, u32)) -> Result<Figure, PlotError> {
    let scene = LineScene::new(plot).map_err(|message| fail("line plot", message))?;
    render(&scene, size)
}

const MAX_LEGEND_CHARS: usize = 60;

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
            let path = if s.points_only {
                Vec::new()
            } else if plot.step {
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
pub(super) fn legend_corner(
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
            let markers =
                (!plot.step && s.points.len() <= 40) || s.points.len() == 1 || s.source.points_only;
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
