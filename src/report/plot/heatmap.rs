//! Heatmaps: a value per cell of a two-parameter grid on the viridis scale, missing cells hatched,
//! with a colour bar.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::axis::{min_max, nice_ticks, widen, y_label_area, TickedAxis, MAX_TICK_CHARS};
use super::color::{rgb, text_color, viridis, Rgb, AXIS};
use super::{
    centered, draw_no_data, estimate_width, fail, msg, render, shorten, Figure, Fonts, PlotError,
    Scene, FONT,
};

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

impl Heatmap {
    /// Whether any cell has a finite value: without one the grid is all hatched "no data".
    pub fn has_data(&self) -> bool {
        self.values
            .iter()
            .flatten()
            .flatten()
            .any(|v| v.is_finite())
    }
}

/// Renders a heatmap; see [`Heatmap`].
pub fn render_heatmap(map: &Heatmap, size: (u32, u32)) -> Result<Figure, PlotError> {
    let scene = HeatScene::new(map).map_err(|message| fail("heatmap", message))?;
    render(&scene, size)
}

pub(super) const MISSING: Rgb = Rgb(228, 228, 228);
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
