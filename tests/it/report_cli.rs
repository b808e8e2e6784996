//! `caf import` and `caf report` through the real binary: Cohen et al.'s published logs
//! imported and reported with numbers checked against the logs themselves, located errors for
//! bad input, and the HTML page rendered in a real headless browser.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::util::*;

fn published() -> PathBuf {
    shared_data().join("published/cohen2019-cifar10-resnet110")
}

fn cohen_file(sigma: &str) -> PathBuf {
    published().join(format!("cifar10-resnet110-sigma_{sigma}.tsv"))
}

/// (correct, radius) per row of a certify.py log, parsed independently of caf.
fn outcomes(path: &Path) -> Vec<(bool, f64)> {
    let text = std::fs::read_to_string(path).expect("published log");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[4] == "1", f[3].parse().expect("radius"))
        })
        .collect()
}

fn import_all(dir: &Dir) {
    for (s, sigma) in [("0.25", "0.25"), ("0.50", "0.5"), ("1.00", "1.0")] {
        let out = ok(&dir.run(&[
            "import",
            cohen_file(s).to_str().expect("utf-8 path"),
            "--method",
            "cohen-resnet110",
            "--sigma",
            sigma,
            "--label",
            "Cohen et al. 2019, published log",
            "--study",
            "published",
            "--db",
            "r.db",
        ]));
        assert!(out.contains("not recomputable"), "{out}");
    }
}

#[test]
fn imported_published_logs_report_the_numbers_of_the_logs() {
    let dir = Dir::new();
    import_all(&dir);
    // Importing the same file again changes nothing.
    let again = ok(&dir.run(&[
        "import",
        cohen_file("0.25").to_str().expect("utf-8"),
        "--method",
        "cohen-resnet110",
        "--sigma",
        "0.25",
        "--study",
        "published",
        "--db",
        "r.db",
    ]));
    assert!(again.contains("imported"), "{again}");
    let out = ok(&dir.run(&[
        "report",
        "published",
        "--db",
        "r.db",
        "--out",
        "rep",
        "--radii",
        "0,0.25,0.5,0.75,1",
    ]));
    assert!(out.contains("index.html"), "{out}");
    let csv = std::fs::read_to_string(dir.join("rep/tables/certified_accuracy.csv")).expect("csv");
    let lines: Vec<Vec<String>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    assert_eq!(lines.len(), 3 * 5, "{csv}");
    for (s, sigma) in [("0.25", 0.25), ("0.50", 0.5), ("1.00", 1.0)] {
        let rows = outcomes(&cohen_file(s));
        for r in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let expected =
                rows.iter().filter(|(c, rad)| *c && *rad >= r).count() as f64 / rows.len() as f64;
            let line = lines
                .iter()
                .find(|l| {
                    l[2].parse::<f64>().ok() == Some(sigma) && l[3].parse::<f64>().ok() == Some(r)
                })
                .unwrap_or_else(|| panic!("no row for σ={sigma} r={r} in {csv}"));
            assert_eq!(line[1], "cohen-resnet110");
            let got: f64 = line[4].parse().expect("number");
            assert!(
                (got - expected).abs() < 1e-12,
                "σ={sigma} r={r}: {got} vs {expected}"
            );
            assert_eq!(line[5], rows.len().to_string());
        }
    }
    let html = std::fs::read_to_string(dir.join("rep/index.html")).expect("html");
    assert!(
        html.contains("no (no nA/n)"),
        "imported rows are marked not recomputable"
    );
    assert!(dir.join("rep/figures/curves-envelope.png").exists());
}

#[test]
fn bad_import_files_are_located_usage_errors_and_record_nothing() {
    let dir = Dir::new();
    let cases = [
        ("noheader.tsv", "0\t3\t3\t0.5\t1\t1.0\n", "no `idx` column"),
        (
            "badradius.tsv",
            "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\tabc\t1\t1.0\n",
            "badradius.tsv:2: column 4 (`radius`)",
        ),
        (
            "contradiction.tsv",
            "idx\tlabel\tpredict\tradius\tcorrect\n0\t3\t4\t0.5\t1\n",
            "contradicts",
        ),
        (
            "short.tsv",
            "idx\tlabel\tpredict\tradius\tcorrect\n0\t3\n",
            "short.tsv:2: missing column",
        ),
        ("empty.tsv", "", "empty file"),
    ];
    for (name, body, needle) in cases {
        dir.write(name, body);
        let out = dir.run(&[
            "import", name, "--method", "x", "--sigma", "0.5", "--db", "e.db",
        ]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(needle),
            "{name}: {}",
            text(&out.stderr)
        );
    }
    // Nothing was recorded: the files were rejected before the database was opened.
    assert!(!dir.join("e.db").exists());
    let out = dir.run(&["report", "--db", "missing.db"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no database"));
}

/// Debian's chromium, started like the machine's probe: headless, no sandbox (root), no
/// background networking (the machine has no network).
fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn headless(browser: &Path, profile: &Path) -> Command {
    let mut c = Command::new(browser);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

#[test]
fn the_html_report_renders_in_headless_chromium() {
    let Some(browser) = chromium() else {
        // .ci/run installs chromium and sets CAF_REQUIRE_BROWSER, so CI never skips this.
        assert!(
            std::env::var_os("CAF_REQUIRE_BROWSER").is_none(),
            "CAF_REQUIRE_BROWSER is set but no chromium was found"
        );
        eprintln!("skipped: no chromium (apt-get install chromium); CI installs it");
        return;
    };
    let dir = Dir::new();
    import_all(&dir);
    ok(&dir.run(&["report", "published", "--db", "r.db", "--out", "rep"]));
    let index = dir.join("rep/index.html");
    let url = format!("file://{}", index.display());
    let source = std::fs::read_to_string(&index).expect("html");

    // The DOM the browser built holds every figure and table of the file.
    let dom = headless(&browser, &dir.join("profile-dom"))
        .args(["--dump-dom", &url])
        .output()
        .expect("run chromium");
    assert!(dom.status.success(), "{}", text(&dom.stderr));
    let dom = text(&dom.stdout);
    for tag in ["<svg", "<table", "<section"] {
        assert_eq!(
            dom.matches(tag).count(),
            source.matches(tag).count(),
            "{tag}"
        );
    }
    assert!(dom.matches("<svg").count() >= 4);

    // A screenshot shows the curves in the method's colour: the SVG figures were drawn.
    let shot = dir.join("shot.png");
    let run = headless(&browser, &dir.join("profile-shot"))
        .arg(format!("--screenshot={}", shot.display()))
        .args(["--window-size=1200,2400", &url])
        .output()
        .expect("run chromium");
    assert!(run.status.success(), "{}", text(&run.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&shot).expect("screenshot"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!((info.width, info.height), (1200, 2400));
    let channels = info.color_type.samples();
    let caf::report::plot::Rgb(r, g, b) = caf::report::plot::method_color("cohen-resnet110");
    let close = |p: &[u8]| {
        (p[0] as i32 - r as i32).abs() < 12
            && (p[1] as i32 - g as i32).abs() < 12
            && (p[2] as i32 - b as i32).abs() < 12
    };
    let hits = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .filter(|p| close(p))
        .count();
    assert!(
        hits > 200,
        "only {hits} pixels of the method's colour in the screenshot"
    );
    if let Ok(keep) = std::env::var("CAF_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).expect("keep screenshot");
    }
}

#[test]
fn compare_overlays_two_databases_with_paired_differences() {
    let dir = Dir::new();
    for db in ["a.db", "b.db"] {
        for (s, sigma) in [("0.25", "0.25"), ("0.50", "0.5")] {
            ok(&dir.run(&[
                "import",
                cohen_file(s).to_str().expect("utf-8"),
                "--method",
                "cohen",
                "--sigma",
                sigma,
                "--study",
                "logs",
                "--db",
                db,
            ]));
        }
    }
    ok(&dir.run(&["report", "--compare", "a.db", "b.db:logs", "--out", "cmp"]));
    let csv = std::fs::read_to_string(dir.join("cmp/tables/compare-studies-1.csv")).expect("csv");
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 2 * 5, "{csv}");
    for r in rows {
        let f: Vec<&str> = r.split(',').collect();
        // The same logs on both sides: equal accuracies, Δ = 0, p = 1.
        assert_eq!(f[4], f[5], "{r}");
        assert_eq!((f[6], f[9]), ("0", "1.0000"), "{r}");
    }
    assert!(dir
        .join("cmp/figures/compare-studies-sigma-0.25.svg")
        .exists());
    let bad = dir.run(&["report", "--compare", "a.db", "nope.db", "--out", "x"]);
    assert_eq!(bad.status.code(), Some(2));
}
