//! Result tables rendered as Markdown, CSV, LaTeX (booktabs) and HTML from one description, so
//! every format shows the same numbers and the same "best" marks.

use std::fmt::Write as _;

/// One table cell: text, or a number that takes part in "best per column".
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Text(String),
    /// A value shown with `decimals` digits; `None` = no result (shown as "–").
    Num {
        value: Option<f64>,
        decimals: usize,
    },
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Self {
        Cell::Text(s.into())
    }

    pub fn num(value: f64, decimals: usize) -> Self {
        Cell::Num {
            value: Some(value),
            decimals,
        }
    }

    pub fn missing() -> Self {
        Cell::Num {
            value: None,
            decimals: 0,
        }
    }

    fn plain(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Num {
                value: Some(v),
                decimals,
            } => format!("{v:.decimals$}"),
            Cell::Num { value: None, .. } => "–".to_string(),
        }
    }

    fn value(&self) -> Option<f64> {
        match self {
            Cell::Num { value, .. } => *value,
            Cell::Text(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
    /// Columns whose maximum is marked (bold in Markdown/LaTeX/HTML, `*` nowhere in CSV).
    pub best_columns: Vec<usize>,
}

impl Table {
    /// Whether `(row, col)` holds its column's maximum (ties all marked, a constant column
    /// none), compared at the precision shown so two values that print the same are both best.
    fn is_best(&self, row: usize, col: usize) -> bool {
        if !self.best_columns.contains(&col) {
            return false;
        }
        let shown = |c: &Cell| {
            c.value()
                .map(|_| c.plain().parse::<f64>().unwrap_or(f64::NAN))
        };
        let Some(v) = self.rows[row].get(col).and_then(shown) else {
            return false;
        };
        let column: Vec<f64> = self
            .rows
            .iter()
            .filter_map(|r| r.get(col).and_then(shown))
            .collect();
        let best = column.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let worst = column.iter().copied().fold(f64::INFINITY, f64::min);
        // A column where every row shows the same value has no best.
        best > worst && v == best
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let esc = |s: &str| s.replace('|', "\\|");
        let head: Vec<String> = self.header.iter().map(|h| esc(h)).collect();
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let align: Vec<&str> = (0..self.header.len())
            .map(|c| {
                let numeric = self
                    .rows
                    .iter()
                    .any(|r| matches!(r.get(c), Some(Cell::Num { .. })));
                if numeric {
                    "---:"
                } else {
                    "---"
                }
            })
            .collect();
        let _ = writeln!(out, "|{}|", align.join("|"));
        for (i, r) in self.rows.iter().enumerate() {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    let s = esc(&cell.plain());
                    if self.is_best(i, c) {
                        format!("**{s}**")
                    } else {
                        s
                    }
                })
                .collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out
    }

    pub fn csv(&self) -> String {
        let mut out = String::new();
        let line = |cells: Vec<String>| cells.iter().map(|c| csv_field(c)).collect::<Vec<_>>();
        let _ = writeln!(out, "{}", line(self.header.clone()).join(","));
        for r in &self.rows {
            // CSV keeps full precision for scripts; the marks are a presentation matter.
            let cells = r
                .iter()
                .map(|c| match c {
                    Cell::Num { value: Some(v), .. } => format!("{v}"),
                    Cell::Num { value: None, .. } => String::new(),
                    Cell::Text(s) => s.clone(),
                })
                .collect();
            let _ = writeln!(out, "{}", line(cells).join(","));
        }
        out
    }

    /// A booktabs tabular (needs `\usepackage{booktabs}`).
    pub fn latex(&self) -> String {
        let mut out = String::new();
        let spec: String = (0..self.header.len())
            .map(|c| {
                if self
                    .rows
                    .iter()
                    .any(|r| matches!(r.get(c), Some(Cell::Num { .. })))
                {
                    'r'
                } else {
                    'l'
                }
            })
            .collect();
        let _ = writeln!(out, "\\begin{{tabular}}{{{spec}}}");
        let _ = writeln!(out, "\\toprule");
        let head: Vec<String> = self.header.iter().map(|h| latex_escape(h)).collect();
        let _ = writeln!(out, "{} \\\\", head.join(" & "));
        let _ = writeln!(out, "\\midrule");
        for (i, r) in self.rows.iter().enumerate() {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    let s = latex_escape(&cell.plain());
                    if self.is_best(i, c) {
                        format!("\\textbf{{{s}}}")
                    } else {
                        s
                    }
                })
                .collect();
            let _ = writeln!(out, "{} \\\\", cells.join(" & "));
        }
        let _ = writeln!(out, "\\bottomrule");
        let _ = writeln!(out, "\\end{{tabular}}");
        out
    }

    pub fn html(&self) -> String {
        let mut out = String::from("<table>\n<thead><tr>");
        for h in &self.header {
            let _ = write!(out, "<th>{}</th>", html_escape(h));
        }
        out.push_str("</tr></thead>\n<tbody>\n");
        for (i, r) in self.rows.iter().enumerate() {
            out.push_str("<tr>");
            for (c, cell) in r.iter().enumerate() {
                let class = match cell {
                    Cell::Num { .. } => " class=\"num\"",
                    Cell::Text(_) => "",
                };
                let s = html_escape(&cell.plain());
                if self.is_best(i, c) {
                    let _ = write!(out, "<td{class}><strong>{s}</strong></td>");
                } else {
                    let _ = write!(out, "<td{class}>{s}</td>");
                }
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</tbody>\n</table>\n");
        out
    }
}

/// RFC 4180 quoting where needed.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub fn latex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\textbackslash{}"),
            '&' | '%' | '$' | '#' | '_' | '{' | '}' => {
                out.push('\\');
                out.push(ch);
            }
            '~' => out.push_str("\\textasciitilde{}"),
            '^' => out.push_str("\\textasciicircum{}"),
            'σ' => out.push_str("$\\sigma$"),
            '–' => out.push_str("--"),
            '−' => out.push_str("$-$"),
            '±' => out.push_str("$\\pm$"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            header: vec!["method".into(), "σ".into(), "r=0".into()],
            rows: vec![
                vec![Cell::text("smooth"), Cell::num(0.25, 2), Cell::num(0.1, 3)],
                vec![
                    Cell::text("a|b & <c>"),
                    Cell::num(0.25, 2),
                    Cell::num(0.45, 3),
                ],
                vec![Cell::text("caf"), Cell::num(0.5, 2), Cell::missing()],
            ],
            best_columns: vec![2],
        }
    }

    #[test]
    fn markdown_marks_the_best_value_and_escapes_pipes() {
        let md = table().markdown();
        assert!(md.contains("| a\\|b & <c> | 0.25 | **0.450** |"), "{md}");
        assert!(md.contains("| smooth | 0.25 | 0.100 |"), "{md}");
        assert!(md.contains("| caf | 0.50 | – |"), "{md}");
        assert!(md.lines().nth(1) == Some("|---|---:|---:|"), "{md}");
    }

    #[test]
    fn csv_keeps_full_precision_and_quotes() {
        let csv = table().csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "method,σ,r=0");
        assert_eq!(lines[1], "smooth,0.25,0.1");
        assert_eq!(lines[2], "a|b & <c>,0.25,0.45");
        assert_eq!(lines[3], "caf,0.5,");
        assert_eq!(csv_field("x,\"y\""), "\"x,\"\"y\"\"\"");
    }

    #[test]
    fn latex_is_booktabs_with_escapes_and_bold_best() {
        let tex = table().latex();
        assert!(
            tex.starts_with("\\begin{tabular}{lrr}\n\\toprule\n"),
            "{tex}"
        );
        assert!(tex.contains("method & $\\sigma$ & r=0 \\\\"), "{tex}");
        assert!(
            tex.contains("a|b \\& <c> & 0.25 & \\textbf{0.450} \\\\"),
            "{tex}"
        );
        assert!(tex.contains("caf & 0.50 & -- \\\\"), "{tex}");
        assert!(
            tex.trim_end().ends_with("\\bottomrule\n\\end{tabular}"),
            "{tex}"
        );
    }

    #[test]
    fn html_escapes_every_cell() {
        let html = table().html();
        assert!(html.contains("<td>a|b &amp; &lt;c&gt;</td>"), "{html}");
        assert!(html.contains("<strong>0.450</strong>"), "{html}");
        assert!(!html.contains("<c>"));
    }

    #[test]
    fn ties_at_the_shown_precision_are_all_best() {
        let t = Table {
            header: vec!["a".into()],
            rows: vec![
                vec![Cell::num(0.1234, 2)],
                vec![Cell::num(0.1199, 2)],
                vec![Cell::num(0.09, 2)],
            ],
            best_columns: vec![0],
        };
        assert_eq!(t.markdown().matches("**0.12**").count(), 2);
        let constant = Table {
            header: vec!["a".into()],
            rows: vec![vec![Cell::num(0.0, 2)], vec![Cell::num(0.0, 2)]],
            best_columns: vec![0],
        };
        assert!(!constant.markdown().contains("**"));
    }
}
