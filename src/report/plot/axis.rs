//! Axes: round tick values, ranges plotters can map, and label areas sized to their text, shared
//! by line plots and heatmaps so both read the same way.

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{estimate_width, Fonts};

/// Roughly seven round-numbered ticks (steps of 1, 2 or 5 × 10^k) and the decimals that print
/// them exactly, because plotters' default float labels can show `0.30000000000000004`.
pub(super) fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
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
pub(super) fn widen(lo: f64, hi: f64) -> Option<(f64, f64)> {
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

pub(super) fn padded(lo: f64, hi: f64, fraction: f64) -> Option<(f64, f64)> {
    let (lo, hi) = widen(lo, hi)?;
    let pad = (hi - lo) * fraction;
    let out = (lo - pad, hi + pad);
    (out.0.is_finite() && out.1.is_finite()).then_some(out)
}

/// A linear axis whose ticks are chosen here ([`nice_ticks`], or one per category or cell).
/// plotters' own f64 axis picks its ticks itself, and its key-point override (`WithKeyPoints`)
/// loses the label formatter that `configure_mesh` needs.
pub(super) struct TickedAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl TickedAxis {
    pub(super) fn new((lo, hi): (f64, f64), ticks: Vec<f64>) -> Self {
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

pub(super) const MAX_TICK_CHARS: usize = 24;

/// The width of the label area left of the plot: the widest tick label plus the rotated axis
/// description, but never more than a third of the figure.
pub(super) fn y_label_area<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    ticks: impl Iterator<Item = String>,
    fonts: &Fonts,
) -> Result<f64, String> {
    let widest = estimate_width(root, ticks, fonts.tick)?;
    let area = f64::from(widest) + fonts.desc * 1.6 + 12.0 * fonts.scale;
    Ok(area.min(f64::from(root.dim_in_pixel().0) / 3.0))
}

pub(super) fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}
