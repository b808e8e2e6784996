//! A small, defensive YAML front end: saphyr-parser's event stream turned into a located node tree.
//!
//! Specs come from users and CI, so this layer assumes hostile input. Every resource it spends is
//! bounded before the schema layer sees anything:
//!
//! * nesting depth ([`MAX_DEPTH`]) — checked on every container start *and* alias expansion, so
//!   the later recursive passes over [`Node`] can never overflow the stack;
//! * node count ([`MAX_NODES`]) and scalar bytes ([`MAX_EXPANDED_BYTES`]) — anchors are supported,
//!   but every copy an alias makes (and the snapshot an anchor keeps) is charged to these budgets,
//!   so "billion laughs" documents stop after a bounded amount of work;
//! * saphyr-parser's pull API (`next_event`) is an explicit state machine, not recursion, and its
//!   scanner produces tokens lazily, so an error at nesting level 65 stops the scan right there
//!   instead of after reading ten thousand `[`. (Its own `load` helper recurses and asserts, so it
//!   is deliberately not used.)
//!
//! Scalars are resolved with the YAML 1.2 core schema; quoted and block scalars are always strings.
//! Only the core-schema tags are accepted.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Tag};

use super::Span;

/// Deepest nesting of lists/mappings accepted.
pub const MAX_DEPTH: usize = 64;
/// Most nodes (scalars, lists, mappings, keys included) a document may produce, counting the copies
/// made by anchors and aliases.
pub const MAX_NODES: usize = 100_000;
/// Most scalar bytes a document may produce, counting alias copies: stops a long string repeated by
/// aliases from blowing up memory while staying under [`MAX_NODES`].
pub const MAX_EXPANDED_BYTES: usize = 4 << 20;

const CORE_TAG_PREFIX: &str = "tag:yaml.org,2002:";

/// A resolved scalar value. Strings keep their text in [`Scalar::text`].
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// Always within `i64::MIN..=u64::MAX`, so it converts losslessly to a JSON number.
    Int(i128),
    /// May be infinite or NaN (`.inf`, `.nan`, `1e999`): callers that need finite numbers check.
    Float(f64),
    Str,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scalar {
    /// The scalar's content as written (quotes removed, escapes applied).
    pub text: String,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Scalar(Scalar),
    Seq(Vec<Node>),
    /// Keys are always string scalars and unique (checked while building).
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub span: Span,
}

impl Node {
    /// The string value of a string scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar(Scalar {
                text,
                value: Value::Str,
            }) => Some(text),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(
            &self.kind,
            Kind::Scalar(Scalar {
                value: Value::Null,
                ..
            })
        )
    }

    /// A short description of the node for "found …" in error messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Scalar(s) => match s.value {
                Value::Null => "null".to_string(),
                Value::Str => format!("the string \"{}\"", abbreviate(&s.text)),
                // Numbers and booleans are shown as written, so `1e3` stays `1e3`.
                _ => abbreviate(&s.text),
            },
            Kind::Seq(_) => "a list".to_string(),
            Kind::Map(_) => "a mapping".to_string(),
        }
    }
}

/// Keeps error messages one line long whatever the user wrote.
pub fn abbreviate(s: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// A YAML-level error; every one has a location.
#[derive(Clone, Debug, PartialEq)]
pub struct YamlError {
    pub span: Span,
    pub message: String,
}

fn err<T>(span: Span, message: impl Into<String>) -> Result<T, YamlError> {
    Err(YamlError {
        span,
        message: message.into(),
    })
}

fn span_of(marker: &saphyr_parser::Marker) -> Span {
    // saphyr's columns are 0-based; ours, like editors', are 1-based.
    Span {
        line: marker.line(),
        col: marker.col() + 1,
    }
}

/// Parses exactly one YAML document into a node tree. `Ok(None)` means the stream holds no
/// document at all (empty, or only comments/whitespace).
pub fn parse(text: &str) -> Result<Option<Node>, YamlError> {
    check_printable(text)?;
    // The event loop below neither recurses nor indexes unchecked, so a panic here would be a
    // parser bug; catching it turns such a bug into an ordinary error rather than a crash of the
    // whole runner. The default hook still prints it, which is what we want for a bug.
    match std::panic::catch_unwind(|| Builder::default().run(text)) {
        Ok(result) => result,
        Err(_) => err(
            Span { line: 1, col: 1 },
            "internal error: the YAML parser panicked on this file",
        ),
    }
}

/// Rejects characters YAML forbids (C0/C1 controls other than tab/newline/CR, DEL, U+FFFE/FFFF)
/// up front, with a precise location, rather than relying on each scanner path to catch them.
fn check_printable(text: &str) -> Result<(), YamlError> {
    let mut line = 1;
    let mut col = 1;
    for c in text.chars() {
        let bad = match c {
            '\t' | '\n' | '\r' | '\u{85}' => false,
            '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{fffe}' | '\u{ffff}' => true,
            _ => false,
        };
        if bad {
            return err(
                Span { line, col },
                format!(
                    "control character U+{:04X} is not allowed in a spec",
                    c as u32
                ),
            );
        }
        if c == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Default)]
struct Stats {
    nodes: usize,
    depth: usize,
    bytes: usize,
}

enum Open {
    Seq(Vec<Node>),
    Map {
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
        /// Key → where it was first written, for duplicate detection in O(1) per key.
        seen: HashMap<String, Span>,
    },
}

struct Frame {
    open: Open,
    span: Span,
    anchor: usize,
    stats: Stats,
}

struct Anchored {
    node: Node,
    stats: Stats,
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Anchored>,
    nodes: usize,
    bytes: usize,
    documents: usize,
    root: Option<Node>,
}

impl Builder {
    fn run(mut self, text: &str) -> Result<Option<Node>, YamlError> {
        let mut parser = Parser::new_from_str(text);
        loop {
            let (event, span) = match parser.next_event() {
                None => break,
                Some(Ok(ev)) => ev,
                Some(Err(e)) => {
                    // saphyr caps flow nesting at 255 and may hit that cap while looking ahead,
                    // before our own (lower) depth check sees the container events.
                    let message = if e.info() == "recursion limit exceeded" {
                        format!("nesting is deeper than {MAX_DEPTH} levels")
                    } else {
                        format!("YAML syntax error: {}", e.info())
                    };
                    return err(span_of(e.marker()), message);
                }
            };
            let at = span_of(&span.start);
            match event {
                Event::StreamEnd => break,
                Event::Nothing | Event::StreamStart | Event::DocumentEnd => {}
                Event::DocumentStart(_) => {
                    self.documents += 1;
                    if self.documents > 1 {
                        return err(
                            at,
                            "a spec must be a single YAML document, but a second document starts here",
                        );
                    }
                }
                Event::Alias(id) => self.alias(id, at)?,
                Event::Scalar(text, style, anchor, tag) => {
                    let scalar = resolve_scalar(&text, style, tag.as_deref(), at)?;
                    let bytes = scalar.text.len();
                    self.charge(1, bytes, at)?;
                    let node = Node {
                        kind: Kind::Scalar(scalar),
                        span: at,
                    };
                    self.complete(
                        node,
                        Stats {
                            nodes: 1,
                            depth: 0,
                            bytes,
                        },
                        anchor,
                    )?;
                }
                Event::SequenceStart(anchor, tag) => {
                    check_container_tag(tag.as_deref(), "seq", "a list", at)?;
                    self.open(Open::Seq(Vec::new()), anchor, at)?;
                }
                Event::MappingStart(anchor, tag) => {
                    check_container_tag(tag.as_deref(), "map", "a mapping", at)?;
                    let open = Open::Map {
                        entries: Vec::new(),
                        pending_key: None,
                        seen: HashMap::new(),
                    };
                    self.open(open, anchor, at)?;
                }
                Event::SequenceEnd | Event::MappingEnd => self.close(at)?,
            }
        }
        if !self.stack.is_empty() {
            // The parser reports unterminated collections itself; this only guards our invariant.
            return err(
                Span { line: 1, col: 1 },
                "unexpected end of the YAML stream",
            );
        }
        Ok(self.root)
    }

    fn charge(&mut self, nodes: usize, bytes: usize, at: Span) -> Result<(), YamlError> {
        self.nodes = self.nodes.saturating_add(nodes);
        self.bytes = self.bytes.saturating_add(bytes);
        if self.nodes > MAX_NODES {
            return err(
                at,
                format!(
                    "the document has more than {MAX_NODES} nodes (copies made by aliases included); \
                     a spec should be far smaller"
                ),
            );
        }
        if self.bytes > MAX_EXPANDED_BYTES {
            return err(
                at,
                format!(
                    "the document's text expands to more than {} MiB (copies made by aliases included)",
                    MAX_EXPANDED_BYTES >> 20
                ),
            );
        }
        Ok(())
    }

    fn open(&mut self, open: Open, anchor: usize, at: Span) -> Result<(), YamlError> {
        if self.stack.len() >= MAX_DEPTH {
            return err(at, format!("nesting is deeper than {MAX_DEPTH} levels"));
        }
        self.charge(1, 0, at)?;
        self.stack.push(Frame {
            open,
            span: at,
            anchor,
            stats: Stats {
                nodes: 1,
                depth: 1,
                bytes: 0,
            },
        });
        Ok(())
    }

    fn close(&mut self, at: Span) -> Result<(), YamlError> {
        let Some(frame) = self.stack.pop() else {
            return err(at, "unexpected end of a collection");
        };
        let kind = match frame.open {
            Open::Seq(items) => Kind::Seq(items),
            Open::Map {
                entries,
                pending_key: None,
                ..
            } => Kind::Map(entries),
            Open::Map {
                pending_key: Some(key),
                ..
            } => {
                // saphyr always emits a value (possibly an empty scalar) after a key.
                return err(key.span, "mapping key without a value");
            }
        };
        self.complete(
            Node {
                kind,
                span: frame.span,
            },
            frame.stats,
            frame.anchor,
        )
    }

    fn alias(&mut self, id: usize, at: Span) -> Result<(), YamlError> {
        let Some(anchored) = self.anchors.get(&id) else {
            // saphyr rejects undefined anchors; an id without a finished node means the alias sits
            // inside the very node its anchor names, which would be an infinite structure.
            return err(
                at,
                "this alias refers to a node that contains it (recursive alias)",
            );
        };
        let stats = anchored.stats;
        if self.stack.len() + stats.depth > MAX_DEPTH {
            return err(
                at,
                format!("expanding this alias nests deeper than {MAX_DEPTH} levels"),
            );
        }
        // Charge before cloning so an alias bomb never allocates past the budget.
        self.charge(stats.nodes, stats.bytes, at)?;
        let node = self.anchors.get(&id).map(|a| a.node.clone());
        match node {
            Some(node) => self.complete(node, stats, 0),
            None => err(at, "this alias refers to an unknown anchor"),
        }
    }

    fn complete(&mut self, node: Node, stats: Stats, anchor: usize) -> Result<(), YamlError> {
        if anchor != 0 {
            // The snapshot is a real copy in memory, so it is charged like an alias expansion.
            self.charge(stats.nodes, stats.bytes, node.span)?;
            self.anchors.insert(
                anchor,
                Anchored {
                    node: node.clone(),
                    stats,
                },
            );
        }
        let Some(parent) = self.stack.last_mut() else {
            if self.root.is_some() {
                return err(node.span, "a spec must be a single YAML document");
            }
            self.root = Some(node);
            return Ok(());
        };
        parent.stats.nodes = parent.stats.nodes.saturating_add(stats.nodes);
        parent.stats.bytes = parent.stats.bytes.saturating_add(stats.bytes);
        parent.stats.depth = parent.stats.depth.max(stats.depth + 1);
        match &mut parent.open {
            Open::Seq(items) => items.push(node),
            Open::Map {
                entries,
                pending_key,
                seen,
            } => match pending_key.take() {
                Some(key) => entries.push((key, node)),
                None => {
                    let name = key_name(&node)?;
                    if let Some(first) = seen.get(name) {
                        return err(
                            node.span,
                            format!(
                                "duplicate key `{}` (first defined at line {}, column {})",
                                abbreviate(name),
                                first.line,
                                first.col
                            ),
                        );
                    }
                    seen.insert(name.to_string(), node.span);
                    *pending_key = Some(node);
                }
            },
        }
        Ok(())
    }
}

/// Mapping keys must be strings: specs map onto JSON-like data, and a key like `1` or `true` is
/// far more often a mistake than an intent.
fn key_name(node: &Node) -> Result<&str, YamlError> {
    match &node.kind {
        Kind::Scalar(Scalar {
            text,
            value: Value::Str,
        }) => {
            if text == "<<" {
                return err(
                    node.span,
                    "merge keys (`<<`) are not supported; repeat the keys, or alias a whole value",
                );
            }
            Ok(text)
        }
        Kind::Scalar(Scalar {
            value: Value::Null, ..
        }) => err(
            node.span,
            "mapping keys must be strings, found an empty (null) key",
        ),
        Kind::Scalar(Scalar { text, .. }) => err(
            node.span,
            format!(
                "mapping keys must be strings, found `{}` (quote it to use it as a string)",
                abbreviate(text)
            ),
        ),
        Kind::Seq(_) | Kind::Map(_) => err(
            node.span,
            format!("mapping keys must be strings, found {}", node.describe()),
        ),
    }
}

/// The suffix of a core-schema tag (`str`, `int`, …), or an error for any other tag.
fn core_tag(tag: &Tag, at: Span) -> Result<String, YamlError> {
    let full = format!("{}{}", tag.handle, tag.suffix);
    match full.strip_prefix(CORE_TAG_PREFIX) {
        Some(suffix @ ("str" | "int" | "float" | "bool" | "null" | "seq" | "map")) => {
            Ok(suffix.to_string())
        }
        _ => {
            // Shown the way it is usually written rather than in saphyr's resolved form.
            let shown = match full.strip_prefix(CORE_TAG_PREFIX) {
                Some(rest) => format!("!!{rest}"),
                None if tag.handle == "!" => format!("!{}", tag.suffix),
                None => format!("!<{full}>"),
            };
            err(
                at,
                format!(
                    "unsupported tag `{}`; only the standard tags !!str, !!int, !!float, !!bool, \
                     !!null, !!seq and !!map are allowed",
                    abbreviate(&shown)
                ),
            )
        }
    }
}

fn check_container_tag(
    tag: Option<&Tag>,
    want: &str,
    what: &str,
    at: Span,
) -> Result<(), YamlError> {
    let Some(tag) = tag else { return Ok(()) };
    let suffix = core_tag(tag, at)?;
    if suffix != want {
        return err(at, format!("tag !!{suffix} cannot be applied to {what}"));
    }
    Ok(())
}

fn resolve_scalar(
    text: &str,
    style: ScalarStyle,
    tag: Option<&Tag>,
    at: Span,
) -> Result<Scalar, YamlError> {
    let text_owned = text.to_string();
    let value = match tag {
        Some(tag) => {
            let suffix = core_tag(tag, at)?;
            let resolved = match suffix.as_str() {
                "str" => Some(Value::Str),
                "null" => resolve_null(text),
                "bool" => resolve_bool(text),
                "int" => resolve_int(text, at)?,
                // A !!float may be written as an integer; its value is still a float.
                "float" => match resolve_float(text) {
                    Some(v) => Some(v),
                    None => resolve_int(text, at)?.map(|v| match v {
                        Value::Int(i) => Value::Float(i as f64),
                        other => other,
                    }),
                },
                _ => {
                    return err(at, format!("tag !!{suffix} cannot be applied to a scalar"));
                }
            };
            match resolved {
                Some(v) => v,
                None => {
                    return err(
                        at,
                        format!("`{}` is not a valid !!{suffix}", abbreviate(text)),
                    );
                }
            }
        }
        None if style != ScalarStyle::Plain => Value::Str,
        None => match resolve_null(text).or_else(|| resolve_bool(text)) {
            Some(v) => v,
            None => match resolve_int(text, at)? {
                Some(v) => v,
                None => resolve_float(text).unwrap_or(Value::Str),
            },
        },
    };
    Ok(Scalar {
        text: text_owned,
        value,
    })
}

fn resolve_null(text: &str) -> Option<Value> {
    matches!(text, "" | "~" | "null" | "Null" | "NULL").then_some(Value::Null)
}

fn resolve_bool(text: &str) -> Option<Value> {
    match text {
        "true" | "True" | "TRUE" => Some(Value::Bool(true)),
        "false" | "False" | "FALSE" => Some(Value::Bool(false)),
        _ => None,
    }
}

/// Core-schema integers: `[-+]?[0-9]+`, `0o[0-7]+`, `0x[0-9a-fA-F]+`. `Ok(None)`: not an integer;
/// `Err`: an integer JSON cannot hold.
fn resolve_int(text: &str, at: Span) -> Result<Option<Value>, YamlError> {
    let (digits, radix, negative) = if let Some(d) = text.strip_prefix("0x") {
        (d, 16, false)
    } else if let Some(d) = text.strip_prefix("0o") {
        (d, 8, false)
    } else if let Some(d) = text.strip_prefix('-') {
        (d, 10, true)
    } else {
        (text.strip_prefix('+').unwrap_or(text), 10, false)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Ok(None);
    }
    // Leading zeros could make the digit string arbitrarily long; strip them before parsing so
    // only the significant digits decide whether the value fits.
    let significant = digits.trim_start_matches('0');
    let magnitude = if significant.is_empty() {
        Some(0u128)
    } else if significant.len() > 40 {
        None
    } else {
        u128::from_str_radix(significant, radix).ok()
    };
    let value = magnitude
        .and_then(|m| i128::try_from(m).ok())
        .map(|m| if negative { -m } else { m });
    match value {
        Some(v) if v >= i128::from(i64::MIN) && v <= i128::from(u64::MAX) => {
            Ok(Some(Value::Int(v)))
        }
        _ => err(
            at,
            format!(
                "integer `{}` is out of range (allowed: {} to {})",
                abbreviate(text),
                i64::MIN,
                u64::MAX
            ),
        ),
    }
}

/// Core-schema floats: `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`, `[-+]?.inf`, `.nan`.
fn resolve_float(text: &str) -> Option<Value> {
    match text {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Some(Value::Float(f64::INFINITY));
        }
        "-.inf" | "-.Inf" | "-.INF" => return Some(Value::Float(f64::NEG_INFINITY)),
        ".nan" | ".NaN" | ".NAN" => return Some(Value::Float(f64::NAN)),
        _ => {}
    }
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = match frac_part {
        None => !int_part.is_empty() && all_digits(int_part),
        Some(f) => all_digits(int_part) && all_digits(f) && !(int_part.is_empty() && f.is_empty()),
    };
    let exponent_ok = match exponent {
        None => true,
        Some(e) => {
            let e = e.strip_prefix(['-', '+']).unwrap_or(e);
            !e.is_empty() && all_digits(e)
        }
    };
    if !mantissa_ok || !exponent_ok {
        return None;
    }
    // The grammar above is a subset of what Rust's parser accepts, so this cannot fail; overflow
    // gives ±inf, which callers reject where numbers must be finite.
    text.parse::<f64>().ok().map(Value::Float)
}
