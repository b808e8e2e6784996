//! Figures checked through their pixels and SVG text, so a change of look shows up as a failing
//! assertion rather than only by eye.

use super::axis::{nice_ticks, widen};
use super::color::{text_color, viridis, PALETTE};
use super::heatmap::MISSING;
use super::line::legend_corner;
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
        points_only: false,
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
