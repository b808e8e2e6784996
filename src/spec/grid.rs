//! The `grid` section: parsing, validation and expansion into cells.
//!
//! Expansion order (documented in experiments/README-spec.md, relied on by the planner for stable
//! job numbering):
//! 1. the cartesian product of the top-level axes — `axes` entries in the order written, then each
//!    `zip` group in the order written — with the first axis varying slowest;
//! 2. each of those cells whose `method` has a `methods.<m>` entry is replaced, in place, by the
//!    product of that entry's axes (same ordering rule), with its `params` added;
//! 3. cells matching any `exclude` rule are dropped;
//! 4. `include` cells are appended in the order written;
//! 5. duplicates (same parameters and numerically equal values) are dropped, keeping the first.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::Value as Json;

use super::read::{
    as_json, as_map, as_number, as_seq, did_you_mean, fields, join_names, Cx, Fields,
};
use super::yaml::{abbreviate, Kind, Node};
use super::{Backbone, Cell, Param, Span, SpecError, MAX_CELLS};

/// Most rule-entry comparisons exclusion may cost (cells × total key/value pairs in `exclude`);
/// keeps a hostile spec from turning filtering into minutes of work.
const MAX_EXCLUDE_WORK: usize = 5_000_000;
/// Most `include` rules and `exclude` rules each.
const MAX_RULES: usize = 10_000;
/// Most memory (estimated) the expanded cells may take. A large parameter value (a long list, a
/// long string) is copied into every cell, so the cell count alone does not bound memory.
const MAX_GRID_BYTES: usize = 128 << 20;
/// Estimated bytes per parameter or JSON value, string contents excluded.
const VALUE_BYTES: usize = 64;

/// One axis of a product: each row is the set of parameters one step of the axis assigns
/// (one pair for a plain axis, one pair per list for a zip group).
struct Axis {
    rows: Vec<Vec<(String, Param)>>,
}

/// params + axes of either the top level or one `methods.<m>` entry.
struct Level {
    params: Vec<(String, Param)>,
    axes: Vec<Axis>,
}

/// Where a parameter name is defined, for collision messages.
#[derive(Clone)]
struct Def {
    span: Span,
    place: String,
}

struct Rule {
    pairs: Vec<(String, Param)>,
    span: Span,
}

struct GridCx<'a> {
    cx: Cx<'a>,
    backbones: &'a BTreeMap<String, Backbone>,
    /// Estimated bytes of the cells built so far, against [`MAX_GRID_BYTES`].
    spent: std::cell::Cell<usize>,
    /// Where whole-grid errors point: the `grid:` key.
    at: Span,
}

/// Expands the grid at `node`; `at` (the `grid:` key) locates errors about the grid as a whole.
pub fn expand(
    cx: Cx,
    node: &Node,
    at: Span,
    backbones: &BTreeMap<String, Backbone>,
) -> Result<Vec<Cell>, SpecError> {
    let g = GridCx {
        cx,
        backbones,
        spent: std::cell::Cell::new(0),
        at,
    };
    let grid = fields(
        cx,
        node,
        "grid",
        &["params", "axes", "zip", "methods", "exclude", "include"],
    )?;

    let mut top_defs = HashMap::new();
    let top = g.level(&grid, &mut top_defs, None)?;
    if !top_defs.contains_key("method") {
        return Err(cx.err(
            at,
            "the grid sets no `method`: every cell needs one; add it to grid.params or grid.axes",
        ));
    }

    let mut methods: Vec<(String, Span, Level)> = Vec::new();
    let mut known: BTreeSet<String> = top_defs.keys().cloned().collect();
    if let Some(methods_node) = grid.get("methods") {
        for (key, value) in as_map(cx, methods_node, "grid.methods")? {
            let method = g.method_name(key, "a key of grid.methods")?;
            let field = format!("grid.methods.{method}");
            let extras = fields(cx, value, &field, &["params", "axes", "zip"])?;
            let mut defs = HashMap::new();
            let level = g.level(&extras, &mut defs, Some(&top_defs))?;
            known.extend(defs.into_keys());
            methods.push((method, key.span, level));
        }
    }

    let exclude = g.rules(grid.get("exclude"), "grid.exclude", &known)?;
    let include = g.rules(grid.get("include"), "grid.include", &known)?;

    // A `methods` entry nothing uses is almost always a typo in the key or in the method list.
    let used: BTreeSet<&str> = top
        .params
        .iter()
        .chain(top.axes.iter().flat_map(|a| a.rows.iter().flatten()))
        .chain(include.iter().flat_map(|r| r.pairs.iter()))
        .filter(|(name, _)| name == "method")
        .filter_map(|(_, p)| p.value.as_str())
        .collect();
    for (method, span, _) in &methods {
        if !used.contains(method.as_str()) {
            return Err(cx.err(
                *span,
                format!(
                    "no cell has method `{method}` (methods in the grid: {}){}",
                    join_names(used.iter().copied()),
                    did_you_mean(method, used.iter().copied())
                ),
            ));
        }
    }
    let extras: HashMap<&str, &Level> = methods.iter().map(|(m, _, l)| (m.as_str(), l)).collect();

    let mut cells = g.product(&top, &extras, at)?;

    let rule_pairs: usize = exclude.iter().map(|r| r.pairs.len()).sum();
    if cells.len().saturating_mul(rule_pairs) > MAX_EXCLUDE_WORK {
        return Err(cx.err(
            at,
            format!(
                "{} cells × {rule_pairs} exclude conditions is too much filtering work; \
                 narrow the axes instead of excluding so many combinations",
                cells.len()
            ),
        ));
    }
    let exclude: Vec<Vec<(&str, String)>> = exclude
        .iter()
        .map(|r| {
            r.pairs
                .iter()
                .map(|(k, p)| (k.as_str(), canonical(&p.value)))
                .collect()
        })
        .collect();
    if !exclude.is_empty() {
        // Each cell's values are canonicalised once, so the rule loop only compares strings.
        let named: BTreeSet<&str> = exclude.iter().flatten().map(|(k, _)| *k).collect();
        cells.retain(|cell| {
            let values: HashMap<&str, String> = named
                .iter()
                .filter_map(|&k| cell.params.get(k).map(|p| (k, canonical(&p.value))))
                .collect();
            !exclude.iter().any(|rule| {
                rule.iter()
                    .all(|(name, want)| values.get(name).is_some_and(|v| v == want))
            })
        });
    }

    for rule in &include {
        cells.push(g.include_cell(&top, &extras, rule)?);
    }

    let mut seen = HashSet::new();
    cells.retain(|cell| seen.insert(cell_key(cell)));

    if cells.is_empty() {
        return Err(cx.err(at, "the grid expands to no cells (every cell is excluded)"));
    }
    Ok(cells)
}

impl GridCx<'_> {
    /// Parses params/axes/zip of one level, recording names in `defs` (rejecting repeats) and, for
    /// a method level, rejecting names the top level already defines.
    fn level(
        &self,
        level: &Fields,
        defs: &mut HashMap<String, Def>,
        top: Option<&HashMap<String, Def>>,
    ) -> Result<Level, SpecError> {
        let cx = self.cx;
        // Collected first and sorted by position so a repeated name is reported where it is
        // written second, whichever of params/axes/zip comes first in the file.
        let mut names: Vec<(String, Span, String)> = Vec::new();
        let mut params = Vec::new();
        let mut axes = Vec::new();

        if let Some(node) = level.get("params") {
            let field = level.name("params");
            for (key, value) in as_map(cx, node, &field)? {
                let name = self.param_name(key, &field)?;
                names.push((name.clone(), key.span, field.clone()));
                params.push((name.clone(), self.param(&name, value)?));
            }
        }
        if let Some(node) = level.get("axes") {
            let field = level.name("axes");
            for (key, value) in as_map(cx, node, &field)? {
                let name = self.param_name(key, &field)?;
                names.push((name.clone(), key.span, field.clone()));
                let values = self.axis_values(&name, value)?;
                axes.push(Axis {
                    rows: values
                        .into_iter()
                        .map(|p| vec![(name.clone(), p)])
                        .collect(),
                });
            }
        }
        if let Some(node) = level.get("zip") {
            let field = level.name("zip");
            let groups = as_seq(
                cx,
                node,
                "a list of zip groups (mappings of name: [values])",
                &field,
            )?;
            for group in groups {
                let entries = as_map(cx, group, &format!("a group of {field}"))?;
                if entries.is_empty() {
                    return Err(cx.err(
                        group.span,
                        format!("empty zip group in {field}; a group needs at least one axis"),
                    ));
                }
                let mut lists: Vec<(String, &Node, Vec<Param>)> = Vec::new();
                for (key, value) in entries {
                    let name = self.param_name(key, &field)?;
                    names.push((name.clone(), key.span, field.clone()));
                    let values = self.axis_values(&name, value)?;
                    lists.push((name, value, values));
                }
                let longest = lists
                    .iter()
                    .max_by_key(|(_, _, v)| v.len())
                    .map(|(n, _, v)| (n.clone(), v.len()));
                if let Some((long_name, long_len)) = longest {
                    if let Some((name, node, values)) =
                        lists.iter().find(|(_, _, v)| v.len() < long_len)
                    {
                        return Err(cx.err(
                            node.span,
                            format!(
                                "zip lists must have equal lengths: `{name}` has {} value{} but \
                                 `{long_name}` has {long_len}",
                                values.len(),
                                if values.len() == 1 { "" } else { "s" }
                            ),
                        ));
                    }
                    let mut rows: Vec<Vec<(String, Param)>> =
                        (0..long_len).map(|_| Vec::new()).collect();
                    for (name, _, values) in lists {
                        for (row, value) in rows.iter_mut().zip(values) {
                            row.push((name.clone(), value));
                        }
                    }
                    axes.push(Axis { rows });
                }
            }
        }

        names.sort_by_key(|(_, span, _)| *span);
        for (name, span, place) in names {
            if top.is_some() && name == "method" {
                return Err(cx.err(
                    span,
                    format!(
                        "`method` cannot be set inside {place}: it selects the method entry itself"
                    ),
                ));
            }
            if let Some(first) = top.and_then(|t| t.get(&name)) {
                return Err(cx.err(
                    span,
                    format!(
                        "`{name}` is already defined in {} (line {}, column {}); a method's extras \
                         cannot redefine a top-level parameter",
                        first.place, first.span.line, first.span.col
                    ),
                ));
            }
            if let Some(first) = defs.get(&name) {
                return Err(cx.err(
                    span,
                    format!(
                        "`{name}` is already defined in {} (line {}, column {}); a parameter may \
                         appear only once among params, axes and zip",
                        first.place, first.span.line, first.span.col
                    ),
                ));
            }
            defs.insert(name, Def { span, place });
        }
        Ok(Level { params, axes })
    }

    fn axis_values(&self, name: &str, node: &Node) -> Result<Vec<Param>, SpecError> {
        let cx = self.cx;
        let items = match &node.kind {
            Kind::Seq(items) => items,
            _ => {
                return Err(cx.err(
                    node.span,
                    format!(
                        "expected a list of values for axis `{name}`, found {} (a fixed value \
                         belongs in params)",
                        node.describe()
                    ),
                ));
            }
        };
        if items.is_empty() {
            return Err(cx.err(
                node.span,
                format!("axis `{name}` has no values; an axis needs at least one"),
            ));
        }
        let mut seen: HashMap<String, Span> = HashMap::new();
        let mut values = Vec::with_capacity(items.len());
        for item in items {
            let param = self.param(name, item)?;
            let key = canonical(&param.value);
            if let Some(first) = seen.get(&key) {
                return Err(cx.err(
                    item.span,
                    format!(
                        "axis `{name}` repeats the value {} (first at line {}, column {})",
                        item.describe(),
                        first.line,
                        first.col
                    ),
                ));
            }
            seen.insert(key, item.span);
            values.push(param);
        }
        Ok(values)
    }

    /// Parameter names end up as JSON keys, CLI flags and report columns: keep them identifier-like.
    fn param_name(&self, key: &Node, field: &str) -> Result<String, SpecError> {
        let name = key.as_str().unwrap_or_default();
        let mut chars = name.chars();
        let ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            && name.len() <= 64;
        if !ok {
            return Err(self.cx.err(
                key.span,
                format!(
                    "invalid parameter name `{}` in {field}: expected a letter or `_` followed by \
                     letters, digits, `_`, `.` or `-` (at most 64 characters)",
                    abbreviate(name)
                ),
            ));
        }
        Ok(name.to_string())
    }

    fn method_name(&self, node: &Node, field: &str) -> Result<String, SpecError> {
        let ok = node.as_str().filter(|m| {
            !m.is_empty()
                && m.len() <= 64
                && m.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        });
        match ok {
            Some(m) => Ok(m.to_string()),
            None => Err(self.cx.expected(
                node,
                "a method name (letters, digits, `_`, `.`, `-`)",
                field,
            )),
        }
    }

    /// Converts one parameter value, validating the parameters this module knows about.
    fn param(&self, name: &str, node: &Node) -> Result<Param, SpecError> {
        let cx = self.cx;
        let value = match name {
            // Stored as a float even when written `1`, so `sigma: 1` and `sigma: 1.0` name the
            // same job.
            "sigma" => match as_number(node).filter(|s| *s > 0.0) {
                Some(s) => Json::from(s),
                None => return Err(cx.expected(node, "a number > 0", "sigma")),
            },
            "method" => Json::String(self.method_name(node, "method")?),
            "backbone" => {
                let backbone = node
                    .as_str()
                    .ok_or_else(|| cx.expected(node, "a backbone name", "backbone"))?;
                if !self.backbones.contains_key(backbone) {
                    let names: Vec<&str> = self.backbones.keys().map(String::as_str).collect();
                    return Err(cx.err(
                        node.span,
                        format!(
                            "unknown backbone `{}`; backbones defined: {}{}",
                            abbreviate(backbone),
                            join_names(names.iter().copied()),
                            did_you_mean(backbone, names.iter().copied())
                        ),
                    ));
                }
                Json::String(backbone.to_string())
            }
            _ => self.json(name, node)?,
        };
        Ok(Param {
            value,
            span: node.span,
        })
    }

    fn json(&self, name: &str, node: &Node) -> Result<Json, SpecError> {
        as_json(self.cx, name, node)
    }

    fn rules(
        &self,
        node: Option<&Node>,
        field: &str,
        known: &BTreeSet<String>,
    ) -> Result<Vec<Rule>, SpecError> {
        let cx = self.cx;
        let Some(node) = node else {
            return Ok(Vec::new());
        };
        let items = as_seq(
            cx,
            node,
            "a list of rules (mappings of parameter: value)",
            field,
        )?;
        if items.len() > MAX_RULES {
            return Err(cx.err(
                node.span,
                format!("{field} has more than {MAX_RULES} rules"),
            ));
        }
        let mut rules = Vec::with_capacity(items.len());
        for item in items {
            let entries = as_map(cx, item, &format!("a rule of {field}"))?;
            if entries.is_empty() {
                return Err(cx.err(
                    item.span,
                    format!("empty rule in {field}; name at least one parameter"),
                ));
            }
            let mut pairs = Vec::with_capacity(entries.len());
            for (key, value) in entries {
                let name = key.as_str().unwrap_or_default();
                if !known.contains(name) {
                    return Err(cx.err(
                        key.span,
                        format!(
                            "unknown parameter `{}` in {field}; parameters in the grid: {}{}",
                            abbreviate(name),
                            join_names(known.iter().map(String::as_str)),
                            did_you_mean(name, known.iter().map(String::as_str))
                        ),
                    ));
                }
                pairs.push((name.to_string(), self.param(name, value)?));
            }
            rules.push(Rule {
                pairs,
                span: item.span,
            });
        }
        Ok(rules)
    }

    /// Steps 1–2 of the expansion order, bounded by [`MAX_CELLS`].
    fn product(
        &self,
        top: &Level,
        extras: &HashMap<&str, &Level>,
        grid_span: Span,
    ) -> Result<Vec<Cell>, SpecError> {
        let too_many = || {
            self.cx.err(
                grid_span,
                format!(
                    "the grid expands to more than {MAX_CELLS} cells before exclusion; \
                     split the study"
                ),
            )
        };
        let mut cells = Vec::new();
        let mut base = Cell::default();
        for (name, p) in &top.params {
            base.params.insert(name.clone(), p.clone());
        }
        // Counting up front rejects 10^20-cell grids without iterating them.
        if count(&top.axes) > MAX_CELLS {
            return Err(too_many());
        }
        for_each_combo(&top.axes, &base, &mut |cell| {
            self.charge(&cell)?;
            let extra = cell
                .params
                .get("method")
                .and_then(|p| p.value.as_str())
                .and_then(|m| extras.get(m));
            match extra {
                None => {
                    cells.push(cell);
                }
                Some(level) => {
                    if count(&level.axes).saturating_add(cells.len()) > MAX_CELLS {
                        return Err(too_many());
                    }
                    let mut with_params = cell;
                    for (name, p) in &level.params {
                        with_params.params.insert(name.clone(), p.clone());
                    }
                    for_each_combo(&level.axes, &with_params, &mut |c| {
                        self.charge(&c)?;
                        cells.push(c);
                        Ok(())
                    })?;
                }
            }
            if cells.len() > MAX_CELLS {
                return Err(too_many());
            }
            Ok(())
        })?;
        Ok(cells)
    }

    /// An include rule's cell: grid.params, then the chosen method's params, then the rule.
    fn include_cell(
        &self,
        top: &Level,
        extras: &HashMap<&str, &Level>,
        rule: &Rule,
    ) -> Result<Cell, SpecError> {
        let mut cell = Cell::default();
        for (name, p) in &top.params {
            cell.params.insert(name.clone(), p.clone());
        }
        let method = rule
            .pairs
            .iter()
            .chain(top.params.iter())
            .find(|(name, _)| name == "method")
            .and_then(|(_, p)| p.value.as_str());
        let Some(method) = method else {
            return Err(self.cx.err(
                rule.span,
                "this include rule sets no `method` and grid.params has none; every cell needs one",
            ));
        };
        if let Some(level) = extras.get(method) {
            for (name, p) in &level.params {
                cell.params.insert(name.clone(), p.clone());
            }
        }
        for (name, p) in &rule.pairs {
            cell.params.insert(name.clone(), p.clone());
        }
        self.charge(&cell)?;
        Ok(cell)
    }

    /// Charges a built cell against [`MAX_GRID_BYTES`]. Only one cell is ever built past the
    /// budget, and a single cell is bounded by the YAML node budget.
    fn charge(&self, cell: &Cell) -> Result<(), SpecError> {
        let size: usize = cell
            .params
            .iter()
            .map(|(name, p)| name.len().saturating_add(json_bytes(&p.value)))
            .fold(0, usize::saturating_add);
        let spent = self.spent.get().saturating_add(size);
        self.spent.set(spent);
        if spent > MAX_GRID_BYTES {
            return Err(self.cx.err(
                self.at,
                format!(
                    "the expanded grid would take more than {} MiB: large parameter values are \
                     copied into every cell; use fewer cells or smaller values",
                    MAX_GRID_BYTES >> 20
                ),
            ));
        }
        Ok(())
    }
}

/// Estimated memory of a value. Recursion is bounded by the YAML layer's depth limit.
fn json_bytes(value: &Json) -> usize {
    let own = VALUE_BYTES;
    match value {
        Json::String(s) => own.saturating_add(s.len()),
        Json::Array(items) => items
            .iter()
            .map(json_bytes)
            .fold(own, usize::saturating_add),
        Json::Object(map) => map
            .iter()
            .map(|(k, v)| k.len().saturating_add(json_bytes(v)))
            .fold(own, usize::saturating_add),
        _ => own,
    }
}

fn count(axes: &[Axis]) -> usize {
    axes.iter()
        .fold(1usize, |n, a| n.saturating_mul(a.rows.len()))
}

/// Calls `f` with `base` extended by every combination of `axes`, the last axis varying fastest.
fn for_each_combo(
    axes: &[Axis],
    base: &Cell,
    f: &mut dyn FnMut(Cell) -> Result<(), SpecError>,
) -> Result<(), SpecError> {
    // An odometer rather than recursion: the number of axes is user-controlled.
    let mut index = vec![0usize; axes.len()];
    if axes.iter().any(|a| a.rows.is_empty()) {
        return Ok(());
    }
    loop {
        let mut cell = base.clone();
        for (axis, &i) in axes.iter().zip(&index) {
            for (name, p) in &axis.rows[i] {
                cell.params.insert(name.clone(), p.clone());
            }
        }
        f(cell)?;
        let mut digit = axes.len();
        loop {
            if digit == 0 {
                return Ok(());
            }
            digit -= 1;
            index[digit] += 1;
            if index[digit] < axes[digit].rows.len() {
                break;
            }
            index[digit] = 0;
        }
    }
}

fn cell_key(cell: &Cell) -> String {
    let mut key = String::new();
    for (name, p) in &cell.params {
        key.push_str(&serde_json::to_string(name).unwrap_or_default());
        key.push('=');
        write_canonical(&p.value, &mut key);
        key.push(';');
    }
    key
}

/// A string equal for values a user would consider equal: object key order ignored, and numbers
/// compared by value (`1` == `1.0`), which serde_json's own equality does not do.
pub(crate) fn canonical(value: &Json) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Json, out: &mut String) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                // Integral floats in integer range print like the integer they equal.
                if f.fract() == 0.0 && f >= -(2f64.powi(63)) && f < 2f64.powi(64) {
                    out.push_str(&(f as i128).to_string());
                } else {
                    out.push_str(&format!("{f:?}"));
                }
            }
        }
        Json::String(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        Json::Array(items) => {
            out.push('[');
            for item in items {
                write_canonical(item, out);
                out.push(',');
            }
            out.push(']');
        }
        Json::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for k in keys {
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                if let Some(v) = map.get(k) {
                    write_canonical(v, out);
                }
                out.push(',');
            }
            out.push('}');
        }
    }
}
