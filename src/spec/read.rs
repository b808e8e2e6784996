//! Typed, located access to the node tree: every accessor says what it expected and where.

use std::path::Path;

use serde_json::Value as Json;

use super::yaml::{abbreviate, Kind, Node, Scalar, Value};
use super::{Span, SpecError};

/// The file being validated; turns a span and a message into a [`SpecError`].
#[derive(Clone, Copy)]
pub struct Cx<'a> {
    pub path: &'a Path,
}

impl Cx<'_> {
    pub fn err(&self, span: Span, message: impl Into<String>) -> SpecError {
        SpecError::at(self.path, span, message)
    }

    /// "expected {what} for {field}, found {node}" at the node.
    pub fn expected(&self, node: &Node, what: &str, field: &str) -> SpecError {
        self.err(
            node.span,
            format!("expected {what} for {field}, found {}", node.describe()),
        )
    }
}

/// A parameter's value as JSON. Recursion is bounded by the YAML layer's depth limit.
pub fn as_json(cx: Cx, name: &str, node: &Node) -> Result<Json, SpecError> {
    Ok(match &node.kind {
        Kind::Scalar(Scalar { text, value }) => match value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => match (i64::try_from(*i), u64::try_from(*i)) {
                (Ok(v), _) => Json::from(v),
                (_, Ok(v)) => Json::from(v),
                // The YAML layer only produces integers in i64::MIN..=u64::MAX.
                _ => {
                    return Err(cx.err(
                        node.span,
                        format!("integer out of range in parameter `{name}`"),
                    ))
                }
            },
            Value::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => Json::Number(n),
                None => {
                    return Err(cx.expected(
                        node,
                        "a finite number",
                        &format!("parameter `{name}`"),
                    ))
                }
            },
            Value::Str => Json::String(text.clone()),
        },
        Kind::Seq(items) => Json::Array(
            items
                .iter()
                .map(|i| as_json(cx, name, i))
                .collect::<Result<_, _>>()?,
        ),
        Kind::Map(entries) => {
            let mut map = serde_json::Map::new();
            for (k, v) in entries {
                map.insert(
                    k.as_str().unwrap_or_default().to_string(),
                    as_json(cx, name, v)?,
                );
            }
            Json::Object(map)
        }
    })
}

/// A mapping with a fixed set of keys.
pub struct Fields<'n> {
    node: &'n Node,
    entries: &'n [(Node, Node)],
    /// Dotted location used in messages, e.g. `certify` or `backbones.resnet20`.
    pub field: String,
}

/// Checks `node` is a mapping whose keys are all in `allowed` (the order is the one shown to users).
pub fn fields<'n>(
    cx: Cx,
    node: &'n Node,
    field: &str,
    allowed: &[&str],
) -> Result<Fields<'n>, SpecError> {
    let entries = as_map(cx, node, field)?;
    for (key, _) in entries {
        let name = key.as_str().unwrap_or_default();
        if !allowed.contains(&name) {
            let place = if field.is_empty() {
                "at the top level".to_string()
            } else {
                format!("in {field}")
            };
            return Err(cx.err(
                key.span,
                format!(
                    "unknown key `{}` {place}; expected one of: {}{}",
                    abbreviate(name),
                    allowed.join(", "),
                    did_you_mean(name, allowed.iter().copied())
                ),
            ));
        }
    }
    Ok(Fields {
        node,
        entries,
        field: field.to_string(),
    })
}

impl<'n> Fields<'n> {
    pub fn span(&self) -> Span {
        self.node.span
    }

    /// The dotted name of a key, for messages.
    pub fn name(&self, key: &str) -> String {
        if self.field.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.field)
        }
    }

    /// The value of an optional key; `key: null` (or `key:` with nothing after it) counts as
    /// absent, so a section can be left in the file with all of its entries commented out.
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    /// Where `key` itself is written, if present: whole-section errors point there.
    pub fn key_span(&self, key: &str) -> Option<Span> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, _)| k.span)
    }

    /// The value of a required key (which may still be null: the type check reports that).
    pub fn required(&self, cx: Cx, key: &str) -> Result<&'n Node, SpecError> {
        match self.entries.iter().find(|(k, _)| k.as_str() == Some(key)) {
            Some((_, v)) => Ok(v),
            None => {
                let place = if self.field.is_empty() {
                    "at the top level of the spec".to_string()
                } else {
                    format!("in {}", self.field)
                };
                Err(cx.err(
                    self.node.span,
                    format!("missing required key `{key}` {place}"),
                ))
            }
        }
    }
}

pub fn as_map<'n>(cx: Cx, node: &'n Node, field: &str) -> Result<&'n [(Node, Node)], SpecError> {
    match &node.kind {
        Kind::Map(entries) => Ok(entries),
        _ => {
            let field = if field.is_empty() {
                "the top level of the spec"
            } else {
                field
            };
            Err(cx.expected(node, "a mapping", field))
        }
    }
}

pub fn as_seq<'n>(
    cx: Cx,
    node: &'n Node,
    what: &str,
    field: &str,
) -> Result<&'n [Node], SpecError> {
    match &node.kind {
        Kind::Seq(items) => Ok(items),
        _ => Err(cx.expected(node, what, field)),
    }
}

pub fn as_str<'n>(cx: Cx, node: &'n Node, field: &str) -> Result<&'n str, SpecError> {
    node.as_str()
        .ok_or_else(|| cx.expected(node, "a string", field))
}

/// An integer in `min..=max`.
pub fn as_int(cx: Cx, node: &Node, field: &str, min: u64, max: u64) -> Result<u64, SpecError> {
    let what = if max == u64::MAX {
        format!("an integer ≥ {min}")
    } else {
        format!("an integer from {min} to {max}")
    };
    match &node.kind {
        Kind::Scalar(Scalar {
            value: Value::Int(i),
            ..
        }) => match u64::try_from(*i) {
            Ok(v) if v >= min && v <= max => Ok(v),
            _ => Err(cx.expected(node, &what, field)),
        },
        _ => Err(cx.expected(node, &what, field)),
    }
}

/// Any finite number, integers included.
pub fn as_number(node: &Node) -> Option<f64> {
    match &node.kind {
        Kind::Scalar(Scalar {
            value: Value::Int(i),
            ..
        }) => Some(*i as f64),
        Kind::Scalar(Scalar {
            value: Value::Float(f),
            ..
        }) if f.is_finite() => Some(*f),
        _ => None,
    }
}

/// A name usable as a file or directory name on every platform and in shell commands without
/// quoting: `[A-Za-z0-9_.-]+`, not `.` or `..`, at most 100 characters.
pub fn check_name(cx: Cx, node: &Node, field: &str) -> Result<String, SpecError> {
    let what = "a name made of letters, digits, `_`, `.` and `-`";
    let name = node
        .as_str()
        .ok_or_else(|| cx.expected(node, what, field))?;
    let charset_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !charset_ok || name == "." || name == ".." || name.len() > 100 {
        return Err(cx.err(
            node.span,
            format!(
                "expected {what} (not `.` or `..`, at most 100 characters) for {field}, found {}",
                node.describe()
            ),
        ));
    }
    Ok(name.to_string())
}

/// Names joined with ", ", at most 20 of them: a hostile spec can define thousands.
pub fn join_names<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    const SHOWN: usize = 20;
    let mut names = names.into_iter();
    let mut out: Vec<String> = names.by_ref().take(SHOWN).map(abbreviate).collect();
    let rest = names.count();
    if rest > 0 {
        out.push(format!("… and {rest} more"));
    }
    out.join(", ")
}

/// `; did you mean `x`?` for the closest candidate within a small edit distance, else "".
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    // Long inputs would make the quadratic distance costly and are never typos of short keys.
    if name.len() > 64 {
        return String::new();
    }
    // Bounded so an error about one of thousands of names stays cheap.
    let best = candidates
        .into_iter()
        .take(1000)
        .filter(|c| c.len() <= 64)
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d > 0 && *d <= (c.len() / 3).max(1))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((_, c)) => format!(" (did you mean `{c}`?)"),
        None => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("sigm", "sigma"), 1);
        assert_eq!(edit_distance("certfy", "certify"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "abc"), 0);
    }

    #[test]
    fn suggestions_only_for_close_names() {
        assert_eq!(
            did_you_mean("certfy", ["name", "certify"]),
            " (did you mean `certify`?)"
        );
        assert_eq!(did_you_mean("zzzzzz", ["name", "certify"]), "");
    }
}
