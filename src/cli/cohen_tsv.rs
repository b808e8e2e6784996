//! Cohen et al.'s certify.py log: a header, then one tab-separated row per image. caf writes it
//! (`caf certify`, `caf export --format cohen-tsv`) and reads it (`caf import`) here, so the
//! files it writes are the files it reads; it adds `nA n` to certify.py's columns so that a log
//! can be recomputed at another α.

use std::io::{self, Write};
use std::path::Path;

use anyhow::{bail, Result};

use caf::store::CertRow;

use super::exit::usage;

pub fn write_header(w: &mut impl Write) -> io::Result<()> {
    writeln!(w, "idx\tlabel\tpredict\tradius\tcorrect\ttime\tnA\tn")
}

/// certify.py's precision (radius to 3 decimals, seconds to 4), so logs diff against its own.
pub fn write_row(w: &mut impl Write, r: &CertRow) -> io::Result<()> {
    writeln!(
        w,
        "{}\t{}\t{}\t{:.3}\t{}\t{:.4}\t{}\t{}",
        r.idx, r.label, r.predict, r.radius, r.correct as u8, r.seconds, r.n_a, r.n
    )
}

/// Reads a log: a header naming at least `idx label predict radius correct`, then one row per
/// image. `time`, `nA`, `n` are used when present: certify.py's own logs have no counts. Every
/// problem is a usage error located by file and line.
pub fn parse(path: &Path, bytes: &[u8], sigma: f64) -> Result<Vec<CertRow>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| usage(format!("{}: not UTF-8 text: {e}", path.display())))?;
    let mut lines = text.lines().enumerate();
    let Some((_, header)) = lines.next() else {
        bail!(usage(format!(
            "{}:1:1: empty file; expected a header line",
            path.display()
        )));
    };
    let cols: Vec<&str> = header.split('\t').map(str::trim).collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let need = |name: &str| {
        col(name).ok_or_else(|| {
            usage(format!(
                "{}:1:1: the header has no `{name}` column (expected tab-separated \
                 `idx label predict radius correct [time] [nA n]`, found `{header}`)",
                path.display()
            ))
        })
    };
    let (ci, cl, cp, cr, cc) = (
        need("idx")?,
        need("label")?,
        need("predict")?,
        need("radius")?,
        need("correct")?,
    );
    let (ct, cna, cn) = (col("time"), col("nA"), col("n"));
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let lineno = i + 1;
        let field = |c: usize, what: &str| -> Result<&str> {
            fields.get(c).map(|s| s.trim()).ok_or_else(|| {
                usage(format!(
                    "{}:{lineno}: missing column {} (`{what}`); the header has {} columns",
                    path.display(),
                    c + 1,
                    cols.len()
                ))
            })
        };
        fn value<T: std::str::FromStr>(
            path: &Path,
            lineno: usize,
            col: usize,
            what: &str,
            s: &str,
        ) -> Result<T> {
            s.parse().map_err(|_| {
                usage(format!(
                    "{}:{lineno}: column {} (`{what}`): `{s}` is not a valid value",
                    path.display(),
                    col + 1
                ))
            })
        }
        let idx: u64 = value(path, lineno, ci, "idx", field(ci, "idx")?)?;
        let label: u32 = value(path, lineno, cl, "label", field(cl, "label")?)?;
        let predict: i64 = value(path, lineno, cp, "predict", field(cp, "predict")?)?;
        let radius: f64 = value(path, lineno, cr, "radius", field(cr, "radius")?)?;
        let correct: u8 = value(path, lineno, cc, "correct", field(cc, "correct")?)?;
        if !radius.is_finite() || radius < 0.0 || correct > 1 || predict < -1 {
            bail!(usage(format!(
                "{}:{lineno}: radius must be ≥ 0, correct 0 or 1 and predict ≥ -1",
                path.display()
            )));
        }
        if (correct == 1) != (predict == i64::from(label)) {
            bail!(usage(format!(
                "{}:{lineno}: `correct` = {correct} contradicts label {label} and prediction {predict}",
                path.display()
            )));
        }
        if !seen.insert(idx) {
            bail!(usage(format!(
                "{}:{lineno}: image {idx} appears twice",
                path.display()
            )));
        }
        let seconds: f64 = match ct {
            Some(c) => value(path, lineno, c, "time", field(c, "time")?)?,
            None => 0.0,
        };
        let (n_a, n): (u64, u64) = match (cna, cn) {
            (Some(a), Some(b)) => (
                value(path, lineno, a, "nA", field(a, "nA")?)?,
                value(path, lineno, b, "n", field(b, "n")?)?,
            ),
            _ => (0, 0),
        };
        rows.push(CertRow {
            idx,
            label,
            predict,
            radius,
            correct: correct == 1,
            c_hat: predict.max(0) as u32,
            n_a,
            n,
            n0: 0,
            alpha: 0.0,
            sigma,
            seconds,
            sequential: None,
        });
    }
    if rows.is_empty() {
        bail!(usage(format!(
            "{}: no result rows after the header",
            path.display()
        )));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(idx: u64, label: u32, predict: i64, radius: f64, n_a: u64) -> CertRow {
        CertRow {
            idx,
            label,
            predict,
            radius,
            correct: predict == i64::from(label),
            c_hat: predict.max(0) as u32,
            n_a,
            n: 1000,
            n0: 0,
            alpha: 0.0,
            sigma: 0.25,
            seconds: 1.5,
            sequential: None,
        }
    }

    #[test]
    fn what_caf_writes_it_reads_back() {
        let rows = vec![row(0, 3, 3, 0.125, 990), row(7, 1, -1, 0.0, 400)];
        let mut bytes = Vec::new();
        write_header(&mut bytes).unwrap();
        for r in &rows {
            write_row(&mut bytes, r).unwrap();
        }
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            "idx\tlabel\tpredict\tradius\tcorrect\ttime\tnA\tn\n\
             0\t3\t3\t0.125\t1\t1.5000\t990\t1000\n\
             7\t1\t-1\t0.000\t0\t1.5000\t400\t1000\n"
        );
        assert_eq!(parse(Path::new("x.tsv"), &bytes, 0.25).unwrap(), rows);
    }
}
