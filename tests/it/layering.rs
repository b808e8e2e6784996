//! The module layering, checked from the source: no cycle between the library's top-level
//! modules, nor between the binary's `cli` modules.
//!
//! Why a test: the one-way picture in README's design section (spec → plan → store/queue →
//! sched → methods → models/data/certify) is what lets a backend, a device path or a method be
//! added in one place; a single `use` in the wrong direction undoes it silently. The test reads
//! every `crate::…`, `super::…` and `use crate::{…}` path outside test code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module A uses module B, with one file where it does (for the error message).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// Source without comments, string literals and `#[cfg(test)]` items, so that only code
/// counts: a doc link to another module is not a dependency, and tests may reach anywhere.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < bytes.len() && bytes[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            i += 2;
            while i + 1 < bytes.len() && !(bytes[i] == '*' && bytes[i + 1] == '/') {
                i += 1;
            }
            i += 2;
            continue;
        }
        if c == '"' {
            // Raw strings (r"…", r#"…"#) are rare in this crate and hold no paths; plain ones
            // are skipped with their escapes.
            i += 1;
            while i < bytes.len() && bytes[i] != '"' {
                if bytes[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
            continue;
        }
        if c == '\'' {
            // A char literal ('x', '\n', '{') must not unbalance the braces below; a lifetime
            // ('a) has no closing quote within three characters.
            let close = (i + 2..(i + 5).min(bytes.len())).find(|&k| bytes[k] == '\'');
            if let Some(k) = close {
                if k == i + 2 || bytes[i + 1] == '\\' {
                    i = k + 1;
                    out.push_str("' '");
                    continue;
                }
            }
        }
        out.push(c);
        i += 1;
    }
    strip_cfg_test(&out)
}

/// Removes each `#[cfg(test)]` item: a `mod x;` line, or a braced item up to its closing brace.
fn strip_cfg_test(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let semi = after.find(';');
        let brace = after.find('{');
        match (semi, brace) {
            (Some(s), Some(b)) if s < b => rest = &after[s + 1..],
            (Some(s), None) => rest = &after[s + 1..],
            (_, Some(b)) => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (k, ch) in after[b..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
            (None, None) => rest = "",
        }
    }
    out.push_str(rest);
    out
}

/// The first path segment of every item of a `{a, b::c, d::{e, f}}` group starting at `s`.
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut item = String::new();
    for ch in s.chars() {
        match ch {
            '{' => {
                depth += 1;
                if depth > 1 {
                    item.push(ch);
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    heads.push(std::mem::take(&mut item));
                    break;
                }
                item.push(ch);
            }
            ',' if depth == 1 => heads.push(std::mem::take(&mut item)),
            _ => item.push(ch),
        }
    }
    heads
        .into_iter()
        .filter_map(|h| {
            let h: String = h
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!h.is_empty()).then_some(h)
        })
        .collect()
}

/// The child modules a file declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn declared_children(code: &str) -> Vec<String> {
    code.split(';')
        .filter_map(|stmt| {
            let words: Vec<&str> = stmt.split_whitespace().collect();
            let at = words.iter().rposition(|w| *w == "mod")?;
            (at + 2 == words.len()).then(|| words[at + 1].to_string())
        })
        .collect()
}

/// Absolute module paths (`["plan"]`, `["cli", "args"]`, …) that `code` in module `module`
/// refers to, each cut to the segments that name a module. Besides `crate::`, `super::` and
/// `self::` paths, a bare path through a child module the file declares counts too
/// (`commands::dispatch` in `cli/mod.rs`).
fn references(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let children = declared_children(code);
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut refs = Vec::new();
    let chars: Vec<(usize, char)> = code.char_indices().collect();
    for (k, &(at, _)) in chars.iter().enumerate() {
        let before = k
            .checked_sub(1)
            .map(|p| chars[p].1)
            .filter(|c| c.is_alphanumeric() || *c == '_' || *c == ':');
        if before.is_some() {
            continue;
        }
        let tail = &code[at..];
        let (mut base, mut rest): (Vec<String>, &str) =
            if let Some(r) = tail.strip_prefix("crate::") {
                (Vec::new(), r)
            } else if tail.starts_with("super::") {
                let mut base = module.to_vec();
                let mut r = tail;
                while let Some(x) = r.strip_prefix("super::") {
                    base.pop();
                    r = x;
                }
                (base, r)
            } else if let Some(r) = tail.strip_prefix("self::") {
                (module.to_vec(), r)
            } else if children
                .iter()
                .any(|c| tail.starts_with(c.as_str()) && tail[c.len()..].starts_with("::"))
            {
                (module.to_vec(), tail)
            } else {
                continue;
            };
        if rest.starts_with('{') {
            for h in group_heads(rest) {
                let mut p = base.clone();
                p.push(h);
                refs.push(p);
            }
            continue;
        }
        // Follow `a::b::c` as far as it goes; the caller cuts it to a known module.
        loop {
            let seg = ident(rest);
            if seg.is_empty() {
                break;
            }
            base.push(seg.clone());
            rest = &rest[seg.len()..];
            match rest.strip_prefix("::") {
                Some(r) if !r.starts_with('{') => rest = r,
                Some(r) => {
                    for h in group_heads(r) {
                        let mut p = base.clone();
                        p.push(h);
                        refs.push(p);
                    }
                    base.clear();
                    break;
                }
                None => break,
            }
        }
        if !base.is_empty() {
            refs.push(base);
        }
    }
    refs
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A source file's module path below `root` (`plan/mod.rs` → `["plan"]`), or `None` for a
/// test-only file (`tests.rs`, `*_tests.rs`).
fn module_of(root: &Path, file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix(root).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if stem == "tests" || stem.ends_with("_tests") {
        return None;
    }
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    Some(parts)
}

/// The dependency graph between the children of `parent` (`[]` for the library's top level,
/// `["cli"]` for the binary's commands). A file's items count for the child it lies in; the
/// parent's own file is the node `parent` itself when `include_parent` is set.
fn graph(root: &Path, files: &[PathBuf], parent: &[String], include_parent: bool) -> Graph {
    let depth = parent.len();
    let mut children: BTreeSet<String> = BTreeSet::new();
    let mut modules = Vec::new();
    for f in files {
        let Some(m) = module_of(root, f) else {
            continue;
        };
        if m.len() > depth && m[..depth] == *parent {
            children.insert(m[depth].clone());
        }
        modules.push((f, m));
    }
    let node_of = |m: &[String]| -> Option<String> {
        if m.len() > depth && m[..depth] == *parent && children.contains(&m[depth]) {
            Some(m[depth].clone())
        } else if include_parent && m == parent {
            Some("(mod)".to_string())
        } else {
            None
        }
    };
    let mut g = Graph::new();
    for (f, m) in &modules {
        let Some(from) = node_of(m) else {
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for r in references(&code_only(&text), m) {
            // `super::Item` from a child names an item of the parent's own file.
            let to = node_of(&r).or_else(|| {
                (include_parent && r.len() == depth + 1 && r[..depth] == *parent)
                    .then(|| "(mod)".to_string())
            });
            if let Some(to) = to {
                if to != from {
                    let shown = f.strip_prefix(root).unwrap_or(f).display().to_string();
                    g.entry(from.clone())
                        .or_default()
                        .entry(to)
                        .or_insert(shown);
                }
            }
        }
    }
    g
}

/// Every cycle's members, each as `a → b → … → a` with the file behind each edge.
fn cycles(g: &Graph) -> Vec<String> {
    // Tarjan's strongly connected components; a component of two or more modules is a cycle.
    struct T<'g> {
        g: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on: BTreeSet<&'g str>,
        out: Vec<Vec<&'g str>>,
    }
    impl<'g> T<'g> {
        fn visit(&mut self, v: &'g str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on.insert(v);
            if let Some(next) = self.g.get(v) {
                for w in next.keys() {
                    let w = w.as_str();
                    if !self.index.contains_key(w) {
                        self.visit(w);
                        let lw = self.low[w];
                        let lv = self.low[v];
                        self.low.insert(v, lv.min(lw));
                    } else if self.on.contains(w) {
                        let iw = self.index[w];
                        let lv = self.low[v];
                        self.low.insert(v, lv.min(iw));
                    }
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
        .iter()
        .map(|comp| {
            let inside: BTreeSet<&str> = comp.iter().copied().collect();
            let edges: Vec<String> = comp
                .iter()
                .flat_map(|a| {
                    g.get(*a)
                        .into_iter()
                        .flatten()
                        .filter(|(b, _)| inside.contains(b.as_str()))
                        .map(move |(b, file)| format!("{a} → {b} ({file})"))
                })
                .collect();
            format!("{{{}}}: {}", comp.join(", "), edges.join("; "))
        })
        .collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn all_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
}

#[test]
fn library_modules_depend_one_way() {
    let root = src();
    let files: Vec<PathBuf> = all_files()
        .into_iter()
        .filter(|f| !f.starts_with(root.join("cli")) && !f.ends_with("main.rs"))
        .collect();
    let g = graph(&root, &files, &[], false);
    assert!(
        g.len() >= 8,
        "the checker found too few modules to be reading the source: {g:?}"
    );
    let found = cycles(&g);
    assert!(
        found.is_empty(),
        "dependency cycles between top-level modules:\n{}",
        found.join("\n")
    );
}

#[test]
fn cli_modules_depend_one_way() {
    let root = src();
    let files: Vec<PathBuf> = all_files()
        .into_iter()
        .filter(|f| f.starts_with(root.join("cli")) || f.ends_with("main.rs"))
        .collect();
    let g = graph(&root, &files, &["cli".to_string()], true);
    assert!(!g.is_empty(), "no cli modules read");
    let found = cycles(&g);
    assert!(
        found.is_empty(),
        "dependency cycles between cli modules:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checker_sees_uses_and_finds_a_planted_cycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let write = |p: &str, text: &str| {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    write("lib.rs", "pub mod a; pub mod b; pub mod c; pub mod d;");
    // d's own file reaches its child bare, and the child reaches back through `super::`.
    write(
        "d/mod.rs",
        "mod kid;\npub struct Thing;\nfn f() { kid::go() }\n",
    );
    write("d/kid.rs", "use super::Thing;\npub fn go() {}\n");
    // a → b through a grouped use, b → c through a path in code, c → a through `super::super`.
    write("a/mod.rs", "use crate::{b::Thing, util};\n");
    write(
        "b.rs",
        "// crate::a in a comment is no dependency\nfn f() { crate::c::go(\"crate::a\") }\n",
    );
    write("c/inner.rs", "use super::super::a::X;\n");
    write(
        "c/mod.rs",
        "mod inner;\n#[cfg(test)]\nmod tests { use crate::b::Y; }\n",
    );
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let g = graph(root, &files, &[], false);
    assert_eq!(g["a"].keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(
        g["b"].keys().collect::<Vec<_>>(),
        ["c"],
        "comments and strings do not count"
    );
    assert_eq!(
        g["c"].keys().collect::<Vec<_>>(),
        ["a"],
        "cfg(test) items do not count"
    );
    let found = cycles(&g);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("{a, b, c}"), "{}", found[0]);
    // Without the edge back, no cycle.
    write("c/inner.rs", "fn f() {}\n");
    let g = graph(root, &files, &[], false);
    assert!(cycles(&g).is_empty());
    // One level down, with the parent's own file as a node: d ⇄ d::kid is a cycle.
    let g = graph(root, &files, &["d".to_string()], true);
    assert_eq!(
        g["(mod)"].keys().collect::<Vec<_>>(),
        ["kid"],
        "bare child paths count"
    );
    assert_eq!(g["kid"].keys().collect::<Vec<_>>(), ["(mod)"]);
    assert_eq!(cycles(&g).len(), 1);
}
