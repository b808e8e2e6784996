//! `caf db copy` with the real binary: a study run on SQLite, copied to PostgreSQL
//! (`CAF_TEST_POSTGRES`; another SQLite file without it) and from there to a second SQLite
//! file, exports and reports exactly what the original does.

use std::path::Path;

use super::postgres_cli::fresh_database;
use super::util::*;

/// A report file without the line stating when it was written (the one line that differs
/// between two reports of the same results).
fn report_file(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.contains("report written"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every file of a report's `tables/` folder, by name.
fn tables(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir.join("tables"))
        .expect("tables folder")
        .map(|e| {
            let e = e.expect("entry");
            let name = e.file_name().to_string_lossy().into_owned();
            (name, report_file(&e.path()))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_study_copied_to_postgres_and_back_exports_and_reports_the_same() {
    let dir = Dir::new();
    dir.write("s.yaml", &resnet_spec("travel", "0.25, 0.5", 20, 100, 20));
    ok(&dir.run(&["run", "s.yaml", "--db", "src.db", "--artifacts", "a", "-q"]));
    let middle = fresh_database().unwrap_or_else(|| "middle.db".into());

    let first = dir.run(&["db", "copy", "src.db", &middle]);
    ok(&first);
    assert!(
        text(&first.stderr).contains("copied"),
        "{}",
        text(&first.stderr)
    );
    // Copying again finds the same study there and writes nothing.
    let again = dir.run(&["db", "copy", "src.db", &middle, "--study", "travel"]);
    ok(&again);
    assert!(
        text(&again.stderr).contains("same results; nothing to copy"),
        "{}",
        text(&again.stderr)
    );
    ok(&dir.run(&["db", "copy", &middle, "back.db"]));

    for format in ["csv", "json"] {
        let src = ok(&dir.run(&["export", "--db", "src.db", "--format", format]));
        let mid = ok(&dir.run(&["export", "--db", &middle, "--format", format]));
        let back = ok(&dir.run(&["export", "--db", "back.db", "--format", format]));
        assert!(src.lines().count() > 5, "{src}");
        assert_eq!(src, mid, "{format}");
        assert_eq!(src, back, "{format}");
    }
    ok(&dir.run(&["report", "--db", "src.db", "--out", "r-src"]));
    ok(&dir.run(&["report", "--db", "back.db", "--out", "r-back"]));
    let (a, b) = (tables(&dir.join("r-src")), tables(&dir.join("r-back")));
    assert!(
        a.iter().any(|(n, _)| n == "certified_accuracy.csv"),
        "{a:?}"
    );
    assert_eq!(a, b);
    assert_eq!(
        report_file(&dir.join("r-src/report.md")),
        report_file(&dir.join("r-back/report.md"))
    );

    // The same study name with other results (another σ) is refused, and changes nothing.
    dir.write("t.yaml", &resnet_spec("travel", "1.0", 20, 100, 20));
    ok(&dir.run(&[
        "run",
        "t.yaml",
        "--db",
        "other.db",
        "--artifacts",
        "a",
        "-q",
    ]));
    let refused = dir.run(&["db", "copy", "other.db", "back.db"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    let msg = text(&refused.stderr);
    assert!(
        msg.contains("study `travel` already exists in the destination with different content"),
        "{msg}"
    );
    let back = ok(&dir.run(&["export", "--db", "back.db", "--format", "csv"]));
    let src = ok(&dir.run(&["export", "--db", "src.db", "--format", "csv"]));
    assert_eq!(src, back);

    // Mistakes are usage errors naming what is wrong.
    let missing = dir.run(&["db", "copy", "src.db", "x.db", "--study", "nope"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("no study `nope` in src.db (studies: travel)"));
    let itself = dir.run(&["db", "copy", "src.db", "sqlite:src.db"]);
    assert_eq!(itself.status.code(), Some(2), "{}", text(&itself.stderr));
    assert!(
        !dir.join("x.db").exists(),
        "nothing is created for a refused copy"
    );
}
